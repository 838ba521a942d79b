"""What a step costs (fct_assets.lib.cost), and that every asset of an upgrade records it."""

from __future__ import annotations

import inspect

import dagster as dg
import numpy as np
import pytest

from fct_assets.lib.cost import measure, measured
from fct_assets.lib.event_log import recorded_metadata
from fct_assets.lineage.trace import count_rows_by_source, lineage


def test_peak_rss_is_the_steps_own_not_the_process_high_water_mark():
    before = np.ones(200 * 2**20 // 8)  # 200 MB touched, then freed: the process's peak
    del before
    with measure() as cost:
        small = np.ones(2**20)  # 8 MB
        step = cost()
    del small
    with measure() as cost:
        big = np.ones(100 * 2**20 // 8)  # 100 MB
        bigger = cost()
    del big
    if step.peak_rss_scope == "process":
        pytest.skip("this system refuses to reset the peak RSS (/proc/self/clear_refs)")
    # The first step did not inherit the 200 MB freed before it; the second saw its 100 MB.
    assert bigger.peak_rss_mb - step.peak_rss_mb > 90
    assert bigger.peak_rss_mb < step.peak_rss_mb + 200


def test_measured_adds_the_cost_to_the_outputs_metadata_and_keeps_the_signature():
    def compute(context, x: int) -> dg.Output:
        return dg.Output(x + 1, metadata={"kept": 1})

    wrapped = measured(compute)
    out = wrapped(None, x=1)
    assert out.value == 2 and out.metadata["kept"].value == 1
    assert {"cost/wall_s", "cost/cpu_s", "cost/peak_rss_mb"} <= set(out.metadata)
    assert all(isinstance(out.metadata[f"cost/{k}"].value, float) for k in ("wall_s", "cpu_s"))
    assert list(inspect.signature(wrapped).parameters) == ["context", "x"]
    assert not inspect.isgeneratorfunction(wrapped)


def test_measured_keeps_a_generator_a_generator_and_a_no_op_silent():
    def compute(context, train: bool):
        if train:
            yield dg.Output(3)

    wrapped = measured(compute)
    assert inspect.isgeneratorfunction(wrapped)
    (out,) = list(wrapped(None, train=True))
    assert out.value == 3 and isinstance(out.metadata["cost/cpu_s"].value, float)
    assert list(wrapped(None, train=False)) == []


@pytest.mark.parametrize("asset", ["new_model", "transformation", "eval_report"])
def test_every_upgrade_asset_records_its_cost_as_numbers(env, asset):
    meta = recorded_metadata(env.instance, dg.AssetKey(asset), "v2")
    for key in ("cost/wall_s", "cost/cpu_s", "cost/peak_rss_mb"):
        assert isinstance(meta[key], float) and meta[key] >= 0, key
    assert meta["cost/peak_rss_mb"] > 0


def test_the_backfill_records_each_ops_cost_and_the_row_counts(env):
    meta = recorded_metadata(env.instance, dg.AssetKey("backfilled_gallery"), "v2")
    parts = ("plan", "shard_0", "publish")
    for part in parts:
        assert isinstance(meta[f"cost/{part}_cpu_s"], float), part
    assert meta["cost/cpu_s"] == pytest.approx(
        sum(meta[f"cost/{p}_cpu_s"] for p in parts), abs=1e-3
    )
    # lineage reads the recorded counts; they are the table's, counted again here.
    table = env.fct.connect().open_table("gallery_v2")
    table.checkout(meta["version"])
    assert lineage(env.instance, "v2").rows_by_source == count_rows_by_source(table)
    assert sum(count_rows_by_source(table).values()) == meta["rows"]
