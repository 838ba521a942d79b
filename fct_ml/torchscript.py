"""An embedding model that comes as a TorchScript archive (torch.jit.save), kept as a module.

The archive's bytes are a uint8 buffer and its preprocessing is the config, so the model is
checkpointed (safetensors, sha256 verified on load) like any model; the scripted module is
loaded from those bytes when first called, on the model's device. `fct_ml.external` reads and
checks such files; `fct_ml.checkpoint` saves and rebuilds them.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def load_scripted(blob: bytes, device) -> torch.jit.ScriptModule:
    """A TorchScript archive's bytes -> its module, its tensors on `device`."""
    # torch 2.14 marks TorchScript deprecated in favour of torch.export; teams still ship
    # TorchScript files, which is what a torchscript: source holds, so its FutureWarning is not news.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(blob), map_location=device)


@dataclass(frozen=True)
class TorchScriptConfig:
    """A TorchScript embedding model: its archive's size, dims and preprocessing."""

    embed_dim: int
    in_channels: int  # channels of the images fed to it (the gallery's)
    archive_bytes: int
    size: int = 0
    channels: int = 0
    mean: float = 0.0
    std: float = 1.0
    source_sha256: str = ""  # sha256 of the TorchScript file it was read from
    num_classes: int = 0  # no classifier: h trains without FastFill's cross-entropy


class TorchScriptModel(nn.Module):
    """x (N, C, H, W) floats in [0, 1] -> (N, embed_dim): preprocessing, then the scripted module."""

    def __init__(self, config: TorchScriptConfig):
        super().__init__()
        self.config = config
        self.classifier = None
        self.register_buffer("archive", torch.zeros(config.archive_bytes, dtype=torch.uint8))
        # Frozen/encode find the device through the parameters; a TorchScript module's own
        # weights live inside the archive, so an empty parameter anchors the device.
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self._scripted: torch.jit.ScriptModule | None = None
        self._loaded_from: int | None = None

    def scripted(self) -> torch.jit.ScriptModule:
        key = int(self.archive.data_ptr()) if self.archive.numel() else 0
        if self._scripted is None or self._loaded_from != key:
            blob = self.archive.detach().cpu().numpy().tobytes()
            self._scripted = load_scripted(blob, self.anchor.device)
            self._scripted.eval()
            self._loaded_from = key
        return self._scripted

    def _apply(self, fn, *args, **kwargs):
        self._scripted = None  # moved to another device: reload next time, there
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = x.float()
        if c.channels and x.shape[1] != c.channels:
            x = x.mean(1, keepdim=True) if c.channels == 1 else x.expand(-1, c.channels, -1, -1)
        if c.size and tuple(x.shape[2:]) != (c.size, c.size):
            x = F.interpolate(x, size=(c.size, c.size), mode="bilinear", align_corners=False)
        x = (x - c.mean) / c.std
        return self.scripted()(x)
