"""Lineage of a model version: every checkpoint, table version, fingerprint, code version and
run that made it, read from the Dagster event log (the record of what was materialised).

The results are typed records (`Lineage`, `RowLineage`); `fct lineage --json` writes their
fields."""

from __future__ import annotations

from typing import Any

import dagster as dg

from fct_assets.lib.event_log import _where, latest_materialization, plain_metadata
from fct_assets.lib.keys import (
    BACKFILLED_GALLERY,
    BASE_ASSETS,
    DATASET,
    EVAL_REPORT,
    NEW_MODEL,
    OLD_MODEL,
    SIDE_INFO_MODEL,
    TRANSFORMATION,
    UPGRADE_ASSETS,
)
from fct_assets.lib.partitions import check_version
from fct_assets.lib.records import (
    HEADLINE,
    BackfilledTable,
    CheckpointMeta,
    DatasetRecord,
    Record,
    from_metadata,
)

# (asset, partitioned?) in graph order
_ASSETS = tuple((name, False) for name in BASE_ASSETS) + tuple(
    (name, True) for name in UPGRADE_ASSETS
)
# The checkpoints of a version, in graph order.
_CHECKPOINTS = (OLD_MODEL, SIDE_INFO_MODEL, NEW_MODEL, TRANSFORMATION)


class ChainHop(Record):
    """One space a version's gallery came through: the model version (or "old_model"), its
    space and checkpoint, and the transformation that mapped into it (None: the old model)."""

    version: str
    space_id: str | None
    sha256: str | None
    transformation_sha256: str | None


class Lineage(Record):
    """What made a model version: its table, checkpoints, dataset, code versions and runs, its
    headline metrics, the spaces its gallery came through, and how its rows got there."""

    version: str
    table: str
    table_version: int
    space_id: str
    checkpoints: dict[str, str | None]  # asset -> sha256, in graph order
    dataset_fingerprint: str
    code_versions: list[str]
    run_ids: list[str]
    headline: dict[str, float]  # records.HEADLINE label -> value
    # Each asset's recorded metadata (the keys lineage keeps) with its run, data version and
    # time: shown as it was recorded, not read by key elsewhere.
    assets: dict[str, dict[str, Any]]
    eval_report_run_id: str
    upgrade_chain: list[ChainHop]  # oldest first
    rows_by_source: dict[str, int]  # "<source>/<base|ingested>" -> rows


class SpaceCheckpoint(Record):
    """The checkpoint whose vectors are in a space: asset[partition] and its sha256."""

    model: str
    sha256: str | None


class RowHop(SpaceCheckpoint):
    """One space in a row's chain, with the checkpoint that made it ("unknown": none found)."""

    space_id: str


class RowLineage(Record):
    """How one row of a version's table got there."""

    version: str
    table: str
    table_version: int
    item_id: int
    label: int
    source: str  # transformed | re-embedded | ingested
    ingest_batch: str | None
    chain: list[RowHop]  # oldest space first


def count_rows_by_source(table) -> dict[str, int]:
    """{"<source>/<base|ingested>": rows} of a (pinned) version table: transformed or
    re-embedded, from the original gallery or an ingest batch."""
    names = set(table.schema.names)
    cols = ["source"] + (["ingest_batch"] if "ingest_batch" in names else [])
    counts: dict[str, int] = {}
    for r in table.search().select(cols).limit(None).to_arrow().to_pylist():
        key = f"{r['source']}/{'ingested' if r.get('ingest_batch') else 'base'}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def lineage(instance: dg.DagsterInstance, version: str, db=None) -> Lineage:
    """The lineage of `version`, from the latest materialisation of each asset.

    `db`: a LanceDB connection, or a callable that opens one (called only when the backfill
    recorded no row counts), or None (no counts then)."""
    check_version(version)
    assets: dict[str, Any] = {}
    metadata: dict[str, dict[str, Any]] = {}
    for name, partitioned in _ASSETS:
        record = latest_materialization(
            instance, dg.AssetKey(name), version if partitioned else None
        )
        if record is None:
            raise LookupError(
                f"lineage of {version}: {name}{f'[{version}]' if partitioned else ''} was never"
                " materialised"
            )
        meta = metadata[name] = plain_metadata(record)
        keep = (
            "sha256",
            "space_id",
            "path",
            "content_digest",
            "code_version",
            "fingerprint",
            "table",
            "version",
            "rows",
            "old_space_id",
            "side_info_space_id",
            "new_space_id",
            "gallery_store_version",
            "reembedded",
            "lancedb_uri",
            "source_version",
            "source_space_id",
            "source_model_sha256",
            "rows_by_source",
        )
        entry = {k: meta[k] for k in keep if k in meta}
        entry["run_id"] = record.run_id
        entry["data_version"] = (
            record.asset_materialization.tags.get("dagster/data_version")
            if record.asset_materialization.tags
            else None
        )
        entry["materialized_at"] = record.timestamp
        assets[name] = entry
    # The typed records of what was read, each from its asset's metadata.
    table = from_metadata(
        BackfilledTable,
        metadata[BACKFILLED_GALLERY],
        _where(dg.AssetKey(BACKFILLED_GALLERY), version),
    )
    dataset = from_metadata(DatasetRecord, metadata[DATASET], DATASET)
    checkpoints = {
        name: from_metadata(CheckpointMeta, metadata[name], name).sha256 or None
        for name in _CHECKPOINTS
    }
    # How the rows of the table got there, counted: recorded by the backfill that published the
    # table (the counts of the very version lineage pins), else read from LanceDB now. The
    # recorded counts keep `fct lineage` from importing lancedb (about 2 s of CPU on a cold start).
    recorded = assets[BACKFILLED_GALLERY].pop("rows_by_source", None)
    rows_by_source: dict[str, int] = dict(recorded) if isinstance(recorded, dict) else {}
    if not isinstance(recorded, dict) and db is not None:
        from fct_assets.lib import storage  # deferred: lancedb, as said above

        pinned = storage.open_pinned(db() if callable(db) else db, table.table, table.version)
        rows_by_source = count_rows_by_source(pinned)
    return Lineage(
        version=version,
        table=table.table,
        table_version=table.version,
        space_id=table.space_id,
        checkpoints=checkpoints,
        dataset_fingerprint=dataset.fingerprint,
        code_versions=sorted({a["code_version"] for a in assets.values() if a.get("code_version")}),
        run_ids=sorted({a["run_id"] for a in assets.values()}),
        headline={k: metadata[EVAL_REPORT][k] for k in HEADLINE if k in metadata[EVAL_REPORT]},
        assets=assets,
        eval_report_run_id=assets[EVAL_REPORT]["run_id"],
        upgrade_chain=upgrade_chain(instance, version),
        rows_by_source=rows_by_source,
    )


def _checkpoint_meta(record, name: str, partition: str | None) -> CheckpointMeta:
    return from_metadata(
        CheckpointMeta, plain_metadata(record), _where(dg.AssetKey(name), partition)
    )


def upgrade_chain(instance: dg.DagsterInstance, version: str) -> list[ChainHop]:
    """The spaces a version's gallery came through, oldest first: the old model, then each version
    whose transformation maps from the previous one, ending with `version`."""
    chain: list[ChainHop] = []
    seen: set[str] = set()
    current: str | None = version
    while current is not None and current not in seen:
        seen.add(current)
        new = latest_materialization(instance, dg.AssetKey(NEW_MODEL), current)
        h = latest_materialization(instance, dg.AssetKey(TRANSFORMATION), current)
        if new is None or h is None:
            raise LookupError(f"lineage of {version}: {current} was never materialised")
        new_meta = _checkpoint_meta(new, NEW_MODEL, current)
        h_meta = _checkpoint_meta(h, TRANSFORMATION, current)
        chain.append(
            ChainHop(
                version=current,
                space_id=new_meta.space_id or None,
                sha256=new_meta.sha256 or None,
                transformation_sha256=h_meta.sha256 or None,
            )
        )
        current = h_meta.source_version or None
    old = latest_materialization(instance, dg.AssetKey(OLD_MODEL), None)
    old_meta = _checkpoint_meta(old, OLD_MODEL, None) if old else CheckpointMeta()
    chain.append(
        ChainHop(
            version=OLD_MODEL,
            space_id=old_meta.space_id or None,
            sha256=old_meta.sha256 or None,
            transformation_sha256=None,
        )
    )
    return chain[::-1]


def space_checkpoints(instance: dg.DagsterInstance) -> dict[str, SpaceCheckpoint]:
    """space_id -> the checkpoint, for every model checkpoint materialised (each version's new
    model, the old model): what a row's chain of space_ids points to."""
    out: dict[str, SpaceCheckpoint] = {}
    for name, partitions in (
        (OLD_MODEL, [None]),
        (NEW_MODEL, instance.get_dynamic_partitions("model_version")),
    ):
        for partition in partitions:
            flt = dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(name), asset_partitions=[partition] if partition else None
            )
            for record in instance.fetch_materializations(flt, limit=50).records:
                meta = _checkpoint_meta(record, name, partition)
                if meta.space_id:
                    where = _where(dg.AssetKey(name), partition)
                    out.setdefault(
                        meta.space_id, SpaceCheckpoint(model=where, sha256=meta.sha256 or None)
                    )
    return out


def row_lineage(
    instance: dg.DagsterInstance,
    db,
    version: str,
    item_id: int,
    *,
    table_version: int | None = None,
) -> RowLineage:
    """How one row of a version's table got there: its chain of spaces with each checkpoint's
    sha256, transformed / re-embedded / ingested, and the ingest batch that brought the item."""
    # Deferred: storage loads lancedb (~2 s of CPU), which `fct lineage` of a version never needs.
    from fct_assets.lib import storage
    from fct_assets.serving.deployment import recorded_table

    row_table = recorded_table(instance, version)
    table = storage.open_pinned(
        db, row_table.table, table_version if table_version is not None else row_table.table_version
    )
    names = set(table.schema.names)
    columns = ["item_id", "label", "source", "space_id"] + [
        c for c in storage.LINEAGE_COLUMNS if c in names
    ]
    rows = table.search().where(f"item_id = {int(item_id)}").select(columns).limit(2).to_list()
    if not rows:
        raise LookupError(f"item {item_id}: not in {row_table.table} at version {table.version}")
    row = rows[0]
    spaces = space_checkpoints(instance)
    chain = (row.get("chain") or row["space_id"]).split(storage.CHAIN_SEP)
    unknown = SpaceCheckpoint(model="unknown", sha256=None)
    return RowLineage(
        version=version,
        table=row_table.table,
        table_version=table.version,
        item_id=int(item_id),
        label=row["label"],
        source=row["source"],
        ingest_batch=row.get("ingest_batch"),
        chain=[
            RowHop(space_id=space, **spaces.get(space, unknown).model_dump()) for space in chain
        ],
    )


def format_row_lineage(info: RowLineage) -> str:
    """`fct lineage VERSION --item-id ID` as text: how the row got there, space by space."""
    how = {
        "transformed": "transformed from the stored vector (no image read)",
        "re-embedded": "re-embedded from its stored image",
        "ingested": "embedded on arrival by this version's model",
    }.get(info.source, info.source)
    lines = [
        f"item {info.item_id} in {info.table} @ LanceDB version {info.table_version}: {how}",
        "  arrived          "
        + (f"ingest batch {info.ingest_batch}" if info.ingest_batch else "with the base gallery"),
    ]
    for step, hop in enumerate(info.chain):
        arrow = "  space          " if step == 0 else "  -> h ->        "
        lines.append(f"{arrow} {hop.space_id}  {hop.model} sha256 {hop.sha256}")
    return "\n".join(lines)


def format_lineage(info: Lineage) -> str:
    """`fct lineage VERSION` as text."""
    lines = [
        f"lineage of {info.version}: table {info.table} @ LanceDB version"
        f" {info.table_version} ({info.space_id})"
    ]
    for name, sha in info.checkpoints.items():
        lines.append(f"  {name:<16} sha256 {sha}")
    lines.append(f"  dataset          fingerprint {info.dataset_fingerprint}")
    lines.append(f"  code version     {', '.join(info.code_versions)}")
    lines.append(f"  dagster runs     {', '.join(info.run_ids)}")
    lines.append(
        "  headline         " + ", ".join(f"{k} {v:.1f}" for k, v in info.headline.items())
    )
    if info.upgrade_chain:
        lines.append("  upgrade chain    " + " -> ".join(hop.version for hop in info.upgrade_chain))
        for hop in info.upgrade_chain:
            h = f", h sha256 {hop.transformation_sha256}" if hop.transformation_sha256 else ""
            lines.append(f"    {hop.version:<14} {hop.space_id} sha256 {hop.sha256}{h}")
    for kind, count in sorted(info.rows_by_source.items()):
        lines.append(
            f"  rows {kind:<20} {count}  (source / arrived with the base gallery or ingested)"
        )
    return "\n".join(lines)
