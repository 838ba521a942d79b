"""Test-only: events Dagster records that a test needs without the real thing happening: a run
that planned an asset check and never ran it (a crash, a cancelled run, a backfill refused by
another's lease), as Dagster records it at run start; a run worker reporting its pid; a
materialisation at a given instant."""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationPlanned,
)
from dagster._core.events import (
    DagsterEvent,
    DagsterEventType,
    EngineEventData,
    StepMaterializationData,
)
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


def report_materialization(
    instance: dg.DagsterInstance,
    event: dg.AssetMaterialization,
    *,
    at: float | None = None,
    run_id: str | None = None,
    job_name: str = "upgrade",
) -> None:
    """`event` recorded at time `at` (default: now), by run `run_id` (default: a new run id; ""
    for none): the public report_runless_asset_event always stamps it now, and a test of a rule
    on timestamps needs two events at one instant."""
    instance.report_dagster_event(
        DagsterEvent(
            event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
            event_specific_data=StepMaterializationData(event),
            job_name=job_name,
        ),
        run_id=make_new_run_id() if run_id is None else run_id,
        timestamp=at,
    )
