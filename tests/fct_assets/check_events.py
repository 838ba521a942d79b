"""Test-only: events Dagster records that a test needs without the real thing happening: a run
that planned an asset check and never ran it (a crash, a cancelled run, a backfill refused by
another's lease), as Dagster records it at run start; a run worker reporting its pid."""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationPlanned,
)
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.utils import make_new_run_id


def report_planned_check(
    instance: dg.DagsterInstance,
    asset: str,
    check: str,
    partitions_def: dg.PartitionsDefinition,
    partition: str,
    job_name: str = "verify",
) -> str:
    """A planned evaluation of `asset:check` on one partition, by a run of its own; its run id."""
    run_id = make_new_run_id()
    instance.report_dagster_event(
        DagsterEvent(
            event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED.value,
            event_specific_data=AssetCheckEvaluationPlanned(
                asset_key=dg.AssetKey(asset),
                check_name=check,
                partitions_subset=partitions_def.empty_subset().with_partition_keys([partition]),
            ),
            job_name=job_name,
        ),
        run_id=run_id,
    )
    return run_id


def report_run_worker(instance: dg.DagsterInstance, run: dg.DagsterRun, pid: int) -> None:
    """The engine event a run worker writes first (dagster/_grpc/impl.py), naming its pid."""
    instance.report_engine_event(
        f"Started process for run (pid: {pid}).", run, EngineEventData.in_process(pid)
    )
