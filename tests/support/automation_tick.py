"""One tick of the real automation sensor, as the Dagster daemon runs it: the code location is
loaded from `fct_assets.definitions` in this fresh process (so FCT_AUTO_UPGRADE is read as at a
deployment's start), and one asset-daemon iteration evaluates the automation sensors that are
running.

    python -m tests.support.automation_tick VERSION

Ticks once (a baseline: the sensor's first evaluation only records the state it starts from),
registers model version VERSION, ticks again once the sensor's minimum interval (30 s) has
passed, and prints as JSON whether the daemon found the sensor running and what the second tick
submitted: {"running": bool, "submitted": [{"assets": [...], "partition": ...} | {"backfill":
id}]}. Runs are queued (the instance's default run coordinator, with no daemon dequeuing) and
deleted afterwards, backfills cancelled, so nothing executes. The instance and storage come from
the environment (tests/support/env.py: Env.environ()).
"""

from __future__ import annotations

import json
import sys
import time

import dagster as dg
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.test_utils import create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.asset_daemon import AssetDaemon

from fct_assets.lib.partitions import add_model_version


def _tick(instance: dg.DagsterInstance, workspace) -> list[dict]:
    """One daemon iteration; what it submitted: runs (then deleted) and backfills (cancelled)."""
    runs_before = {run.run_id for run in instance.get_runs()}
    backfills_before = {b.backfill_id for b in instance.get_backfills()}
    daemon = AssetDaemon(
        settings=instance.get_auto_materialize_settings(), pre_sensor_interval_seconds=0
    )
    daemon._run_iteration_impl(workspace, None, {}, {})
    out = []
    for run in instance.get_runs():
        if run.run_id in runs_before:
            continue
        out.append(
            {
                "assets": sorted(key.to_user_string() for key in run.asset_selection or ()),
                "partition": run.tags.get("dagster/partition"),
            }
        )
        instance.delete_run(run.run_id)
    for backfill in instance.get_backfills():
        if backfill.backfill_id in backfills_before:
            continue
        out.append({"backfill": backfill.backfill_id})
        instance.update_backfill(backfill.with_status(BulkActionStatus.CANCELED))
    return out


def main(version: str) -> None:
    instance = dg.DagsterInstance.get()
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="fct_assets.definitions", attribute="defs")
    )
    with create_test_daemon_workspace_context(
        InProcessWorkspaceLoadTarget(origin), instance
    ) as workspace:
        entry = next(iter(workspace.create_request_context().get_code_location_entries().values()))
        repo = next(iter(entry.code_location.get_repositories().values()))
        sensor = repo.get_sensor("fct_upgrade_automation")
        state = instance.get_instigator_state(sensor.get_remote_origin_id(), sensor.selector_id)
        running = sensor.get_current_instigator_state(state).is_running
        baseline = time.monotonic()
        _tick(instance, workspace)
        add_model_version(instance, version)
        if running:
            time.sleep(max(0.0, baseline + sensor.min_interval_seconds + 1 - time.monotonic()))
        print(json.dumps({"running": running, "submitted": _tick(instance, workspace)}))


if __name__ == "__main__":
    main(sys.argv[1])
