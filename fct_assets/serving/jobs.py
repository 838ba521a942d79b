"""Promotion and rollback as Dagster jobs (launchpad and UI): one op each over
fct_assets.serving.deployment. Both are partitioned by model version, so the launchpad offers
the registered versions to pick from instead of a typed config document: `promote` serves the
version picked, `rollback` serves it again when it is the deployment before the current one.
A refusal fails the run with its one-line reason as the failure's description, which the run
page shows as the failure line."""

import dagster as dg
from pydantic import Field

from fct_assets.lib.keys import LANE_TAG, OPS_LANE
from fct_assets.lib.partitions import VersionError, model_version, require_registered
from fct_assets.lib.records import Deployment
from fct_assets.lib.resources import FctResource
from fct_assets.serving import rollback as rolling_back
from fct_assets.serving.deployment import PromotionError, promote


class RollbackConfig(dg.Config):
    """How to roll back when the previous deployment's table lacks items of gallery_store."""

    force: bool = Field(
        False,
        description=(
            "Serve the previous deployment even when items ingested since cannot be added to its"
            " table (it was published again since): they stop being searchable, and the"
            " deployments row says how many. Left false, such a rollback is refused; items that"
            " can be added are embedded by that version's model first either way."
        ),
    )


def _deployment_output(row: Deployment) -> dg.Output:
    return dg.Output(row, metadata=row.model_dump())


def _picked_version(context: dg.OpExecutionContext, action: str) -> str:
    """The model version picked in the launchpad (the run's partition), if registered; else
    dg.Failure with one line saying what to pick."""
    if not context.has_partition_key:
        raise dg.Failure(
            description=(
                f"{action}: no model version picked; launch it for one registered version (the"
                " launchpad's partition)"
            ),
            allow_retries=False,
        )
    try:
        # A client may send any key; the launchpad offers the registered ones only.
        return require_registered(context.instance, context.partition_key)
    except VersionError as refused:
        raise dg.Failure(description=f"{action}: {refused}", allow_retries=False) from None


@dg.op(
    description=(
        "Serve the model version picked (the run's partition) if its blocking checks passed"
        " (the deployment record gets one row)."
    ),
    tags={"fct/action": "promote"},
    # No field, declared: an op without a schema takes any config, so a document still naming
    # `version` (which this job took before it was partitioned) would launch with it ignored.
    config_schema={},
)
def promote_version(context: dg.OpExecutionContext, fct: FctResource) -> dg.Output:
    version = _picked_version(context, "promote")
    try:
        row = promote(context.instance, fct.connect(), version)
    except PromotionError as refused:
        raise dg.Failure(description=str(refused), allow_retries=False) from None
    context.log.info(
        f"promoted {row.version}: serving {row.table} @ LanceDB version {row.table_version}"
    )
    return _deployment_output(row)


@dg.op(
    description=(
        "Serve again the deployment before the current one, which must be the version picked (the"
        " run's partition), its table first caught up with the items ingested since."
    ),
    tags={"fct/action": "rollback"},
)
def rollback_deployment(
    context: dg.OpExecutionContext, config: RollbackConfig, fct: FctResource
) -> dg.Output:
    version = _picked_version(context, "rollback")
    try:
        row = rolling_back.rollback(
            context.instance,
            fct,
            force=config.force,
            to=version,
            run_id=context.run.run_id,
            log=context.log.info,
        )
    except PromotionError as refused:
        raise dg.Failure(description=str(refused), allow_retries=False) from None
    context.log.info(
        f"rolled back: serving {row.version} ({row.table} @ LanceDB version {row.table_version});"
        f" {row.note}"
    )
    return _deployment_output(row)


@dg.job(
    name="promote",
    description=(
        "Promote a model version: pick it among the registered versions (the partition)."
        " Refused unless its blocking checks passed."
    ),
    partitions_def=model_version,
    tags={"fct/action": "promote", LANE_TAG: OPS_LANE},
)
def promote_job():
    promote_version()


@dg.job(
    name="rollback",
    description=(
        "Roll back to the deployment before the current one: pick that version (the partition)."
        " Items ingested since are embedded by its model first, or it is refused (`force`"
        " overrides)."
    ),
    partitions_def=model_version,
    tags={"fct/action": "rollback", LANE_TAG: OPS_LANE},
)
def rollback_job():
    rollback_deployment()
