"""The side-info model psi: SimCLR (NT-Xent) trained without labels on the old classes' images.

Side-info keeps what the old model's supervised training threw away. It is computed once, when
the old model is deployed, and stored beside every gallery item's old embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fct_ml.models import EmbeddingModel, ModelConfig


@dataclass(frozen=True)
class SideInfoConfig:
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(num_classes=0)
    )  # embed_dim = side-info dim
    projection_dim: int = 64  # SimCLR projection head output (used for the loss only)
    temperature: float = 0.2


class SimCLRModel(nn.Module):
    """encoder (EmbeddingModel, whose output is the side-info) + projection head for NT-Xent."""

    def __init__(self, config: SideInfoConfig):
        super().__init__()
        self.encoder = EmbeddingModel(config.model)
        d = config.model.embed_dim
        self.projector = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, config.projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))
