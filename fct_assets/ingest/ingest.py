"""Ingestion: items that arrive between upgrades, embedded by the *deployed* model.

    inbox (FCT_INBOX, default data/inbox)   image files, optionally one sub-folder per label
      │  sensor `fct_inbox` (fct_assets/ingest/assets.py): new files, unchanged for
      │  FCT_INBOX_SETTLE_S -> one batch -> one run
      ▼
    ingest_files   decode + validate each file (fct_assets/lib/images.py: limits, the mode
                   conversions; a corrupt one is quarantined with a one-line reason, one that may
                   still be being written is left for a retry on a later tick, the rest lands);
                   content-derived item ids; embed with the deployed model (the old model before
                   any promotion) and the side-info model; then ONE commit to gallery_store
                   (image, label, side_info, and the old embedding while the old model is
                   deployed), ONE commit to the deployed version's table (the vector, source
                   "ingested", its space_id, chain, ingest batch), and one deployments row that
                   serves that new table version.

Idempotent: an item's id is derived from its decoded pixels, and each table receives only the
ids it does not hold yet. The same picture dropped twice, or a run retried after it wrote one
table but not the other, gives one row per table.

A file still being written: the sensor takes only files whose mtime is FCT_INBOX_SETTLE_S old
(a write moves it). One that is still caught incomplete (empty, or it starts like an image but
does not decode) stays in the inbox with a retry marker (fct_assets/lib/inbox.py); the marker
changes its stamp, so the sensor's next tick launches it again. That try ingests it if it is
complete now, tries once more if it changed meanwhile (its writer is still going), and
quarantines it if it is the same incomplete file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fct_assets.lib import guards, storage
from fct_assets.lib.images import FORMATS as FORMATS
from fct_assets.lib.images import MAX_FILE_BYTES as MAX_FILE_BYTES
from fct_assets.lib.images import MAX_PIXELS as MAX_PIXELS
from fct_assets.lib.images import IncompleteImage, decode_image, read_image_file
from fct_assets.lib.inbox import INBOX_ENV as INBOX_ENV
from fct_assets.lib.inbox import PROCESSED, QUARANTINE, RETRY, retry_marker
from fct_assets.lib.inbox import inbox_dir as inbox_dir
from fct_assets.lib.records import Checkpoint, DatasetRecord, IngestBatch, Quarantined

WAIT_ENV = "FCT_INGEST_WAIT_S"  # how long a batch waits for another writer of its tables
DEFAULT_WAIT_S = 300
# Seconds a file's mtime must be old before the sensor takes it. Every write moves the mtime, so
# a file being copied is left alone; a local copy of a photo writes in well under a second, and
# each second here delays a tenth of the drops by one sensor tick (10 s). A writer that pauses
# longer is caught by the retry of incomplete files.
SETTLE_ENV = "FCT_INBOX_SETTLE_S"
DEFAULT_SETTLE_S = 2.0
UNKNOWN_LABEL = -1


class IngestError(ValueError):
    """A batch that cannot be ingested at all (one line saying why); nothing was written."""


def _seconds_from_env(name: str, default: float) -> float:
    value = os.environ.get(name, str(default))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise IngestError(f"{name}={value!r}: expected seconds >= 0")
    return seconds


def lease_wait_s() -> float:
    """FCT_INGEST_WAIT_S (default 300): seconds an ingest batch waits for a backfill or another
    writer of gallery_store or the deployed table before it is refused."""
    return _seconds_from_env(WAIT_ENV, DEFAULT_WAIT_S)


def inbox_settle_s() -> float:
    """FCT_INBOX_SETTLE_S (default 2): seconds a file must be unchanged before it is taken."""
    return _seconds_from_env(SETTLE_ENV, DEFAULT_SETTLE_S)


@dataclass(frozen=True)
class Retry:
    """The retry marker of an inbox file: the batch that found it incomplete, its size and mtime
    then, and why it did not decode."""

    batch: str
    size: int
    mtime_ns: int
    reason: str


def read_retry(inbox: Path, relpath: str) -> Retry | None:
    """The file's retry marker, or None (none, or unreadable: the file is simply tried again)."""
    try:
        return Retry(**json.loads(retry_marker(inbox, relpath).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_retry(inbox: Path, relpath: str, retry: Retry) -> None:
    marker = retry_marker(inbox, relpath)
    marker.parent.mkdir(parents=True, exist_ok=True)
    partial = marker.with_name(f".{marker.name}.tmp")
    partial.write_text(json.dumps(asdict(retry)))
    os.replace(partial, marker)  # the sensor never reads half a marker


@dataclass(frozen=True)
class InboxFile:
    """A file waiting in the inbox: its path relative to the inbox, size and mtime, and the batch
    that left it for a retry (if one did). Its stamp changes with any of them, so the sensor
    launches a file again once it changed or was left for a retry."""

    relpath: str
    size: int
    mtime_ns: int
    retry: str = ""

    @property
    def stamp(self) -> str:
        return f"{self.size}:{self.mtime_ns}" + (f":retry:{self.retry}" if self.retry else "")


def scan_inbox(inbox: Path, settle_s: float | None = None) -> list[InboxFile]:
    """Files under `inbox` whose mtime is at least `settle_s` (default FCT_INBOX_SETTLE_S) old,
    sorted; names starting with '.' (the processed, quarantine and retry folders, files being
    written under a temporary dot-name) are skipped at every level. A future mtime (a copy that
    kept its source's) counts as settled: no write of this machine made it."""
    if not inbox.is_dir():
        return []
    settle_ns = (inbox_settle_s() if settle_s is None else settle_s) * 1e9
    now_ns = time.time_ns()
    markers = (inbox / RETRY).is_dir()
    found = []
    for root, dirs, names in os.walk(inbox):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path = Path(root) / name
            try:
                st = path.stat()
            except FileNotFoundError:  # moved away meanwhile
                continue
            if 0 <= now_ns - st.st_mtime_ns < settle_ns:
                continue  # written to within the settle time: maybe still being written
            relpath = str(path.relative_to(inbox))
            retry = read_retry(inbox, relpath) if markers else None
            found.append(
                InboxFile(relpath, st.st_size, st.st_mtime_ns, retry.batch if retry else "")
            )
    return sorted(found, key=lambda f: f.relpath)


def folder_name(class_name: str) -> str:
    """A class name as a folder name: '/' (Fashion-MNIST's "T-shirt/top") becomes '-'."""
    return class_name.replace("/", "-")


def label_of(folder: str | None, class_names: Sequence[str]) -> int:
    """The label a folder name gives: a class name (any case; '/' written as '-') or a class
    index; else unknown (-1)."""
    if not folder:
        return UNKNOWN_LABEL
    names = [folder_name(n).lower() for n in class_names]
    if folder_name(folder).lower() in names:
        return names.index(folder_name(folder).lower())
    if folder.isdigit() and int(folder) < len(class_names):
        return int(folder)
    return UNKNOWN_LABEL


def inbox_label(relpath: str, class_names: Sequence[str]) -> int:
    """A file's label from its inbox sub-folder (`<label>/<file>`); a file at the top: unknown."""
    parts = Path(relpath).parts
    return label_of(parts[0] if len(parts) > 1 else None, class_names)


def shown(path: str) -> str:
    """A file name as one printable line: names with a newline or other control character are
    shown quoted and escaped (repr), so a log or error line stays one line."""
    return path if path.isprintable() else repr(path)


def read_item(path: str, inbox: Path | None = None) -> bytes:
    """The bytes of one arriving file; raises ValueError with a one-line reason, reading nothing,
    for a path that leaves the inbox (`..`, a symlink pointing out), something that is not a
    regular file or a file above MAX_FILE_BYTES (fct_assets.lib.images.read_image_file)."""
    where = Path(path)
    if inbox is not None:
        real, root = where.resolve(), inbox.resolve()
        if not real.is_relative_to(root):
            link = " (a symlink)" if where.is_symlink() else ""
            raise ValueError(f"outside the inbox{link}: resolves to {shown(str(real))}")
    return read_image_file(where)


def content_id(image: np.ndarray) -> int:
    """A positive int64 item id from the decoded pixels and their shape (60 bits of sha256): the
    same picture gives the same id whatever file, name or encoding it came in."""
    digest = hashlib.sha256(str(image.shape).encode() + image.tobytes()).hexdigest()
    return int(digest[:15], 16)


@dataclass(frozen=True)
class Target:
    """Where arriving items go: the deployed model and its table (gallery_store and the old model
    while no version has been promoted)."""

    version: str | None
    table: str
    model: Checkpoint
    deployment_seq: int | None = None


def existing_ids(table, ids: Iterable[int], chunk: int = 2000) -> set[int]:
    """Which of `ids` the table (at its checked-out version) holds."""
    ids = sorted(set(int(i) for i in ids))
    found: set[int] = set()
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        where = f"item_id IN ({', '.join(map(str, part))})"
        rows = table.search().where(where).select(["item_id"]).limit(len(part)).to_arrow()
        found.update(rows.column("item_id").to_pylist())
    return found


def _fixed(vectors: np.ndarray | None, dim: int, n: int) -> pa.Array:
    if vectors is None:
        return pa.nulls(n, type=pa.list_(pa.float32(), dim))
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), dim)


def _append_commit(table, rows: pa.Table) -> int:
    """One LanceDB commit of `rows` (cast to the table's schema); the table's new version."""
    rows = rows.select([f.name for f in table.schema if f.name in rows.column_names])
    missing = [f for f in table.schema if f.name not in rows.column_names]
    for field in missing:
        if not field.nullable:
            raise IngestError(f"{table.name}: column {field.name} is required; cannot append")
        rows = rows.append_column(field, pa.nulls(len(rows), type=field.type))
    table.add(rows.select(table.schema.names).cast(table.schema))
    return table.version


@dataclass(frozen=True)
class Decoded:
    files: list[str]
    images: np.ndarray  # (N, C, H, W) uint8
    labels: np.ndarray  # (N,) int32
    ids: np.ndarray  # (N,) int64
    quarantined: list[Quarantined]
    incomplete: list[Quarantined]  # empty, or an image's start that does not decode (yet)
    duplicates_in_batch: int


def decode_files(
    files: Sequence[tuple[str, int]], channels: int, size: tuple[int, int], read=None
) -> Decoded:
    """Decode (path, label) pairs; a file that cannot be read or decoded is quarantined with its
    reason, one that may still be being written is set apart (incomplete); a picture twice in
    the batch is kept once."""
    read = read or read_item
    kept_files, images, labels, ids, quarantined, incomplete = [], [], [], [], [], []
    seen: set[int] = set()
    duplicates = 0
    for path, label in files:
        try:
            image = decode_image(read(path), channels, size)
        except OSError as err:
            why = err.strerror or type(err).__name__
            quarantined.append(Quarantined(file=path, reason=f"cannot read ({why})"))
            continue
        except IncompleteImage as err:
            incomplete.append(Quarantined(file=path, reason=str(err)))
            continue
        except ValueError as err:
            quarantined.append(Quarantined(file=path, reason=str(err)))
            continue
        item = content_id(image)
        if item in seen:
            duplicates += 1
            continue
        seen.add(item)
        kept_files.append(path)
        images.append(image)
        labels.append(label)
        ids.append(item)
    h, w = size
    return Decoded(
        files=kept_files,
        images=np.stack(images) if images else np.zeros((0, channels, h, w), np.uint8),
        labels=np.asarray(labels, dtype=np.int32),
        ids=np.asarray(ids, dtype=np.int64),
        quarantined=quarantined,
        incomplete=incomplete,
        duplicates_in_batch=duplicates,
    )


def ingest_files(
    fct,
    files: Sequence[tuple[str, int]],
    *,
    batch: str,
    dataset: DatasetRecord,
    target: Target,
    side_info_model: Checkpoint,
    advance_deployment: Callable[[int], int | None] | None = None,
    log: Callable[[str], None] = print,
    run_id: str = "",
    instance=None,
    inbox: Path | None = None,
    before_commit: Callable[[str], None] | None = None,
) -> IngestBatch:
    """Ingest (path, label) files as batch `batch` into gallery_store and the target's table.

    `advance_deployment(table_version)` is called after the deployed table's commit and returns
    the deployments row that serves the new table version (fct_assets.serving.deployment.advance).
    The tables are written under their leases (fct_assets.lib.guards), held by Dagster run `run_id`
    of `instance` when given, else by this process; raises guards.TableBusyError naming the
    holder when one is still writing after `FCT_INGEST_WAIT_S` seconds (nothing written).
    With `inbox`, a file that resolves outside it is quarantined unread (read_item), and an
    incomplete one is left in the inbox for a retry (`retry_or_give_up`; its marker is written
    once the batch's commits are done).
    `before_commit(table)` is called under the leases right before each table's commit; what it
    raises aborts the batch there (fct_assets/ingest/assets.py: the run still running, the
    deployment unchanged, its table still servable)."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    import torch

    from fct_ml.pipeline import embed

    started = time.perf_counter()
    db = fct.connect()
    decoded = decode_files(
        files, dataset.channels, tuple(dataset.image_size), read=lambda p: read_item(p, inbox)
    )
    retrying, given_up = retry_or_give_up(decoded.incomplete, inbox, batch)
    for q in [*decoded.quarantined, *given_up]:
        log(f"ingest {batch}: quarantined {shown(q.file)}: {q.reason}")
    for q, _, _ in retrying:
        log(f"ingest {batch}: left {shown(q.file)} in the inbox: {q.reason}")
    # One writer per table: gallery_store and the deployed version's table are leased for the
    # read-decide-append below, so a backfill republishing the deployed table (or gallery_store
    # being rebuilt) never interleaves with it: this waits, bounded, and is refused naming it.
    tables = [storage.GALLERY_STORE] + ([target.table] if target.version is not None else [])
    me = guards.Writer.me(run_id=run_id if instance is not None else "", purpose="ingest")
    ended = guards.ended_check(instance)
    with guards.leased(db, tables, me, ended=ended, wait_s=lease_wait_s()):
        store = db.open_table(storage.GALLERY_STORE)
        if "ingest_batch" not in store.schema.names:
            raise IngestError(
                "gallery_store was written before ingestion existed (no ingest_batch column);"
                " re-materialise gallery_store"
            )
        declared = storage.table_space_ids(store)
        if side_info_model.space_id != declared.get("side_info_space_id"):
            raise IngestError(
                f"side_info_model is {side_info_model.space_id} but gallery_store holds side-info of"
                f" {declared.get('side_info_space_id')}; re-materialise gallery_store"
            )
        in_store = existing_ids(store, decoded.ids.tolist())
        table = db.open_table(target.table) if target.version is not None else None
        in_table = existing_ids(table, decoded.ids.tolist()) if table is not None else in_store
        # Embedded: the items some table lacks (a retried run may find an item in gallery_store but
        # not yet in the deployed table); a batch already stored everywhere runs no model.
        need = np.array(
            [int(i) not in in_store or int(i) not in in_table for i in decoded.ids], dtype=bool
        )
        exp, device = fct.experiment(), fct.torch_device()
        images = torch.from_numpy(decoded.images[need])
        emb = embed(target.model.model.to(device), images, exp).numpy()  # (M, deployed_dim)
        side = embed(side_info_model.model.to(device), images, exp).numpy()  # (M, side_dim)
        bad = ~(np.isfinite(emb).all(axis=1) & np.isfinite(side).all(axis=1)) if len(emb) else []
        quarantined = [*decoded.quarantined, *given_up]
        embedded_files = [f for f, n in zip(decoded.files, need) if n]
        for i in np.nonzero(bad)[0]:
            quarantined.append(
                Quarantined(file=embedded_files[i], reason="embedding is NaN or Inf")
            )
        keep = ~np.asarray(bad, dtype=bool) if len(emb) else np.zeros(0, bool)
        already = decoded.ids[~need]  # in every table: nothing to write
        ids, labels = decoded.ids[need][keep], decoded.labels[need][keep]
        emb, side = emb[keep], side[keep]
        kept_images = decoded.images[need][keep]

        new_in_store = np.array([int(i) not in in_store for i in ids], dtype=bool)
        n_store = int(new_in_store.sum())
        old_dim = store.schema.field("old_embedding").type.list_size
        if target.version is None and len(emb) and emb.shape[1] != old_dim:
            raise IngestError(f"old_model gives dim {emb.shape[1]}, gallery_store holds {old_dim}")
        store_version = store.version
        if n_store:
            pick = new_in_store
            n = n_store
            old_space = declared.get("old_space_id")
            rows = pa.table(
                {
                    "item_id": pa.array(ids[pick], pa.int64()),
                    "label": pa.array(labels[pick], pa.int32()),
                    "image": pa.array(
                        [storage.encode_png(img) for img in kept_images[pick]], pa.binary()
                    ),
                    # The old model embeds arriving items only while it is deployed.
                    "old_embedding": _fixed(
                        emb[pick] if target.version is None else None, old_dim, n
                    ),
                    "side_info": _fixed(side[pick], side.shape[1], n),
                    "old_space_id": pa.array(
                        [old_space if target.version is None else None] * n, pa.string()
                    ),
                    "side_info_space_id": pa.array([side_info_model.space_id] * n, pa.string()),
                    "ingest_batch": pa.array([batch] * n, pa.string()),
                }
            )
            if before_commit is not None:
                before_commit(storage.GALLERY_STORE)
            store_version = _append_commit(store, rows)
            log(f"ingest {batch}: {n} items added to gallery_store (version {store_version})")

        table_version, added_table, seq = store_version, n_store, None
        if target.version is not None:
            space = storage.table_space_ids(table).get("space_id")
            if space != target.model.space_id:
                raise storage.SpaceMismatchError(
                    f"{target.table}: holds space {space}, the deployed model is"
                    f" {target.model.space_id}"
                )
            pick = np.array([int(i) not in in_table for i in ids], dtype=bool)
            added_table = int(pick.sum())
            table_version = table.version
            if added_table:
                n = added_table
                rows = pa.table(
                    {
                        "item_id": pa.array(ids[pick], pa.int64()),
                        "label": pa.array(labels[pick], pa.int32()),
                        "embedding": _fixed(emb[pick], emb.shape[1], n),
                        "sigma": pa.array(np.zeros(n, np.float32)),
                        "source": pa.array(["ingested"] * n, pa.string()),
                        "space_id": pa.array([space] * n, pa.string()),
                        "chain": pa.array([space] * n, pa.string()),
                        "ingest_batch": pa.array([batch] * n, pa.string()),
                    }
                )
                if before_commit is not None:
                    before_commit(target.table)
                table_version = _append_commit(table, rows)
                log(f"ingest {batch}: {n} items added to {target.table} (version {table_version})")
            if advance_deployment is not None:
                seq = advance_deployment(table_version)
    _mark_retries(inbox, files, batch, retrying)
    seconds = time.perf_counter() - started
    return IngestBatch(
        batch=batch,
        files=len(files),
        ingested=tuple(int(i) for i in np.concatenate([already, ids])),
        added_to_store=n_store,
        added_to_table=added_table,
        duplicates=decoded.duplicates_in_batch + len(already) + (len(ids) - n_store),
        quarantined=tuple(quarantined),
        retrying=tuple(q for q, _, _ in retrying),
        deployed_version=target.version,
        table=target.table,
        space_id=target.model.space_id,
        side_info_space_id=side_info_model.space_id,
        store_version=store_version,
        table_version=table_version,
        deployment_seq=seq,
        seconds=round(seconds, 3),
        items_per_s=round(len(files) / seconds, 1) if seconds > 0 else None,
    )


def retry_or_give_up(
    incomplete: Sequence[Quarantined], inbox: Path | None, batch: str
) -> tuple[list[tuple[Quarantined, str, Retry]], list[Quarantined]]:
    """Which incomplete files stay in the inbox for a retry on a later tick (each with its path
    relative to the inbox and the marker to write), and which are quarantined.

    Left for a retry: a file of the inbox's top (not one a retried run finds in .processed) with
    no marker, or whose marker this batch wrote (a re-run of the batch decides the same), or that
    changed since the batch that marked it (its writer is still going). Quarantined: the same
    incomplete file a later batch found unchanged, and, without an inbox, every one."""
    retrying, given_up = [], []
    for q in incomplete:
        relpath, info = None, None
        if inbox is not None:
            try:
                relpath = Path(q.file).relative_to(inbox).as_posix()
                info = Path(q.file).stat()
            except (ValueError, OSError):
                relpath = None
        if relpath is None or info is None or relpath.startswith("."):
            given_up.append(Quarantined(file=q.file, reason=f"{q.reason}; still being written?"))
            continue
        before = read_retry(inbox, relpath)
        stamp = (info.st_size, info.st_mtime_ns)
        if before is None or before.batch == batch or (before.size, before.mtime_ns) != stamp:
            retry = Retry(batch, info.st_size, info.st_mtime_ns, q.reason)
            why = f"{q.reason}; still being written? left in the inbox for a retry on a later tick"
            retrying.append((Quarantined(file=q.file, reason=why), relpath, retry))
        else:
            why = f"{q.reason}; the same on a retry, unchanged since batch {before.batch} tried it"
            given_up.append(Quarantined(file=q.file, reason=why))
    return retrying, given_up


def _mark_retries(
    inbox: Path | None,
    files: Sequence[tuple[str, int]],
    batch: str,
    retrying: Sequence[tuple[Quarantined, str, Retry]],
) -> None:
    """Write the markers of the files left for a retry; drop the markers this batch wrote on an
    earlier attempt for files that decode now, so that `settle` moves those."""
    if inbox is None:
        return
    for _, relpath, retry in retrying:
        _write_retry(inbox, relpath, retry)
    if not (inbox / RETRY).is_dir():
        return
    left = {relpath for _, relpath, _ in retrying}
    for path, _ in files:
        try:
            relpath = Path(path).relative_to(inbox).as_posix()
        except ValueError:
            continue
        marked = read_retry(inbox, relpath) if relpath not in left else None
        if marked is not None and marked.batch == batch:
            retry_marker(inbox, relpath).unlink(missing_ok=True)


def batch_key(files: Sequence[InboxFile], now: float | None = None) -> str:
    """A new batch's partition key: `b<UTC time>-<digest of its files' names and stamps>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    digest = hashlib.sha256("\n".join(f"{f.relpath}|{f.stamp}" for f in files).encode())
    return f"b{stamp}-{digest.hexdigest()[:8]}"


def settle(inbox: Path, relpath: str, batch: str, reason: str | None) -> None:
    """Move an inbox file out of the way once its batch landed: into .processed/<batch>/ (its
    mtime set to now, so housekeeping keeps it `processed_keep_days` from landing), or into
    .quarantine/<batch>/ with `<name>.reason.txt` holding its one-line reason. A file this batch
    left for a retry (its marker, written by this batch, matches the file) stays where it is;
    otherwise its marker goes with it."""
    rel = os.path.normpath(relpath)
    if os.path.isabs(rel) or rel.split(os.sep)[0] == "..":
        return  # named outside the inbox (refused unread): never moved
    src = inbox / rel
    if not src.exists() and not src.is_symlink():
        return  # a retried run: moved the first time
    marked = read_retry(inbox, Path(rel).as_posix())
    if marked is not None and reason is None and marked.batch == batch:
        return  # left for a retry on a later tick (even if its writer went on meanwhile)
    dest = inbox / (QUARANTINE if reason else PROCESSED) / batch / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    if reason:
        dest.with_name(dest.name + ".reason.txt").write_text(reason + "\n")
    else:
        os.utime(dest, follow_symlinks=False)
    if marked is not None:
        retry_marker(inbox, Path(rel).as_posix()).unlink(missing_ok=True)


def locate(inbox: Path | None, relpath_or_path: str, batch: str) -> str:
    """Where a batch's file is now: in the inbox, or (a retried run) where the first run moved it."""
    if inbox is None:
        return relpath_or_path
    for place in (
        inbox / relpath_or_path,
        inbox / PROCESSED / batch / relpath_or_path,
        inbox / QUARANTINE / batch / relpath_or_path,
    ):
        if place.exists():
            return str(place)
    return str(inbox / relpath_or_path)
