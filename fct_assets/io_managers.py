"""IO managers: checkpoints (safetensors + sha256 verified against the event log) and JSON.

Neither pickles anything. A checkpoint is loaded only if its sha256 equals the one recorded
in the materialisation that wrote it, so a file swapped or edited on disk is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field

from fct_assets.partitions import check_version
from fct_assets.resources import DATA_ROOT


def _op_output_path(output: dg.OutputContext, suffix: str) -> Path:
    """An op output inside a graph asset (e.g. the backfill plan): one file per run, step and output."""
    mapped = f".{output.mapping_key}" if output.mapping_key else ""
    return Path("_runs") / output.run_id / f"{output.step_key}.{output.name}{mapped}{suffix}"


def _relative_path(context: dg.OutputContext | dg.InputContext, suffix: str) -> Path:
    output = context if isinstance(context, dg.OutputContext) else context.upstream_output
    if output is not None and not output.has_asset_key:
        return _op_output_path(output, suffix)
    key = context.asset_key.path
    if context.has_asset_partitions:
        # Partition keys are model versions: checked so that a path never leaves the root.
        return Path(*key) / f"{check_version(context.asset_partition_key)}{suffix}"
    return Path(*key[:-1]) / f"{key[-1]}{suffix}"


def latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
):
    """The event-log record of the latest materialisation of (asset, partition), or None."""
    flt = dg.AssetRecordsFilter(
        asset_key=asset_key, asset_partitions=[partition] if partition else None
    )
    records = instance.fetch_materializations(flt, limit=1).records
    return records[0] if records else None


def plain_metadata(record) -> dict[str, Any]:
    """A materialisation record's metadata as plain values."""
    return {k: getattr(v, "value", v) for k, v in record.asset_materialization.metadata.items()}


def recorded_metadata(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
) -> dict[str, Any]:
    """The metadata of the latest materialisation of (asset, partition), as plain values."""
    record = latest_materialization(instance, asset_key, partition)
    if record is None:
        where = f"[{partition}]" if partition else ""
        raise LookupError(f"{asset_key.to_user_string()}{where}: never materialised")
    return plain_metadata(record)


class _FileIOManager(dg.ConfigurableIOManager):
    """One file per asset (and partition) under `root`, named `<key>/<partition><suffix>`."""

    root: str
    _suffix: ClassVar[str]

    def path_for(self, context: dg.OutputContext | dg.InputContext) -> Path:
        return Path(self.root) / _relative_path(context, self._suffix)


class CheckpointIOManager(_FileIOManager):
    """Model checkpoints under `root`: one safetensors file per asset and partition."""

    _suffix: ClassVar[str] = ".safetensors"
    root: str = Field(
        default_factory=lambda: os.environ.get(
            "FCT_CHECKPOINT_ROOT", str(DATA_ROOT / "checkpoints")
        ),
        description="Folder for checkpoints. Env FCT_CHECKPOINT_ROOT.",
    )

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        from fct_ml.checkpoint import save_checkpoint

        name = context.asset_key.to_user_string()
        if context.has_asset_partitions:
            name = f"{name}:{context.asset_partition_key}"
        provenance = {"run_id": context.run_id, "asset": name}
        info = save_checkpoint(self.path_for(context), obj, name=name, metadata=provenance)
        context.add_output_metadata(
            {
                "sha256": info.sha256,
                "space_id": info.space_id,
                "path": dg.MetadataValue.path(info.path),
            }
        )

    def load_input(self, context: dg.InputContext) -> Any:
        from fct_ml.checkpoint import load_checkpoint

        upstream = context.upstream_output
        partition = context.asset_partition_key if context.has_asset_partitions else None
        recorded = recorded_metadata(context.instance, upstream.asset_key, partition)
        model, meta = load_checkpoint(self.path_for(context), recorded.get("sha256"))
        model.checkpoint_sha256 = meta["sha256"]  # provenance for the asset that uses it
        model.space_id = recorded.get("space_id")
        # The whole record of the materialisation this checkpoint came from: an asset that checks
        # it (e.g. the spaces h was trained on) reads the same record, not a later one.
        model.recorded_metadata = recorded
        return model


class JsonIOManager(_FileIOManager):
    """Small JSON records (dataset descriptors, table summaries, reports) under `root`."""

    _suffix: ClassVar[str] = ".json"
    root: str = Field(
        default_factory=lambda: os.environ.get("FCT_RECORD_ROOT", str(DATA_ROOT / "records")),
        description="Folder for JSON records. Env FCT_RECORD_ROOT.",
    )

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        path = self.path_for(context)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)

    def load_input(self, context: dg.InputContext) -> Any:
        return json.loads(self.path_for(context).read_text())
