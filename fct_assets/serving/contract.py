"""The serving contract: what a process that answers queries needs, in one small JSON file beside
the deployments table, and a searcher built from that file alone, without Dagster.

    from fct_assets.serving.contract import open_searcher

    searcher = open_searcher("data/lancedb")      # the LanceDB folder (or s3://...) fct writes
    hits = searcher.search("query.png", k=10)     # an image file, a (C, H, W) uint8 image or a
                                                  # (D,) vector in the served space: list[Hit]
    hits = searcher.search(searcher.stored_image(7), k=10)   # a gallery item's stored image

The file, `<LanceDB URI>/serving_contract.json` (a `ServingContract` record), is written by
`write` at every row of the deployments table (promote, rollback, an ingest that advances the
served table version), atomically: a reader sees the previous contract or the new one. It names
the row, the served table, its URI and the LanceDB version it is pinned at, the space of its
vectors, the metric and the ANN index's search parameters at that version, the query model's
checkpoint and sha256, and the size and channels query images are prepared at.

`open_searcher` refuses, with one line, a contract that is missing, stale (the deployments table
has a later row: its writer stopped before writing the contract), that names no query model, or
whose checkpoint's sha256 differs from the one it names. The searcher reads the pinned table
version, so every answer comes from one complete snapshot, whatever is written meanwhile; a
long-lived server opens a new searcher when `read(root).seq` changes.

Nothing this module imports reaches Dagster (tests/fct_assets/test_contract.py checks it in a
fresh interpreter, after building a searcher): lancedb and torch are imported where a searcher
is opened, and `write`, which runs inside the Dagster layer, imports the table helpers there.
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fct_assets.lib import records
from fct_assets.lib.images import decode_image, read_image_file
from fct_assets.lib.object_store import (
    connect_lancedb,
    default_lancedb_uri,
    fsspec_storage_options,
    is_object_store,
    object_store_error,
)
from fct_assets.lib.records import CheckpointMeta, Deployment, Hit, QueryModel, ServingContract

CONTRACT_FILE = "serving_contract.json"
# The table names of fct_assets/lib/storage.py, which imports Dagster (test_contract.py holds
# them equal).
DEPLOYMENTS = "deployments"
GALLERY_STORE = "gallery_store"
METRIC = "l2"  # LanceDB's distance type; the version tables' IVF_PQ index is built for it


class ContractError(ValueError):
    """A serving contract that cannot be served (one line naming the file and why)."""


def contract_uri(root: str) -> str:
    """Where the contract of the LanceDB database `root` (a folder or an object-store URI) is."""
    return f"{str(root).rstrip('/')}/{CONTRACT_FILE}"


def read(root: str | None = None) -> ServingContract:
    """The contract of the LanceDB database `root` (default: the one fct uses, FCT_LANCEDB_URI)."""
    uri = contract_uri(root or default_lancedb_uri())
    try:
        text = _path(uri).read_bytes().decode()
    except FileNotFoundError:
        raise ContractError(
            f"{uri}: no serving contract (nothing deployed yet?); promote a version first: `fct"
            " promote VERSION`"
        ) from None
    except Exception as err:
        if is_object_store(uri):
            raise object_store_error(uri, err, "cannot read the serving contract") from err
        raise
    return records.loads(text, uri, ServingContract)


def write(db, row: Deployment, *, checkpoint: CheckpointMeta | None = None) -> ServingContract:
    """Write the contract of deployments row `row` beside the deployments table of `db` (a
    LanceDB connection), atomically; returns it.

    `checkpoint`: what the query model's materialisation recorded (promote passes the version's
    new_model). Without it, the query model is the one an earlier contract named for the row's
    space (a rollback, an ingest), else none: a searcher then refuses the contract. A contract of
    a later row, already written, is kept (two writers finishing out of order)."""
    # Deferred: storage imports Dagster, which a serving process must not load; `write` runs in
    # the Dagster layer (promote, rollback, an ingest step), where Dagster is loaded already.
    from fct_assets.lib import storage

    root = str(db.uri)
    previous = _previous(root)
    if previous is not None and previous.seq > row.seq:
        return previous
    known = {m.space_id: m for m in previous.models} if previous is not None else {}
    if checkpoint is not None:
        if not (checkpoint.path and checkpoint.sha256 and checkpoint.space_id):
            raise ContractError(
                f"query model {checkpoint.path or '(no path)'}: its materialisation recorded no"
                " path, sha256 or space id; re-materialise new_model"
            )
        known[checkpoint.space_id] = QueryModel(
            path=checkpoint.path, sha256=checkpoint.sha256, space_id=checkpoint.space_id
        )

    search: dict[str, Any] = {}
    if storage.table_exists(db, row.table):
        table = db.open_table(row.table)
        # A row may name a version that is gone or never was (a repair script's append).
        if row.table_version in {v["version"] for v in table.list_versions()}:
            table.checkout(row.table_version)
            if storage.ann_index_exists(table):
                dim = table.schema.field("embedding").type.list_size
                params = storage.ann_params(table.count_rows(), dim)
                search = {"nprobes": params["nprobes"], "refine_factor": params["refine_factor"]}
    image: dict[str, int] = {}
    if storage.table_exists(db, GALLERY_STORE):
        # Query images are prepared as the gallery's are: its first stored image's channels and
        # size (the models were trained on images of the same kind; open_searcher checks the
        # query model's input channels against them).
        first = db.open_table(GALLERY_STORE).search().select(["image"]).limit(1).to_list()
        try:
            stored = Image.open(io.BytesIO(first[0]["image"])) if first else None
        except OSError:  # not an image (a hand-made table): no size, so image files are refused
            stored = None
        if stored is not None:
            image = {
                "image_channels": len(stored.getbands()),
                "image_width": stored.size[0],
                "image_height": stored.size[1],
            }

    contract = ServingContract(
        seq=row.seq,
        action=row.action,
        version=row.version,
        table=row.table,
        table_uri=f"{root.rstrip('/')}/{row.table}.lance",
        table_version=row.table_version,
        space_id=row.space_id,
        metric=METRIC,
        model=known.get(row.space_id),
        models=tuple(known.values()),
        **search,
        **image,
    )
    _write_atomically(contract_uri(root), records.dumps(contract).encode())
    return contract


@dataclass(frozen=True)
class Searcher:
    """Answers queries for one deployment as its contract says: its query model (sha256
    verified) and its table at the pinned LanceDB version. Built by `open_searcher`."""

    contract: ServingContract
    model: Any  # the query model (an nn.Module), in eval mode on the CPU
    table: Any  # the LanceDB table, checked out at contract.table_version
    db: Any  # the LanceDB connection (gallery_store, for stored images)

    @property
    def dim(self) -> int:
        """The dimension of the served vectors."""
        return self.table.schema.field("embedding").type.list_size

    @property
    def channels(self) -> int:
        """The channels of the images the query model takes (1 grey, 3 RGB)."""
        return self.model.config.in_channels

    def search(self, query, k: int = 10) -> list[Hit]:
        """The k nearest gallery items to `query`, nearest first: an image file (a path), a
        (C, H, W) uint8 image (C the contract's channels), or a (D,) vector of the served space."""
        if isinstance(query, str | os.PathLike):
            query = self.image_file(query)
        query = np.asarray(query)
        if query.ndim == 3:
            vector = self.embed(query)
        elif query.ndim == 1 and query.shape[0] == self.dim:
            vector = query.astype(np.float32)
        else:
            raise ContractError(
                f"query: expected an image file, a (C, H, W) image or a ({self.dim},) vector of"
                f" {self.contract.space_id}, got an array of shape {query.shape}"
            )
        found = self.table.search(vector, vector_column_name="embedding").distance_type(
            self.contract.metric
        )
        if self.contract.nprobes is not None:
            # The IVF_PQ index answers approximately: probe a share of its partitions and re-rank
            # exactly (refine), as measured in benchmarks/perf/backfill.py.
            found = found.nprobes(self.contract.nprobes).refine_factor(self.contract.refine_factor)
        rows = found.select(["item_id", "label", "source", "_distance"]).limit(k).to_list()
        return [
            Hit(
                item_id=r["item_id"],
                label=r["label"],
                distance=float(r["_distance"]),
                source=r["source"],
            )
            for r in rows
        ]

    def embed(self, image: np.ndarray) -> np.ndarray:
        """(C, H, W) uint8 -> (D,) float32: the query model's embedding of one image."""
        # Deferred: torch and fct_ml (~1.6 s) were imported when the model was loaded; here only
        # to name them.
        import torch

        from fct_ml.augment import to_float
        from fct_ml.training import encode

        channels = self.channels
        if image.ndim != 3 or image.shape[0] != channels:
            raise ContractError(
                f"query image: expected ({channels}, H, W) uint8, got shape {image.shape}"
            )
        x = torch.tensor(image)[None]  # a copy: a decoded image is a read-only array
        return encode(self.model, [x], transform=to_float)[0].numpy()

    def stored_image(self, item_id: int) -> np.ndarray:
        """(C, H, W) uint8: the image gallery_store holds for `item_id`."""
        store = self.db.open_table(GALLERY_STORE)
        rows = store.search().where(f"item_id = {int(item_id)}").select(["image"]).limit(1)
        found = rows.to_list()
        if not found:
            raise LookupError(f"item_id {item_id}: not in gallery_store")
        return decode_png(found[0]["image"], self.channels)

    def image_file(self, path: str | os.PathLike) -> np.ndarray:
        """(C, H, W) uint8: the image file at `path`, in the contract's channels and resized
        (bilinear) to the gallery's size."""
        c = self.contract
        if c.image_height is None or c.image_width is None:
            raise ContractError(
                f"{c.table_uri}: the serving contract names no gallery image size (no"
                " gallery_store when it was written); query with a stored item or a vector"
            )
        # The same limits and mode conversions as an arriving item (lib/images), so a query
        # made from a file gets the pixels that file would have in the gallery.
        try:
            return decode_image(
                read_image_file(Path(path)), self.channels, (c.image_height, c.image_width)
            )
        except OSError as err:
            raise ValueError(
                f"{path}: cannot read ({err.strerror or type(err).__name__})"
            ) from None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def open_searcher(root: str | None = None) -> Searcher:
    """A searcher for what the LanceDB database `root` serves now (default: the one fct uses,
    FCT_LANCEDB_URI), built from its serving contract alone: the query model loaded and its
    sha256 checked, the table pinned at the contract's version, its declared space checked.

    Refused with one line (ContractError) when the contract is missing, stale, names no query
    model, or names a checkpoint whose sha256 differs."""
    root = root or default_lancedb_uri()
    where = contract_uri(root)
    contract = read(root)
    model = contract.model
    if model is None or model.space_id != contract.space_id:
        raise ContractError(
            f"{where}: no query model is recorded for {contract.version}'s space"
            f" {contract.space_id} (deployed without `fct promote`?); promote it: `fct promote"
            f" {contract.version}`"
        )
    db = connect_lancedb(root, create=False)
    latest = _latest_seq(db)
    if latest != contract.seq:
        raise ContractError(
            f"{where}: stale: it describes deployment {contract.seq}, the deployments table is at"
            f" {latest}; a later promote, rollback or ingest writes it again"
        )
    query_model = _load_model(model, where)
    takes = query_model.config.in_channels
    if contract.image_channels is not None and takes != contract.image_channels:
        raise ContractError(
            f"{model.path}: takes {takes}-channel images, the gallery's have"
            f" {contract.image_channels} (serving contract {where})"
        )
    table = db.open_table(contract.table)
    table.checkout(contract.table_version)
    declared = (table.schema.metadata or {}).get(b"space_id", b"").decode()
    if declared != contract.space_id:
        raise ContractError(
            f"{contract.table_uri}: holds space {declared or '(none)'} at version"
            f" {contract.table_version}, the contract {where} expects {contract.space_id}"
        )
    return Searcher(contract=contract, model=query_model, table=table, db=db)


def decode_png(blob: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> (C, H, W) uint8, as fct_assets.lib.storage.decode_png decodes a stored image
    (test_contract.py holds the two equal); a corrupt image raises ValueError."""
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"stored image is not a readable PNG ({err})") from None
    array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return array[None] if channels == 1 else np.transpose(array, (2, 0, 1))


def _path(uri: str):
    """`uri` as a local Path, or as a UPath with the object store's options."""
    if "://" not in uri:
        return Path(uri)
    # Deferred: universal-pathlib loads fsspec, needed only for an object store.
    from upath import UPath

    return UPath(uri, **fsspec_storage_options(uri))


def _read_bytes(uri: str) -> bytes:
    try:
        return _path(uri).read_bytes()
    except FileNotFoundError:
        raise ContractError(f"{uri}: file not found") from None
    except Exception as err:
        if is_object_store(uri):
            raise object_store_error(uri, err, "cannot read") from err
        raise


def _write_atomically(uri: str, blob: bytes) -> None:
    """Readers see the old file or the whole new one: a temporary file renamed over the target
    on a folder; an object store's put is atomic by itself."""
    if "://" in uri:
        try:
            _path(uri).write_bytes(blob)
        except Exception as err:
            raise object_store_error(uri, err, "cannot write the serving contract") from err
        return
    path = Path(uri)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _previous(root: str) -> ServingContract | None:
    """The contract written before, if there is a readable one (an unreadable one is replaced)."""
    try:
        return read(root)
    except (ContractError, records.RecordError):
        return None


def _latest_seq(db) -> int | None:
    """The seq of the deployments table's latest row, or None without one."""
    try:
        table = db.open_table(DEPLOYMENTS)
    except (ValueError, FileNotFoundError):
        return None
    seqs = table.search().select(["seq"]).limit(None).to_arrow().column("seq").to_pylist()
    return max(seqs, default=None)


def _load_model(model: QueryModel, where: str):
    """The query model from its checkpoint, refused unless the file's sha256 is the contract's."""
    blob = _read_bytes(model.path)
    actual = hashlib.sha256(blob).hexdigest()
    if actual != model.sha256:
        raise ContractError(
            f"{model.path}: sha256 {actual} differs from {model.sha256}, the one the serving"
            f" contract {where} names; refusing to load it"
        )
    # Deferred: fct_ml loads torch (~1.6 s), paid only once the contract has been read and the
    # file verified; `read` alone (a server polling the contract's seq) loads no torch.
    from fct_ml.checkpoint import load_checkpoint_bytes

    loaded, _ = load_checkpoint_bytes(blob, model.path, model.sha256)
    return loaded
