"""Lineage of a model version: every checkpoint, table version, fingerprint, code version and
run that made it, read from the Dagster event log (the record of what was materialised)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from fct_assets.lib.event_log import latest_materialization, plain_metadata
from fct_assets.lib.partitions import check_version

# (asset, partitioned?) in graph order
_ASSETS = (
    ("dataset", False),
    ("old_model", False),
    ("side_info_model", False),
    ("gallery_store", False),
    ("new_model", True),
    ("transformation", True),
    ("backfilled_gallery", True),
    ("eval_report", True),
)


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


def lineage(instance: dg.DagsterInstance, version: str, db=None) -> dict[str, Any]:
    """{"version", "assets": {name: {run_id, data_version, sha256?, space_id?, ...}}, "headline": {...}}.

    `db`: a LanceDB connection, or a callable that opens one (called only when the backfill
    recorded no row counts), or None (no counts then)."""
    check_version(version)
    assets: dict[str, Any] = {}
    eval_meta: dict[str, Any] = {}
    for name, partitioned in _ASSETS:
        record = latest_materialization(
            instance, dg.AssetKey(name), version if partitioned else None
        )
        if record is None:
            raise LookupError(
                f"lineage of {version}: {name}{f'[{version}]' if partitioned else ''} was never"
                " materialised"
            )
        meta = plain_metadata(record)
        if name == "eval_report":
            eval_meta = meta
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
    report = assets["eval_report"]
    # How the rows of the table got there, counted: recorded by the backfill that published the
    # table (the counts of the very version lineage pins), else read from LanceDB now. The
    # recorded counts keep `fct lineage` from importing lancedb (about 2 s of CPU on a cold start).
    recorded = assets["backfilled_gallery"].pop("rows_by_source", None)
    rows_by_source: dict[str, int] = dict(recorded) if isinstance(recorded, dict) else {}
    if not isinstance(recorded, dict) and db is not None:
        from fct_assets.lib import storage

        table = storage.open_pinned(
            db() if callable(db) else db,
            assets["backfilled_gallery"]["table"],
            assets["backfilled_gallery"]["version"],
        )
        rows_by_source = count_rows_by_source(table)
    return {
        "version": version,
        "table": assets["backfilled_gallery"].get("table"),
        "table_version": assets["backfilled_gallery"].get("version"),
        "space_id": assets["backfilled_gallery"].get("space_id"),
        "checkpoints": {
            n: assets[n].get("sha256")
            for n in ("old_model", "side_info_model", "new_model", "transformation")
        },
        "dataset_fingerprint": assets["dataset"].get("fingerprint"),
        "code_versions": sorted(
            {a.get("code_version") for a in assets.values() if a.get("code_version")}
        ),
        "run_ids": sorted({a["run_id"] for a in assets.values()}),
        "headline": {
            k: eval_meta[k]
            for k in (
                "new/h(old) top1",
                "new/h(old) mAP",
                "old/old mAP",
                "new/new mAP",
                "gap closed mAP (%)",
            )
            if k in eval_meta
        },
        "assets": assets,
        "eval_report_run_id": report["run_id"],
        "upgrade_chain": upgrade_chain(instance, version),
        "rows_by_source": rows_by_source,
    }


def upgrade_chain(instance: dg.DagsterInstance, version: str) -> list[dict[str, Any]]:
    """The spaces a version's gallery came through, oldest first: the old model, then each version
    whose transformation maps from the previous one ({"version", "space_id", "sha256",
    "transformation_sha256"}), ending with `version`."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = version
    while current is not None and current not in seen:
        seen.add(current)
        new = latest_materialization(instance, dg.AssetKey("new_model"), current)
        h = latest_materialization(instance, dg.AssetKey("transformation"), current)
        if new is None or h is None:
            raise LookupError(f"lineage of {version}: {current} was never materialised")
        new_meta, h_meta = plain_metadata(new), plain_metadata(h)
        chain.append(
            {
                "version": current,
                "space_id": new_meta.get("space_id"),
                "sha256": new_meta.get("sha256"),
                "transformation_sha256": h_meta.get("sha256"),
            }
        )
        current = h_meta.get("source_version") or None
    old = latest_materialization(instance, dg.AssetKey("old_model"), None)
    old_meta = plain_metadata(old) if old else {}
    chain.append(
        {
            "version": "old_model",
            "space_id": old_meta.get("space_id"),
            "sha256": old_meta.get("sha256"),
            "transformation_sha256": None,
        }
    )
    return chain[::-1]


def space_checkpoints(instance: dg.DagsterInstance) -> dict[str, dict[str, str]]:
    """space_id -> {"model": asset[partition], "sha256"} for every model checkpoint materialised
    (each version's new model, the old model): what a row's chain of space_ids points to."""
    out: dict[str, dict[str, str]] = {}
    for name, partitions in (
        ("old_model", [None]),
        ("new_model", instance.get_dynamic_partitions("model_version")),
    ):
        for partition in partitions:
            flt = dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(name), asset_partitions=[partition] if partition else None
            )
            for record in instance.fetch_materializations(flt, limit=50).records:
                meta = plain_metadata(record)
                if meta.get("space_id"):
                    where = f"{name}[{partition}]" if partition else name
                    out.setdefault(meta["space_id"], {"model": where, "sha256": meta.get("sha256")})
    return out


def row_lineage(
    instance: dg.DagsterInstance,
    db,
    version: str,
    item_id: int,
    *,
    table_version: int | None = None,
) -> dict[str, Any]:
    """How one row of a version's table got there: its chain of spaces with each checkpoint's
    sha256, transformed / re-embedded / ingested, and the ingest batch that brought the item."""
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
    return {
        "version": version,
        "table": row_table.table,
        "table_version": table.version,
        "item_id": int(item_id),
        "label": row["label"],
        "source": row["source"],
        "ingest_batch": row.get("ingest_batch"),
        "chain": [
            {"space_id": space, **spaces.get(space, {"model": "unknown", "sha256": None})}
            for space in chain
        ],
    }


def format_row_lineage(info: dict[str, Any]) -> str:
    how = {
        "transformed": "transformed from the stored vector (no image read)",
        "re-embedded": "re-embedded from its stored image",
        "ingested": "embedded on arrival by this version's model",
    }.get(info["source"], info["source"])
    lines = [
        f"item {info['item_id']} in {info['table']} @ LanceDB version {info['table_version']}:"
        f" {how}",
        "  arrived          "
        + (
            f"ingest batch {info['ingest_batch']}"
            if info["ingest_batch"]
            else "with the base gallery"
        ),
    ]
    for step, hop in enumerate(info["chain"]):
        arrow = "  space          " if step == 0 else "  -> h ->        "
        lines.append(f"{arrow} {hop['space_id']}  {hop['model']} sha256 {hop['sha256']}")
    return "\n".join(lines)


def format_lineage(info: dict[str, Any]) -> str:
    lines = [
        f"lineage of {info['version']}: table {info['table']} @ LanceDB version"
        f" {info['table_version']} ({info['space_id']})"
    ]
    for name, sha in info["checkpoints"].items():
        lines.append(f"  {name:<16} sha256 {sha}")
    lines.append(f"  dataset          fingerprint {info['dataset_fingerprint']}")
    lines.append(f"  code version     {', '.join(info['code_versions'])}")
    lines.append(f"  dagster runs     {', '.join(info['run_ids'])}")
    lines.append(
        "  headline         " + ", ".join(f"{k} {v:.1f}" for k, v in info["headline"].items())
    )
    chain = info.get("upgrade_chain") or []
    if chain:
        lines.append("  upgrade chain    " + " -> ".join(hop["version"] for hop in chain))
        for hop in chain:
            h = f", h sha256 {hop['transformation_sha256']}" if hop["transformation_sha256"] else ""
            lines.append(f"    {hop['version']:<14} {hop['space_id']} sha256 {hop['sha256']}{h}")
    for kind, count in sorted((info.get("rows_by_source") or {}).items()):
        lines.append(
            f"  rows {kind:<20} {count}  (source / arrived with the base gallery or ingested)"
        )
    return "\n".join(lines)
