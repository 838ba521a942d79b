"""Promotion's guard on a real instance and real LanceDB tables: a version is served only when
every blocking check passed on the very table version that is recorded. Each test upgrades its
own model version, so none depends on another's state or order."""

from __future__ import annotations

import json

import pytest

from fct_assets.lib import storage
from fct_assets.lib.records import CheckResult
from fct_assets.serving import deployment
from fct_assets.serving.deployment import PromotionError, check_results, current, promote

SCHEMA_CHECK = "backfilled_gallery:backfilled_gallery_schema"
REPORT_CHECK = "eval_report:eval_report_expectations"


def _served_versions(db) -> set[str]:
    return {row.version for row in deployment.history(db)}


def _verify(env, version: str):
    """The `verify` job: the version's blocking checks on its tables as they are now."""
    return env.defs.resolve_job_def("verify").execute_in_process(
        instance=env.instance, tags={"dagster/partition": version}, raise_on_error=False
    )


def test_a_version_whose_checks_passed_is_promoted_at_the_checked_table_version(env):
    assert env.upgrade("vpass").success
    db = env.fct.connect()
    results = check_results(env.instance, "vpass")
    assert {k: v.why for k, v in results.items()} == {
        SCHEMA_CHECK: "passed",
        REPORT_CHECK: "passed",
        "eval_report:negative_flip_gate": "passed",
        "eval_report:served_map_gate": "passed",
    }
    table_version = db.open_table("gallery_vpass").version
    assert {v.table_version for v in results.values()} == {table_version}
    row = promote(env.instance, db, "vpass")
    assert (row.version, row.table, row.table_version) == (
        "vpass",
        "gallery_vpass",
        table_version,
    )
    assert current(db).seq == row.seq


def test_no_check_ran_is_refused_as_never_ran(env):
    # A version with no materialisation and no check at all.
    db = env.fct.connect()
    never = CheckResult(passed=False, why="never ran")  # no run, no table version, no run id
    assert set(check_results(env.instance, "vnever").values()) == {never}
    with pytest.raises(PromotionError, match="never ran"):
        promote(env.instance, db, "vnever")
    assert "vnever" not in _served_versions(db)


def test_a_failed_check_is_refused_as_failed_not_as_never_ran(env):
    assert env.upgrade("vfail").success
    db = env.fct.connect()
    # A second writer appends one row after the materialisation: the table's row count and
    # version no longer match the record, and the re-run check fails.
    table = db.open_table("gallery_vfail")
    storage.append_rows(db, "gallery_vfail", table.to_arrow().slice(0, 1))
    verify = _verify(env, "vfail")
    evaluations = {e.check_name: e for e in verify.get_asset_check_evaluations()}
    assert not evaluations["backfilled_gallery_schema"].passed
    results = check_results(env.instance, "vfail")
    assert results[SCHEMA_CHECK].why == "failed"
    assert results[SCHEMA_CHECK].ran_after_latest_materialization
    assert results[REPORT_CHECK].why == "passed"
    with pytest.raises(PromotionError) as refused:
        promote(env.instance, db, "vfail")
    message = str(refused.value)
    assert f"'{SCHEMA_CHECK}': 'failed'" in message
    assert "never ran" not in message and "no checks ran" not in message
    assert "vfail" not in _served_versions(db)


def test_checks_older_than_the_latest_materialisation_are_refused_as_stale(env):
    assert env.upgrade("vstale").success
    db = env.fct.connect()
    # The table is re-published after its checks passed, and its check does not run again.
    assert env.materialise_table("vstale", checks=False).success
    results = check_results(env.instance, "vstale")
    assert results[SCHEMA_CHECK].why == "stale: ran before the latest materialisation"
    assert not results[SCHEMA_CHECK].ran_after_latest_materialization
    with pytest.raises(PromotionError, match=f"'{SCHEMA_CHECK}': 'stale"):
        promote(env.instance, db, "vstale")
    assert "vstale" not in _served_versions(db)


def test_a_rematerialisation_between_the_checks_and_the_record_is_not_promoted(env):
    # Promotion reads the checks, then the table's record. A re-materialisation that lands in
    # between (here: the checks are read, then the table is re-published, then promotion reads
    # the record) publishes a table version no check of this read ran on: it must not be the one
    # recorded as served.
    assert env.upgrade("vrace").success
    db = env.fct.connect()
    checked = db.open_table("gallery_vrace").version  # the version the upgrade's checks read
    results = check_results(env.instance, "vrace")
    assert env.materialise_table("vrace", checks=False).success
    try:
        row = promote(env.instance, db, "vrace", results=results)
    except PromotionError as refused:
        assert "latest materialisation published" in str(refused)
        assert "vrace" not in _served_versions(db)
    else:
        # Recording the checked version would do too; the version no check ran on would not.
        assert row.table_version == checked, row
    assert db.open_table("gallery_vrace").version != checked  # the injection did land


def test_the_report_gate_fails_when_h_is_below_the_old_model_and_blocks_promotion(env):
    assert env.upgrade("vgate").success
    db = env.fct.connect()
    # The eval report as the JSON IO manager stored it, edited so that new/h(old) is below
    # old/old: the great-expectations suite re-run by `verify` must fail on it.
    path = env.root / "records" / "eval_report" / "vgate.json"
    report = json.loads(path.read_text())
    report["cases"]["new/h(old)"]["mAP"] = report["cases"]["old/old"]["mAP"] - 1.0
    path.write_text(json.dumps(report))
    verify = _verify(env, "vgate")
    evaluations = {e.check_name: e for e in verify.get_asset_check_evaluations()}
    gate = evaluations["eval_report_expectations"]
    assert not gate.passed and evaluations["backfilled_gallery_schema"].passed
    failing = gate.metadata["failing_expectations"].value
    assert [f["kwargs"]["column"] for f in failing] == ["fct_minus_old_mAP"]
    with pytest.raises(PromotionError, match=f"'{REPORT_CHECK}': 'failed'"):
        promote(env.instance, db, "vgate")
    assert "vgate" not in _served_versions(db)
