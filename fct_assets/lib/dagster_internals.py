"""The one product module that uses Dagster's private API (`dagster._core`).

Each function here does something the public API does not offer (as of dagster 1.13); the
reason is beside it. Keeping them in one place, each with a test
(tests/fct_assets/test_dagster_internals.py), means a Dagster upgrade that moves one of them
breaks one test here and no code elsewhere. `make lint` (ruff TID251, pyproject) refuses a
private import in any other product file; what only tests need is in
tests/support/dagster_internals.py.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster._core.event_api import PartitionKeyFilter
from dagster._core.events import JobFailureData, RunFailureReason
from dagster._core.storage.asset_check_execution_record import (
    COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES,
)

__all__ = ["latest_check_execution", "launch_refused", "report_run_worker_lost"]


def latest_check_execution(
    instance: dg.DagsterInstance, check_key: dg.AssetCheckKey, partition: str
) -> Any | None:
    """The latest execution record of `check_key` on one partition that has a result, else the
    latest one, or None.

    The public instance API has no per-partition check history; promotion needs the latest
    result for the version being promoted, not for whichever version ran last. A run planned
    the check but never ran it when it failed before (a second backfill refused by the first's
    lease): that record has no result and must not hide the result of the run that did."""
    records = instance.event_log_storage.get_asset_check_execution_history(
        check_key, limit=20, partition_filter=PartitionKeyFilter(key=partition)
    )
    # By status, not by `record.evaluation`: for a planned record that property returns the
    # planned event (cast to an evaluation), so it is never None once a run has started.
    evaluated = [r for r in records if r.status in COMPLETED_ASSET_CHECK_EXECUTION_RECORD_STATUSES]
    return (evaluated or records or [None])[0]


def report_run_worker_lost(instance: dg.DagsterInstance, run: dg.DagsterRun, message: str) -> int:
    """Mark `run` failed because its worker process died (reason UNEXPECTED_TERMINATION), and
    free the pool slots its steps held or waited for; returns how many (claimed + queued).

    The public `report_run_failed` takes the reason only inside `JobFailureData`, a private
    class. Without a reason the run's failure is "unknown"; with it, run retries (which skip a
    run that failed by a step's own error when `retry_on_asset_or_op_failure` is off) retry it,
    and the UI says why it failed. A step killed with its run never releases its claim on a
    pool slot (pool `gpu` has one), so the retry would wait in the queue behind a dead run
    until run monitoring's `free_slots_after_run_end_seconds`; the storage call that frees them
    is what that monitoring calls."""
    instance.report_run_failed(
        run,
        message,
        job_failure_data=JobFailureData(
            error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION
        ),
    )
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return 0
    held = 0
    for key in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(key)
        held += sum(slot.run_id == run.run_id for slot in info.claimed_slots)
        # A claimed slot is also a pending step with an assigned time: count the others.
        held += sum(
            step.run_id == run.run_id and step.assigned_timestamp is None
            for step in info.pending_steps
        )
    storage.free_concurrency_slots_for_run(run.run_id)
    return held


def launch_refused(job_name: str, refusals: list[tuple[tuple[str, ...], Any, str]]) -> Exception:
    """The error a run coordinator raises to refuse a submission as Dagster refuses a config that
    does not fit its types: the GraphQL launch answers `RunConfigValidationInvalid`, one error per
    `(path in the run config, value, one line)`, and the UI shows the lines in its config-error
    dialog, with no stack trace.

    Dagster's config types carry no numeric bounds, and any other error raised while a launch is
    handled (in the code location or in a run coordinator) reaches the UI as a Python error with
    its stack trace. dagster-graphql returns the `error` of a `UserFacingGraphQLError` as the
    mutation's answer; its type and the config error types live in dagster-graphql's private
    schema modules. Outside the webserver (a sensor's submission in the daemon) the same error
    is raised as an ordinary exception: the instance marks the run failed with its line."""
    # Deferred: dagster-graphql's schema takes about a second to import, and only a submission
    # that is refused needs it.
    from dagster._config.stack import EvaluationStackRoot
    from dagster_graphql.implementation.utils import UserFacingGraphQLError
    from dagster_graphql.schema.pipelines.config import (
        GrapheneEvaluationStack,
        GrapheneRunConfigValidationInvalid,
        GrapheneRuntimeMismatchConfigError,
    )

    errors = []
    for path, value, line in refusals:
        stack = EvaluationStackRoot()
        for part in path:
            stack = stack.for_field(part)
        errors.append(
            GrapheneRuntimeMismatchConfigError(
                message=line,
                path=[],  # deprecated in Dagster's schema; the stack holds the path
                stack=GrapheneEvaluationStack(stack),
                reason="RUNTIME_TYPE_MISMATCH",
                value_rep=repr(value),
            )
        )

    class LaunchRefused(UserFacingGraphQLError):
        def __init__(self) -> None:
            super().__init__(
                GrapheneRunConfigValidationInvalid(pipeline_name=job_name, errors=errors)
            )
            # What the instance records on the refused run, and what a log shows: the lines.
            self.args = ("; ".join(line for _, _, line in refusals),)

    return LaunchRefused()
