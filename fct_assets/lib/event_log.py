"""What the Dagster event log recorded: the latest materialisation of an asset (partition) and
its metadata as plain values.

Apart from the IO managers (fct_assets.lib.io_managers) so that the commands that only read the
record (`fct lineage`) do not import the IO managers' filesystem layer (upath, fsspec: about a
tenth of a second of a cold start)."""

from __future__ import annotations

from typing import Any

import dagster as dg


def latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
):
    """The event-log record of the latest materialisation of (asset, partition), or None."""
    flt = dg.AssetRecordsFilter(
        asset_key=asset_key, asset_partitions=[partition] if partition else None
    )
    found = instance.fetch_materializations(flt, limit=1).records
    return found[0] if found else None


def plain_metadata(record) -> dict[str, Any]:
    """A materialisation record's metadata as plain values."""
    return {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}


def _where(asset_key: dg.AssetKey, partition: str | None) -> str:
    return asset_key.to_user_string() + (f"[{partition}]" if partition else "")


def recorded_metadata(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
) -> dict[str, Any]:
    """The metadata of the latest materialisation of (asset, partition), as plain values."""
    record = latest_materialization(instance, asset_key, partition)
    if record is None:
        raise LookupError(f"{_where(asset_key, partition)}: never materialised")
    return plain_metadata(record)
