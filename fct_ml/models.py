"""Embedding models: a backbone, a non-negative embedding and a bias-free classifier.

As in the paper's official code, the embedding is a 1x1 convolution over the backbone's
feature map followed by ReLU *before* global average pooling, so every embedding is
non-negative; the classifier is a linear layer without bias. Features are not
L2-normalised: retrieval uses raw L2 distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from fct_ml.backbones import BACKBONES


@dataclass(frozen=True)
class ModelConfig:
    """An embedding model. `in_channels` and `num_classes` come from the dataset."""

    arch: str = "cnn-s"  # a key of fct_ml.backbones.BACKBONES
    embed_dim: int = 128
    in_channels: int = 1
    num_classes: int = 10  # 0: no classifier (the side-info model)
    # "linear": the paper's bias-free linear classifier on the raw embedding. "cosine": a
    # normalised softmax, logit_scale * cos(embedding, class row), whose class rows are
    # directions that the embeddings of their class gather around; BCT's influence loss
    # through such a classifier puts new embeddings where the old model's own lie.
    classifier: Literal["linear", "cosine"] = "linear"
    logit_scale: float = 16.0  # cosine classifier only
    # Inputs arrive as floats in [0, 1]; the model standardises them itself so that a
    # checkpoint is all that serving needs.
    input_mean: float = 0.5
    input_std: float = 0.25


class EmbeddingModel(nn.Module):
    """x (N, C, H, W) floats in [0, 1] -> embedding (N, embed_dim), non-negative."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch not in BACKBONES:
            raise ValueError(
                f"arch: unknown backbone {config.arch!r} (known: {', '.join(BACKBONES)})"
            )
        self.config = config
        self.backbone, channels = BACKBONES[config.arch].build(config.in_channels)
        self.embed = nn.Conv2d(channels, config.embed_dim, kernel_size=1)
        self.classifier = (
            nn.Linear(config.embed_dim, config.num_classes, bias=False)
            if config.num_classes > 0
            else None
        )
        self.register_buffer("input_mean", torch.tensor(config.input_mean), persistent=False)
        self.register_buffer("input_std", torch.tensor(config.input_std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        fmap = torch.relu(self.embed(self.backbone(x)))  # (N, embed_dim, h, w), ReLU before pooling
        return fmap.mean(dim=(2, 3))  # (N, embed_dim)

    def logits(self, embedding: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) -> (N, num_classes)."""
        if self.classifier is None:
            raise ValueError("this model has no classifier (num_classes=0)")
        return classifier_logits(embedding, self.classifier.weight, self.config)


def classifier_logits(
    embedding: torch.Tensor, weight: torch.Tensor, config: ModelConfig
) -> torch.Tensor:
    """embedding (N, D), class rows (C, D) -> logits (N, C), as `config.classifier` scores them."""
    if config.classifier == "cosine":
        return config.logit_scale * F.normalize(embedding, dim=1) @ F.normalize(weight, dim=1).T
    return embedding @ weight.T


def build_model(config: ModelConfig) -> EmbeddingModel:
    return EmbeddingModel(config)
