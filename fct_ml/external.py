"""Embedding models that come from outside the study: a checkpoint file or a TorchScript file.

    train                 train the model (the default everywhere)
    checkpoint:PATH       a safetensors checkpoint of a registry architecture with its config in
                          the file's metadata (fct_ml.checkpoint's format, kind embedding_model)
    torchscript:PATH      a TorchScript archive (torch.jit.save) taking images and returning
                          (N, D) embeddings, behind the preprocessing declared with it

Every external file is read once, its sha256 computed (and compared with the one given, if
any), and the model is refused with one line naming the problem when it cannot load, gives
another dim than declared, or gives NaN/Inf (or no (N, D) matrix) for the probe batch. A
TorchScript model is kept as a `fct_ml.torchscript.TorchScriptModel`: the archive's bytes as a
uint8 tensor plus its preprocessing, so it is checkpointed (safetensors, sha256 verified on load)
like any model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from fct_ml.checkpoint import CheckpointError, load_checkpoint_bytes
from fct_ml.models import EmbeddingModel
from fct_ml.torchscript import TorchScriptConfig, TorchScriptModel, load_scripted

KINDS = ("train", "checkpoint", "torchscript")


class ModelSourceError(ValueError):
    """An external model that cannot be used (one line naming the file and the problem)."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # train | checkpoint | torchscript
    path: str = ""

    def __str__(self) -> str:
        return self.kind if self.kind == "train" else f"{self.kind}:{self.path}"


def parse_source(text: str) -> ModelSource:
    """'train' | 'checkpoint:PATH' | 'torchscript:PATH' -> ModelSource."""
    kind, sep, path = text.partition(":")
    if text == "train":
        return ModelSource("train")
    if kind in ("checkpoint", "torchscript") and sep and path:
        return ModelSource(kind, path)
    raise ModelSourceError(
        f"model source {text!r}: expected train, checkpoint:PATH or torchscript:PATH"
    )


@dataclass(frozen=True)
class Preprocessing:
    """What a TorchScript model expects, from images given as floats in [0, 1] of the gallery's
    channels: resized to `size` x `size` (0: as given), converted to `channels` (0: as given; 1
    <-> 3 by averaging or repeating), then (x - mean) / std."""

    size: int = 0
    channels: int = 0
    mean: float = 0.0
    std: float = 1.0


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _read(source: ModelSource, expected_sha256: str | None) -> tuple[bytes, str]:
    path = Path(source.path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise ModelSourceError(f"{source}: file not found") from None
    except OSError as err:
        raise ModelSourceError(f"{source}: cannot read ({err.strerror})") from None
    digest = _sha256(blob)
    if expected_sha256 and digest != expected_sha256.lower():
        raise ModelSourceError(
            f"{source}: sha256 {digest[:12]}… differs from the declared {expected_sha256[:12]}…"
        )
    return blob, digest


def load_external(
    source: ModelSource,
    *,
    in_channels: int,
    probe: torch.Tensor,
    embed_dim: int | None = None,
    preprocessing: Preprocessing = Preprocessing(),
    expected_sha256: str | None = None,
) -> tuple[nn.Module, str]:
    """(the model, the file's sha256) of a `checkpoint:` or `torchscript:` source, checked on
    `probe` ((N, C, H, W) uint8 images of the gallery): refused unless it gives finite (N, D)
    embeddings with D == `embed_dim` (when declared)."""
    blob, digest = _read(source, expected_sha256)
    if source.kind == "checkpoint":
        try:
            model, meta = load_checkpoint_bytes(blob, str(source), None)
        except CheckpointError as err:
            raise ModelSourceError(str(err)) from None
        if not isinstance(model, EmbeddingModel):
            raise ModelSourceError(
                f"{source}: holds a {meta.get('kind')}, expected an embedding_model"
            )
        if model.config.in_channels != in_channels:
            raise ModelSourceError(
                f"{source}: takes {model.config.in_channels}-channel images, the gallery's have"
                f" {in_channels}"
            )
    elif source.kind == "torchscript":
        try:
            scripted = load_scripted(blob, "cpu")
        except Exception as err:  # RuntimeError, ValueError: the archive is not TorchScript
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ModelSourceError(f"{source}: not a TorchScript archive ({reason})") from None
        del scripted  # loaded again from the bytes the checkpoint keeps
        if preprocessing.std <= 0:
            raise ModelSourceError(f"{source}: preprocessing std {preprocessing.std}; expected > 0")
        probe_dim = embed_dim if embed_dim is not None else 0
        model = TorchScriptModel(
            TorchScriptConfig(
                embed_dim=probe_dim,
                in_channels=in_channels,
                archive_bytes=len(blob),
                size=preprocessing.size,
                channels=preprocessing.channels,
                mean=preprocessing.mean,
                std=preprocessing.std,
                source_sha256=digest,
            )
        )
        model.archive.copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
    else:
        raise ModelSourceError(f"{source}: not an external model source")
    dim = _probe(model.eval(), probe, str(source), embed_dim)
    if isinstance(model, TorchScriptModel) and model.config.embed_dim != dim:
        fixed = TorchScriptModel(replace(model.config, embed_dim=dim))
        fixed.archive.copy_(model.archive)
        model = fixed.eval()
    return model, digest


def _probe(model: nn.Module, probe: torch.Tensor, where: str, embed_dim: int | None) -> int:
    """The embedding dim the model gives for the probe batch; refused unless finite (N, D)."""
    n = probe.shape[0]
    try:
        with torch.no_grad():
            out = model(probe.float() / 255.0)
    except Exception as err:  # whatever the model raises on the gallery's images
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelSourceError(f"{where}: fails on the probe batch ({reason})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSourceError(f"{where}: gives {shape} for {n} probe images; expected ({n}, D)")
    if embed_dim is not None and out.shape[1] != embed_dim:
        raise ModelSourceError(
            f"{where}: gives {out.shape[1]}-d embeddings, declared embed_dim is {embed_dim}"
        )
    if not torch.isfinite(out).all():
        raise ModelSourceError(f"{where}: gives NaN or Inf for the probe batch")
    return int(out.shape[1])
