"""The fct code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import dagster as dg

from fct_assets.assets import ALL_ASSETS
from fct_assets.automation import (
    automation_sensor,
    base_job,
    daily_evaluation,
    scheduled_evaluation_job,
    upgrade_job,
    verify_job,
)
from fct_assets.checks import ALL_CHECKS
from fct_assets.deployment import promote_job, rollback_job
from fct_assets.io_managers import CheckpointIOManager, JsonIOManager
from fct_assets.resources import FctResource


def resources() -> dict[str, object]:
    """Resources from the environment (FCT_LANCEDB_URI, FCT_CHECKPOINT_ROOT, FCT_RECORD_ROOT, FCT_PRESET, FCT_DEVICE)."""
    return {"fct": FctResource(), "checkpoint_io_manager": CheckpointIOManager(), "json_io_manager": JsonIOManager()}


def build_defs(resource_defs: dict[str, object] | None = None) -> dg.Definitions:
    """The definitions with the given resources (tests pass temporary folders)."""
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=[base_job, upgrade_job, verify_job, scheduled_evaluation_job, promote_job, rollback_job],
        schedules=[daily_evaluation],
        sensors=[automation_sensor],
        resources=resource_defs or resources(),
    )


defs = build_defs()
