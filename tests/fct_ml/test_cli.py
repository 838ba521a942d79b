"""`fct reproduce` end to end on digits with the tiny preset (in-process, via fct_ml.cli.main).

The tiny run takes ~10-15 s on the 2-core CPU (more under load). It runs once with seed 0, in
the session fixture `tiny_run` (conftest.py) that tests/fct_ml/test_reproduce.py shares.
Determinism (same seed twice, same metrics) is checked through the same CLI in
tests/reliability/test_faults.py.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest

from fct_ml.cli import main

CASES = (
    "old/old",
    "new/new",
    "new/h(old)",
    "new/h(old) no side-info",
    "new/old",
)
ORDERS = ("random", "sigma", "true_error")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_reproduce_exits_zero_and_writes_json(tiny_run) -> None:
    run = tiny_run
    assert run["code"] == 0, run["stderr"]
    assert run["result"] is not None
    assert f"wrote {run['out']}" in run["stdout"]
    assert run["stderr"] == ""  # --quiet: no progress, no log lines


@pytest.mark.slow
def test_reproduce_result_json(tiny_run) -> None:
    r = tiny_run["result"]
    for key in (
        "dataset",
        "preset",
        "seed",
        "old_classes",
        "cases",
        "cases_unseen_classes",
        "backfill_auc",
        "gap_closed",
        "timings_s",
    ):
        assert key in r, key
    assert r["dataset"] == "digits"
    assert r["preset"] == "tiny"
    assert r["seed"] == 0
    assert r["old_classes"] == [0, 1, 2, 3, 4]  # digits' default split

    for case in CASES:
        assert case in r["cases"], case
    for case, metrics in r["cases"].items():
        assert set(metrics) == {"top1", "top5", "mAP"}, case
        for name, value in metrics.items():
            assert 0.0 <= value <= 100.0, (case, name, value)
        assert metrics["top1"] <= metrics["top5"], case
    for case in CASES:
        unseen = r["cases_unseen_classes"][case]
        assert set(unseen) == {"top1", "top5", "mAP"}
        assert all(0.0 <= v <= 100.0 for v in unseen.values())

    assert set(r["backfill_auc"]) == set(ORDERS)
    for order in ORDERS:
        assert set(r["backfill_auc"][order]) >= {"top1", "mAP"}
        assert all(0.0 <= r["backfill_auc"][order][m] <= 100.0 for m in ("top1", "mAP"))

    assert set(r["gap_closed"]) == {"top1", "mAP"}
    for value in r[
        "gap_closed"
    ].values():  # a percentage, or null when old == new (NaN in JSON -> null)
        assert value is None or math.isfinite(value)

    assert r["timings_s"], "no stage timings"
    assert all(isinstance(v, (int, float)) and v >= 0 for v in r["timings_s"].values())


@pytest.mark.slow
def test_reproduce_prints_the_table(tiny_run) -> None:
    stdout = tiny_run["stdout"]
    assert "new/h(old)" in stdout
    assert "gap closed" in stdout


def test_old_classes_out_of_range_exits_1(capsys) -> None:
    code = main(
        ["reproduce", "--dataset", "digits", "--preset", "tiny", "--old-classes", "0-99", "--quiet"]
    )
    assert code == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err
    assert err.startswith("fct: error:")
    assert "old_classes" in err and "99" in err
    assert "Traceback" not in captured.err


def test_unknown_dataset_exits_1(capsys) -> None:
    code = main(["reproduce", "--dataset", "nope", "--preset", "tiny", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("fct: error:")
    assert "'nope'" in err and "digits" in err  # names the culprit and what is known
