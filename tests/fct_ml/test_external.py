"""External models: checkpoint and TorchScript files, good and bad, checked on a probe batch."""

import hashlib

import pytest
import torch
import torch.nn as nn

from fct_ml.checkpoint import checkpoint_bytes, load_checkpoint_bytes, save_checkpoint
from fct_ml.external import (
    ModelSource,
    ModelSourceError,
    Preprocessing,
    load_external,
    parse_source,
)
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.torchscript import TorchScriptModel
from fct_ml.transformation import Transformation, TransformationConfig

PROBE = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)


class Mean3(nn.Module):
    """(N, C, H, W) -> (N, 3): each channel's mean, twice the first; exact to compute by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(2, 3))
        return torch.cat([m, 2 * m[:, :1], m[:, :1] * 0 + x.shape[-1]], dim=1)


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) / 0.0 * 0.0  # NaN


def _script(module: nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module), str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_parse_source():
    assert parse_source("train") == ModelSource("train")
    assert parse_source("checkpoint:/a/b.safetensors") == ModelSource(
        "checkpoint", "/a/b.safetensors"
    )
    for bad in ("", "checkpoint:", "onnx:/x", "Train"):
        with pytest.raises(ModelSourceError, match="expected train, checkpoint:PATH"):
            parse_source(bad)


def test_torchscript_model_with_declared_preprocessing(tmp_path):
    path = tmp_path / "m.pt"
    digest = _script(Mean3(), path)
    model, sha = load_external(
        ModelSource("torchscript", str(path)),
        in_channels=1,
        probe=PROBE,
        embed_dim=3,
        preprocessing=Preprocessing(size=4, channels=1, mean=0.5, std=0.25),
        expected_sha256=digest,
    )
    assert sha == digest and isinstance(model, TorchScriptModel)
    x = torch.full((2, 1, 8, 8), 0.75)  # floats in [0, 1], as encode feeds them
    # resized to 4x4 (constant stays 0.75), standardised: (0.75 - 0.5) / 0.25 = 1.
    assert torch.allclose(model(x), torch.tensor([[1.0, 2.0, 4.0]] * 2))
    # It round-trips through a checkpoint like any model, archive and preprocessing included.
    blob, kind = checkpoint_bytes(model, name="new_model:v9")
    again, meta = load_checkpoint_bytes(blob, "mem", hashlib.sha256(blob).hexdigest())
    assert kind == "torchscript" and meta["config"]["source_sha256"] == digest
    assert torch.equal(again(x), model(x))


def test_checkpoint_model(tmp_path):
    torch.manual_seed(0)
    model = EmbeddingModel(ModelConfig(arch="cnn-xs", embed_dim=8, in_channels=1, num_classes=3))
    info = save_checkpoint(tmp_path / "m.safetensors", model, name="theirs")
    loaded, sha = load_external(
        ModelSource("checkpoint", info.path), in_channels=1, probe=PROBE, embed_dim=8
    )
    assert sha == info.sha256
    x = PROBE.float() / 255
    assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"^torchscript:.*nope\.pt: file not found$"),
        ("not torchscript", r"^torchscript:.*: not a TorchScript archive \("),
        ("wrong dim", r"^torchscript:.*: gives 3-d embeddings, declared embed_dim is 128$"),
        ("nan", r"^torchscript:.*: gives NaN or Inf for the probe batch$"),
        (
            "sha256",
            r"^torchscript:.*: sha256 [0-9a-f]{12}… differs from the declared 000000000000…$",
        ),
    ],
)
def test_bad_torchscript_is_refused_with_one_line(tmp_path, case, message):
    path = tmp_path / "m.pt"
    _script(Broken() if case == "nan" else Mean3(), path)
    if case == "not torchscript":
        path.write_bytes(b"PK\x03\x04 not a zip at all")
    if case == "missing":
        path = tmp_path / "nope.pt"
    with pytest.raises(ModelSourceError, match=message) as err:
        load_external(
            ModelSource("torchscript", str(path)),
            in_channels=1,
            probe=PROBE,
            embed_dim=128 if case == "wrong dim" else None,
            expected_sha256="0" * 64 if case == "sha256" else None,
        )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "case, message",
    [
        ("channels", r"takes 3-channel images, the gallery's have 1$"),
        ("kind", r"holds a transformation, expected an embedding_model$"),
        ("corrupt", r"not a safetensors checkpoint"),
        ("wrong dim", r"gives 8-d embeddings, declared embed_dim is 16$"),
    ],
)
def test_bad_checkpoint_is_refused_with_one_line(tmp_path, case, message):
    path = tmp_path / "m.safetensors"
    if case == "kind":
        model = Transformation(TransformationConfig(old_dim=4, side_info_dim=4, new_dim=4))
    else:
        channels = 3 if case == "channels" else 1
        model = EmbeddingModel(ModelConfig(arch="cnn-xs", embed_dim=8, in_channels=channels))
    save_checkpoint(path, model, name="theirs")
    if case == "corrupt":
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelSourceError, match=message) as err:
        load_external(
            ModelSource("checkpoint", str(path)),
            in_channels=1,
            probe=PROBE,
            embed_dim=16 if case == "wrong dim" else None,
        )
    assert "\n" not in str(err.value)
