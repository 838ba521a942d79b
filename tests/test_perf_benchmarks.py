"""The benchmarks' bookkeeping on hand-made inputs: the import breakdown of cli_startup.py, the
slowdowns of thread_budget.py; and system/gpu_check.py's CPU half, run at a tiny size."""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from benchmarks.perf.cli_startup import import_breakdown
from benchmarks.perf.thread_budget import summary
from benchmarks.system import gpu_check
from fct_assets.lib.config import BackfillConfig
from fct_ml.backfill import apply_transformation

IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:    400000 |     400000 |     torch._C
import time:    200000 |     600000 |   torch
import time:      5000 |       5000 |       lance_namespace.api
import time:    300000 |     305000 |     lancedb.db
import time:     10000 |     315000 |   lancedb
import time:     50000 |     50000 | numpy
"""


def test_import_time_is_summed_by_top_level_package():
    assert import_breakdown(IMPORTTIME, top=2) == {
        "torch": 0.6,
        "lancedb": 0.31,
        "(other)": 0.055,  # numpy 0.05, lance_namespace 0.005, _io 0.0001
        "(total)": 0.965,
    }


def _case(epoch_s: float, ingest: bool = True) -> dict:
    case = {"epoch": {"epoch_s": epoch_s, "torch_threads": 1}}
    if ingest:
        case["ingest"] = {"ingest_s": 3.0, "items": 2000, "items_per_s": 666.7}
    return case


def _epoch_and_ingest_cases() -> dict:
    """The four cases of an epoch and an ingest: 20 s / 16 s alone, 30 s / 80 s beside."""
    return {
        "alone": _case(20.0, ingest=False),
        "alone, all cores": _case(16.0, ingest=False),
        "beside": _case(30.0),
        "beside, all cores": _case(80.0),
    }


def test_the_slowdown_is_beside_over_alone_with_the_budget():
    cases = _epoch_and_ingest_cases()
    s = summary(cases)
    assert (s["slowdown"], s["slowdown_vs_all_cores_alone"], s["slowdown_all_cores"]) == (
        1.5,
        1.88,
        5.0,
    )
    assert s["met"] and s["ingest_finished"]
    cases["beside"] = _case(51.0)
    assert not summary(cases)["met"]  # 2.55x


def test_two_epochs_at_once_are_each_judged_against_their_own_budget_alone():
    cases = {
        **_epoch_and_ingest_cases(),
        "beside an epoch": _case(36.0, ingest=False),
        "beside an epoch, all cores": _case(112.0, ingest=False),
    }
    s = summary(cases)
    # By hand: 36 / 20 = 1.8 with the budget; 112 / 16 = 7.0 with a thread per core.
    assert (s["slowdown_beside_epoch"], s["slowdown_beside_epoch_all_cores"]) == (1.8, 7.0)
    del cases["beside an epoch"], cases["beside an epoch, all cores"]
    assert "slowdown_beside_epoch" not in summary(cases)  # an older run's cases: left out


TINY = gpu_check.Sizes(
    h_items=512, h_batch=256, backfill_items=600, train_items=256, train_epochs=2, repeat=1
)


def test_gpu_check_cpu_half_measures_every_figure_and_says_gpu_not_run(tmp_path):
    result = gpu_check.run(cuda=False, cpu_sizes=TINY, out=tmp_path, log=lambda _: None)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written == json.loads(json.dumps(result))  # what it returns is what it wrote
    assert written["complete"] and written["gpu"] == "not run: --cpu-only"
    keys = [row["figure"] for row in written["figures"]]
    assert keys == [
        "h_bf16",
        "backfill_arrays",
        "backfill_arrays_wide",
        "backfill_lancedb",
        "train_new_model",
        "reembed_new_model",
    ]
    for row in written["figures"]:
        assert row["cpu_status"] == "ok", row
        assert isinstance(row["cpu"], float) and math.isfinite(row["cpu"]) and row["cpu"] > 0
        assert row["cuda"] is None and row["cuda_status"] == "not run"
        # a target is judged on CUDA alone: without a GPU it is not run, never met or missed
        assert row["target"] == ("not run" if row["target_cuda_min"] else None)
    cpu = written["cpu"]
    assert cpu["backfill_lancedb"]["items"] == 600
    assert cpu["backfill_arrays"]["relative_error_vs_cpu_fp32"] == 0.0  # fp32 against itself
    assert [g["presets"] for g in cpu["train_new_model"]] == [["demo", "cpu"]]
    assert cpu["train_new_model"][0]["items"] == 256  # one full batch of 256 per epoch
    md = (tmp_path / "gpu_check.md").read_text()
    assert "**GPU: not run: --cpu-only**" in md and "Not measured" not in md


def test_gpu_check_backfill_over_arrays_writes_every_page_as_h_over_the_whole_gallery():
    torch.manual_seed(0)
    h = gpu_check.product_h(torch.device("cpu"))
    old, side = gpu_check.synthetic_gallery(1000, h.config.old_dim, h.config.side_info_dim)
    # pages of 300: 300, 300, 300 and a last one of 100
    embeddings, sigma = gpu_check.backfill_arrays(h, old, side, 300)
    expected, expected_sigma = apply_transformation(
        h, torch.from_numpy(old), torch.from_numpy(side), batch_size=1000
    )
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma, expected_sigma.numpy(), rtol=1e-5, atol=1e-5)


def test_gpu_check_h_is_the_cpu_presets_fastfill_h_and_pages_are_the_products():
    config = gpu_check.product_h(torch.device("cpu")).config
    assert (config.old_dim, config.side_info_dim, config.new_dim) == (128, 128, 128)
    assert (config.branch_width, config.inner_width, config.side_info, config.uncertainty) == (
        256,
        128,
        True,
        True,
    )
    assert gpu_check.ROWS_PER_BATCH == BackfillConfig().rows_per_batch


def test_gpu_check_groups_presets_that_train_the_same_new_model():
    groups = gpu_check.training_groups(("demo", "cpu", "paper"))
    assert [names for names, _, _ in groups] == [["demo", "cpu"], ["paper"]]
    assert [model.arch for _, model, _ in groups] == ["cnn-s", "resnet50"]


def test_gpu_check_judges_targets_on_cuda_and_keeps_failures_apart():
    cnn_s = {"arch": "cnn-s", "embed_dim": 128, "batch_size": 256, "optimizer": "sgd"}
    result = {
        "cuda": {
            "h_bf16": {"value": 12_000_000.0},
            "backfill_arrays": {"value": 999_999.0},
            "backfill_arrays_wide": {"failed": "RuntimeError: CUDA out of memory"},
            "backfill_lancedb": {"not_run": "needs fct's full install"},
            "train_new_model": [
                {"value": 5.0, "presets": ["demo"], **cnn_s},
                {"value": 3.0, "presets": ["paper"], **cnn_s, "arch": "resnet50"},
            ],
        },
        "cpu": {"h_bf16": {"value": 1.0}},
    }
    rows = {row["figure"]: row for row in gpu_check.summarise(result)}
    assert rows["h_bf16"]["target"] == "met"
    assert rows["backfill_arrays"]["target"] == "missed"  # 1 item/s short of 1M
    assert rows["backfill_arrays_wide"]["cuda_status"].startswith("failed: RuntimeError")
    assert rows["backfill_arrays_wide"]["target"] == "not run"
    assert rows["backfill_lancedb"]["cuda_status"] == "not run: needs fct's full install"
    assert rows["train_new_model"]["cuda"] == 3.0  # the slowest group
    assert rows["train_new_model"]["label"] == (
        "new model training (presets: demo: cnn-s 128-d, batch 256, sgd;"
        " paper: resnet50 128-d, batch 256, sgd)"
    )
    assert rows["reembed_new_model"]["cuda_status"] == "not run"
    assert gpu_check.failed({"figures": list(rows.values())})
