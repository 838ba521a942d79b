"""Automation of upgrades: the jobs an upgrade runs as, the sensor that materialises a model
version when it is added, and the daily re-evaluation of the deployed version."""

import os

import dagster as dg

from fct_assets.lib.keys import BACKFILLED_GALLERY, EVAL_REPORT, LANE_TAG, UPGRADE_LANE
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import current


def auto_upgrade_status() -> dg.DefaultSensorStatus:
    """FCT_AUTO_UPGRADE=on (default) | off: whether the automation sensor starts running.

    On: adding a version upgrades it at once with the preset's config. Off: a person adds the
    version and launches `upgrade` from the launchpad with their own config, and no automatic
    run races theirs. Either way the sensor can be toggled in the UI (Automation), which the
    instance remembers over this default."""
    value = os.environ.get("FCT_AUTO_UPGRADE", "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"FCT_AUTO_UPGRADE={value!r}: expected on or off")
    return dg.DefaultSensorStatus.RUNNING if value == "on" else dg.DefaultSensorStatus.STOPPED


# The assets carry AutomationCondition.eager(); this sensor evaluates them. Declared RUNNING by
# default: Dagster's default automation sensor starts STOPPED (docs/design.md §5).
automation_sensor = dg.AutomationConditionSensorDefinition(
    "fct_upgrade_automation",
    target=dg.AssetSelection.groups("upgrade"),
    default_status=auto_upgrade_status(),
    minimum_interval_seconds=30,
    # Its runs take the upgrade lane of the run queue, as the upgrade job's do.
    run_tags={LANE_TAG: UPGRADE_LANE},
    description=(
        "Materialises new_model, transformation, backfilled_gallery and eval_report of each added"
        " model version."
    ),
)


upgrade_job = dg.define_asset_job(
    "upgrade",
    selection=dg.AssetSelection.groups("upgrade"),
    description=(
        "One upgrade: pick a model version (partition), set the new model and h in the launchpad,"
        " launch."
    ),
    tags={LANE_TAG: UPGRADE_LANE},
)


catch_up_job = dg.define_asset_job(
    "catch_up",
    selection=dg.AssetSelection.assets(BACKFILLED_GALLERY, EVAL_REPORT),
    description=(
        "Backfill a version's table again from the store as it is now (items ingested during its"
        " backfill included) and re-evaluate it: what promotion asks for when items are missing."
    ),
    tags={LANE_TAG: UPGRADE_LANE},
)


verify_job = dg.define_asset_job(
    "verify",
    selection=dg.AssetSelection.checks_for_assets(BACKFILLED_GALLERY, EVAL_REPORT),
    description=(
        "Re-runs a version's blocking checks on its tables as they are now (no training, no"
        " writing)."
    ),
    tags={LANE_TAG: UPGRADE_LANE},
)


scheduled_evaluation_job = dg.define_asset_job(
    "scheduled_evaluation",
    selection=dg.AssetSelection.assets(EVAL_REPORT),
    description=(
        "Re-evaluates one version's gallery table (the schedule picks the deployed version and"
        " its pinned table version)."
    ),
    tags={LANE_TAG: UPGRADE_LANE},
)


@dg.schedule(
    job=scheduled_evaluation_job,
    cron_schedule="0 6 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily evaluation of the deployed version's pinned table.",
)
def daily_evaluation(context: dg.ScheduleEvaluationContext, fct: FctResource):

    deployed = current(fct.connect())
    if deployed is None:
        return dg.SkipReason("no version is deployed yet")
    # The served snapshot, pinned at tick time: not the version's latest table, which may be an
    # unpromoted re-materialisation, or newer than the one a rollback returned to.
    table_version = deployed.table_version
    return dg.RunRequest(
        partition_key=deployed.version,
        run_config={"ops": {EVAL_REPORT: {"config": {"table_version": table_version}}}},
        tags={
            "fct/scheduled": "daily",
            "fct/deployment_seq": str(deployed.seq),
            "fct/table_version": str(table_version),
        },
    )
