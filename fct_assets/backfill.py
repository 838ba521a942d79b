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

The plan, shard results and the published table are typed records (fct_assets.records), plain
JSON on disk, so they travel between processes (Dagster ops) without pickling.
`backfill_version` runs the three steps in one process (benchmarks, crash tests). Every read
sees the same gallery_store version, pinned by `checkout`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fct_assets import guards, storage
from fct_assets.records import (
    BackfilledTable,
    BackfillPlan,
    Checkpoint,
    GalleryStore,
    ShardRange,
    ShardResult,
)

STAGING_PREFIX = "_staging_"


def staging_table(version: str, run_id: str, shard: int, shards: int) -> str:
    """`_staging_gallery_<version>_<run8>_<k>of<N>`: one writer (one shard of one run) per table."""
    return f"{STAGING_PREFIX}{storage.version_table(version)}_{(run_id or 'local')[:8]}_{shard}of{shards}"


def claim_table(db, version: str, run_id: str = "", instance=None) -> guards.Writer:
    """Take the lease on `gallery_<version>` for this run (a Dagster run when `run_id` and
    `instance` are given, else this process) before anything is written, and drop the staging
    tables an ended run of the version left. Raises guards.TableBusyError, one line naming the
    run or process that is writing the version now: its staging tables are never touched."""
    me = guards.Writer.me(run_id=run_id if instance is not None else "")

    def ended(writer: guards.Writer) -> bool:
        if writer.run_id and instance is not None:
            run = instance.get_run_by_id(writer.run_id)
            return run is None or run.is_finished
        return guards.process_ended(writer)

    guards.claim(db, storage.version_table(version), me, ended=ended)
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
    h, rows_per_batch: int
) -> Callable[[pa.RecordBatch], tuple[torch.Tensor, torch.Tensor]]:
    """A batch of stored rows -> (h's embeddings (B, new_dim), sigma (B,)).

    Refuses non-finite or mis-sized input."""
    from fct_ml.backfill import apply_transformation

    use_side = h.config.side_info

    def transform(batch: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        old = torch.from_numpy(storage.vectors(batch.column("old_embedding")))
        side = torch.from_numpy(storage.vectors(batch.column("side_info"))) if use_side else None
        for name, t in (("old_embedding", old), ("side_info", side)):
            if t is not None and not torch.isfinite(t).all():
                raise ValueError(
                    f"gallery_store.{name}: NaN or Inf in stored vectors; nothing was published"
                )
        if old.shape[1] != h.config.old_dim:
            raise ValueError(
                f"gallery_store.old_embedding: dim {old.shape[1]}, but h expects {h.config.old_dim}"
            )
        emb, sigma = apply_transformation(h, old, side, batch_size=rows_per_batch)
        return emb, (sigma if sigma is not None else torch.zeros(len(emb)))

    return transform


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
) -> BackfillPlan:
    """Pass 1 and the split of the gallery into contiguous row ranges of near-equal size."""
    if shards < 1:
        raise ValueError(f"shards: {shards}; expected at least 1")
    db = fct.connect()
    n, store_version = gallery_store.rows, gallery_store.version
    started = time.perf_counter()
    # Pass 1: sigma of every item, to spend the re-embedding budget where h is least sure.
    reembed_ids: list[int] = []
    budget = int(round(reembed_fraction * n))
    if (
        budget > 0
    ):  # with no budget the plan runs no model (on k8s its pod needs no accelerator time)
        h = h.to(fct.torch_device())
        transform = _transformer(h, rows_per_batch)
        ids, sigmas = [], []
        for batch in storage.pinned_pages(
            db,
            storage.GALLERY_STORE,
            store_version,
            ["item_id", "old_embedding", "side_info"],
            rows_per_batch,
        ):
            ids.append(batch.column("item_id").to_numpy())
            sigmas.append(transform(batch)[1].numpy())
        ids_all, sigma_all = np.concatenate(ids), np.concatenate(sigmas)
        reembed_ids = ids_all[np.argsort(-sigma_all, kind="stable")[:budget]].tolist()
    count = min(shards, max(n, 1))  # never an empty shard
    ranges = tuple(
        ShardRange(index=k, count=count, start=k * n // count, stop=(k + 1) * n // count)
        for k in range(count)
    )
    return BackfillPlan(
        version=version,
        gallery_store_version=store_version,
        rows=n,
        run_id=run_id,
        reembed_fraction=reembed_fraction,
        reembed_ids=tuple(reembed_ids),
        rows_per_batch=rows_per_batch,
        ann_min_rows=ann_min_rows,
        shards=ranges,
        plan_seconds=round(time.perf_counter() - started, 3),
    )


def _shard_rows(
    db, plan: BackfillPlan, shard: ShardRange, h, new_model: Checkpoint, done: dict, log
) -> Iterator[pa.RecordBatch]:
    """Pass 2 over one shard's rows: h for all, the new model for the chosen ones."""
    from fct_ml.augment import to_float
    from fct_ml.training import encode

    transform = _transformer(h, plan.rows_per_batch)
    reembed = set(plan.reembed_ids)
    space_id, dim = new_model.space_id, h.config.new_dim
    channels = new_model.model.config.in_channels
    schema = storage.backfilled_schema(dim, space_id)
    name = storage.version_table(plan.version)
    where = f" shard {shard.index + 1}/{shard.count}" if shard.count > 1 else ""
    total = shard.stop - shard.start
    cols = ["item_id", "label", "old_embedding", "side_info"] + (["image"] if reembed else [])
    started = time.perf_counter()
    for batch in storage.pinned_pages(
        db,
        storage.GALLERY_STORE,
        plan.gallery_store_version,
        cols,
        plan.rows_per_batch,
        shard.start,
        shard.stop,
    ):
        emb, sigma = transform(batch)
        emb = emb.numpy()
        item_ids = batch.column("item_id").to_numpy()
        pick = np.array([i in reembed for i in item_ids.tolist()], dtype=bool)
        source = np.where(pick, "re-embedded", "transformed")
        if pick.any():
            blobs = batch.column("image").to_pylist()
            images = []
            for i in np.nonzero(pick)[0]:
                try:
                    images.append(storage.decode_png(blobs[i], channels))
                except ValueError as err:
                    raise ValueError(f"gallery_store item {item_ids[i]}: {err}") from None
            x = torch.from_numpy(np.stack(images))
            emb[pick] = encode(new_model.model, [x], transform=to_float).numpy()
            done["reembedded"] += int(pick.sum())
        if not np.isfinite(emb).all():
            raise ValueError(f"{name}: NaN or Inf in backfilled vectors; nothing was published")
        done["rows"] += len(item_ids)
        elapsed = time.perf_counter() - started
        rate = done["rows"] / elapsed if elapsed > 0 else float("nan")
        eta = (total - done["rows"]) / rate if rate > 0 else float("nan")
        log(
            f"backfill {plan.version}{where}: {done['rows']}/{total} items ({done['reembedded']}"
            f" re-embedded), {rate:,.0f} items/s, ETA {eta:.0f} s"
        )
        yield pa.record_batch(
            [
                pa.array(item_ids.astype(np.int64)),
                batch.column("label"),
                pa.FixedSizeListArray.from_arrays(
                    pa.array(emb.astype(np.float32).reshape(-1)), dim
                ),
                pa.array(sigma.numpy().astype(np.float32)),
                pa.array(source.tolist()),
                pa.array([space_id] * len(item_ids)),
            ],
            schema=schema,
        )


def write_shard(
    fct,
    plan: BackfillPlan,
    shard: ShardRange,
    h,
    new_model: Checkpoint,
    *,
    log: Callable[[str], None] = print,
) -> ShardResult:
    """Backfill one shard into its staging table (or, for a single shard, the version's table)."""
    db, device = fct.connect(), fct.torch_device()
    h = h.to(device)
    new_model.model.to(device)
    staged = shard.count > 1
    name = (
        staging_table(plan.version, plan.run_id, shard.index, shard.count)
        if staged
        else storage.version_table(plan.version)
    )
    schema = storage.backfilled_schema(h.config.new_dim, new_model.space_id)
    done = {"rows": 0, "reembedded": 0}
    # Timed from the first read to the commit: the per-item cost `fct estimate` extrapolates,
    # without
    # this process's fixed start-up (connection, moving the models).
    started = time.perf_counter()
    info = storage.publish(db, name, schema, _shard_rows(db, plan, shard, h, new_model, done, log))
    # offset/limit pages must tile the range exactly
    if info["rows"] != shard.stop - shard.start:
        raise RuntimeError(
            f"{name}: {info['rows']} rows written for range [{shard.start}, {shard.stop})"
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
        schema = storage.backfilled_schema(dim, space_id)

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
) -> BackfilledTable:
    """Plan, write the shards one after another, publish `gallery_<version>`, in this process,
    holding the version's lease throughout (released at the end, failed or not). The Dagster
    asset runs the same three steps as ops, the shards in parallel."""
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
        )
        if shards > 1:
            drop_staging(db, version, keep_run=run_id)
        results = [write_shard(fct, plan, shard, h, new_model, log=log) for shard in plan.shards]
        return publish_shards(fct, plan, results, log=log)
    finally:
        release_table(db, version, me)
