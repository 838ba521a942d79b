"""IO managers: checkpoints (safetensors, sha256 verified against the event log) and typed
records (flat JSON, fct_assets.lib.records), under FCT_STORAGE_URI.

Both store files through universal-pathlib (Dagster's UPathIOManager): a local folder by
default, an object store such as `s3://bucket/fct` in deploy/ (s3fs; endpoint and credentials
from the AWS environment, fct_assets.lib.resources), any fsspec filesystem in tests (`memory://`).
Neither pickles anything. A checkpoint is loaded only if its sha256 equals the one recorded in
the materialisation that wrote it, so a file swapped or edited in storage is refused, and so is
one whose materialisation recorded no sha256.

Layout under the storage URI: `checkpoints/<asset>[/<version>].safetensors`,
`records/<asset>[/<version>].json`, and an op's output inside a graph asset (the backfill plan,
shard results) at `records/<run_id>/<step>/<output>[/<mapping key>].json`.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import dagster as dg
from pydantic import Field
from upath import UPath

from fct_assets.lib import records
from fct_assets.lib.event_log import _where, recorded_metadata
from fct_assets.lib.partitions import check_version
from fct_assets.lib.resources import (
    DATA_ROOT,
    fsspec_storage_options,
    is_object_store,
    object_store_error,
)

STORAGE_ENV = "FCT_STORAGE_URI"


def storage_uri(*parts: str) -> str:
    """FCT_STORAGE_URI (default: the checkout's data/ folder) joined with `parts`."""
    base = os.environ.get(STORAGE_ENV) or str(DATA_ROOT)
    return "/".join([base.rstrip("/"), *parts])


def store_path(uri: str | UPath) -> UPath:
    """`uri` as a UPath; an s3:// one with the endpoint and credentials of the AWS environment
    (fct_assets.lib.resources.fsspec_storage_options)."""
    if isinstance(uri, UPath):
        return uri
    return UPath(uri, **fsspec_storage_options(str(uri)))


def _store_failure(path: UPath, err: Exception, doing: str) -> Exception:
    """`err` as one line naming the endpoint when `path` is on an object store (botocore's
    errors are not OSErrors, and a traceback through aiobotocore names nothing of ours)."""
    if is_object_store(str(path)):
        return object_store_error(str(path), err, doing)
    return err


def recorded_record(
    instance: dg.DagsterInstance,
    cls: type[records.R],
    asset: str,
    partition: str | None = None,
    *,
    within: str | None = None,
) -> records.R:
    """The record `cls` of the latest materialisation of (asset, partition), from its metadata
    (or from the JSON metadata entry `within`, e.g. the eval report's "json")."""
    key = dg.AssetKey(asset)
    meta = recorded_metadata(instance, key, partition)
    where = _where(key, partition)
    if within is not None:
        if not isinstance(meta.get(within), dict):
            raise records.RecordError(f"{where}: its metadata has no {within!r} entry")
        meta, where = meta[within], f"{where}.{within}"
    return records.from_metadata(cls, meta, where)


def write_atomically(path: UPath, blob: bytes) -> None:
    """Write `blob` so that readers see the old file or the whole new one, never a part.

    On a local filesystem: a temporary file renamed over the target. An object store's put is
    atomic by itself (and its rename would be a second copy)."""
    if path.protocol in ("", "file", "local"):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(blob)
            tmp.rename(path)
        finally:
            if tmp.exists():
                tmp.unlink()
    else:
        try:
            path.write_bytes(blob)
        except Exception as err:
            raise _store_failure(path, err, "cannot write") from err


class _FctUPathIOManager(dg.UPathIOManager):
    """Partition keys are model versions, checked so that a path never leaves the base."""

    def make_safe_partition_path(self, base_path: UPath, partition: str) -> UPath:
        return base_path / check_version(partition)


def checkpoint_from_record(
    recorded: records.CheckpointMeta, where: str, path: str | UPath | None = None
) -> records.Checkpoint:
    """The checkpoint a materialisation recorded (`recorded`: its metadata; `path`: where the
    file is, default the recorded path), verified against the recorded sha256.

    `where` names the materialisation in errors. A checkpoint without a recorded sha256 is
    refused: loading it unverified would let a swapped file through."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.checkpoint import CheckpointError, load_checkpoint_bytes, space_id

    path = store_path(path if path is not None else recorded.path)
    sha256 = recorded.sha256
    if not sha256:
        raise CheckpointError(
            f"{where}: its materialisation recorded no sha256; refusing to load {path} unverified"
            " (re-materialise it)"
        )
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception as err:
        raise _store_failure(path, err, "cannot read checkpoint") from err
    model, meta = load_checkpoint_bytes(blob, str(path), sha256)
    return records.Checkpoint(
        model=model,
        sha256=meta["sha256"],
        space_id=recorded.space_id or space_id(meta["name"], sha256),
        recorded=recorded,
    )


def recorded_checkpoint_meta(
    instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None
) -> records.CheckpointMeta:
    """What the latest materialisation of a checkpoint (asset, partition) recorded."""
    where = _where(key, partition)
    return records.from_metadata(
        records.CheckpointMeta, recorded_metadata(instance, key, partition), where
    )


def load_recorded_checkpoint(
    instance: dg.DagsterInstance, asset: str, partition: str | None = None
) -> records.Checkpoint:
    """The checkpoint of the latest materialisation of (asset, partition), verified."""
    key = dg.AssetKey(asset)
    return checkpoint_from_record(
        recorded_checkpoint_meta(instance, key, partition), _where(key, partition)
    )


class _CheckpointStore(_FctUPathIOManager):
    extension = ".safetensors"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:

        # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
        from fct_ml.checkpoint import checkpoint_bytes, space_id

        name = context.asset_key.to_user_string()
        if context.has_asset_partitions:
            name = f"{name}:{context.asset_partition_key}"
        provenance = {"run_id": context.run_id, "asset": name}
        blob, _ = checkpoint_bytes(obj, name=name, metadata=provenance)
        write_atomically(path, blob)
        sha256 = hashlib.sha256(blob).hexdigest()
        context.add_output_metadata({"sha256": sha256, "space_id": space_id(name, sha256)})

    def load_from_path(self, context: dg.InputContext, path: UPath) -> records.Checkpoint:
        key = context.upstream_output.asset_key
        partition = context.asset_partition_key if context.has_asset_partitions else None
        recorded = recorded_checkpoint_meta(context.instance, key, partition)
        return checkpoint_from_record(recorded, _where(key, partition), path)


class _RecordStore(_FctUPathIOManager):
    extension = ".json"

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        write_atomically(path, records.dumps(obj).encode())

    def load_from_path(self, context: dg.InputContext, path: UPath) -> records.Record:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise records.RecordError(f"{path}: record not found; materialise it first") from None
        except Exception as err:
            raise _store_failure(path, err, "cannot read record") from err
        return records.loads(text, str(path))


# Two small factories spelled out rather than one parametrised class: each is a resource that a
# deployment configures, and its field's default and description name its own folder.
class CheckpointIOManager(dg.ConfigurableIOManagerFactory):
    """Model checkpoints: one safetensors file per asset and partition; loads a `Checkpoint`."""

    uri: str = Field(
        default_factory=lambda: storage_uri("checkpoints"),
        description="Where checkpoints go: a folder or a URI (s3://bucket/fct/checkpoints). Env"
        " FCT_STORAGE_URI + /checkpoints.",
    )

    def create_io_manager(self, context) -> _CheckpointStore:
        return _CheckpointStore(base_path=store_path(self.uri))


class RecordIOManager(dg.ConfigurableIOManagerFactory):
    """Typed records (fct_assets.lib.records) as flat JSON, one file per asset and partition."""

    uri: str = Field(
        default_factory=lambda: storage_uri("records"),
        description="Where records go: a folder or a URI (s3://bucket/fct/records). Env"
        " FCT_STORAGE_URI + /records.",
    )

    def create_io_manager(self, context) -> _RecordStore:
        return _RecordStore(base_path=store_path(self.uri))
