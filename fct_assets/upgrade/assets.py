"""The four assets of each upgrade, partitioned by model version.

    dataset ──> new_model[v] ──> transformation[v] ──> backfilled_gallery[v] ──> eval_report[v]
    (old_model, side_info_model, gallery_store: fct_assets.base)

Each asset loads its inputs, calls fct_ml, and returns the value with its provenance as
metadata. Models carry a data version equal to their content digest, so re-training with
another config makes everything downstream stale, and nothing upstream.
"""

import time
from collections.abc import Iterator

import dagster as dg

from fct_assets.lib import storage
from fct_assets.lib.asset_factory import (
    ARTIFACT,
    CODE_VERSION,
    OWNERS,
    external_output,
    model_output,
    preset_overrides,
    upgrade_asset,
    versioned,
)
from fct_assets.lib.config import (
    EvalReportConfig,
    ModelTrainingConfig,
    TransformationTrainingConfig,
    require_launchable,
)
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lib.keys import NEW_MODEL, NO_OP_TAG, UPGRADE_KEYS
from fct_assets.lib.partitions import model_version, require_registered
from fct_assets.lib.provenance import epoch_logger
from fct_assets.lib.records import (
    BackfilledTable,
    Checkpoint,
    DatasetRecord,
    EvalReport,
    GalleryStore,
)
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import current
from fct_assets.upgrade.backfill_ops import (
    backfill_config,
    backfill_shard,
    plan_backfill,
    publish_backfill,
)
from fct_assets.upgrade.freshness import upgrade_is_current
from fct_assets.upgrade.gates import launch_gates, restate_verdicts
from fct_assets.upgrade.report import (
    evaluate_version,
    features_once,
    h_training_features,
    report_metadata,
)


# Not required: a run of a version that is current yields nothing, and the run's other steps skip.
@upgrade_asset(
    kind="pytorch", io_manager_key="checkpoint_io_manager", runs_model=True, output_required=False
)
def new_model(
    context: dg.AssetExecutionContext,
    config: ModelTrainingConfig,
    fct: FctResource,
    dataset: DatasetRecord,
) -> Iterator[dg.Output]:
    """The new embedding model phi_new of this version, trained on all classes."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml import pipeline

    require_registered(context.instance, context.partition_key)  # before anything trains
    # Every step's config, before this one trains for minutes and replaces its checkpoint: a run
    # that no run coordinator checked (execute_in_process, `dagster job execute`) stops here.
    require_launchable(context.run.run_config)
    # The run's selection (empty: the whole job's), not this asset's own.
    selected = context.run.asset_selection or context.job_def.asset_layer.executable_asset_keys
    if context.has_partition_key and set(selected) >= UPGRADE_KEYS:
        why = upgrade_is_current(context, fct.connect())
        if why is not None:  # a second run of the version: no-op, and it says so
            context.log.warning(why)
            context.instance.add_run_tags(context.run.run_id, {NO_OP_TAG: why})
            # Its checks would show "Skipped": the verdicts on what is current, stated again.
            restate_verdicts(context)
            return
    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    if config.source != "train":
        yield external_output(context, config, data)
        return
    exp = preset_overrides(fct.experiment(), config, "new_model", "new_train")
    stage = f"new_model[{context.partition_key}]"
    model, history = pipeline.train_new_model(
        data,
        exp,
        fct.run(config.seed),
        desc="new_model",
        on_epoch=epoch_logger(
            context, stage, exp.new_train.epochs, len(pipeline.fit_split(data, exp))
        ),
    )
    yield model_output(
        model, history, context, arch=model.config.arch, embed_dim=model.config.embed_dim
    )


@upgrade_asset(kind="pytorch", io_manager_key="checkpoint_io_manager", runs_model=True)
def transformation(
    context: dg.AssetExecutionContext,
    config: TransformationTrainingConfig,
    fct: FctResource,
    dataset: DatasetRecord,
    old_model: Checkpoint,
    side_info_model: Checkpoint,
    new_model: Checkpoint,
) -> dg.Output:
    """h(stored embedding, side_info) -> this version's space, with FastFill's uncertainty sigma."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml import pipeline
    from fct_ml.transformation import TrainedFor, bind

    require_registered(context.instance, context.partition_key)  # before anything trains
    require_launchable(context.run.run_config)  # as new_model: the later steps' config too
    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    exp = preset_overrides(fct.experiment(), config, "transformation", "transformation_train")
    run = fct.run(config.seed)
    # Chained upgrades: h maps from the space the gallery is stored in now, the deployed
    # version's (every item is in its table: transformed there, or ingested since); before any
    # promotion, the old model's.
    source, source_version = _source_model(context, fct, config, old_model)
    # Kept in this process for the eval report's closed-form maps (the same features).
    features = features_once(
        data, dataset.fingerprint, source, side_info_model, new_model, exp, run
    )
    stage = f"transformation[{context.partition_key}]"
    # FastFill's sigma trains through the new model's classifier; an external new model without
    # one (or with another class set) gets the plain h, sigma 0.
    classifier = getattr(new_model.model, "classifier", None)
    fastfill = classifier is not None and classifier.weight.shape[0] == data.num_classes
    h, history = pipeline.train_h(
        features,
        new_model.model,
        exp,
        run,
        side_info=config.side_info,
        uncertainty=fastfill,
        desc=stage,
        on_epoch=epoch_logger(
            context,
            stage,
            exp.transformation_train.epochs if config.kind == "mlp" else 1,  # one solve
            len(features.labels),
        ),
        kind=config.kind,
    )
    # The checkpoints h was trained for travel in its own checkpoint: a backfill refuses to pair
    # it with any other (a new model retrained after it, another source space).
    bind(
        h,
        TrainedFor(
            source_space_id=source.space_id,
            side_info_space_id=side_info_model.space_id,
            target_space_id=new_model.space_id,
        ),
    )
    return model_output(
        h,
        history,
        context,
        old_space_id=old_model.space_id,
        side_info_space_id=side_info_model.space_id,
        new_space_id=new_model.space_id,
        old_model_sha256=old_model.sha256,
        side_info_model_sha256=side_info_model.sha256,
        new_model_sha256=new_model.sha256,
        side_info=bool(h.config.side_info),
        kind=config.kind,
        seed=config.seed,
        source_version=source_version or "",
        source_space_id=source.space_id,
        source_model_sha256=source.sha256,
    )


def _source_model(
    context: dg.AssetExecutionContext,
    fct: FctResource,
    config: TransformationTrainingConfig,
    old_model: Checkpoint,
) -> tuple[Checkpoint, str | None]:
    """(the model whose space h maps from, its model version or None for the old model)."""

    serving = current(fct.connect()) if config.source == "deployed" else None
    if serving is None or serving.version == context.partition_key:
        return old_model, None
    model = load_recorded_checkpoint(context.instance, NEW_MODEL, serving.version)
    if model.space_id != serving.space_id:
        raise storage.SpaceMismatchError(
            f"{serving.table} serves space {serving.space_id}, but new_model[{serving.version}]"
            f" is now {model.space_id}; promote a version again"
        )
    context.log.info(
        f"transformation[{context.partition_key}]: maps from the deployed {serving.version}"
        f" ({model.space_id})"
    )
    return model, serving.version


@versioned(
    dg.graph_asset,
    group_name="upgrade",
    kinds={"lancedb"},
    partitions_def=model_version,
    automation_condition=dg.AutomationCondition.eager(),
    config=backfill_config,
    owners=OWNERS,
    tags={"fct/artifact": ARTIFACT["lancedb"]},
)
def backfilled_gallery(gallery_store, transformation, new_model):
    """The gallery in this version's space, from the stored vectors (no image read) plus an optional
    re-embedded share, most uncertain first; in parallel shards, published in one commit."""
    # A graph of ops (fct_assets/upgrade/backfill_ops.py), so that shards run in separate processes; its
    # config mapping keeps the launchpad config {"reembed_fraction", "rows_per_batch", "shards", ...}.
    plan, shards = plan_backfill(gallery_store, transformation, new_model)
    done = shards.map(lambda shard: backfill_shard(plan, shard, transformation, new_model))
    return publish_backfill(plan, done.collect())


@upgrade_asset(kind="python", io_manager_key="record_io_manager", runs_model=True)
def eval_report(
    context: dg.AssetExecutionContext,
    config: EvalReportConfig,
    fct: FctResource,
    dataset: DatasetRecord,
    gallery_store: GalleryStore,
    backfilled_gallery: BackfilledTable,
    transformation: Checkpoint,
    new_model: Checkpoint,
    old_model: Checkpoint,
    side_info_model: Checkpoint,
) -> dg.Output[EvalReport]:
    """What changes per query if this version is served, the gates, the paper's cases, curves."""

    started = time.perf_counter()
    features = (
        h_training_features(
            context.instance, fct, dataset, transformation, old_model, side_info_model, new_model
        )
        if config.compare_closed_form
        else None
    )
    report = evaluate_version(
        fct,
        dataset,
        gallery_store,
        backfilled_gallery,
        transformation,
        new_model,
        table_version=config.table_version,
        instance=context.instance,
        features=features,
        gates=launch_gates(config.max_nfr, config.map_tolerance, fct.preset),
        query_sample=config.query_sample,
    )
    report = report.model_copy(update={"seconds": round(time.perf_counter() - started, 2)})
    return dg.Output(report, metadata=report_metadata(report, CODE_VERSION))


ASSETS = [new_model, transformation, backfilled_gallery, eval_report]
