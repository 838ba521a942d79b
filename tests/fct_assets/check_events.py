"""Test-only: record that a run planned an asset check and never ran it (a crash, a cancelled
run, a backfill refused by another's lease), as Dagster records it at run start."""

from __future__ import annotations

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationPlanned,
)
from dagster._core.events import DagsterEvent, DagsterEventType
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
