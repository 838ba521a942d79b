"""Closed-form transformations: h fitted in one solve instead of trained, as baselines for the
learned h and as an h a user may deploy.

    linear       ridge regression [old, side-info] -> new (or old -> new without side-info)
    procrustes   orthogonal Procrustes old -> new: y = s (x - mean_x) R + mean_y, R with
                 orthonormal rows or columns (semi-orthogonal where the dims differ)

Both are affine, so either is one `ClosedFormMap`: one Linear layer, the same interface as
`fct_ml.transformation.Transformation` where the backfill reads it (`config.old_dim`,
`config.side_info_dim`, `config.new_dim`, `config.side_info`, `sigma_head` None, a forward of
(old, side)), checkpointed as the `closed_form` kind (fct_ml.checkpoint).

Fitted in float64 on the same training features as the learned h (fct_ml.pipeline.Features);
a fit takes seconds where the MLP trains for minutes.

Procrustes, with its translation and its one global scale s (Schönemann & Carroll, 1970): a
rotation alone cannot match two spaces whose vectors differ in mean and norm. R = U V^T from
the SVD U S V^T of Xc^T Yc (centred features), s = trace(S) / ||Xc||^2. Where old_dim <=
new_dim, R has orthonormal rows, ||Xc R|| = ||Xc||, and this is the least-squares optimum
among such maps. Where old_dim > new_dim (R with orthonormal columns) no closed form is exact;
this is the usual SVD solution, the R that maximises trace(R^T Xc^T Yc).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from fct_ml.config import ConfigError

ClosedFormKind = Literal["linear", "procrustes"]
KINDS: tuple[str, ...] = ("linear", "procrustes")
# The ridge penalty relative to the features' scale: lambda = RIDGE * trace(Xc^T Xc / N) / D,
# i.e. a share of the mean variance per input dimension, so one value suits features of any
# norm. Small: it only steadies the solve where inputs are nearly collinear (side-info and old
# embeddings of the same images are).
RIDGE = 1e-3


@dataclass(frozen=True)
class ClosedFormConfig:
    kind: ClosedFormKind = "linear"
    old_dim: int = 128
    side_info_dim: int = 128
    new_dim: int = 128
    # linear: whether the side-info is an input. procrustes maps the old embedding alone (False).
    side_info: bool = True
    ridge: float = RIDGE  # linear only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if self.kind == "procrustes" and self.side_info:
            raise ConfigError("side_info: procrustes maps the old embedding alone; expected False")
        for name in ("old_dim", "side_info_dim", "new_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
        if not self.ridge >= 0:
            raise ConfigError(f"ridge: expected a number >= 0, got {self.ridge!r}")

    @property
    def in_dim(self) -> int:
        return self.old_dim + (self.side_info_dim if self.side_info else 0)


class ClosedFormMap(nn.Module):
    """An affine h: old (N, old_dim), side (N, side_info_dim) or None -> (N, new_dim)."""

    # No FastFill sigma: a closed-form map predicts no uncertainty (the backfill then has no
    # sigma order, as for a plain h).
    sigma_head = None

    def __init__(self, config: ClosedFormConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.in_dim, config.new_dim)

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        if self.config.side_info:
            if side is None:
                raise ValueError("this transformation needs side_info")
            old = torch.cat([old, side.to(old.dtype)], dim=1)
        return self.linear(old)


def _centred(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    return x - mean, mean


def fit_ridge(
    x: torch.Tensor, y: torch.Tensor, ridge: float = RIDGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression y ~ x W + b in closed form: x (N, D_in), y (N, D_out) -> (W (D_in,
    D_out), b (D_out,)), float64. Minimises ||x W + b - y||^2 + N * lam * ||W||^2 with lam =
    `ridge` * trace(Xc^T Xc / N) / D_in (the intercept is not penalised)."""
    _check_pair(x, y)
    x, y = x.double(), y.double()
    xc, x_mean = _centred(x)
    yc, y_mean = _centred(y)
    n, d = xc.shape
    gram = xc.T @ xc / n  # (D_in, D_in) covariance
    lam = ridge * float(torch.diagonal(gram).sum()) / d
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), xc.T @ yc / n)
    return w, y_mean - x_mean @ w


def fit_procrustes(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Orthogonal Procrustes with translation and scale: x (N, D_x), y (N, D_y) -> (R (D_x, D_y)
    semi-orthogonal, b (D_y,), s) with y ~ s x R + b, float64 (see the module's docstring)."""
    _check_pair(x, y)
    x, y = x.double(), y.double()
    xc, x_mean = _centred(x)
    yc, y_mean = _centred(y)
    u, sv, vh = torch.linalg.svd(xc.T @ yc, full_matrices=False)
    rotation = u @ vh  # (D_x, D_y): orthonormal rows or columns
    norm = float(xc.pow(2).sum())
    scale = float(sv.sum()) / norm if norm > 0 else 1.0
    return rotation, y_mean - scale * x_mean @ rotation, scale


def fit_closed_form(
    kind: str,
    old_embedding: torch.Tensor,
    side_info: torch.Tensor,
    new_embedding: torch.Tensor,
    *,
    side_info_used: bool = True,
    ridge: float = RIDGE,
) -> ClosedFormMap:
    """The closed-form h of `kind` fitted on aligned features old (N, old_dim), side (N,
    side_dim), new (N, new_dim); procrustes ignores side-info (its config says so)."""
    if kind not in KINDS:
        raise ValueError(f"closed-form transformation: expected one of {list(KINDS)}, got {kind!r}")
    for name, t in (
        ("old_embedding", old_embedding),
        ("side_info", side_info),
        ("new_embedding", new_embedding),
    ):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or Inf; cannot fit the transformation on it")
    use_side = side_info_used and kind == "linear"
    config = ClosedFormConfig(
        kind=kind,
        old_dim=old_embedding.shape[1],
        side_info_dim=side_info.shape[1],
        new_dim=new_embedding.shape[1],
        side_info=use_side,
        ridge=ridge,
    )
    x = old_embedding.cpu()
    if use_side:
        x = torch.cat([x, side_info.cpu().to(x.dtype)], dim=1)
    if kind == "linear":
        weight, bias = fit_ridge(x, new_embedding.cpu(), ridge)
    else:
        rotation, bias, scale = fit_procrustes(x, new_embedding.cpu())
        weight = scale * rotation
    h = ClosedFormMap(config)
    with torch.no_grad():
        h.linear.weight.copy_(weight.T.float())
        h.linear.bias.copy_(bias.float())
    return h.eval()


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(
            f"closed-form fit: inputs {tuple(x.shape)} and targets {tuple(y.shape)} must be (N,"
            " D) with one N >= 2"
        )
