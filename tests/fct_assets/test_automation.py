"""Automation: FCT_AUTO_UPGRADE, the automation sensor and the daily schedule, ticked for real
against the shared instance (each test sets up the versions it needs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from fct_assets.lib import storage
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import current, promote, rollback
from fct_assets.upgrade.automation import auto_upgrade_status


@pytest.mark.parametrize(
    "value, status",
    [
        (None, dg.DefaultSensorStatus.RUNNING),
        ("on", dg.DefaultSensorStatus.RUNNING),
        ("OFF", dg.DefaultSensorStatus.STOPPED),
        (" off ", dg.DefaultSensorStatus.STOPPED),
    ],
)
def test_auto_upgrade_setting(monkeypatch, value, status):
    if value is None:
        monkeypatch.delenv("FCT_AUTO_UPGRADE", raising=False)
    else:
        monkeypatch.setenv("FCT_AUTO_UPGRADE", value)
    assert auto_upgrade_status() == status


def test_auto_upgrade_refuses_other_values(monkeypatch):
    monkeypatch.setenv("FCT_AUTO_UPGRADE", "yes")
    with pytest.raises(ValueError, match=r"^FCT_AUTO_UPGRADE='yes': expected on or off$"):
        auto_upgrade_status()


# ---------------------------------------------------------------- the daily schedule, ticked


def _tick_schedule(env, fct=None):
    """One tick of the real `daily_evaluation` schedule against the env's instance."""
    schedule = env.defs.resolve_schedule_def("daily_evaluation")
    context = dg.build_schedule_context(instance=env.instance, resources={"fct": fct or env.fct})
    return schedule(context)


def test_the_schedule_skips_when_nothing_is_deployed(env, tmp_path):
    # Its own LanceDB folder: no deployment record at all.
    empty = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    tick = _tick_schedule(env, empty)
    assert isinstance(tick, dg.SkipReason)
    assert tick.skip_message == "no version is deployed yet"


def test_the_schedule_evaluates_the_pinned_table_a_rollback_serves(env):
    db = env.fct.connect()
    assert env.upgrade("vsched").success
    promote(env.instance, db, "vsched")
    served = current(db).table_version
    # vsched's table is re-published with half the gallery re-embedded (checked, not promoted),
    # then another version is promoted and rolled back: vsched is served again, at the version
    # promoted first, which is no longer its latest.
    assert env.materialise_table("vsched", reembed_fraction=0.5).success
    latest = db.open_table("gallery_vsched").version
    assert env.upgrade("vsched2").success
    promote(env.instance, db, "vsched2")
    rollback(db)
    assert (current(db).version, current(db).table_version) == ("vsched", served)
    assert latest != served

    request = _tick_schedule(env)
    assert isinstance(request, dg.RunRequest) and request.partition_key == "vsched"
    run = env.defs.resolve_job_def("scheduled_evaluation").execute_in_process(
        instance=env.instance,
        partition_key=request.partition_key,
        run_config=request.run_config,
        tags=request.tags,
    )
    assert run.success
    report = json.loads((env.root / "records" / "eval_report" / "vsched.json").read_text())
    assert (report["table"], report["table_version"]) == ("gallery_vsched", served)
    # The served snapshot was backfilled by transformation only; the latest one is half
    # re-embedded.
    assert report["reembedded"] == 0
    latest_sources = storage.open_pinned(db, "gallery_vsched", latest).to_arrow().column("source")
    assert latest_sources.to_pylist().count("re-embedded") > 0
    # The report names the table version it read, and the served table equals h(old) there.
    markdown = report_markdown(env, "vsched").splitlines()
    heading = next(line for line in markdown if line.startswith("### Evaluation of vsched"))
    assert f"gallery_vsched at LanceDB version {served} " in heading
    assert report["cases"]["new/gallery_vsched"] == report["cases"]["new/h(old)"]


def report_markdown(env, version: str) -> str:
    record = env.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("eval_report"), asset_partitions=[version]),
        limit=1,
    ).records[0]
    return record.asset_materialization.metadata["report"].value


# ---------------------------------------------------------------- the automation sensor, ticked

REPO = Path(__file__).resolve().parents[2]
UPGRADE = ("backfilled_gallery", "eval_report", "new_model", "transformation")


def _tick_sensor(env, version: str, auto_upgrade: str) -> dict:
    """Register `version`, then one daemon tick of the real sensor in a fresh process started
    with FCT_AUTO_UPGRADE=`auto_upgrade` (tests/support/automation_tick.py): {"running",
    "submitted"}. The version is unregistered afterwards (nothing of it was materialised)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.support.automation_tick", version],
            cwd=REPO,
            env={**os.environ, **env.environ(), "FCT_AUTO_UPGRADE": auto_upgrade},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        env.instance.delete_dynamic_partition("model_version", version)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_sensor_requests_exactly_the_new_versions_four_assets(env):
    # One run of the four upgrade assets of the added version: not the base assets, not another
    # version's.
    tick = _tick_sensor(env, "vauto", "on")
    assert tick == {
        "running": True,
        "submitted": [{"assets": list(UPGRADE), "partition": "vauto"}],
    }


def test_the_sensor_requests_nothing_when_auto_upgrade_is_off(env):
    assert _tick_sensor(env, "voff", "off") == {"running": False, "submitted": []}
