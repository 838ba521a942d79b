"""External models in the asset graph: new_model (and the base old_model) from a TorchScript or
checkpoint file; a bad one is refused with one line and nothing is published."""

import dagster as dg
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fct_assets.lib import storage
from fct_assets.lib.event_log import plain_metadata
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_ml.checkpoint import save_checkpoint, sha256_file
from fct_ml.models import EmbeddingModel, ModelConfig


class Pooled(nn.Module):
    """(N, C, H, W) -> (N, C * 16): 4x4 average pooling, flattened; a fixed, usable embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 4).flatten(1)


def _models_job(env, selection):
    job = dg.define_asset_job("external", selection=dg.AssetSelection.assets(*selection))
    return dg.Definitions(
        assets=env.defs.assets,
        asset_checks=env.defs.asset_checks,
        jobs=[job],
        resources=env.resources(),
    ).resolve_job_def("external")


def _latest(env, asset, partition=None):
    flt = dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
    )
    return env.instance.fetch_materializations(flt, limit=1).records


def test_a_torchscript_new_model_upgrades_a_version(env, tmp_path):
    path = tmp_path / "pooled.pt"
    torch.jit.save(torch.jit.script(Pooled()), str(path))
    env.instance.add_dynamic_partitions("model_version", ["vts"])
    config = {
        "source": f"torchscript:{path}",
        "sha256": sha256_file(path),
        "embed_dim": 16,
        "preprocess_mean": 0.5,
        "preprocess_std": 0.5,
    }
    job = _models_job(env, ["new_model", "transformation", "backfilled_gallery"])
    result = job.execute_in_process(
        instance=env.instance,
        partition_key="vts",
        run_config={"ops": {"new_model": {"config": config}}},
    )
    assert result.success
    meta = plain_metadata(_latest(env, "new_model", "vts")[0])
    assert meta["source_sha256"] == sha256_file(path) and meta["embed_dim"] == 16
    model = load_recorded_checkpoint(env.instance, "new_model", "vts")  # sha256 checked again
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(model.model(x), Pooled()((x - 0.5) / 0.5))
    table = env.fct.connect().open_table("gallery_vts")
    assert storage.table_space_ids(table)["space_id"] == model.space_id
    assert table.schema.field("embedding").type.list_size == 16


@pytest.mark.parametrize(
    "kind, message",
    [
        ("wrong dim", "gives 16-d embeddings, declared embed_dim is 32"),
        ("not torchscript", "not a TorchScript archive"),
        ("wrong sha256", "differs from the declared"),
    ],
)
def test_a_bad_external_new_model_publishes_nothing(env, tmp_path, kind, message):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(Pooled()), str(path))
    if kind == "not torchscript":
        path.write_bytes(b"hello")
    version = "vbad" + str(abs(hash(kind)) % 1000)
    env.instance.add_dynamic_partitions("model_version", [version])
    config = {
        "source": f"torchscript:{path}",
        "embed_dim": 32 if kind == "wrong dim" else None,
        "sha256": "f" * 64 if kind == "wrong sha256" else None,
    }
    result = _models_job(env, ["new_model"]).execute_in_process(
        instance=env.instance,
        partition_key=version,
        run_config={"ops": {"new_model": {"config": config}}},
        raise_on_error=False,
    )
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    error = failure.step_failure_data.error
    while error.cause is not None:  # Dagster wraps the asset's own error
        error = error.cause
    text = error.message.strip()
    assert message in text and text.startswith("fct_ml.external.ModelSourceError: torchscript:")
    assert not _latest(env, "new_model", version)
    assert not (env.root / "checkpoints" / "new_model" / f"{version}.safetensors").exists()


def test_the_old_model_from_a_checkpoint(env, tmp_path):
    torch.manual_seed(0)
    theirs = EmbeddingModel(ModelConfig(arch="cnn-xs", embed_dim=8, in_channels=1, num_classes=5))
    info = save_checkpoint(tmp_path / "old.safetensors", theirs, name="their_old_model")
    # Its own instance and storage: the shared env's base assets stay as they are.
    from tests.support.env import DATASET_CONFIG

    home = tmp_path / "home"
    home.mkdir()
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        defs = dg.Definitions(
            assets=env.defs.assets,
            jobs=[dg.define_asset_job("old", dg.AssetSelection.assets("dataset", "old_model"))],
            resources={
                **env.resources(),
                "checkpoint_io_manager": type(env.checkpoints)(uri=str(tmp_path / "ck")),
                "record_io_manager": type(env.records)(uri=str(tmp_path / "rec")),
            },
        )
        config = {
            **DATASET_CONFIG["ops"],
            "old_model": {"config": {"source": f"checkpoint:{info.path}", "sha256": info.sha256}},
        }
        result = defs.resolve_job_def("old").execute_in_process(
            instance=instance, run_config={"ops": config}
        )
        assert result.success
        meta = plain_metadata(_latest_in(instance, "old_model"))
        assert meta["source_sha256"] == info.sha256 and meta["embed_dim"] == 8
        bad = {
            **config,
            "old_model": {"config": {"source": f"checkpoint:{info.path}", "embed_dim": 4}},
        }
        failed = defs.resolve_job_def("old").execute_in_process(
            instance=instance, run_config={"ops": bad}, raise_on_error=False
        )
        assert not failed.success
        assert plain_metadata(_latest_in(instance, "old_model"))["sha256"] == meta["sha256"]


def _latest_in(instance, asset):
    return instance.fetch_materializations(dg.AssetKey(asset), limit=1).records[0]
