"""LanceDB tables: the stored gallery and one backfilled table per model version.

`gallery_store`: item_id, label, image (PNG bytes), old_embedding, side_info, old_space_id,
side_info_space_id. `gallery_<version>`: item_id, label, embedding, sigma, source
("transformed" | "re-embedded"), space_id.

Every table is published by ONE LanceDB commit (`create_table(mode="overwrite")` over a
stream of record batches): readers see the previous version or the new one, never a half
written table, and a writer that dies mid-way publishes nothing. Each table's space_ids are
also written to its schema metadata, and vectors of another space are refused. Each publish
also writes a fresh publish id there (`publish_id`): appends, compaction and indexing keep it,
so two versions of a table with the same id hold the same published rows plus appends
(`same_publish`). A version's table of at least `ann_min_rows` rows then gets an IVF_PQ index,
in a second commit that changes no row (`build_ann_index`); search uses it when present
(`ann_params`).
"""

from __future__ import annotations

import errno
import io
import math
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from fct_assets.lib.partitions import check_version
from fct_assets.lib.resources import is_object_store, object_store_cause, object_store_error

GALLERY_STORE = "gallery_store"
DEPLOYMENTS = "deployments"
# Schema metadata key of a table's publish id: new on every publish, kept by appends.
PUBLISH_KEY = "fct_publish"


class SpaceMismatchError(ValueError):
    """Vectors of one embedding space offered to a table of another (one line naming both)."""


def table_exists(db, name: str) -> bool:
    """Whether `name` has a committed version. A writer killed before its commit leaves data
    files (so the folder shows in a listing) but no version: that table does not exist."""
    try:
        db.open_table(name)
    except (ValueError, FileNotFoundError):
        return False
    return True


def open_pinned(db, name: str, version: int):
    """Table `name` at one committed version: reads see that snapshot, whatever is written meanwhile."""
    table = db.open_table(name)
    table.checkout(version)
    return table


def pinned_pages(
    db,
    name: str,
    version: int,
    columns: list[str],
    rows_per_batch: int,
    start: int = 0,
    stop: int | None = None,
):
    """Rows [start, stop) of table `name` at `version`, as record batches of at most
    `rows_per_batch` rows.

    Pages by offset/limit rather than one streaming scan: the scan reader buffers far ahead (the
    1M-item backfill peaked at 1,758 MB RSS with it, 1,095 MB with pages), a page at a time keeps
    memory at one batch."""
    table = open_pinned(db, name, version)
    stop = table.count_rows() if stop is None else stop
    for offset in range(start, stop, rows_per_batch):
        page = (
            table.search()
            .select(columns)
            .offset(offset)
            .limit(min(rows_per_batch, stop - offset))
            .to_arrow()
        )
        yield from page.to_batches()


def version_table(version: str) -> str:
    return f"gallery_{check_version(version)}"


def _vector(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def gallery_store_schema(
    old_dim: int, side_dim: int, old_space_id: str, side_space_id: str, *, living: bool = False
) -> pa.Schema:
    """The store of record. `living=True` (what the `gallery_store` asset writes): items may
    arrive after a promotion, embedded by the deployed version's model only, so they have no old
    embedding (null `old_embedding` and `old_space_id`), and every row names its ingest batch
    (null for the base gallery). `living=False`: the base gallery's columns only."""
    fields = [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("old_embedding", _vector(old_dim), nullable=living),
        pa.field("side_info", _vector(side_dim), nullable=False),
        pa.field("old_space_id", pa.string(), nullable=living),
        pa.field("side_info_space_id", pa.string(), nullable=False),
    ]
    if living:
        fields.append(pa.field("ingest_batch", pa.string(), nullable=True))
    return pa.schema(
        fields, metadata={"old_space_id": old_space_id, "side_info_space_id": side_space_id}
    )


# How a row of a version's table got there (`lineage=True`): the embedding spaces its vector
# passed through, oldest first, joined by " > " (`old_model@… > new_model:v2@… > new_model:v3@…`;
# one space for a vector a model made from the image), and the ingest batch that brought the item
# (null for the base gallery).
LINEAGE_COLUMNS = ("chain", "ingest_batch")
CHAIN_SEP = " > "


def backfilled_schema(dim: int, space_id: str, *, lineage: bool = False) -> pa.Schema:
    fields = [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("embedding", _vector(dim), nullable=False),
        pa.field("sigma", pa.float32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("space_id", pa.string(), nullable=False),
    ]
    if lineage:
        fields += [pa.field(name, pa.string(), nullable=True) for name in LINEAGE_COLUMNS]
    return pa.schema(fields, metadata={"space_id": space_id})


# What each column holds, for the UI's column view of the LanceDB assets.
COLUMN_DOCS = {
    "item_id": "Gallery item id (unique; the same item in every table)",
    "label": "Class label (evaluation only; retrieval never reads it)",
    "image": "The item's image, PNG bytes (lossless), for re-embedding",
    "old_embedding": "phi_old(image), the deployed model's vector",
    "side_info": "psi(image), the side-info vector h also reads",
    "old_space_id": "Space of old_embedding (old model's content digest)",
    "side_info_space_id": "Space of side_info (side-info model's content digest)",
    "embedding": "The item's vector in this version's space: h(old, side_info) or phi_new(image)",
    "sigma": "h's predicted uncertainty (FastFill); re-embedding goes to the highest first",
    "source": "transformed | re-embedded | ingested (embedded by this version's model on arrival)",
    "space_id": "Space of embedding (new model's content digest)",
    "chain": "Spaces the vector passed through, oldest first (' > '): how the row got here",
    "ingest_batch": "Ingest batch that brought the item (empty: the base gallery)",
}


def table_metadata(db_uri: str, name: str, schema: pa.Schema) -> dict:
    """Dagster metadata describing a published table: its columns (typed, described) and URI."""

    columns = [
        dg.TableColumn(f.name, str(f.type), description=COLUMN_DOCS.get(f.name)) for f in schema
    ]
    return {
        "dagster/column_schema": dg.TableSchema(columns=columns),
        "dagster/uri": f"{db_uri.rstrip('/')}/{name}.lance",
    }


def encode_png(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG bytes (lossless, so re-embedding from the store is exact)."""

    array = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(blob: bytes, channels: int) -> np.ndarray:
    """PNG bytes -> (C, H, W) uint8; a corrupt image raises ValueError."""

    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except (
        UnidentifiedImageError
    ):  # PIL's message names an anonymous BytesIO object: say what the bytes are
        raise ValueError(
            f"stored image is not a readable PNG (unknown format, starts with {bytes(blob[:8])!r});"
            " expected PNG bytes"
        ) from None
    except OSError as err:
        raise ValueError(f"stored image is not a readable PNG ({err})") from None
    array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return array[None] if channels == 1 else np.transpose(array, (2, 0, 1))


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column -> (N, D) float32 without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    # A copy: arrow's buffers are read-only, and torch.from_numpy wants a writable array.
    return (
        column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=True)
    )


def _schema_meta(schema: pa.Schema) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}


def _refuse_foreign_space(
    name: str, column: str, values: pa.Array | pa.ChunkedArray, expected: str
) -> None:
    """Every value of a space-id column must be the table's own space."""

    # A null is no vector of any space (an item ingested after a promotion has no old embedding);
    # the schema's nullability decides whether it is allowed.
    found = set(pc.unique(values).to_pylist()) - {None}
    if found and found != {expected}:
        other = sorted(found - {expected}, key=str)[:1] or ["(none)"]
        raise SpaceMismatchError(
            f"{name}.{column}: vectors of space {other[0]} offered to a table of space {expected}"
        )


def _checked(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, space_columns: dict[str, str], name: str
) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        batch = batch.cast(schema) if batch.schema != schema else batch
        for column, expected in space_columns.items():
            _refuse_foreign_space(name, column, batch.column(column), expected)
        yield batch


def publish(
    db, name: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch], *, tag: str | None = None
) -> dict:
    """Write `batches` as table `name` in one commit; returns {"table", "version", "rows"}.

    Space-id columns must hold the space named in the schema metadata, batch after batch;
    a mismatch aborts the write before anything is published.
    """
    meta = _schema_meta(schema)
    space_columns = {
        c: meta[c] for c in ("old_space_id", "side_info_space_id", "space_id") if c in meta
    }
    # A fresh publish id: whoever appends later (ingest) can tell this publish from the next.
    schema = schema.with_metadata({**meta, PUBLISH_KEY: uuid.uuid4().hex})
    failure: list[Exception] = []

    def produce() -> Iterator[pa.RecordBatch]:
        try:
            yield from _checked(batches, schema, space_columns, name)
        except Exception as err:  # LanceDB re-raises it as a RuntimeError holding a traceback
            failure.append(err)
            raise

    try:
        existed = table_exists(db, name)
        reader = pa.RecordBatchReader.from_batches(schema, produce())
        try:
            table = db.create_table(name, data=reader, schema=schema, mode="overwrite")
        except Exception:
            if not existed:  # a first write that failed leaves no half-made table folder behind
                _drop_after_failure(db, name)
            # The producer's own one-line error (SpaceMismatchError, a corrupt image, ...).
            if failure:
                raise failure[0] from None
            raise
        if tag:
            table.tags.create(tag, table.version)
        return {"table": name, "version": table.version, "rows": table.count_rows()}
    except Exception as err:
        # An object store that went down or refused the credentials: one line naming the endpoint
        # (LanceDB's own message is a multi-line Rust error chain). Nothing was committed.
        uri = str(getattr(db, "uri", ""))
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            raise OSError(
                errno.ENOSPC,
                f"{name}: no space left on device under {uri} while publishing; nothing was"
                f" published ({name} is as it was); free space and run again",
            ) from None
        if not is_object_store(uri) or object_store_cause(err) is None:
            raise
        raise object_store_error(f"{uri.rstrip('/')}/{name}", err, "publish failed:") from err


def _drop_after_failure(db, name: str) -> None:
    try:
        db.drop_table(name, ignore_missing=True)
    except Exception as err:
        # The store is unreachable: the write never committed a version, so readers see no table;
        # its data files (if any) are dropped by the next successful write under this name.
        if object_store_cause(err) is None:
            raise


def ann_params(rows: int, dim: int) -> dict[str, Any]:
    """IVF_PQ parameters for a table of `rows` vectors of `dim`, as measured in benchmarks/perf/backfill.py
    (256 partitions, dim/4 sub-vectors, 1/8 of the partitions probed, refine x10: recall@10 reported there).
    At least 256 rows per partition: k-means trains poorly on fewer."""
    partitions = max(1, min(256, rows // 256))
    sub_vectors = max(d for d in range(1, max(1, dim // 4) + 1) if dim % d == 0)
    return {
        "index_type": "IVF_PQ",
        "metric": "l2",
        "num_partitions": partitions,
        "num_sub_vectors": sub_vectors,
        "nprobes": max(1, math.ceil(partitions / 8)),
        "refine_factor": 10,
    }


def ann_index_exists(table) -> bool:
    """Whether the table (at its checked-out version) has a vector index on `embedding`."""
    return any(list(index.columns) == ["embedding"] for index in table.list_indices())


def build_ann_index(table, dim: int) -> dict[str, Any]:
    """Build the IVF_PQ index on `embedding` (a new table version); returns its parameters."""
    # Deferred: lancedb (~2 s of CPU) only where an index is built.
    from lancedb.index import IvfPq

    params = ann_params(table.count_rows(), dim)
    table.create_index(
        "embedding",
        config=IvfPq(
            distance_type="l2",
            num_partitions=params["num_partitions"],
            num_sub_vectors=params["num_sub_vectors"],
        ),
    )
    return params


def table_space_ids(table) -> dict[str, str]:
    """The space ids a table declares in its schema metadata."""
    return {k: v for k, v in _schema_meta(table.schema).items() if k.endswith("space_id")}


def publish_id(table) -> str | None:
    """The id of the publish a table (at its checked-out version) descends from; None for a
    table published before publish ids existed."""
    return _schema_meta(table.schema).get(PUBLISH_KEY)


def same_publish(db, name: str, version: int, later: int) -> bool:
    """Whether `later` (>= `version`) holds what `version` held plus appends: both descend from
    one publish (appends, compaction and index builds keep its id; a publish writes a new one)."""
    if later < version:
        return False
    return publish_id(open_pinned(db, name, version)) == publish_id(open_pinned(db, name, later))


def append_rows(db, name: str, rows: pa.Table) -> int:
    """Append rows to an existing table, refusing vectors of a space other than the table's."""
    table = db.open_table(name)
    for column, expected in table_space_ids(table).items():
        if column in rows.column_names:
            _refuse_foreign_space(name, column, rows.column(column), expected)
    table.add(rows)
    return table.version
