"""Tiny seeded inputs shared by the model, trainer and transformation tests."""

import torch

# A transformation small enough to train in a test: old 3-d, side-info 2-d, new 2-d.
TINY_H = dict(old_dim=3, side_info_dim=2, new_dim=2, branch_width=4, inner_width=4)


def tiny_images(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 8, 8) uint8 images and labels 0, 1, 2, 0, ... (seed 0)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 3


def tiny_features(n: int = 16) -> tuple[torch.Tensor, ...]:
    """(old (n, 3), side_info (n, 2), new (n, 2), labels (n,)) drawn with seed 3."""
    g = torch.Generator().manual_seed(3)
    old = torch.randn(n, 3, generator=g)
    side = torch.randn(n, 2, generator=g)
    new = torch.randn(n, 2, generator=g)
    labels = torch.arange(n) % 3
    return old, side, new, labels
