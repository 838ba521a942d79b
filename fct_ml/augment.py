"""Batched image augmentation on tensors, on whatever device the batch is on.

Per-image PIL transforms cost more than the small CPU models they feed, so every
augmentation here acts on a whole (N, C, H, W) float batch at once: one affine grid
(random resized crop, shift, flip) and per-sample photometric jitter.

Deferred imports: torch loads when a batch is augmented, not when the policies are read, so
the registries load without torch (tests/test_registries.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported where it is used: fct_ml.datasets lists every dataset's policy, and a Dagster
# code location reads that list without loading torch.
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class AugmentConfig:
    """One augmentation policy. The defaults do nothing."""

    flip: bool = (
        False  # horizontal flip with p=0.5 (wrong for digits, right for clothes and photos)
    )
    crop_scale: tuple[float, float] = (1.0, 1.0)  # random resized crop: area fraction range
    crop_ratio: tuple[float, float] = (0.75, 1.333)  # random resized crop: aspect ratio range
    translate: float = 0.0  # extra random shift, as a fraction of the image side
    brightness: float = 0.0  # add U(-b, b)
    contrast: float = 0.0  # scale around the per-image mean by U(1-c, 1+c)
    grayscale_p: float = 0.0  # RGB only: replace by luminance with this probability
    jitter_p: float = 1.0  # probability that brightness/contrast are applied to an image


def to_float(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) uint8 -> float in [0, 1]; float input passes through."""
    import torch

    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images


def augment(
    x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply `config` to a float batch (N, C, H, W) in [0, 1]; returns a new (N, C, H, W) batch."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    device = x.device

    def uniform(lo: float, hi: float, size: int = n) -> torch.Tensor:
        return torch.rand(size, generator=generator, device="cpu").mul_(hi - lo).add_(lo).to(device)

    geometric = config.flip or config.crop_scale != (1.0, 1.0) or config.translate > 0
    if geometric:
        area = uniform(*config.crop_scale)
        log_ratio = uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1]))
        ratio = log_ratio.exp()
        # Side lengths of the crop as fractions of the image (clamped to the image).
        sx = (area * ratio).sqrt().clamp(max=1.0)
        sy = (area / ratio).sqrt().clamp(max=1.0)
        # Centre anywhere that keeps the crop inside, plus the extra shift (normalised coords: [-1,
        # 1]).
        tx = (1 - sx) * uniform(-1.0, 1.0) + 2 * config.translate * uniform(-1.0, 1.0)
        ty = (1 - sy) * uniform(-1.0, 1.0) + 2 * config.translate * uniform(-1.0, 1.0)
        flip = torch.ones(n, device=device)
        if config.flip:
            flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=device, dtype=x.dtype)
        theta[:, 0, 0] = sx * flip
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = sy
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if config.brightness > 0 or config.contrast > 0:
        apply = (uniform(0.0, 1.0) < config.jitter_p).float().view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = uniform(1 - config.contrast, 1 + config.contrast).view(n, 1, 1, 1)
        b = uniform(-config.brightness, config.brightness).view(n, 1, 1, 1)
        jittered = (x - mean) * c + mean + b
        x = apply * jittered + (1 - apply) * x
    if config.grayscale_p > 0 and x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=device, dtype=x.dtype).view(1, 3, 1, 1)
        gray = (x * weights).sum(dim=1, keepdim=True).expand_as(x)
        pick = (uniform(0.0, 1.0) < config.grayscale_p).float().view(n, 1, 1, 1)
        x = pick * gray + (1 - pick) * x
    return x.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class AugmentPolicy:
    """The augmentations of one kind of data: for supervised training and for SimCLR views."""

    supervised: AugmentConfig
    contrastive: AugmentConfig
