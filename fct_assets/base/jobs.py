"""The job that builds the base assets (once per old model)."""

import dagster as dg

from fct_assets.lib.keys import LANE_TAG, UPGRADE_LANE

base_job = dg.define_asset_job(
    "base",
    selection=dg.AssetSelection.groups("base"),
    description="Dataset, old model, side-info model and the stored gallery (once per old model).",
    tags={LANE_TAG: UPGRADE_LANE},
)
