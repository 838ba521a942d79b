"""A second run of a current version: whether an upgrade run has anything to do.

The automation sensor's run and a launchpad run of the same version can queue one behind the
other; the second retrains nothing and overwrites nothing when every upgrade asset is current."""

import dagster as dg

from fct_assets.lib.event_log import latest_materialization, plain_metadata
from fct_assets.lib.keys import BASE_ASSETS, EVAL_REPORT, TRANSFORMATION, UPGRADE_ASSETS
from fct_assets.lib.records import CheckpointMeta, from_metadata
from fct_assets.serving.deployment import current


def _op_config(run_config: dict, op: str) -> dict:
    return dict((run_config or {}).get("ops", {}).get(op, {}).get("config", {}) or {})


def upgrade_is_current(context: dg.AssetExecutionContext, db) -> str | None:
    """Why this run of a model version has nothing to do (one line), or None when it has: every
    upgrade asset of the version was materialised, in order, after the base assets, by runs with
    the same launchpad config for it as this run, by the same code version, and h maps from the
    space it would map from now. A second run of a version (the automation sensor's and a
    launchpad run, queued one behind the other) then retrains nothing and overwrites nothing."""

    version = context.partition_key
    latest = {
        name: latest_materialization(context.instance, dg.AssetKey(name), version)
        for name in UPGRADE_ASSETS
    }
    if any(record is None for record in latest.values()):
        return None
    stamps = [latest[name].timestamp for name in UPGRADE_ASSETS]
    if stamps != sorted(stamps):
        return None  # an input was re-materialised after what depends on it: that is stale
    for name in BASE_ASSETS:
        base = latest_materialization(context.instance, dg.AssetKey(name), None)
        if base is not None and base.timestamp > stamps[0]:
            return None
    mine = context.run.run_config
    graph = context.job_def.asset_layer.asset_graph
    for name, record in latest.items():
        run = context.instance.get_run_by_id(record.run_id)
        if run is None or _op_config(run.run_config, name) != _op_config(mine, name):
            return None
        key = dg.AssetKey(name)
        recorded = record.asset_materialization.tags.get("dagster/code_version")
        if recorded != graph.get(key).code_version:
            return None
    # h maps from the deployed version's space (chained upgrades): a promotion since changes it.
    h = from_metadata(
        CheckpointMeta, plain_metadata(latest[TRANSFORMATION]), f"{TRANSFORMATION}[{version}]"
    )
    if _op_config(mine, TRANSFORMATION).get("source", "deployed") == "deployed":
        serving = current(db)
        now = (
            serving.space_id
            if serving is not None and serving.version != version
            else h.old_space_id
        )
        if h.source_space_id != now:
            return None
    return (
        f"{version} is current: new_model, transformation, backfilled_gallery and eval_report were"
        f" materialised with this config by run {latest[EVAL_REPORT].run_id[:8]}; nothing"
        " retrained or overwritten (change the config, or re-materialise an asset alone, to"
        " redo it)"
    )
