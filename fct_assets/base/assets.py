"""The base assets, built once when the old model is deployed.

    dataset ──┬─> old_model ────────┐
              ├─> side_info_model ──┼─> gallery_store
              └─> (new_model[v], fct_assets.upgrade)

Each asset loads its inputs, calls fct_ml, and returns the value with its provenance as
metadata. Models carry a data version equal to their content digest, so re-training with
another config makes everything downstream stale, and nothing upstream.
"""

import itertools
import json

import dagster as dg
import numpy as np
import pyarrow as pa

from fct_assets.lib import guards, storage
from fct_assets.lib.asset_factory import (
    CODE_VERSION,
    base_asset,
    external_output,
    model_output,
    preset_overrides,
)
from fct_assets.lib.config import (
    DatasetConfig,
    ModelTrainingConfig,
)
from fct_assets.lib.provenance import epoch_logger
from fct_assets.lib.records import (
    Checkpoint,
    DatasetRecord,
    GalleryStore,
)
from fct_assets.lib.resources import FctResource


def _old_class_data(fct: FctResource, dataset: DatasetRecord):
    """(the dataset, the old classes, how many of the items trained on they hold)."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.pipeline import fit_split

    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    fit = fit_split(data, fct.experiment())
    return data, dataset.old_classes, len(fit.with_classes(dataset.old_classes))


@base_asset(kind="python", io_manager_key="record_io_manager")
def dataset(config: DatasetConfig, fct: FctResource) -> dg.Output[DatasetRecord]:
    """Images and labels with their class split and content fingerprint; the test split is the gallery."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
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
        gallery_items=data.gallery_size,
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
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml import pipeline

    data, old, items = _old_class_data(fct, dataset)
    if config.source != "train":
        return external_output(context, config, data, classes=json.dumps(list(old)))
    exp = preset_overrides(fct.experiment(), config, "old_model", "old_train")
    on_epoch = epoch_logger(context, "old_model", exp.old_train.epochs, items)
    model, history = pipeline.train_old_model(
        data, old, exp, fct.run(config.seed), on_epoch=on_epoch
    )
    return model_output(model, history, context, classes=json.dumps(list(old)), items=items)


@base_asset(kind="pytorch", io_manager_key="checkpoint_io_manager", runs_model=True)
def side_info_model(
    context: dg.AssetExecutionContext,
    config: ModelTrainingConfig,
    fct: FctResource,
    dataset: DatasetRecord,
) -> dg.Output:
    """The side-info model psi: SimCLR without labels on the old classes' images."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml import pipeline

    if config.source != "train":
        raise ValueError(
            f"side_info_model: source {config.source!r}; the side-info model is trained here"
            " (source: train)"
        )
    data, old, items = _old_class_data(fct, dataset)
    exp = preset_overrides(fct.experiment(), config, "side_info__model", "side_info_train")
    on_epoch = epoch_logger(context, "side_info_model", exp.side_info_train.epochs, items)
    model, history = pipeline.train_side_info(
        data, old, exp, fct.run(config.seed), on_epoch=on_epoch
    )
    return model_output(model, history, context, items=items)


@base_asset(kind="lancedb", io_manager_key="record_io_manager", runs_model=True)
def gallery_store(
    context: dg.AssetExecutionContext,
    fct: FctResource,
    dataset: DatasetRecord,
    old_model: Checkpoint,
    side_info_model: Checkpoint,
) -> dg.Output[GalleryStore]:
    """The stored gallery in LanceDB: image, old embedding and side-info of every item."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.pipeline import embed

    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    exp, device = fct.experiment(), fct.torch_device()
    old_net, side_net = old_model.model.to(device), side_info_model.model.to(device)
    old_space, side_space = old_model.space_id, side_info_model.space_id
    total = data.gallery_size

    def embedded():
        """(first item id, ImageSet, old (B, old_dim), side (B, side_dim)) per batch: the gallery
        streamed (a generated one is never held whole), each batch through both models."""
        start = 0
        for part in data.gallery_batches(2048):
            old = embed(old_net, part.images, exp).numpy()
            side = embed(side_net, part.images, exp).numpy()
            for name, array in (("old_embedding", old), ("side_info", side)):
                bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
                if len(bad):
                    # Raised inside the publish's stream: its one commit never happens.
                    raise ValueError(
                        f"gallery_store: {name} of item {start + int(bad[0])} holds NaN or Inf;"
                        " nothing was written"
                    )
            yield start, part, old, side
            start += len(part)

    stream = embedded()
    first = next(stream)  # the dims of both vectors, for the schema
    old_dim, side_dim = first[2].shape[1], first[3].shape[1]
    schema = storage.gallery_store_schema(old_dim, side_dim, old_space, side_space, living=True)

    def batches():
        for start, part, old, side in itertools.chain([first], stream):
            n = len(part)
            yield pa.record_batch(
                [
                    pa.array(np.arange(start, start + n, dtype=np.int64)),
                    pa.array(part.labels.numpy().astype(np.int32)),
                    pa.array(
                        [storage.encode_png(img) for img in part.images.numpy()], type=pa.binary()
                    ),
                    pa.FixedSizeListArray.from_arrays(pa.array(old.reshape(-1)), old_dim),
                    pa.FixedSizeListArray.from_arrays(pa.array(side.reshape(-1)), side_dim),
                    pa.array([old_space] * n),
                    pa.array([side_space] * n),
                    pa.nulls(n, pa.string()),  # ingest_batch: the base gallery came with no batch
                ],
                schema=schema,
            )
            done = start + n
            # A line per 10 % (and the last): a million-item gallery logs ten lines, not 500.
            if done == total or done * 10 // total != start * 10 // total:
                context.log.info(f"gallery_store: {done}/{total} items written")

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
        old_dim=int(old_dim),
        side_info_dim=int(side_dim),
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


ASSETS = [dataset, old_model, side_info_model, gallery_store]
