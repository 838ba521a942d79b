"""Lineage of a model version: every checkpoint, table version, fingerprint, code version and
run that made it, read from the Dagster event log (the record of what was materialised)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from fct_assets.io_managers import latest_materialization, plain_metadata
from fct_assets.partitions import check_version

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


def lineage(instance: dg.DagsterInstance, version: str) -> dict[str, Any]:
    """{"version", "assets": {name: {run_id, data_version, sha256?, space_id?, ...}}, "headline": {...}}."""
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
    }


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
    return "\n".join(lines)
