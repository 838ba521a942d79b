"""Every name the asset graph is addressed by, in one place: asset keys, the blocking checks that
guard promotion, run pools and run tags.

Domains import the names from here rather than from each other's definitions, so serving can ask
"did the checks of this version pass?" without importing the checks (which import the assets).
A test compares these names with the loaded definitions.
"""

import dagster as dg

# ---------------------------------------------------------------- assets

DATASET = "dataset"
OLD_MODEL = "old_model"
SIDE_INFO_MODEL = "side_info_model"
GALLERY_STORE = "gallery_store"
NEW_MODEL = "new_model"
TRANSFORMATION = "transformation"
BACKFILLED_GALLERY = "backfilled_gallery"
EVAL_REPORT = "eval_report"
INGESTED_BATCH = "ingested_batch"
# Observed, never materialised: one observation per deployments row (group `serving`).
SERVED_VERSION = "served_version"

# Built once per old model (group `base`), in dependency order.
BASE_ASSETS = (DATASET, OLD_MODEL, SIDE_INFO_MODEL, GALLERY_STORE)
# One upgrade, partitioned by model version (group `upgrade`), in dependency order.
UPGRADE_ASSETS = (NEW_MODEL, TRANSFORMATION, BACKFILLED_GALLERY, EVAL_REPORT)
UPGRADE_KEYS = frozenset(dg.AssetKey(name) for name in UPGRADE_ASSETS)

# ---------------------------------------------------------------- checks

GALLERY_STORE_SCHEMA = "gallery_store_schema"
BACKFILLED_GALLERY_SCHEMA = "backfilled_gallery_schema"
EVAL_REPORT_EXPECTATIONS = "eval_report_expectations"
# The gates on the upgrade decision (fct_assets/upgrade/gates.py): NFR of P(0) against what is
# served, and mAP of P(0) against it.
NFR_GATE = "negative_flip_gate"
MAP_GATE = "served_map_gate"
GATE_CHECKS = (
    dg.AssetCheckKey(dg.AssetKey(EVAL_REPORT), NFR_GATE),
    dg.AssetCheckKey(dg.AssetKey(EVAL_REPORT), MAP_GATE),
)

# The blocking checks that guard promotion: a version is served only when each passed on its
# latest materialisation (the gates: unless `fct promote --accept-regressions` accepts them).
PROMOTION_CHECKS = (
    dg.AssetCheckKey(dg.AssetKey(BACKFILLED_GALLERY), BACKFILLED_GALLERY_SCHEMA),
    dg.AssetCheckKey(dg.AssetKey(EVAL_REPORT), EVAL_REPORT_EXPECTATIONS),
    *GATE_CHECKS,
)

# ---------------------------------------------------------------- pools and tags

# Steps that train or run a model; deploy/k8s_executor.yaml gives each a GPU.
GPU_POOL = "gpu"
# One ingest step at a time: each writes gallery_store (one writer).
INGEST_POOL = "ingest"
# On a run of a version that is current: why it did nothing.
NO_OP_TAG = "fct/no_op"

# The run queue's lanes (dagster_home/dagster.yaml `tag_concurrency_limits` on LANE_TAG): each
# job's runs carry one, and each lane has its own slots, so an ingest never waits behind upgrades
# and an upgrade never waits behind ingest batches.
LANE_TAG = "fct/lane"
UPGRADE_LANE = "upgrade"  # base, upgrade, catch_up, verify, scheduled_evaluation, automation
INGEST_LANE = "ingest"  # ingest batches (the inbox sensor, `fct ingest`)
OPS_LANE = "ops"  # promote, rollback, housekeeping: short, and never behind an upgrade
LANES = (UPGRADE_LANE, INGEST_LANE, OPS_LANE)
