"""The transformation h(old_embedding, side_info) -> new embedding space (FCT), and FastFill's sigma.

Shape as the official apple/ml-fct code: two input branches (old 128->256->256 and side-info
128->256->256, each Linear-BN-ReLU, the paper's 1x1 convolutions on a 1x1 map), their
concatenation, then an MLP 512->2048->2048->new_dim whose last layer is plain. FastFill adds
a linear head new_dim->1 on h's output that predicts the log of the sample's error.

The inner MLP's depth (`inner_depth` hidden layers of `inner_width`, 2 as the official code) and
a low-rank variant (`inner_rank`) exist for the quality-cost frontier of h
(benchmarks/studies/h_frontier.py); `transformation_macs` is h's cost per item.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from fct_ml.augment import AugmentConfig, augment, to_float
from fct_ml.config import ConfigError
from fct_ml.models import EmbeddingModel
from fct_ml.training import Frozen, seed_everything


@dataclass(frozen=True)
class TransformationConfig:
    old_dim: int = 128
    side_info_dim: int = 128
    new_dim: int = 128
    branch_width: int = 256
    inner_width: int = 2048
    # False: h(old) without side-info; as the official code, the side branch is fed the old
    # embedding a second time, so both variants have the same shape and capacity.
    side_info: bool = True
    uncertainty: bool = False  # FastFill: add the sigma head
    # FastFill: weight of the cross-entropy through the new classifier against the squared
    # error (chosen on validation: benchmarks/results/experiments.md).
    ce_weight: float = 1.0
    # Hidden layers of width inner_width in the inner MLP (2: 2w->W->W->new_dim, the official
    # shape); 1 drops the W->W layer.
    inner_depth: int = 2
    # 0: full. r > 0: each inner_width x inner_width layer is two Linear layers W->r->W with no
    # nonlinearity between them (a rank-r product, 2*W*r multiply-adds instead of W*W).
    inner_rank: int = 0

    def __post_init__(self) -> None:
        # from_dict checks types only; these ranges are what the layout can be built from.
        if isinstance(self.inner_depth, bool) or self.inner_depth < 1:
            raise ConfigError(f"inner_depth: expected an integer >= 1, got {self.inner_depth!r}")
        if isinstance(self.inner_rank, bool) or self.inner_rank < 0:
            raise ConfigError(
                f"inner_rank: expected an integer >= 0 (0: full rank), got {self.inner_rank!r}"
            )
        if self.inner_rank > 0 and self.inner_depth < 2:
            # A rank that changes nothing would be recorded as if it had: refused instead.
            raise ConfigError(
                f"inner_rank: {self.inner_rank} needs inner_depth >= 2 (depth"
                f" {self.inner_depth} has no inner_width x inner_width layer to factorise)"
            )


@dataclass(frozen=True)
class TrainedFor:
    """The checkpoints an h was trained for, by space id (`name@sha256[:12]`,
    fct_ml.checkpoint.space_id): the space it maps from, the side-info's, and the space it maps
    into. h's output is in `target_space_id` only when its inputs are in the other two, and only
    as long as that checkpoint is the target model: a new model retrained after h (an upgrade
    that failed half-way) makes a new space that h never saw. Stored in h's checkpoint."""

    source_space_id: str
    side_info_space_id: str
    target_space_id: str


class BindingError(ValueError):
    """An h applied to other checkpoints than it was trained for (one line naming both)."""


def bind(h: nn.Module, trained_for: TrainedFor) -> nn.Module:
    """`h`, marked as trained for these checkpoints (any kind of h: an attribute, not a tensor,
    so its weights and content digest are unchanged); returns h."""
    h.trained_for = trained_for
    return h


def trained_for(h: nn.Module) -> TrainedFor | None:
    """The checkpoints `h` was trained for, or None for an h that records none."""
    return getattr(h, "trained_for", None)


def require_trained_for(
    h: nn.Module,
    where: str,
    *,
    source: str | None = None,
    side_info: str | None = None,
    target: str | None = None,
    hint: str = "train it again",
) -> TrainedFor:
    """Refuse (BindingError, one line naming both spaces) an h used with another source,
    side-info or target space than it was trained for, or one that records none; the spaces
    given as None are not compared. Returns what h was trained for."""
    bound = trained_for(h)
    if bound is None:
        raise BindingError(f"{where} records no checkpoints it was trained for; {hint}")
    for role, was, now in (
        ("maps from", bound.source_space_id, source),
        ("reads side-info of", bound.side_info_space_id, side_info),
        ("maps into", bound.target_space_id, target),
    ):
        if now is not None and now != was:
            raise BindingError(
                f"{where} was trained for {was} (the space it {role}), but {now} is there now;"
                f" {hint}"
            )
    return bound


def mlp(
    dims: list[int], plain_last: bool, rank: int = 0, low_rank: Sequence[int] = ()
) -> nn.Sequential:
    """Linear-BN-ReLU per step of `dims`, the last Linear plain (with bias) if `plain_last`.
    With rank > 0, each step listed in `low_rank` is a bias-free Linear pair a -> rank -> b (no
    nonlinearity between them); every other layer keeps the index and name it has in the full
    MLP, so a full-rank h's state dict is the same at every release."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        if rank > 0 and i in low_rank:
            layers.append(
                nn.Sequential(nn.Linear(a, rank, bias=False), nn.Linear(rank, b, bias=False))
            )
        else:
            layers.append(nn.Linear(a, b, bias=last and plain_last))
        if not (last and plain_last):
            layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _inner_dims(config: TransformationConfig) -> list[int]:
    return [2 * config.branch_width, *[config.inner_width] * config.inner_depth, config.new_dim]


def _square_steps(config: TransformationConfig) -> range:
    """The inner MLP's inner_width x inner_width steps (hidden to hidden): the ones `inner_rank`
    factorises. Step 0 (2 * branch_width -> inner_width) never is, even when the two are equal."""
    return range(1, config.inner_depth)


def transformation_macs(config: TransformationConfig) -> int:
    """Multiply-accumulates per item of h's forward pass (with the sigma head when
    `config.uncertainty`), counting the Linear layers only: in_features * out_features each.
    BatchNorm, ReLU, bias adds and the concatenation are left out (O(width) each, against
    O(width^2) for a Linear)."""
    w = config.branch_width
    side_in = config.side_info_dim if config.side_info else config.old_dim
    branches = (config.old_dim + side_in) * w + 2 * w * w
    dims = _inner_dims(config)
    low_rank = _square_steps(config) if config.inner_rank > 0 else range(0)
    inner = sum(
        (a + b) * config.inner_rank if i in low_rank else a * b
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))
    )
    sigma = config.new_dim if config.uncertainty else 0
    return branches + inner + sigma


class Transformation(nn.Module):
    """h: old (N, old_dim), side (N, side_info_dim) or None -> (N, new_dim)."""

    def __init__(self, config: TransformationConfig):
        super().__init__()
        self.config = config
        side_in = config.side_info_dim if config.side_info else config.old_dim
        w = config.branch_width
        self.old_branch = mlp([config.old_dim, w, w], plain_last=False)
        self.side_branch = mlp([side_in, w, w], plain_last=False)
        self.inner = mlp(
            _inner_dims(config),
            plain_last=True,
            rank=config.inner_rank,
            low_rank=_square_steps(config),
        )
        self.sigma_head = nn.Linear(config.new_dim, 1) if config.uncertainty else None
        # log(mean squared error / mean exp(sigma)) over h's training features, set after
        # training, so that exp(sigma) is h's expected squared error ||h(x) - phi_new(x)||^2
        # in absolute terms (backfill ranks transformed items with it); orders are unchanged.
        self.register_buffer("sigma_offset", torch.zeros(()))

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.side_info:
            if side is None:
                raise ValueError("this transformation needs side_info")
            second = side
        else:
            second = old
        return self.inner(torch.cat([self.old_branch(old), self.side_branch(second)], dim=1))

    def forward_with_sigma(
        self, old: torch.Tensor, side: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (prediction (N, new_dim), sigma (N,)); sigma is the predicted log error (FastFill)."""
        if self.sigma_head is None:
            raise ValueError("this transformation has no uncertainty head (uncertainty=False)")
        pred = self(old, side)
        # sigma reads h's output but sends no gradient back into it: the sigma term of the
        # loss would otherwise shift every output along the head's weight, off the new model's
        # distribution.
        return pred, self.sigma_head(pred.detach()).squeeze(1) + self.sigma_offset


@torch.no_grad()
def calibrate_sigma(
    h: Transformation,
    old_embedding: torch.Tensor,
    side_info: torch.Tensor,
    new_embedding: torch.Tensor,
    *,
    batch_size: int = 4096,
) -> float:
    """Shift sigma so that mean exp(sigma) equals h's mean squared error on these features
    (N, dims): sigma's loss mixes the cross-entropy into its target and its bias trains
    slowly, so its raw scale is not the error's. Returns the offset (also stored in h)."""
    h.sigma_offset.zero_()
    frozen = Frozen(h, method="forward_with_sigma")
    sq_sum, exp_sum = 0.0, 0.0
    for start in range(0, old_embedding.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        pred, sigma = frozen(old_embedding[sl], side_info[sl])
        sq_sum += float((pred.cpu() - new_embedding[sl]).pow(2).sum())
        exp_sum += float(sigma.exp().sum())
    offset = math.log(max(sq_sum, 1e-12) / max(exp_sum, 1e-12))
    h.sigma_offset.fill_(offset)
    return offset


def training_features(
    models: Sequence[EmbeddingModel],
    images: torch.Tensor,
    views: int,
    aug: AugmentConfig,
    *,
    batch_size: int,
    seed: int,
) -> list[torch.Tensor]:
    """Features of `images` by each frozen model, for training h: one clean pass and
    `views - 1` augmented passes, the *same* augmented image going through every model.
    Returns one (views * N, D_model) tensor per model."""
    generator = seed_everything(seed)
    device = next(models[0].parameters()).device
    frozen = [Frozen(model) for model in models]
    outs: list[list[torch.Tensor]] = [[] for _ in models]
    for view in range(views):
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size].to(device))
            if view > 0:  # view 0 is the clean image
                x = augment(x, aug, generator)
            for out, model in zip(outs, frozen):
                out.append(model(x).cpu())
    return [torch.cat(o) for o in outs]
