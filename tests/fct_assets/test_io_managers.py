"""The IO managers on a local folder and on an fsspec in-memory filesystem: a checkpoint goes in
and comes back as a verified, typed Checkpoint; a record comes back typed; a swapped checkpoint,
one whose materialisation recorded no sha256, and a stale record are refused with one line."""

from __future__ import annotations

import uuid

import dagster as dg
import pytest
import torch
from upath import UPath

from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager, storage_uri
from fct_assets.lib.records import Checkpoint, RecordError, VersionTable
from fct_ml.checkpoint import CheckpointError, content_digest
from fct_ml.models import EmbeddingModel, ModelConfig

CONFIG = ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3)


@dg.asset(io_manager_key="checkpoint_io_manager")
def small_model() -> EmbeddingModel:
    torch.manual_seed(0)
    return EmbeddingModel(CONFIG).eval()


@dg.asset(io_manager_key="record_io_manager")
def small_table(small_model: Checkpoint) -> VersionTable:
    return VersionTable(
        version="v2", table="gallery_v2", table_version=1, space_id=small_model.space_id
    )


@dg.asset
def reader(small_model: Checkpoint, small_table: VersionTable) -> None:
    # What crossed the boundary is typed: the model with its provenance, and the record.
    assert isinstance(small_model.model, EmbeddingModel) and not small_model.model.training
    assert small_model.space_id == small_table.space_id
    assert small_model.recorded.sha256 == small_model.sha256


ASSETS = [small_model, small_table, reader]


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    """A storage URI: a local folder, or a fresh folder of fsspec's in-memory filesystem."""
    if request.param == "local":
        return str(tmp_path / "storage")
    return f"memory://fct-test-{uuid.uuid4().hex[:8]}"


def _resources(uri: str) -> dict:
    return {
        "checkpoint_io_manager": CheckpointIOManager(uri=f"{uri}/checkpoints"),
        "record_io_manager": RecordIOManager(uri=f"{uri}/records"),
    }


def _run(
    uri: str, instance: dg.DagsterInstance, *selection: dg.AssetsDefinition
) -> dg.ExecuteInProcessResult:
    """Materialise `selection` (default: all) with the IO managers on `uri`; failures are returned."""
    return dg.materialize(
        ASSETS,
        selection=list(selection) or None,
        instance=instance,
        resources=_resources(uri),
        raise_on_error=False,
    )


def _refusal(result: dg.ExecuteInProcessResult) -> str:
    """The message of the error that failed the run's one failed step."""
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    while error.cause is not None:  # Dagster wraps the IO manager's error
        error = error.cause
    return error.message.strip()


def test_checkpoints_and_records_round_trip(storage):
    instance = dg.DagsterInstance.ephemeral()
    assert _run(storage, instance).success
    assert UPath(f"{storage}/checkpoints/small_model.safetensors").exists()
    assert UPath(f"{storage}/records/small_table.json").exists()
    recorded = instance.get_latest_materialization_event(dg.AssetKey("small_model"))
    meta = recorded.asset_materialization.metadata
    assert meta["path"].value == f"{storage}/checkpoints/small_model.safetensors"
    assert meta["space_id"].value == f"small_model@{meta['sha256'].value[:12]}"


def test_a_swapped_checkpoint_is_refused(storage):
    instance = dg.DagsterInstance.ephemeral()
    assert _run(storage, instance).success
    # Another model's file under the same name: loading must fail before the model is built.
    torch.manual_seed(1)
    other = EmbeddingModel(CONFIG).eval()
    assert content_digest(other) != content_digest(small_model.op.compute_fn.decorated_fn())
    from fct_ml.checkpoint import checkpoint_bytes

    UPath(f"{storage}/checkpoints/small_model.safetensors").write_bytes(
        checkpoint_bytes(other, name="small_model")[0]
    )
    result = _run(storage, instance, small_table)
    assert not result.success
    message = _refusal(result)
    assert "\n" not in message and "differs from the recorded" in message, message
    assert message.startswith(f"{CheckpointError.__module__}.CheckpointError: {storage}")


def test_a_checkpoint_without_a_recorded_sha256_is_refused(storage):
    instance = dg.DagsterInstance.ephemeral()
    assert _run(storage, instance).success
    path = f"{storage}/checkpoints/small_model.safetensors"
    # A materialisation that names the file but records no sha256 (an older writer, a hand-made
    # event): the file must not be loaded unverified, even though it is intact.
    instance.report_runless_asset_event(
        dg.AssetMaterialization("small_model", metadata={"path": path})
    )
    result = _run(storage, instance, small_table)
    assert not result.success
    message = _refusal(result)
    assert "\n" not in message, message
    assert "small_model: its materialisation recorded no sha256; refusing to load" in message


def test_a_stale_record_is_refused(storage):
    instance = dg.DagsterInstance.ephemeral()
    assert _run(storage, instance).success
    path = UPath(f"{storage}/records/small_table.json")
    path.write_text(path.read_text().replace('"table_version"', '"table_revision"'))
    result = _run(storage, instance, reader)
    assert not result.success
    message = _refusal(result)
    assert "\n" not in message, message
    assert f"{path}: stale or invalid VersionTable record (table_version: Field required" in (
        message
    )
    assert RecordError.__name__ in message


def test_storage_uri_from_the_environment(monkeypatch):
    monkeypatch.setenv("FCT_STORAGE_URI", "s3://bucket/fct/")
    assert storage_uri("checkpoints") == "s3://bucket/fct/checkpoints"
    assert CheckpointIOManager().uri == "s3://bucket/fct/checkpoints"
    assert RecordIOManager().uri == "s3://bucket/fct/records"
