"""Promotion and rollback as Dagster jobs (launchpad and UI): one op each over
fct_assets.serving.deployment."""

import dagster as dg

from fct_assets.lib.config import PromotionConfig
from fct_assets.lib.records import Deployment
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import promote, rollback


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
    row = promote(context.instance, fct.connect(), config.version)
    context.log.info(
        f"promoted {row.version}: serving {row.table} @ LanceDB version {row.table_version}"
    )
    return _deployment_output(row)


@dg.op(
    description="Serve again the deployment before the current one.",
    tags={"fct/action": "rollback"},
)
def rollback_deployment(context: dg.OpExecutionContext, fct: FctResource) -> dg.Output:
    row = rollback(fct.connect())
    context.log.info(
        f"rolled back: serving {row.version} ({row.table} @ LanceDB version {row.table_version})"
    )
    return _deployment_output(row)


@dg.job(
    name="promote",
    description=(
        "Promote a model version: set `version` in the launchpad. Refused unless its blocking"
        " checks passed."
    ),
    tags={"fct/action": "promote"},
)
def promote_job():
    promote_version()


@dg.job(
    name="rollback",
    description="Roll back to the deployment before the current one (no config).",
    tags={"fct/action": "rollback"},
)
def rollback_job():
    rollback_deployment()
