"""Promotion and rollback as Dagster jobs (launchpad and UI): one op each over
fct_assets.serving.deployment. A refusal fails the run with its one-line reason as the failure's
description, which the run page shows as the failure line."""

import dagster as dg
from pydantic import Field

from fct_assets.lib.config import PromotionConfig
from fct_assets.lib.keys import LANE_TAG, OPS_LANE
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


@dg.op(
    description=(
        "Serve a model version if its blocking checks passed (the deployment record gets one row)."
    ),
    tags={"fct/action": "promote"},
)
def promote_version(
    context: dg.OpExecutionContext, config: PromotionConfig, fct: FctResource
) -> dg.Output:
    try:
        row = promote(context.instance, fct.connect(), config.version)
    except PromotionError as refused:
        raise dg.Failure(description=str(refused), allow_retries=False) from None
    context.log.info(
        f"promoted {row.version}: serving {row.table} @ LanceDB version {row.table_version}"
    )
    return _deployment_output(row)


@dg.op(
    description=(
        "Serve again the deployment before the current one, its table first caught up with the"
        " items ingested since."
    ),
    tags={"fct/action": "rollback"},
)
def rollback_deployment(
    context: dg.OpExecutionContext, config: RollbackConfig, fct: FctResource
) -> dg.Output:
    try:
        row = rolling_back.rollback(
            context.instance,
            fct,
            force=config.force,
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
        "Promote a model version: set `version` in the launchpad. Refused unless its blocking"
        " checks passed."
    ),
    tags={"fct/action": "promote", LANE_TAG: OPS_LANE},
)
def promote_job():
    promote_version()


@dg.job(
    name="rollback",
    description=(
        "Roll back to the deployment before the current one; items ingested since are embedded"
        " by its model first, or it is refused (`force` overrides)."
    ),
    tags={"fct/action": "rollback", LANE_TAG: OPS_LANE},
)
def rollback_job():
    rollback_deployment()
