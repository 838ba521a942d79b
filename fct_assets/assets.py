"""The asset graph: base assets (built once, when the old model is deployed) and the four
assets of each upgrade, partitioned by model version.

    dataset ──┬─> old_model ────────┐
              ├─> side_info_model ──┼─> gallery_store
              └─> new_model[v] ──> transformation[v] ──> backfilled_gallery[v] ──> eval_report[v]

Each asset loads its inputs, calls fct_ml, and returns the value with its provenance as
metadata. Models carry a data version equal to their content digest, so re-training with
another config makes everything downstream stale, and nothing upstream.
"""

import json
import time
from collections.abc import Iterator
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa

from fct_assets import guards, storage
from fct_assets.backfill_ops import (
    GPU_POOL,
    backfill_config,
    backfill_shard,
    plan_backfill,
    publish_backfill,
)
from fct_assets.config import (
    DatasetConfig,
    EvalReportConfig,
    ModelTrainingConfig,
    TransformationTrainingConfig,
)
from fct_assets.cost import measured
from fct_assets.partitions import model_version, require_registered
from fct_assets.provenance import code_version, epoch_logger, history_metadata, source_version
from fct_assets.records import (
    BackfilledTable,
    Checkpoint,
    DatasetRecord,
    EvalReport,
    GalleryStore,
)
from fct_assets.resources import FctResource

# The checkout's git commit, recorded as metadata on every materialisation (lineage). Each asset's
# Dagster code version is the digest of its own code instead (`versioned`).
CODE_VERSION = code_version()


# Who answers for these assets, as the UI shows it (Dagster takes "team:NAME" or an e-mail).
OWNERS = ["team:retrieval"]
# The kind of artifact, as a tag: the catalog filters on it ("fct/artifact=model").
ARTIFACT = {"pytorch": "model", "lancedb": "table", "python": "record"}


def versioned(decorator, **kwargs):
    """`decorator(**kwargs)` (dg.asset, dg.graph_asset) with the code version set to the digest of
    the decorated function's source and of the project code it reaches (provenance.source_version)."""

    def decorate(fn):
        # A plain asset records what it cost (cost/wall_s, cost/cpu_s, cost/peak_rss_mb); the graph
        # asset's ops record their own (backfill_ops).
        compute = measured(fn) if decorator is dg.asset else fn
        return decorator(code_version=source_version(fn), **kwargs)(compute)

    return decorate


def base_asset(*, kind: str, io_manager_key: str, runs_model: bool = False):
    """An asset built once per old model (group `base`, unpartitioned). One that trains or runs a
    model is in the `gpu` pool (and deploy/k8s_executor.yaml gives its step a GPU)."""
    return versioned(
        dg.asset,
        group_name="base",
        kinds={kind},
        io_manager_key=io_manager_key,
        pool=GPU_POOL if runs_model else None,
        owners=OWNERS,
        tags={"fct/artifact": ARTIFACT[kind]},
    )


def upgrade_asset(
    *, kind: str, io_manager_key: str, runs_model: bool = False, output_required: bool = True
):
    """An asset of one upgrade: partitioned by model version, materialised by itself (eager) when
    a version is added or an input changes; in the `gpu` pool when it trains or runs a model."""
    return versioned(
        dg.asset,
        output_required=output_required,
        group_name="upgrade",
        kinds={kind},
        partitions_def=model_version,
        io_manager_key=io_manager_key,
        pool=GPU_POOL if runs_model else None,
        automation_condition=dg.AutomationCondition.eager(),
        owners=OWNERS,
        tags={"fct/artifact": ARTIFACT[kind]},
    )


NO_OP_TAG = "fct/no_op"  # on a run of a current version: why it did nothing
UPGRADE_KEYS = {
    dg.AssetKey(name)
    for name in ("new_model", "transformation", "backfilled_gallery", "eval_report")
}


def _overrides(exp, config, model: str, train: str):
    """The preset `exp` with the launchpad's choices for one model (`model`, `train`: the
    ExperimentConfig fields, nested as `a__b`); fields left unset keep the preset's."""
    from fct_ml.config import replace

    chosen = {
        f"{model}__arch": getattr(config, "arch", None),
        f"{model}__embed_dim": getattr(config, "embed_dim", None),
        f"{model}__inner_width": getattr(config, "inner_width", None),
        f"{model}__inner_depth": getattr(config, "inner_depth", None),
        f"{model}__inner_rank": getattr(config, "inner_rank", None),
        f"{train}__epochs": config.epochs,
    }
    return replace(exp, **{k: v for k, v in chosen.items() if v is not None})


def _old_class_data(fct: FctResource, dataset: DatasetRecord):
    """(the dataset, the old classes, how many of the items trained on they hold)."""
    from fct_ml.pipeline import fit_split

    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    fit = fit_split(data, fct.experiment())
    return data, dataset.old_classes, len(fit.with_classes(dataset.old_classes))


def _model_output(model, history, context: dg.AssetExecutionContext, **metadata: Any) -> dg.Output:
    from fct_ml.checkpoint import content_digest

    digest = content_digest(model)
    return dg.Output(
        model.cpu().eval(),
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "content_digest": digest,
            "code_version": CODE_VERSION,
            "run_id": context.run.run_id,
            **history_metadata(history),
            **metadata,
        },
    )


def _external_output(
    context: dg.AssetExecutionContext, config: ModelTrainingConfig, data, **metadata: Any
) -> dg.Output:
    """A model from outside (config.source checkpoint:PATH | torchscript:PATH), checked on a probe
    batch of the gallery's images; refused with one line, publishing nothing, when it cannot be
    used."""
    from fct_ml.external import Preprocessing, load_external, parse_source

    source = parse_source(config.source)
    model, digest = load_external(
        source,
        in_channels=data.channels,
        probe=data.test.images[:16],
        embed_dim=config.embed_dim,
        preprocessing=Preprocessing(
            size=config.preprocess_size,
            channels=config.preprocess_channels,
            mean=config.preprocess_mean,
            std=config.preprocess_std,
        ),
        expected_sha256=config.sha256,
    )
    context.log.info(f"{context.asset_key.to_user_string()}: {source} (sha256 {digest}) accepted")
    return _model_output(
        model,
        [],
        context,
        source=str(source),
        source_sha256=digest,
        embed_dim=int(model.config.embed_dim),
        **metadata,
    )


# ---------------------------------------------------------------- base


@base_asset(kind="python", io_manager_key="record_io_manager")
def dataset(config: DatasetConfig, fct: FctResource) -> dg.Output[DatasetRecord]:
    """Images and labels with their class split and content fingerprint; the test split is the gallery."""
    from fct_ml.data import parse_class_list
    from fct_ml.datasets import default_old_classes

    data = fct.load_dataset(config.dataset)
    split = config.old_classes or default_old_classes(config.dataset, data.num_classes)
    old_classes = parse_class_list(split, data.num_classes, what="old_classes")
    fingerprint = data.fingerprint()
    record = DatasetRecord(
        spec=config.dataset,
        name=data.name,
        fingerprint=fingerprint,
        old_classes=old_classes,
        class_names=tuple(data.class_names),
        num_classes=data.num_classes,
        channels=data.channels,
        image_size=tuple(data.image_size),
        train_items=len(data.train),
        gallery_items=len(data.test),
    )
    version = dg.DataVersion(f"{fingerprint[:12]}-{'.'.join(map(str, old_classes))}")
    return dg.Output(
        record,
        data_version=version,
        # The record's own fields, unchanged (class_names as a JSON list): metadata must read
        # back as a DatasetRecord (`recorded_record`), which a joined string did not.
        metadata=record.model_dump(mode="json"),
    )


# old_model and side_info_model read alike on purpose: each is one pipeline stage with its own
# overrides and epoch log, side by side as in the paper; a shared helper would hide which
# stage and which config fields each asset trains.
@base_asset(kind="pytorch", io_manager_key="checkpoint_io_manager", runs_model=True)
def old_model(
    context: dg.AssetExecutionContext,
    config: ModelTrainingConfig,
    fct: FctResource,
    dataset: DatasetRecord,
) -> dg.Output:
    """The deployed embedding model phi_old, trained on the old classes only."""
    from fct_ml import pipeline

    data, old, items = _old_class_data(fct, dataset)
    if config.source != "train":
        return _external_output(context, config, data, classes=json.dumps(list(old)))
    exp = _overrides(fct.experiment(), config, "old_model", "old_train")
    on_epoch = epoch_logger(context, "old_model", exp.old_train.epochs, items)
    model, history = pipeline.train_old_model(
        data, old, exp, fct.run(config.seed), on_epoch=on_epoch
    )
    return _model_output(model, history, context, classes=json.dumps(list(old)), items=items)


@base_asset(kind="pytorch", io_manager_key="checkpoint_io_manager", runs_model=True)
def side_info_model(
    context: dg.AssetExecutionContext,
    config: ModelTrainingConfig,
    fct: FctResource,
    dataset: DatasetRecord,
) -> dg.Output:
    """The side-info model psi: SimCLR without labels on the old classes' images."""
    from fct_ml import pipeline

    if config.source != "train":
        raise ValueError(
            f"side_info_model: source {config.source!r}; the side-info model is trained here"
            " (source: train)"
        )
    data, old, items = _old_class_data(fct, dataset)
    exp = _overrides(fct.experiment(), config, "side_info__model", "side_info_train")
    on_epoch = epoch_logger(context, "side_info_model", exp.side_info_train.epochs, items)
    model, history = pipeline.train_side_info(
        data, old, exp, fct.run(config.seed), on_epoch=on_epoch
    )
    return _model_output(model, history, context, items=items)


@base_asset(kind="lancedb", io_manager_key="record_io_manager", runs_model=True)
def gallery_store(
    context: dg.AssetExecutionContext,
    fct: FctResource,
    dataset: DatasetRecord,
    old_model: Checkpoint,
    side_info_model: Checkpoint,
) -> dg.Output[GalleryStore]:
    """The stored gallery in LanceDB: image, old embedding and side-info of every item."""
    from fct_ml.pipeline import embed

    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    gallery = data.test
    exp, device = fct.experiment(), fct.torch_device()
    old = embed(old_model.model.to(device), gallery.images, exp).numpy()  # (N, old_dim)
    side = embed(side_info_model.model.to(device), gallery.images, exp).numpy()  # (N, side_dim)
    for name, array in (("old_embedding", old), ("side_info", side)):
        if not np.isfinite(array).all():
            raise ValueError(f"gallery_store: {name} holds NaN or Inf; nothing was written")
    old_space, side_space = old_model.space_id, side_info_model.space_id
    schema = storage.gallery_store_schema(
        old.shape[1], side.shape[1], old_space, side_space, living=True
    )
    images = gallery.images.numpy()
    labels = gallery.labels.numpy()

    def batches(size: int = 2048):
        for start in range(0, len(labels), size):
            stop = min(start + size, len(labels))
            n = stop - start
            yield pa.record_batch(
                [
                    pa.array(np.arange(start, stop, dtype=np.int64)),
                    pa.array(labels[start:stop].astype(np.int32)),
                    pa.array(
                        [storage.encode_png(img) for img in images[start:stop]], type=pa.binary()
                    ),
                    pa.FixedSizeListArray.from_arrays(
                        pa.array(old[start:stop].reshape(-1)), old.shape[1]
                    ),
                    pa.FixedSizeListArray.from_arrays(
                        pa.array(side[start:stop].reshape(-1)), side.shape[1]
                    ),
                    pa.array([old_space] * n),
                    pa.array([side_space] * n),
                    pa.nulls(n, pa.string()),  # ingest_batch: the base gallery came with no batch
                ],
                schema=schema,
            )
            context.log.info(f"gallery_store: {stop}/{len(labels)} items written")

    db = fct.connect()
    # Ingest runs append to gallery_store: the rebuild waits for one in flight (guards.leased).
    me = guards.Writer.me(run_id=context.run.run_id, purpose="gallery_store")
    ended = guards.ended_check(context.instance)
    with guards.leased(db, [storage.GALLERY_STORE], me, ended=ended, wait_s=300.0):
        info = storage.publish(
            db, storage.GALLERY_STORE, schema, batches(), tag=f"run-{context.run.run_id[:8]}"
        )
    record = GalleryStore(
        **info,
        old_space_id=old_space,
        old_dim=int(old.shape[1]),
        side_info_dim=int(side.shape[1]),
        side_info_space_id=side_space,
        old_model_sha256=old_model.sha256,
        side_info_model_sha256=side_info_model.sha256,
        dataset_fingerprint=dataset.fingerprint,
    )
    return dg.Output(
        record,
        data_version=dg.DataVersion(f"v{record.version}-{old_space}-{side_space}"),
        metadata={
            **record.model_dump(),
            "dagster/row_count": record.rows,
            "lancedb_uri": fct.lancedb_uri,
            "code_version": CODE_VERSION,
            **storage.table_metadata(fct.lancedb_uri, storage.GALLERY_STORE, schema),
        },
    )


# ---------------------------------------------------------------- upgrade (one partition per model version)


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
    from fct_assets.deployment import upgrade_is_current
    from fct_ml import pipeline

    require_registered(context.instance, context.partition_key)  # before anything trains
    # The run's selection (empty: the whole job's), not this asset's own.
    selected = context.run.asset_selection or context.job_def.asset_layer.executable_asset_keys
    if context.has_partition_key and set(selected) >= UPGRADE_KEYS:
        why = upgrade_is_current(context, fct.connect())
        if why is not None:  # a second run of the version: no-op, and it says so
            context.log.warning(why)
            context.instance.add_run_tags(context.run.run_id, {NO_OP_TAG: why})
            return
    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    if config.source != "train":
        yield _external_output(context, config, data)
        return
    exp = _overrides(fct.experiment(), config, "new_model", "new_train")
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
    yield _model_output(
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
    from fct_ml import pipeline

    require_registered(context.instance, context.partition_key)  # before anything trains
    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    exp = _overrides(fct.experiment(), config, "transformation", "transformation_train")
    run = fct.run(config.seed)
    # Chained upgrades: h maps from the space the gallery is stored in now, the deployed
    # version's (every item is in its table: transformed there, or ingested since); before any
    # promotion, the old model's.
    source, source_version = _source_model(context, fct, config, old_model)
    models = (source.model, side_info_model.model, new_model.model)
    features = pipeline.training_features(data, *models, exp, run)
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
            context, stage, exp.transformation_train.epochs, len(features.labels)
        ),
    )
    return _model_output(
        h,
        history,
        context,
        old_space_id=old_model.space_id,
        side_info_space_id=side_info_model.space_id,
        new_space_id=new_model.space_id,
        old_model_sha256=old_model.sha256,
        side_info_model_sha256=side_info_model.sha256,
        new_model_sha256=new_model.sha256,
        side_info=config.side_info,
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
    from fct_assets.deployment import current
    from fct_assets.io_managers import load_recorded_checkpoint

    serving = current(fct.connect()) if config.source == "deployed" else None
    if serving is None or serving.version == context.partition_key:
        return old_model, None
    model = load_recorded_checkpoint(context.instance, "new_model", serving.version)
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
    # A graph of ops (fct_assets/backfill_ops.py), so that shards run in separate processes; its
    # config mapping keeps the launchpad config {"reembed_fraction", "rows_per_batch", "shards", ...}.
    plan, shards = plan_backfill(gallery_store, transformation)
    done = shards.map(lambda shard: backfill_shard(plan, shard, transformation, new_model))
    return publish_backfill(plan, done.collect())


@upgrade_asset(kind="python", io_manager_key="record_io_manager", runs_model=True)
def eval_report(
    config: EvalReportConfig,
    fct: FctResource,
    dataset: DatasetRecord,
    gallery_store: GalleryStore,
    backfilled_gallery: BackfilledTable,
    transformation: Checkpoint,
    new_model: Checkpoint,
) -> dg.Output[EvalReport]:
    """The paper's cases for this version and its backfilling curve (markdown, plot, JSON)."""
    from fct_assets.report import evaluate_version, markdown_table

    started = time.perf_counter()
    report = evaluate_version(
        fct,
        dataset,
        gallery_store,
        backfilled_gallery,
        transformation,
        new_model,
        table_version=config.table_version,
    )
    report = report.model_copy(update={"seconds": round(time.perf_counter() - started, 2)})
    cases = report.cases
    return dg.Output(
        report,
        metadata={
            "report": dg.MetadataValue.md(markdown_table(report)),
            "json": dg.MetadataValue.json(report.model_dump(exclude={"plot_png_base64"})),
            "new/h(old) top1": cases["new/h(old)"]["top1"],
            "new/h(old) mAP": cases["new/h(old)"]["mAP"],
            "old/old mAP": cases["old/old"]["mAP"],
            "new/new mAP": cases["new/new"]["mAP"],
            "gap closed mAP (%)": report.gap_closed["mAP"],
            "code_version": CODE_VERSION,
        },
    )


ALL_ASSETS = [
    dataset,
    old_model,
    side_info_model,
    gallery_store,
    new_model,
    transformation,
    backfilled_gallery,
    eval_report,
]
