"""Rollback as `fct rollback` and the `rollback` job run it: the target's table is first brought
up to date, never shrinking what is searchable silently.

The items of gallery_store that the target version's table lacks (ingested while a later version
served) are embedded by the target's own model from their stored images and appended to its
table, under the leases of gallery_store and that table, so no ingest lands in between; then the
rollback row is recorded (fct_assets/serving/deployment.py decides, refuses or forces).
"""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg
import numpy as np
import pyarrow as pa

from fct_assets.lib import guards, storage
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lib.keys import NEW_MODEL
from fct_assets.lib.records import Deployment, VersionTable
from fct_assets.lib.resources import FctResource
from fct_assets.serving import deployment
from fct_assets.serving.deployment import PromotionError

# Seconds a rollback waits for an ingest batch (or a backfill) holding gallery_store or the
# target's table; ingest batches hold them for seconds.
LEASE_WAIT_S = 300.0
CHUNK = 2000  # item ids per `IN (...)` read of gallery_store


def rollback(
    instance: dg.DagsterInstance,
    fct: FctResource,
    *,
    force: bool = False,
    to: str | None = None,
    run_id: str = "",
    log: Callable[[str], object] = print,
    wait_s: float = LEASE_WAIT_S,
) -> Deployment:
    """Serve again the deployment before the current one, its table first caught up with the
    items of gallery_store it lacks (embedded by its own model from their stored images); refused
    with one line giving the count when that cannot be done, unless `force`. `to`: the version
    the caller means (the rollback job's partition), refused when the target is another.
    `run_id`: the Dagster run holding the leases (none: this process)."""
    db = fct.connect()
    target, _ = deployment.rollback_target(db)
    tables = sorted({storage.GALLERY_STORE, target.table})
    me = guards.Writer.me(run_id=run_id, purpose="rollback")
    ended = guards.ended_check(instance if run_id else None)

    def catch_up(to: VersionTable, missing: list[int]) -> int:
        if to.table != target.table:  # a promotion between the lease and the decision
            raise PromotionError(
                f"rollback to {to.version} not recorded: the deployment changed meanwhile; run the"
                " rollback again"
            )
        return catch_up_table(instance, fct, db, to, missing, log=log)

    try:
        with guards.leased(db, tables, me, ended=ended, wait_s=wait_s):
            return deployment.rollback(db, force=force, catch_up=catch_up, to=to, instance=instance)
    except guards.TableBusyError as busy:  # one line, refused like any other rollback
        raise PromotionError(f"rollback not recorded: {busy}") from None


def catch_up_table(
    instance: dg.DagsterInstance,
    fct: FctResource,
    db,
    target: VersionTable,
    item_ids: list[int],
    *,
    log: Callable[[str], object] = print,
) -> int:
    """Append `item_ids` (items of gallery_store) to the target's table at `target.table_version`
    (its latest), embedded by new_model[target.version] from their stored images as ingest embeds
    arriving items (source "re-embedded", chain: its space alone); the table's new version. The
    caller holds the leases of gallery_store and the table."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    import torch

    from fct_ml.pipeline import embed

    model = load_recorded_checkpoint(instance, NEW_MODEL, target.version)
    if model.space_id != target.space_id:
        raise PromotionError(
            f"rollback to {target.version} refused: new_model[{target.version}] is now"
            f" {model.space_id} but {target.table} holds {target.space_id}; its missing items"
            " cannot be embedded in its space"
        )
    table = db.open_table(target.table)
    if table.version != target.table_version:
        raise PromotionError(
            f"rollback to {target.version} refused: {target.table} was written meanwhile (version"
            f" {table.version}, expected {target.table_version}); run the rollback again"
        )
    rows = _stored(db, item_ids)
    if rows.num_rows != len(set(item_ids)):
        raise PromotionError(
            f"rollback to {target.version}: {len(set(item_ids)) - rows.num_rows} of the items to"
            " catch up are no longer in gallery_store"
        )
    channels = model.model.config.in_channels
    images = []
    for item, blob in zip(rows.column("item_id").to_pylist(), rows.column("image").to_pylist()):
        try:
            images.append(storage.decode_png(blob, channels))
        except ValueError as err:
            raise PromotionError(f"gallery_store item {item}: {err}") from None
    exp = fct.experiment()
    vectors = embed(
        model.model.to(fct.torch_device()), torch.from_numpy(np.stack(images)), exp
    ).numpy()  # (N, dim)
    if not np.isfinite(vectors).all():
        raise PromotionError(
            f"rollback to {target.version}: new_model[{target.version}] gave NaN or Inf for an"
            " item of gallery_store; nothing was appended"
        )
    n, dim = vectors.shape
    columns = {
        "item_id": rows.column("item_id"),
        "label": rows.column("label"),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).reshape(-1)), dim
        ),
        "sigma": pa.array(np.zeros(n, np.float32)),
        "source": pa.array(["re-embedded"] * n, pa.string()),
        "space_id": pa.array([target.space_id] * n, pa.string()),
        # Embedded from the image: the vector's chain starts afresh in this space.
        "chain": pa.array([target.space_id] * n, pa.string()),
        "ingest_batch": rows.column("ingest_batch")
        if "ingest_batch" in rows.column_names
        else pa.nulls(n, pa.string()),
    }
    names = [name for name in table.schema.names if name in columns]
    data = pa.table({name: columns[name] for name in names}).cast(
        pa.schema([table.schema.field(name) for name in names])
    )
    version = storage.append_rows(db, target.table, data)
    log(
        f"rollback to {target.version}: {n} items of gallery_store embedded by"
        f" new_model[{target.version}] and added to {target.table} (version {version})"
    )
    return version


def _stored(db, item_ids: list[int]) -> pa.Table:
    """item_id, label, image (and ingest_batch when the store has it) of `item_ids`, by id."""
    store = db.open_table(storage.GALLERY_STORE)
    columns = ["item_id", "label", "image"] + (
        ["ingest_batch"] if "ingest_batch" in store.schema.names else []
    )
    ids = sorted(set(int(i) for i in item_ids))
    parts = []
    for start in range(0, len(ids), CHUNK):
        part = ids[start : start + CHUNK]
        where = f"item_id IN ({', '.join(map(str, part))})"
        parts.append(store.search().where(where).select(columns).limit(len(part)).to_arrow())
    found = pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})
    return found.sort_by("item_id")
