"""`make scale-check`'s code on 20,000 items: benchmarks/system/scale_check.py's `run`, the real
graph (in process) on the tiny preset with a gallery generated from scikit-learn's digits (its
models train in seconds), then what the result must hold whatever the machine's speed: no timing
is asserted. About 1.5 minutes on 2 cores."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from benchmarks.common import write_results
from benchmarks.system import scale_check
from fct_assets.upgrade.report import markdown_table, recorded_report

ITEMS, QUERIES, INGEST, SEARCHES = 20_000, 2_000, 500, 100
COST = ("wall_s", "cpu_s", "peak_rss_mb")


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    scratch = tmp_path_factory.mktemp("scale") / "scratch"
    result = scale_check.run(
        ITEMS,
        scratch,
        dataset="digits",
        preset="tiny",
        queries=QUERIES,
        ingest=INGEST,
        searches=SEARCHES,
        # One process: ~15 step processes would each import torch and Dagster again (2 more
        # minutes on 2 cores); the steps' code is the same.
        executor="in_process",
        say=lambda *_: None,
    )
    return scratch, result


@pytest.mark.slow
def test_every_table_holds_the_gallery_and_the_ingested_items(checked):
    _, result = checked
    assert result["dataset"] == f"digits-augmented:{ITEMS}"
    assert result["executor"] == "in_process"
    assert result["distinct_images"] == {"rows": ITEMS, "distinct": ITEMS}
    assert "20,000 items from the 1,257 training images" in result["gallery_made"]
    tables = result["tables"]
    assert tables["gallery_store"]["rows"] == tables["gallery_v2"]["rows"] == ITEMS + INGEST
    assert tables["deployments"]["rows"] == 2  # the promotion, the ingest's advance
    assert tables["_writers"]["rows"] == 0  # every lease given back
    assert all(t["disk_mb"] > 0 for t in tables.values())
    assert result["backfill"]["rows"] == ITEMS and result["backfill"]["ann_index"] == "built"
    ingest = result["ingest"]
    assert (ingest["files"], ingest["added_to_store"], ingest["added_to_table"]) == (
        INGEST,
        INGEST,
        INGEST,
    )
    assert ingest["quarantined"] == 0 and ingest["table"] == "gallery_v2"
    assert result["promotion"]["table"] == "gallery_v2"


@pytest.mark.slow
def test_the_evaluation_sampled_its_queries_and_says_so(checked):
    scratch, result = checked
    e = result["evaluation"]
    assert (e["gallery_items"], e["queries"], e["query_seed"], e["sub_gallery"]) == (
        ITEMS,
        QUERIES,
        0,
        QUERIES,
    )
    assert set(e["cases_ci95"]) == {"old/old", "new/h(old)", "new/gallery_v2"}
    for case, ci in e["cases_ci95"].items():
        for metric in ("top1", "mAP"):
            assert ci[metric]["low"] <= ci[metric]["estimate"] <= ci[metric]["high"], case
            assert ci[metric]["estimate"] == pytest.approx(e["cases"][case][metric], abs=0.01)
    # The report itself, as the instance recorded it, names the sample and the sub-gallery.
    instance = dg.DagsterInstance.from_config(str(scratch / "dagster_home"))
    report = recorded_report(instance, "v2")
    text = markdown_table(report, include_plot=False)
    assert f"{QUERIES} sampled queries against all {ITEMS} items" in text
    assert f"sub-gallery of the {QUERIES} sampled items" in text


@pytest.mark.slow
def test_search_recall_against_exact_and_the_recorded_costs(checked, tmp_path):
    _, result = checked
    search = result["search"]
    assert (search["searches"], search["rows"]) == (SEARCHES, ITEMS + INGEST)
    assert search["ann"]["nprobes"] is not None  # the contract names the index's parameters
    assert search["flat"]["recall_at_10"] == 1.0  # LanceDB's flat search is exact
    assert 0.0 <= search["index"]["recall_at_10"] <= 1.0
    for kind in ("index", "flat"):
        assert 0 < search[kind]["p50_ms"] <= search[kind]["p99_ms"]
    steps = result["steps"]
    assert set(steps) == {*scale_check.BASE, *scale_check.UPGRADE, "ingested_batch"}
    for name, cost in steps.items():
        assert all(isinstance(cost[k], float) and cost[k] >= 0 for k in COST), name
    assert set(result["backfill_ops"]) == {"plan", "shard_0", "publish"}
    assert set(result["seconds_per_million_items"]) == {
        "gallery_store",
        "transformation",
        "backfilled_gallery",
        "eval_report",
    }
    assert [t["target"].split(" (")[0] for t in result["targets"]] == [
        "upgrade from new_model done to promoted",
        "peak RSS of any step",
        "backfilled_gallery end to end",
        f"ingest of {INGEST} items",
        "search p50 with the index",
    ]
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    # The results as `make scale-check` writes them.
    result = {**result, "seconds": 1.0, "machine": "m", "load_average": "0", "command": "c"}
    path = write_results("scale_check", result, scale_check.markdown(result), tmp_path)
    assert json.loads(path.read_text())["items"] == ITEMS
    text = (tmp_path / "scale_check.md").read_text()
    assert f"Distinct stored images: {ITEMS:,} of {ITEMS:,}" in text
    assert f"{QUERIES:,} queries (seed 0) against all {ITEMS:,} items" in text
    assert "| gallery_store | 20,500 |" in text
    assert scale_check.table(result).splitlines()[0].startswith("target")
