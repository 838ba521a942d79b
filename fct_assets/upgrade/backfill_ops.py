"""The ops behind the graph-backed asset `backfilled_gallery`: plan -> N shards (fan-out) -> publish.

Each op is a thin wrapper of one function of `fct_assets.upgrade.backfill`. Shards are a dynamic fan-out
inside ONE asset partition (not a version x shard multi-partition): the version's table exists
only as one commit, so a shard is never an asset of its own that could be materialised, seen or
promoted alone. The ops that run models (plan: sigma, shards: h and re-embedding) are in the
`gpu` concurrency pool, so a machine with one accelerator runs one of them at a time
(dagster_home/dagster.yaml: pools default_limit 1); op outputs are small JSON records
(typed records, fct_assets.lib.records), never pickles.
"""

import os
import time

import dagster as dg

from fct_assets.lib import guards, storage
from fct_assets.lib.config import BackfillConfig, validated
from fct_assets.lib.cost import cost_metadata, measure
from fct_assets.lib.keys import BACKFILLED_GALLERY, GPU_POOL
from fct_assets.lib.partitions import require_registered
from fct_assets.lib.provenance import code_version
from fct_assets.lib.records import (
    BackfilledTable,
    BackfillPlan,
    Checkpoint,
    GalleryStore,
    ShardRange,
    ShardResult,
    StepCost,
)
from fct_assets.lib.resources import FctResource
from fct_assets.lineage.trace import count_rows_by_source
from fct_assets.upgrade.backfill import (
    claim_table,
    drop_staging,
    publish_shards,
    release_table,
    require_bound,
    resolve_source,
    write_shard,
)
from fct_assets.upgrade.backfill import plan_backfill as plan_fn

RECORDS = "record_io_manager"


def backfill_cost_metadata(
    plan: BackfillPlan, shards: list[ShardResult], publish: StepCost, wall_s: float | None
) -> dict:
    """The backfill's cost as numeric metadata: each op's (cost/plan_*, cost/shard_<k>_*,
    cost/publish_*) and the whole's: wall from the plan's start to the publish's end (waits
    between the ops included), CPU summed, the largest peak RSS of its processes."""
    parts = {"plan": plan.cost, **{f"shard_{s.index}": s.cost for s in shards}, "publish": publish}
    known = [c for c in parts.values() if c is not None]
    meta: dict = {}
    for name, c in parts.items():
        if c is not None:
            meta.update(cost_metadata(c, prefix=f"cost/{name}_"))
            del meta[f"cost/{name}_peak_rss_scope"]
    meta["cost/wall_s"] = float(wall_s if wall_s is not None else sum(c.wall_s for c in known))
    meta["cost/cpu_s"] = float(round(sum(c.cpu_s for c in known), 3))
    meta["cost/peak_rss_mb"] = float(max(c.peak_rss_mb for c in known))
    return meta


@dg.config_mapping(config_schema=BackfillConfig.to_config_schema())
def backfill_config(config: dict) -> dict:
    """The asset's launchpad config (reembed_fraction, rows_per_batch, shards, ann_min_rows) goes to the plan,
    which carries it to the shards and the publish: run config keeps the shape
    {"ops": {"backfilled_gallery": {"config": {...}}}}.

    Passed through unchecked: a value out of range is refused at submission, with every other
    step's (fct_assets/lib/submission.py), and else by the plan as it starts. An error raised
    here, in the code location, would reach the UI as a stack trace."""
    return {"plan_backfill": {"config": dict(config)}}


@dg.op(
    out={
        "plan": dg.Out(BackfillPlan, io_manager_key=RECORDS),
        "shard": dg.DynamicOut(ShardRange, io_manager_key=RECORDS),
    },
    pool=GPU_POOL,
    # The schema, not a `config: BackfillConfig` parameter: Dagster would build the class itself
    # and a value out of range would fail the step with pydantic's multi-line error.
    config_schema=BackfillConfig.to_config_schema(),
    description=(
        "Pass 1 (sigma of every item when re-embedding), the items to re-embed, the shards' row"
        " ranges."
    ),
)
def plan_backfill(
    context: dg.OpExecutionContext,
    fct: FctResource,
    gallery_store: GalleryStore,
    transformation: Checkpoint,
    new_model: Checkpoint,
):

    # Refused at submission already (lib/submission.py); here for runs no coordinator saw
    # (execute_in_process, `fct catch-up`): one line naming the field, before anything is read.
    config = validated(BackfillConfig, dict(context.op_config), BACKFILLED_GALLERY)
    version = require_registered(context.instance, context.partition_key)
    h_meta = transformation.recorded  # the record of the checkpoint loaded here
    if h_meta.side_info_space_id != gallery_store.side_info_space_id:
        raise storage.SpaceMismatchError(
            f"gallery_store.side_info_space_id is {gallery_store.side_info_space_id} but"
            f" transformation[{version}] was trained on {h_meta.side_info_space_id};"
            f" re-materialise transformation[{version}]"
        )
    source = resolve_source(context.instance, fct.connect(), gallery_store, h_meta, version)
    # Before anything is written: h must have been trained for this new model, whose space the
    # rows will be labelled with (one line naming both, else).
    require_bound(
        transformation.model,
        version,
        new_model,
        source,
        gallery_store.side_info_space_id,
        recorded=h_meta,
    )
    context.log.info(
        f"backfill {version}: from {source.table}@{source.version} ({source.column},"
        f" {source.space_id}, {source.rows} items)"
    )
    # One writer per version's table: a run of the same version still writing refuses this one
    # (one line naming it); one that ended without publishing hands its lease over, and the
    # staging tables it left (a failed shard) are dropped here, never a live run's.
    claim_table(fct.connect(), version, context.run.run_id, context.instance)
    dropped = drop_staging(fct.connect(), version, keep_run=context.run.run_id)
    if dropped:
        context.log.info(
            f"backfill {version}: dropped {len(dropped)} staging tables of earlier runs"
        )
    started = time.time()
    with measure() as cost:
        plan = plan_fn(
            fct,
            version,
            gallery_store,
            transformation.model,
            reembed_fraction=config.reembed_fraction,
            rows_per_batch=config.rows_per_batch,
            shards=config.shards,
            ann_min_rows=config.ann_min_rows,
            run_id=context.run.run_id,
            source=source,
        ).model_copy(update={"started_at": started, "cost": cost()})
    context.log.info(
        f"backfill {version}: {plan.rows} items in {len(plan.shards)} shards, "
        f"{len(plan.reembed_ids)} to re-embed"
    )
    yield dg.Output(plan, "plan")
    for shard in plan.shards:
        yield dg.DynamicOutput(shard, output_name="shard", mapping_key=f"shard_{shard.index}")


@dg.op(
    out=dg.Out(ShardResult, io_manager_key=RECORDS),
    pool=GPU_POOL,
    description=(
        "Pass 2 over one shard's rows: h, re-embedding of the chosen items, one staging table."
    ),
)
def backfill_shard(
    context: dg.OpExecutionContext,
    fct: FctResource,
    plan: BackfillPlan,
    shard: ShardRange,
    transformation: Checkpoint,
    new_model: Checkpoint,
) -> ShardResult:

    with measure() as cost:
        result = write_shard(
            fct, plan, shard, transformation.model, new_model, log=context.log.info
        )
        spent = cost()
    # Provenance travels with the rows: the checkpoints this process loaded (verified against their
    # sha256).
    return result.model_copy(
        update={
            "pid": os.getpid(),
            "transformation_sha256": transformation.sha256,
            "new_model_sha256": new_model.sha256,
            "cost": spent,
        }
    )


@dg.op(
    out=dg.Out(BackfilledTable, io_manager_key=RECORDS),
    description=(
        "ONE commit of gallery_<version> from the staged shards; staging dropped; IVF_PQ above"
        " ann_min_rows."
    ),
)
def publish_backfill(
    context: dg.OpExecutionContext,
    fct: FctResource,
    plan: BackfillPlan,
    shards: list[ShardResult],
) -> dg.Output[BackfilledTable]:

    for key in ("transformation_sha256", "new_model_sha256"):
        used = {getattr(s, key) for s in shards}
        if len(used) != 1:  # a checkpoint re-materialised while the shards ran
            raise RuntimeError(
                f"backfill {plan.version}: shards used different {key} {sorted(used)}"
            )
    with measure() as cost:
        record = publish_shards(fct, plan, shards, log=context.log.info)
        # Counted now, on the version just published, so that `fct lineage` reads them from the
        # event log without opening LanceDB.
        by_source = count_rows_by_source(
            storage.open_pinned(fct.connect(), record.table, record.version)
        )
        spent = cost()
    record = record.model_copy(
        update={
            "transformation_sha256": shards[0].transformation_sha256,
            "new_model_sha256": shards[0].new_model_sha256,
            "backfill_wall_seconds": round(time.time() - plan.started_at, 3),
        }
    )
    release_table(fct.connect(), plan.version, guards.Writer.me(run_id=context.run.run_id))
    return dg.Output(
        record,
        data_version=dg.DataVersion(f"v{record.version}-{record.space_id}"),
        metadata={
            **record.model_dump(exclude={"ann_params", "source"}),
            "ann_params": dg.MetadataValue.json(record.ann_params or {}),
            "source": dg.MetadataValue.json(record.source.model_dump() if record.source else {}),
            "dagster/row_count": record.rows,
            "rows_by_source": dg.MetadataValue.json(by_source),
            **backfill_cost_metadata(plan, shards, spent, record.backfill_wall_seconds),
            "code_version": code_version(),
            **storage.table_metadata(
                fct.lancedb_uri,
                record.table,
                storage.backfilled_schema(record.dim, record.space_id, lineage=True),
            ),
        },
    )
