"""Checkpoints: a model's state dict in safetensors (tensors only, no pickle), with its config
in the file's metadata and its sha256 beside it.

A checkpoint's sha256 names its embedding space: `space_id = name@sha256[:12]`. Vectors of two
spaces are never compared, so every stored vector carries the space_id of the model that made
it. Loading verifies the sha256 *before* parsing, so a tampered or swapped file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fct_ml.closed_form import ClosedFormConfig, ClosedFormMap
from fct_ml.config import ConfigError, from_dict
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.torchscript import TorchScriptConfig, TorchScriptModel
from fct_ml.transformation import Transformation, TransformationConfig


class CheckpointError(ValueError):
    """A checkpoint is missing, tampered with, or not what it claims (one-line message naming the file)."""


# kind -> (config class, constructor): what a checkpoint can be rebuilt into.
MODEL_KINDS: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {
    "embedding_model": (ModelConfig, EmbeddingModel),
    "transformation": (TransformationConfig, Transformation),
    # A closed-form h (linear, procrustes): one affine layer (fct_ml/closed_form.py).
    "closed_form": (ClosedFormConfig, ClosedFormMap),
    # An external TorchScript model: its archive as a uint8 tensor (fct_ml/torchscript.py).
    "torchscript": (TorchScriptConfig, TorchScriptModel),
}


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    kind: str
    name: str  # e.g. "old_model", "new_model"

    @property
    def space_id(self) -> str:
        return space_id(self.name, self.sha256)


def space_id(name: str, sha256: str) -> str:
    """The embedding space of vectors made by checkpoint `name` with this sha256."""
    return f"{name}@{sha256[:12]}"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_digest(model: nn.Module) -> str:
    """sha256 over the model's config and tensors (not its provenance): equal for equal weights."""
    digest = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def checkpoint_bytes(
    model: nn.Module, *, name: str, metadata: dict[str, Any] | None = None
) -> tuple[bytes, str]:
    """`model` (one of MODEL_KINDS: an EmbeddingModel, a Transformation, ...) as safetensors
    bytes; returns (bytes, kind).

    The file holds the state dict and, as metadata, the model kind, its config and any
    `metadata` given (JSON-able provenance)."""
    kind = next((k for k, (_, ctor) in MODEL_KINDS.items() if isinstance(model, ctor)), None)
    if kind is None:
        raise CheckpointError(
            f"{name}: cannot checkpoint a {type(model).__name__} (known: {', '.join(MODEL_KINDS)})"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {
        "kind": kind,
        "name": name,
        "config": json.dumps(asdict(model.config)),
        "provenance": json.dumps(metadata or {}),
    }
    return save_safetensors(tensors, metadata=meta), kind


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    name: str,
    metadata: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Write `model` atomically to a local `path` (see `checkpoint_bytes`); returns its sha256.

    The file appears complete or not at all."""
    blob, kind = checkpoint_bytes(model, name=name, metadata=metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return CheckpointInfo(
        path=str(path), sha256=hashlib.sha256(blob).hexdigest(), kind=kind, name=name
    )


def load_checkpoint(
    path: str | os.PathLike, expected_sha256: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored at the local `path`, in eval mode on the CPU; returns (model,
    metadata). See `load_checkpoint_bytes`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return load_checkpoint_bytes(path.read_bytes(), str(path), expected_sha256)


def load_checkpoint_bytes(
    blob: bytes, where: str, expected_sha256: str | None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint's bytes (read from `where`, named in errors).

    `expected_sha256` is the hash recorded when the file was written; a file whose hash
    differs is refused before it is parsed. Pass None only for a file you just made.
    """
    found = hashlib.sha256(blob).hexdigest()
    if expected_sha256 is not None and found != expected_sha256:
        raise CheckpointError(
            f"{where}: sha256 {found[:12]}… differs from the recorded {expected_sha256[:12]}…;"
            " refusing to load it"
        )
    try:
        tensors = load_safetensors(blob)
        # The metadata lives in the JSON header: read it from the same verified bytes, not
        # from a second read of the file.
        header_len = int.from_bytes(blob[:8], "little")
        meta = dict(json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {})
    except (SafetensorError, ValueError, OSError) as err:
        raise CheckpointError(
            f"{where}: not a safetensors checkpoint ({str(err).splitlines()[0]})"
        ) from None
    kind = meta.get("kind")
    if kind not in MODEL_KINDS:
        raise CheckpointError(
            f"{where}: unknown checkpoint kind {kind!r} (known: {', '.join(MODEL_KINDS)})"
        )
    config_cls, ctor = MODEL_KINDS[kind]
    try:
        config_data = json.loads(meta.get("config", "{}"))
        config = from_dict(config_cls, config_data)
    except (ConfigError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{where}: bad config in metadata ({err})") from None
    model = ctor(config)
    # Strict: missing and unexpected keys AND shape mismatches (which torch raises rather than
    # returns) all mean the file is not the model its config describes.
    missing = sorted(set(model.state_dict()) - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    mismatched = [
        k for k, v in model.state_dict().items() if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{where}: state dict does not match its config (missing {missing[:3]}, unexpected"
            f" {unexpected[:3]}, other shape {mismatched[:3]})"
        )
    model.load_state_dict(tensors)
    meta["config"] = config_data
    meta["provenance"] = json.loads(meta.get("provenance", "{}"))
    meta["sha256"] = found
    return model.eval(), meta
