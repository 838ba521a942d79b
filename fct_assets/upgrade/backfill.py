"""Backfilling a version's gallery table from the stored vectors: plan, shards, one publish.

    plan_backfill      pass 1: sigma of every item (only when re-embedding), the global choice
                       of items to re-embed (FastFill: most uncertain first), and N contiguous
                       row ranges of the pinned gallery_store version (the shards).
    write_shard        pass 2 over one range: apply h, re-embed the chosen items from their
                       stored images, write the rows to the shard's staging table (one commit).
                       A single shard skips staging and writes the version's table directly.
    publish_shards     ONE commit of `gallery_<version>` streamed from the staged shards in
                       shard order, then the staging tables are dropped and, above
                       `ann_min_rows`, an IVF_PQ index is built.

Why staging tables rather than appends to the final table: LanceDB wants one writer per table
(docs/design.md §4), and an append per shard would publish partial tables between commits. A shard
that fails leaves only its run's staging tables, which no reader opens and the next plan of the
version drops; the published table (and the deployed snapshot) never changes. The copy costs
one extra write of the vectors (no image is read again), small next to h and re-embedding.

Pass 1 stays in the plan, in one process: the global choice of the most uncertain items needs
every sigma first; it reads vectors only and runs h (no image, no write), so it costs about one
transform pass. Sharding it too would take a second fan-out (sigma shards -> choose -> shards).

The plan, shard results and the published table are typed records (fct_assets.lib.records), plain
JSON on disk, so they travel between processes (Dagster ops) without pickling.
`backfill_version` runs the three steps in one process (benchmarks, crash tests). Every read
sees the same gallery_store version, pinned by `checkout`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fct_assets.lib import guards, storage
from fct_assets.lib.records import (
    BackfilledTable,
    BackfillPlan,
    Checkpoint,
    CheckpointMeta,
    GalleryStore,
    ShardRange,
    ShardResult,
    SourceTable,
)
from fct_assets.serving.deployment import history

STAGING_PREFIX = "_staging_"
# Source pages read ahead of h: the next page's LanceDB read overlaps h on the current one (both
# release the GIL). Two pages of 8,192 rows are ~10 MB of vectors. The default of the
# `pages_ahead` parameters below; 0 reads each page after h is done with the last one.
READ_AHEAD = 2
_END = object()


def read_ahead(items: Iterable, depth: int) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead of the consumer. An error of
    the producer is raised here, at the item where it happened; a consumer that stops early
    (an error of its own, a closed generator) stops the producer at its next item."""
    if depth < 1:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((_END, None))
        except BaseException as err:  # re-raised in the consumer's thread
            ready.put((_END, err))

    worker = threading.Thread(target=produce, name="fct-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, err = ready.get()
            if item is _END:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                pass


WAIT_FOR_INGEST_S = 120.0  # how long a backfill waits for an ingest batch writing its table


def staging_table(version: str, run_id: str, shard: int, shards: int) -> str:
    """`_staging_gallery_<version>_<run8>_<k>of<N>`: one writer (one shard of one run) per table."""
    return f"{STAGING_PREFIX}{storage.version_table(version)}_{(run_id or 'local')[:8]}_{shard}of{shards}"


def claim_table(db, version: str, run_id: str = "", instance=None) -> guards.Writer:
    """Take the lease on `gallery_<version>` for this run (a Dagster run when `run_id` and
    `instance` are given, else this process) before anything is written, and drop the staging
    tables an ended run of the version left. Raises guards.TableBusyError, one line naming the
    run or process that is writing the version now: its staging tables are never touched."""
    me = guards.Writer.me(run_id=run_id if instance is not None else "", purpose="backfill")
    # An ingest batch holds the deployed version's table for seconds: wait for it; another
    # backfill would hold it for minutes: refuse at once.
    guards.claim(
        db,
        storage.version_table(version),
        me,
        ended=guards.ended_check(instance),
        wait_s=WAIT_FOR_INGEST_S,
        wait_for=lambda writer: writer.purpose == "ingest",
    )
    return me


def release_table(db, version: str, me: guards.Writer) -> None:
    guards.release(db, storage.version_table(version), me)


def drop_staging(db, version: str, *, keep_run: str | None = None) -> list[str]:
    """Drop the version's staging tables (all runs but `keep_run`); returns the names dropped.
    Call it holding the version's lease (`claim_table`): then every other run's staging is an
    ended run's.

    Listed by name because a shard killed before its commit leaves a folder with no version,
    which `table_exists` would call absent but which still takes disk space."""
    prefix = f"{STAGING_PREFIX}{storage.version_table(version)}_"
    keep = f"{prefix}{keep_run[:8]}_" if keep_run else None
    names, token = [], None
    while True:
        page = db.list_tables(page_token=token)
        names += [
            n for n in page.tables if n.startswith(prefix) and not (keep and n.startswith(keep))
        ]
        token = page.page_token
        if not token:
            break
    for name in names:
        db.drop_table(name, ignore_missing=True)
    return names


def _transformer(
    h, rows_per_batch: int, source: SourceTable | None = None
) -> Callable[[pa.RecordBatch], tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """A batch of stored rows (the source's vector column as `stored`, and `side_info`) -> (h's
    embeddings (B, new_dim), sigma (B,), missing (B,) bool).

    `missing` marks the rows with no vector in the source's space: items ingested after a
    promotion have no old embedding (the old model no longer embeds arriving items). h has
    nothing to map for them: their embedding and sigma are zeros here, and the shard embeds them
    from their stored images instead. Refuses non-finite or mis-sized input."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.backfill import all_finite, apply_transformation

    use_side = h.config.side_info
    where = f"{source.table}.{source.column}" if source else "gallery_store.old_embedding"

    def transform(batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        column = batch.column("stored")
        missing = column.is_null().to_numpy(zero_copy_only=False)
        emb = torch.zeros(batch.num_rows, h.config.new_dim)
        sigma = torch.zeros(batch.num_rows)
        present = ~missing
        if not present.any():
            return emb, sigma, missing
        keep = pa.array(present)
        old = torch.from_numpy(storage.vectors(column.filter(keep)))
        side = (
            torch.from_numpy(storage.vectors(batch.column("side_info").filter(keep)))
            if use_side
            else None
        )
        for name, t in ((where, old), ("gallery_store.side_info", side)):
            if t is not None and not all_finite(t):
                raise ValueError(f"{name}: NaN or Inf in stored vectors; nothing was published")
        if old.shape[1] != h.config.old_dim:
            raise ValueError(f"{where}: dim {old.shape[1]}, but h expects {h.config.old_dim}")
        mapped, uncertainty = apply_transformation(h, old, side, batch_size=rows_per_batch)
        rows = torch.from_numpy(np.nonzero(present)[0])
        emb[rows] = mapped
        if uncertainty is not None:
            sigma[rows] = uncertainty
        return emb, sigma, missing

    return transform


def require_bound(
    h,
    version: str,
    new_model: Checkpoint,
    source: SourceTable,
    side_info_space_id: str | None,
    recorded: CheckpointMeta | None = None,
) -> None:
    """Refuse, with one line naming both spaces, to backfill `version` with an h trained for
    other checkpoints than the ones here: the vectors of the table it maps from (`source`), the
    stored side-info, and `new_model`, whose space the rows are labelled with. A version whose
    upgrade failed after new_model was retrained (and before h was) leaves exactly that: the
    table would be labelled with the new model's space_id and filled with vectors of the space
    the previous one made.

    The binding comes from h's checkpoint (fct_ml.transformation.TrainedFor); for an h written
    before checkpoints carried it, from what its materialisation recorded (`recorded`). An h
    with neither is refused when `recorded` is given (the Dagster path); outside Dagster
    (`backfill_version`, benchmarks on random models) an unbound h is the caller's to vouch
    for."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.transformation import BindingError, require_trained_for, trained_for

    where = f"transformation[{version}]"
    hint = (
        f"re-materialise {where} (an upgrade that failed after new_model[{version}] was retrained"
        " leaves them apart)"
    )
    if trained_for(h) is not None:
        require_trained_for(
            h,
            where,
            source=source.space_id,
            side_info=side_info_space_id,
            target=new_model.space_id,
            hint=hint,
        )
        return
    if recorded is None:
        return
    if not recorded.new_space_id and not recorded.new_model_sha256:
        raise BindingError(f"{where} records no new model it was trained for; {hint}")
    was_space = recorded.new_space_id or new_model.space_id
    was_sha = recorded.new_model_sha256 or new_model.sha256
    if was_space != new_model.space_id or was_sha != new_model.sha256:
        was = recorded.new_space_id or f"new_model sha256 {was_sha[:12]}"
        raise BindingError(
            f"{where} was trained for {was} (the space it maps into), but"
            f" {new_model.space_id} is there now; {hint}"
        )


def resolve_source(
    instance, db, gallery_store: GalleryStore, h_meta: CheckpointMeta, version: str
) -> SourceTable:
    """The table holding the vectors h maps from (`h_meta`: the transformation's recorded
    metadata): gallery_store when h maps from the old model, else the table of the model version
    h maps from, at the table version its deployment serves (ingest runs advance it), pinned."""

    source_version = h_meta.source_version or None
    if source_version is None:
        if h_meta.old_space_id != gallery_store.old_space_id:
            raise storage.SpaceMismatchError(
                f"gallery_store.old_space_id is {gallery_store.old_space_id} but"
                f" transformation[{version}] was trained on {h_meta.old_space_id};"
                f" re-materialise transformation[{version}]"
            )
        return store_source(db, gallery_store)
    rows = [r for r in history(db) if r.version == source_version]
    if not rows:
        raise LookupError(
            f"transformation[{version}] maps from {source_version}, which was never deployed"
        )
    served = rows[-1]
    if served.space_id != h_meta.source_space_id:
        raise storage.SpaceMismatchError(
            f"{served.table} holds space {served.space_id} but transformation[{version}] maps"
            f" from {h_meta.source_space_id}; re-materialise transformation[{version}]"
        )
    table = storage.open_pinned(db, served.table, served.table_version)
    return SourceTable(
        table=served.table,
        version=served.table_version,
        column="embedding",
        space_id=served.space_id,
        model_version=source_version,
        rows=table.count_rows(),
    )


def store_source(db, gallery_store: GalleryStore) -> SourceTable:
    """gallery_store at its latest version (items ingested since its materialisation included)."""
    table = db.open_table(storage.GALLERY_STORE)
    return SourceTable(
        table=storage.GALLERY_STORE,
        version=table.version,
        column="old_embedding",
        space_id=gallery_store.old_space_id,
        model_version=None,
        rows=table.count_rows(),
    )


class SideInfo:
    """gallery_store's side-info (and optionally images) by item id, pinned at one version: the
    join a chained backfill needs, since a version's table holds vectors but no side-info.
    Holds every item's side-info in memory ((N, side_dim) float32: 512 MB per million 128-d
    items)."""

    def __init__(self, db, store_version: int):
        self.db, self.version = db, store_version
        data = (
            storage.open_pinned(db, storage.GALLERY_STORE, store_version)
            .search()
            .select(["item_id", "side_info"])
            .limit(None)
            .to_arrow()
        )
        ids = data.column("item_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self.ids = ids[order]
        self.side = storage.vectors(data.column("side_info"))[order]

    def rows(self, item_ids: np.ndarray, where: str) -> np.ndarray:
        pos = np.searchsorted(self.ids, item_ids)
        pos = np.minimum(pos, len(self.ids) - 1)
        missing = self.ids[pos] != item_ids if len(self.ids) else np.ones(len(item_ids), bool)
        if missing.any():
            raise ValueError(
                f"{where}: item {int(item_ids[missing][0])} is not in gallery_store (version"
                f" {self.version}); its side-info is missing"
            )
        return pos

    def images(self, item_ids: list[int]) -> dict[int, bytes]:
        rows = stored_rows(self.db, self.version, item_ids, ["item_id", "image"])
        return dict(zip(rows.column("item_id").to_pylist(), rows.column("image").to_pylist()))


def stored_rows(db, store_version: int, item_ids: list[int], columns: list[str]) -> pa.Table:
    """`columns` of the items `item_ids` in gallery_store at `store_version` (in store order)."""
    table = storage.open_pinned(db, storage.GALLERY_STORE, store_version)
    names = set(table.schema.names)
    wanted = [c for c in columns if c in names]
    parts = []
    for start in range(0, len(item_ids), 2000):
        part = item_ids[start : start + 2000]
        parts.append(
            table.search()
            .where(f"item_id IN ({', '.join(map(str, part))})")
            .select(wanted)
            .limit(len(part))
            .to_arrow()
        )
    if not parts:
        return pa.table({c: pa.array([], table.schema.field(c).type) for c in wanted})
    return pa.concat_tables(parts)


def transformed_again(
    db, table: BackfilledTable, h, item_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `item_ids` (a few) in a version's published table (at `table.version`) and h applied
    again to each item's own inputs as the backfill read them: its vector in the source
    (`table.source` at its pinned version; gallery_store's old embedding when None) and its
    side-info in gallery_store at `table.gallery_store_version`. Both (K, new_dim), in the order
    of `item_ids`: equal for a transformed row, apart by h's error for a re-embedded one.
    Refuses (ValueError, one line) an item the table or the source does not hold."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.backfill import apply_transformation

    ids = np.asarray(item_ids, dtype=np.int64)
    if ids.size == 0:
        raise ValueError("transformed_again: no item ids given; expected at least one")
    store = table.gallery_store_version
    source = table.source or SourceTable(
        table=storage.GALLERY_STORE, version=store, column="old_embedding", space_id=""
    )

    def by_id(name: str, version: int, column: str) -> np.ndarray:
        rows = (
            storage.open_pinned(db, name, version)
            .search()
            .where(f"item_id IN ({', '.join(map(str, ids.tolist()))})")
            .select(["item_id", column])
            .limit(len(ids))
            .to_arrow()
        )
        found = rows.column("item_id").to_numpy()
        held = np.isin(ids, found)
        if not held.all():
            raise ValueError(f"{name} (version {version}): no item {int(ids[~held][0])}")
        order = np.argsort(found, kind="stable")
        values = rows.column(column).take(pa.array(order[np.searchsorted(found[order], ids)]))
        if values.null_count:
            first = int(ids[values.is_null().to_numpy(zero_copy_only=False)][0])
            raise ValueError(f"{name}.{column} (version {version}): item {first} has no vector")
        return storage.vectors(values)

    rows = by_id(table.table, table.version, "embedding")
    stored = torch.from_numpy(by_id(source.table, source.version, source.column))
    side = torch.from_numpy(by_id(storage.GALLERY_STORE, store, "side_info"))
    again, _ = apply_transformation(h, stored, side if h.config.side_info else None)
    return rows, again.numpy()


def absent_items(db, source: SourceTable, store_version: int) -> np.ndarray:
    """Ids of the items of gallery_store (at `store_version`) that the source table (at its pinned
    version) does not hold, sorted: items ingested while another version was served (a later
    promotion, then a rollback) never reached the table h maps from. Empty when the source is
    gallery_store itself."""
    if source.table == storage.GALLERY_STORE:
        return np.zeros(0, np.int64)

    def ids(name: str, version: int) -> np.ndarray:
        table = storage.open_pinned(db, name, version)
        return table.search().select(["item_id"]).limit(None).to_arrow().column("item_id")

    stored = ids(storage.GALLERY_STORE, store_version).to_numpy()
    held = ids(source.table, source.version).to_numpy()
    return np.sort(stored[~np.isin(stored, held)]).astype(np.int64)


def source_pages(
    db,
    source: SourceTable,
    side: SideInfo | None,
    columns: list[str],
    rows_per_batch: int,
    start: int = 0,
    stop: int | None = None,
    *,
    pages_ahead: int = READ_AHEAD,
) -> Iterator[pa.RecordBatch]:
    """Rows [start, stop) of the pinned source as batches with `item_id`, `stored` (the source's
    vectors), `side_info` and whichever of `columns` the source holds (label, chain,
    ingest_batch, image, ...), `pages_ahead` pages read ahead by a background thread (0: none)."""
    names = set(db.open_table(source.table).schema.names)
    wanted = ["item_id", source.column] + [
        c for c in columns if c in names and c not in ("item_id", source.column, "side_info")
    ]
    if side is None:
        wanted.append("side_info")
    pages = storage.pinned_pages(
        db, source.table, source.version, wanted, rows_per_batch, start, stop
    )
    for batch in read_ahead(pages, pages_ahead):
        arrays = {name: batch.column(name) for name in batch.schema.names}
        arrays["stored"] = arrays.pop(source.column)
        if side is not None:
            ids = arrays["item_id"].to_numpy()
            pos = side.rows(ids, source.table)
            dim = side.side.shape[1]
            arrays["side_info"] = pa.FixedSizeListArray.from_arrays(
                pa.array(side.side[pos].reshape(-1)), dim
            )
        yield pa.record_batch(list(arrays.values()), names=list(arrays))


def plan_backfill(
    fct,
    version: str,
    gallery_store: GalleryStore,
    h,
    *,
    reembed_fraction: float,
    rows_per_batch: int,
    shards: int = 1,
    ann_min_rows: int | None = None,
    run_id: str = "",
    source: SourceTable | None = None,
    pages_ahead: int = READ_AHEAD,
) -> BackfillPlan:
    """Pass 1 and the split of the source (default: gallery_store at its latest version) into
    contiguous row ranges of near-equal size. `pages_ahead`: source pages read ahead of h."""
    if shards < 1:
        raise ValueError(f"shards: {shards}; expected at least 1")
    db = fct.connect()
    source = source or store_source(db, gallery_store)
    n = source.rows
    store_version = db.open_table(storage.GALLERY_STORE).version
    side = SideInfo(db, store_version) if source.table != storage.GALLERY_STORE else None
    # Items the source table lacks: the last shard embeds them from their stored images.
    absent = absent_items(db, source, store_version)
    started = time.perf_counter()
    # Pass 1: sigma of every item, to spend the re-embedding budget where h is least sure.
    reembed_ids: list[int] = []
    budget = int(round(reembed_fraction * n))
    if (
        budget > 0
    ):  # with no budget the plan runs no model (on k8s its pod needs no accelerator time)
        h = h.to(fct.torch_device())
        transform = _transformer(h, rows_per_batch, source)
        ids, sigmas = [], []
        for batch in source_pages(db, source, side, [], rows_per_batch, pages_ahead=pages_ahead):
            ids.append(batch.column("item_id").to_numpy())
            _, sigma, missing = transform(batch)
            # Items with no source vector are embedded from their images whatever the budget:
            # they do not take its places.
            sigmas.append(np.where(missing, -np.inf, sigma.numpy()))
        ids_all, sigma_all = np.concatenate(ids), np.concatenate(sigmas)
        order = np.argsort(-sigma_all, kind="stable")[:budget]
        reembed_ids = ids_all[order[np.isfinite(sigma_all[order])]].tolist()
    count = min(shards, max(n, 1))  # never an empty shard
    ranges = tuple(
        ShardRange(index=k, count=count, start=k * n // count, stop=(k + 1) * n // count)
        for k in range(count)
    )
    return BackfillPlan(
        version=version,
        gallery_store_version=store_version,
        rows=n + len(absent),
        run_id=run_id,
        reembed_fraction=reembed_fraction,
        reembed_ids=tuple(reembed_ids),
        rows_per_batch=rows_per_batch,
        ann_min_rows=ann_min_rows,
        shards=ranges,
        plan_seconds=round(time.perf_counter() - started, 3),
        source=source,
    )


def _shard_rows(
    db,
    plan: BackfillPlan,
    shard: ShardRange,
    h,
    new_model: Checkpoint,
    done: dict,
    log,
    pages_ahead: int,
) -> Iterator[pa.RecordBatch]:
    """Pass 2 over one shard's rows: h for all, the new model for the chosen ones and for those
    with no vector in the source's space; the last shard then adds the items the source table
    lacks, embedded by the new model from their stored images."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.augment import to_float
    from fct_ml.training import encode

    source = plan.source
    transform = _transformer(h, plan.rows_per_batch, source)
    reembed = np.unique(np.asarray(plan.reembed_ids, dtype=np.int64))
    space_id, dim = new_model.space_id, h.config.new_dim
    channels = new_model.model.config.in_channels
    schema = storage.backfilled_schema(dim, space_id, lineage=True)
    name = storage.version_table(plan.version)
    where = f" shard {shard.index + 1}/{shard.count}" if shard.count > 1 else ""
    last = shard.index == shard.count - 1
    absent = absent_items(db, source, plan.gallery_store_version) if last else np.zeros(0)
    total = shard.stop - shard.start + len(absent)
    in_store = source.table == storage.GALLERY_STORE
    side = None if in_store else SideInfo(db, plan.gallery_store_version)
    cols = ["label", "chain", "ingest_batch", "space_id"] + (
        ["image"] if reembed.size and in_store else []
    )
    started = time.perf_counter()

    def embed_images(item_ids: np.ndarray, blobs: dict[int, bytes]) -> np.ndarray:
        images = []
        for i in item_ids.tolist():
            try:
                images.append(storage.decode_png(blobs[i], channels))
            except (KeyError, ValueError) as err:
                raise ValueError(f"gallery_store item {i}: {err}") from None
        x = torch.from_numpy(np.stack(images))
        return encode(new_model.model, [x], transform=to_float).numpy()

    def report(rows: int) -> None:
        done["rows"] += rows
        elapsed = time.perf_counter() - started
        rate = done["rows"] / elapsed if elapsed > 0 else float("nan")
        eta = (total - done["rows"]) / rate if rate > 0 else float("nan")
        log(
            f"backfill {plan.version}{where}: {done['rows']}/{total} items ({done['reembedded']}"
            f" re-embedded), {rate:,.0f} items/s, ETA {eta:.0f} s"
        )

    def rows_batch(item_ids, labels, emb, sigma, pick, chain, ingest) -> pa.RecordBatch:
        if not np.isfinite(emb).all():
            raise ValueError(f"{name}: NaN or Inf in backfilled vectors; nothing was published")
        # Columns built by Arrow from arrays (no Python loop over rows), vectors without a copy
        # where they are float32 already.
        return pa.record_batch(
            [
                pa.array(item_ids.astype(np.int64, copy=False)),
                labels,
                pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.astype(np.float32, copy=False).reshape(-1)), dim
                ),
                pa.array(sigma.astype(np.float32, copy=False)),
                pc.if_else(pa.array(pick, pa.bool_()), "re-embedded", "transformed"),
                pa.repeat(space_id, len(item_ids)),
                chain,
                ingest,
            ],
            schema=schema,
        )

    pages = source_pages(
        db,
        source,
        side,
        cols,
        plan.rows_per_batch,
        shard.start,
        shard.stop,
        pages_ahead=pages_ahead,
    )
    for batch in pages:
        emb, sigma, missing = transform(batch)
        emb = emb.numpy()
        item_ids = batch.column("item_id").to_numpy()
        # The chosen items, and those h has no input for (no vector in the source's space).
        pick = np.isin(item_ids, reembed) | missing
        if pick.any():
            chosen = item_ids[pick]
            if "image" in batch.schema.names:
                blobs = dict(zip(item_ids.tolist(), batch.column("image").to_pylist()))
            elif side is not None:
                blobs = side.images(chosen.tolist())
            else:
                rows = stored_rows(
                    db, plan.gallery_store_version, chosen.tolist(), ["item_id", "image"]
                )
                blobs = dict(
                    zip(rows.column("item_id").to_pylist(), rows.column("image").to_pylist())
                )
            emb[pick] = embed_images(chosen, blobs)
            done["reembedded"] += int(pick.sum())
        yield rows_batch(
            item_ids,
            batch.column("label"),
            emb,
            sigma.numpy(),
            pick,
            chains(batch, source, space_id, pick),
            _column_or_nulls(batch, "ingest_batch"),
        )
        report(len(item_ids))
    # The items the source table lacks (ingested while another version was served): h has
    # nothing to map, so the new model embeds them from their stored images (sigma 0: exact).
    for start in range(0, len(absent), plan.rows_per_batch):
        ids = absent[start : start + plan.rows_per_batch].tolist()
        rows = stored_rows(
            db, plan.gallery_store_version, ids, ["item_id", "label", "image", "ingest_batch"]
        ).sort_by("item_id")
        item_ids = rows.column("item_id").to_numpy()
        blobs = dict(zip(item_ids.tolist(), rows.column("image").to_pylist()))
        emb = embed_images(item_ids, blobs)
        done["reembedded"] += len(item_ids)
        n = len(item_ids)
        ingest = (
            rows.column("ingest_batch").combine_chunks().cast(pa.string())
            if "ingest_batch" in rows.column_names
            else pa.nulls(n, pa.string())
        )
        yield rows_batch(
            item_ids,
            rows.column("label").combine_chunks(),
            emb,
            np.zeros(n, np.float32),
            np.ones(n, bool),
            pa.repeat(space_id, n),
            ingest,
        )
        report(n)


def _column_or_nulls(batch: pa.RecordBatch, name: str) -> pa.Array:
    if name in batch.schema.names:
        return batch.column(name).cast(pa.string())
    return pa.nulls(batch.num_rows, pa.string())


def chains(
    batch: pa.RecordBatch, source: SourceTable, space_id: str, reembedded: np.ndarray
) -> pa.Array:
    """Each row's chain of spaces: the source row's chain (its space, when the source has no
    chain column or the row none) then this version's space; a re-embedded row starts afresh.
    Arrow compute, not a Python loop over rows: the backfill's pace is set per row here."""
    n, names = batch.num_rows, batch.schema.names
    if "space_id" in names and source.table != storage.GALLERY_STORE:
        spaces = batch.column("space_id").cast(pa.string())
    else:
        spaces = pa.repeat(source.space_id, n)
    if "chain" in names:
        before = batch.column("chain").cast(pa.string())
        # An empty chain is no chain (as a missing one): the row's own space starts it.
        before = pc.if_else(pc.equal(before, ""), pa.scalar(None, pa.string()), before)
        before = pc.coalesce(before, spaces)
    else:
        before = spaces
    chained = pc.binary_join_element_wise(before, space_id, storage.CHAIN_SEP)
    return pc.if_else(pa.array(reembedded, pa.bool_()), space_id, chained)


def _side_info_space(db, plan: BackfillPlan) -> str | None:
    """The space of gallery_store's side-info at the plan's version (its schema metadata)."""
    store = storage.open_pinned(db, storage.GALLERY_STORE, plan.gallery_store_version)
    return storage.table_space_ids(store).get("side_info_space_id")


def write_shard(
    fct,
    plan: BackfillPlan,
    shard: ShardRange,
    h,
    new_model: Checkpoint,
    *,
    log: Callable[[str], None] = print,
    pages_ahead: int = READ_AHEAD,
) -> ShardResult:
    """Backfill one shard into its staging table (or, for a single shard, the version's table),
    reading `pages_ahead` source pages ahead of h."""
    db, device = fct.connect(), fct.torch_device()
    # In every shard's process, which loaded its own checkpoints: h must have been trained for
    # the new model that labels the rows (and the spaces it reads).
    require_bound(h, plan.version, new_model, plan.source, _side_info_space(db, plan))
    h = h.to(device)
    new_model.model.to(device)
    staged = shard.count > 1
    name = (
        staging_table(plan.version, plan.run_id, shard.index, shard.count)
        if staged
        else storage.version_table(plan.version)
    )
    schema = storage.backfilled_schema(h.config.new_dim, new_model.space_id, lineage=True)
    done = {"rows": 0, "reembedded": 0}
    # Timed from the first read to the commit: the per-item cost `fct estimate` extrapolates,
    # without
    # this process's fixed start-up (connection, moving the models).
    started = time.perf_counter()
    info = storage.publish(
        db, name, schema, _shard_rows(db, plan, shard, h, new_model, done, log, pages_ahead)
    )
    # offset/limit pages must tile the range exactly (the last shard adds the absent items)
    absent = (
        len(absent_items(db, plan.source, plan.gallery_store_version))
        if shard.index == shard.count - 1
        else 0
    )
    if info["rows"] != shard.stop - shard.start + absent:
        raise RuntimeError(
            f"{name}: {info['rows']} rows written for range [{shard.start}, {shard.stop})"
            + (f" and {absent} items the source lacks" if absent else "")
        )
    return ShardResult(
        **info,
        index=shard.index,
        reembedded=done["reembedded"],
        staged=staged,
        space_id=new_model.space_id,
        dim=h.config.new_dim,
        seconds=round(time.perf_counter() - started, 3),
    )


def publish_shards(
    fct, plan: BackfillPlan, results: list[ShardResult], *, log: Callable[[str], None] = print
) -> BackfilledTable:
    """ONE commit of `gallery_<version>` from the shards' staging tables (in shard order), the staging
    tables dropped, the ANN index above `ann_min_rows`; returns the table's record for the asset."""
    db = fct.connect()
    version, n = plan.version, plan.rows
    copy_seconds = (
        0.0  # the staged rows' copy into the version's table: part of a sharded backfill's cost
    )
    name = storage.version_table(version)
    results = sorted(results, key=lambda r: r.index)
    if [r.index for r in results] != list(range(len(plan.shards))):
        raise RuntimeError(
            f"{name}: shards {[r.index for r in results]} reported, expected"
            f" 0..{len(plan.shards) - 1}"
        )
    space_id, dim = results[0].space_id, results[0].dim
    if results[0].staged:
        schema = storage.backfilled_schema(dim, space_id, lineage=True)

        def staged_rows() -> Iterator[pa.RecordBatch]:
            for (
                r
            ) in results:  # pinned to the version each shard committed: a later write is not copied
                yield from storage.pinned_pages(
                    db, r.table, r.version, schema.names, plan.rows_per_batch, 0, r.rows
                )

        started = time.perf_counter()
        info = storage.publish(db, name, schema, staged_rows())
        copy_seconds = time.perf_counter() - started
        for r in results:
            db.drop_table(r.table, ignore_missing=True)
        log(
            f"backfill {version}: published {info['rows']} rows from {len(results)} shards; staging"
            " tables dropped"
        )
    else:
        info = {"table": name, "version": results[0].version, "rows": results[0].rows}
    if info["rows"] != n:
        raise RuntimeError(f"{name}: {info['rows']} rows published, the gallery holds {n}")
    table = db.open_table(name)
    ann: dict[str, Any] = {"ann_index": "none"}
    if plan.ann_min_rows is not None and n >= plan.ann_min_rows:
        # After the publish, in its own commit: readers pinned to the data version see no index and
        # search exactly.
        ann = {"ann_index": "built", "ann_params": storage.build_ann_index(table, dim)}
        log(f"backfill {version}: IVF_PQ index built ({ann['ann_params']})")
    if plan.run_id:
        table.tags.create(f"run-{plan.run_id[:8]}", table.version)
    seconds = plan.plan_seconds + sum(r.seconds for r in results) + copy_seconds
    # Measured cost of this backfill on ONE worker (both passes, LanceDB I/O and the staging copy
    # included; not the processes' start-up nor the waits between them), for `fct estimate`.
    return BackfilledTable(
        table=name,
        version=table.version,
        rows=info["rows"],
        space_id=space_id,
        dim=dim,
        reembedded=sum(r.reembedded for r in results),
        reembed_fraction=plan.reembed_fraction,
        shards=len(results),
        backfill_seconds=round(seconds, 3),
        backfill_items_per_s=round(n / seconds, 1) if seconds > 0 else None,
        gallery_store_version=plan.gallery_store_version,
        gallery_rows=n,
        source=plan.source,
        **ann,
    )


def backfill_version(
    fct,
    version: str,
    gallery_store: GalleryStore,
    h,
    new_model: Checkpoint,
    reembed_fraction: float,
    rows_per_batch: int,
    *,
    shards: int = 1,
    ann_min_rows: int | None = None,
    log: Callable[[str], None] = print,
    run_id: str = "",
    source: SourceTable | None = None,
    pages_ahead: int = READ_AHEAD,
) -> BackfilledTable:
    """Plan, write the shards one after another, publish `gallery_<version>`, in this process,
    holding the version's lease throughout (released at the end, failed or not). The Dagster
    asset runs the same three steps as ops, the shards in parallel. `pages_ahead`: source pages
    read ahead of h (0: none; benchmarks/perf/pipeline.py measures both)."""
    db = fct.connect()
    me = claim_table(db, version)
    try:
        plan = plan_backfill(
            fct,
            version,
            gallery_store,
            h,
            reembed_fraction=reembed_fraction,
            rows_per_batch=rows_per_batch,
            shards=shards,
            ann_min_rows=ann_min_rows,
            run_id=run_id,
            source=source,
            pages_ahead=pages_ahead,
        )
        if shards > 1:
            drop_staging(db, version, keep_run=run_id)
        results = [
            write_shard(fct, plan, shard, h, new_model, log=log, pages_ahead=pages_ahead)
            for shard in plan.shards
        ]
        return publish_shards(fct, plan, results, log=log)
    finally:
        release_table(db, version, me)
