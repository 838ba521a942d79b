"""The side-info model psi: SimCLR (NT-Xent) trained without labels on the old classes' images.

Side-info keeps what the old model's supervised training threw away. It is computed once, when
the old model is deployed, and stored beside every gallery item's old embedding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fct_ml.augment import AugmentConfig
from fct_ml.losses import SimCLRObjective
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.training import EpochRecord, TrainConfig, fit, prepare_model, seed_everything


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


def train_side_info_model(
    images: torch.Tensor,
    config: SideInfoConfig,
    train: TrainConfig,
    aug: AugmentConfig,
    *,
    device: torch.device,
    seed: int,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """Train psi on (N, C, H, W) uint8 images, no labels; returns the encoder (side-info model)."""
    if config.model.num_classes != 0:
        raise ValueError(
            "side-info model: model.num_classes must be 0 (it is trained without labels)"
        )
    generator = seed_everything(seed)
    model = prepare_model(SimCLRModel(config), device)
    objective = SimCLRObjective(model, aug, config.temperature, generator)
    history = fit(
        model,
        objective,
        (images,),
        train,
        generator=generator,
        desc="side_info_model",
        progress=progress,
        on_epoch=on_epoch,
    )
    return model.encoder.eval(), history
