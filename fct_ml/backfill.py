"""Backfilling: the gallery in the new space, by transformation (cheap) or re-embedding (images).

`apply_transformation` maps stored (old_embedding, side_info) arrays through h in batches; no
image is read. A *backfilling curve* (FastFill) measures retrieval while a growing fraction of
the gallery is re-embedded with the new model, in some order: `random`, `sigma` (most
uncertain first, FastFill) or `true_error` (largest true error ||h(x) - phi_new(x)||^2 first:
the order sigma tries to predict; not an upper bound on what an order can reach, because
retrieval depends on where an error points, not only on its size). Its area is the mean of
the metric over the curve's points, on FastFill's grid of points i/(points-1). Optionally
each transformed item carries its expected squared error exp(sigma) as one more coordinate
(`with_expected_error`); on Fashion-MNIST validation h trained as now needs no such
correction (its curves never dip) and the correction cost sigma's top-1 lead, so it is off
by default (benchmarks/results/experiments.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fct_ml.evaluation import BackfillCurve, BackfillSummary
from fct_ml.retrieval import Metric, RetrievalResult, retrieve_mixed
from fct_ml.training import Frozen

ORDERS = ("random", "sigma", "true_error")


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of `t` is NaN or +-Inf.

    One sum first: a NaN or an infinite element makes it NaN or infinite, so a finite sum proves
    every element finite, at a fraction of the elementwise test's cost (which allocates a mask
    as large as `t`; on a backfill of a cheap h it was a sixth of the time). Only a sum that
    overflowed (huge but finite values) or a real NaN/Inf takes the elementwise test."""
    if t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float64) if t.is_floating_point() else None
    if total is not None and bool(torch.isfinite(total)):
        return True
    return bool(torch.isfinite(t).all())


def apply_transformation(
    h: torch.nn.Module,
    old_embedding: torch.Tensor,
    side_info: torch.Tensor | None,
    *,
    batch_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h over stored vectors: old (N, old_dim), side (N, side_dim) -> ((N, new_dim), sigma (N,) or None)."""
    config = h.config
    if old_embedding.ndim != 2 or old_embedding.shape[1] != config.old_dim:
        raise ValueError(
            f"old_embedding: expected (N, {config.old_dim}), got {tuple(old_embedding.shape)}"
        )
    if config.side_info and (
        side_info is None or side_info.ndim != 2 or side_info.shape[1] != config.side_info_dim
    ):
        got = None if side_info is None else tuple(side_info.shape)
        raise ValueError(f"side_info: expected (N, {config.side_info_dim}), got {got}")
    if side_info is not None and side_info.shape[0] != old_embedding.shape[0]:
        raise ValueError(
            f"side_info: {side_info.shape[0]} rows but old_embedding has {old_embedding.shape[0]}"
        )
    # A NaN/Inf input would come out as a NaN vector, silently wrong in every ranking. Side-info
    # is checked only when h reads it (side_info=False feeds the old embedding twice).
    for name, t in (
        ("old_embedding", old_embedding),
        ("side_info", side_info if config.side_info else None),
    ):
        if t is not None and not all_finite(t):
            bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0])
            raise ValueError(f"{name}: row {bad} contains NaN or Inf; expected finite vectors")
    with_sigma = h.sigma_head is not None
    frozen = Frozen(h, method="forward_with_sigma" if with_sigma else "forward")
    outs, sigmas = [], []
    for start in range(0, old_embedding.shape[0], batch_size):
        old = old_embedding[start : start + batch_size].float()
        # Side-info goes to the device only when h reads it (h without side-info ignores it).
        out = (
            frozen(old, side_info[start : start + batch_size].float())
            if config.side_info
            else frozen(old)
        )
        if with_sigma:
            out, sigma = out
            sigmas.append(sigma.cpu())
        outs.append(out.cpu())
    transformed = torch.cat(outs) if outs else torch.empty(0, config.new_dim)
    if not with_sigma:
        return transformed, None
    return transformed, (torch.cat(sigmas) if sigmas else torch.empty(0))


def backfill_order(
    name: str,
    n: int,
    *,
    sigma: torch.Tensor | None = None,
    error: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The order (n,) in which gallery items are re-embedded: first index first."""
    if name == "random":
        return torch.randperm(n, generator=generator)
    if name == "sigma":
        if sigma is None:
            raise ValueError("backfill order 'sigma' needs the transformation's sigma")
        return torch.argsort(sigma, descending=True, stable=True)
    if name == "true_error":
        if error is None:
            raise ValueError(
                "backfill order 'true_error' needs the true error of each transformed item"
            )
        return torch.argsort(error, descending=True, stable=True)
    raise ValueError(f"backfill order: expected one of {ORDERS}, got {name!r}")


def with_expected_error(
    vectors: torch.Tensor, expected_sq_error: torch.Tensor | None
) -> torch.Tensor:
    """(N, D) gallery vectors -> (N, D + 1): one more coordinate, sqrt of each item's expected
    squared error (0 for a re-embedded item, None: all 0). Queries get a 0 there too.

    A transformed item h(x) stands for phi_new(x) = h(x) + e with E||e||^2 = its expected
    error, so E||q - phi_new(x)||^2 = ||q - h(x)||^2 + E||e||^2 (for e independent of q). The
    extra coordinate adds exactly that term to the squared L2 distance, so transformed and
    re-embedded items are ranked on the same scale in a partly backfilled gallery; without it
    h's outputs, regressed towards their conditional mean, sit systematically closer to every
    query than re-embedded items do, and a mixed gallery ranks worse than both of its ends.
    """
    extra = (
        torch.zeros(vectors.shape[0], 1)
        if expected_sq_error is None
        else expected_sq_error.float().clamp(min=0).sqrt().unsqueeze(1)
    )
    return torch.cat([vectors.float(), extra.to(vectors.device)], dim=1)


def backfill_results(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    transformed: torch.Tensor,
    reembedded: torch.Tensor,
    gallery_labels: torch.Tensor,
    orders: dict[str, torch.Tensor],
    fractions: Sequence[float],
    *,
    leave_one_out: bool = False,
    metric: Metric = "l2",
) -> dict[str, list[RetrievalResult]]:
    """For each order, the per-query retrieval at each fraction of the gallery re-embedded.

    query (Q, D) in the new space; transformed / reembedded (G, D): the gallery through h and
    through the new model. Returns {order: [result at fractions[0], ...]}, each point equal
    to `retrieve` on that mixed gallery; all orders and points are ranked together by
    `retrieve_mixed` (one sort per query, not one per point).
    """
    n = transformed.shape[0]
    if transformed.shape != reembedded.shape:
        raise ValueError(
            f"backfill curves: transformed {tuple(transformed.shape)} and re-embedded"
            f" {tuple(reembedded.shape)} galleries must have one shape"
        )
    # The distinct gallery sizes k = round(f * n), ascending: point i re-embeds the first
    # ks[i] items of an order, so the item at position j of an order is re-embedded from the
    # first point with ks[i] > j on (len(ks): never).
    ks = sorted({round(f * n) for f in fractions})
    switch = torch.empty(len(orders), n, dtype=torch.long)
    positions = torch.arange(n)
    for o, order in enumerate(orders.values()):
        if sorted(order.tolist()) != list(range(n)):
            raise ValueError(f"backfill order: expected a permutation of the {n} gallery items")
        switch[o, order] = torch.searchsorted(torch.tensor(ks), positions, right=True)
    results = retrieve_mixed(
        query,
        query_labels,
        transformed,
        reembedded,
        gallery_labels,
        switch,
        len(ks),
        leave_one_out=leave_one_out,
        metric=metric,
    )
    point = {k: i for i, k in enumerate(ks)}
    return {
        name: [results[o][point[round(f * n)]] for f in fractions] for o, name in enumerate(orders)
    }


def backfill_curves(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    transformed: torch.Tensor,
    reembedded: torch.Tensor,
    gallery_labels: torch.Tensor,
    orders: dict[str, torch.Tensor],
    fractions: Sequence[float],
    *,
    leave_one_out: bool = False,
    metric: Metric = "l2",
) -> dict[str, list[dict[str, float]]]:
    """For each order, the metrics at each fraction of the gallery re-embedded: the summaries
    of `backfill_results` (same arguments), {order: [summary at fractions[0], ...]}."""
    measured = backfill_results(
        query,
        query_labels,
        transformed,
        reembedded,
        gallery_labels,
        orders,
        fractions,
        leave_one_out=leave_one_out,
        metric=metric,
    )
    return {name: [r.summary() for r in points] for name, points in measured.items()}


def backfill_summary(
    new_embedding: torch.Tensor,
    labels: torch.Tensor,
    transformed: torch.Tensor,
    sigma: torch.Tensor,
    points: int,
    *,
    generator: torch.Generator,
    metric: Metric = "l2",
    expected_error: bool = False,
) -> BackfillSummary:
    """FastFill's backfilling curves for the three orders, and their areas, in percent: the
    summary of `backfill_study` (same arguments)."""
    return backfill_study(
        new_embedding,
        labels,
        transformed,
        sigma,
        points,
        generator=generator,
        metric=metric,
        expected_error=expected_error,
    )[0]


def backfill_study(
    new_embedding: torch.Tensor,
    labels: torch.Tensor,
    transformed: torch.Tensor,
    sigma: torch.Tensor,
    points: int,
    *,
    generator: torch.Generator,
    metric: Metric = "l2",
    expected_error: bool = False,
) -> tuple[BackfillSummary, dict[str, list[RetrievalResult]]]:
    """FastFill's backfilling curves for the three orders, their areas in percent, and each
    point's per-query results (for the negative flips along the curve).

    The gallery starts as `transformed` (h's vectors) and items are re-embedded (-> `new_embedding`)
    in the order of each strategy; queries are the new embeddings, leave-one-out. The
    `true_error` order knows each item's true error. Returns the curves and their areas by order
    (`random`, `sigma`, `true_error`), and {order: [RetrievalResult per point]}. With
    `expected_error`, each transformed item carries its expected squared error exp(sigma) as an
    extra coordinate (`with_expected_error`)."""
    fractions = [i / (points - 1) for i in range(points)]
    error = (transformed - new_embedding).pow(2).sum(1)
    if expected_error:
        transformed = with_expected_error(transformed, sigma.exp())
        new_embedding = with_expected_error(new_embedding, None)
    orders = {
        "random": backfill_order("random", len(labels), generator=generator),
        "sigma": backfill_order("sigma", len(labels), sigma=sigma),
        "true_error": backfill_order("true_error", len(labels), error=error),
    }
    results = backfill_results(
        new_embedding,
        labels,
        transformed,
        new_embedding,
        labels,
        orders,
        fractions,
        leave_one_out=True,
        metric=metric,
    )
    measured = {order: [r.summary() for r in pts] for order, pts in results.items()}
    curves = {
        order: BackfillCurve(
            fractions=tuple(fractions),
            top1=tuple(100 * p["top1"] for p in pts),
            mAP=tuple(100 * p["mAP"] for p in pts),
        )
        for order, pts in measured.items()
    }
    summary = BackfillSummary(curves=curves, areas={o: c.area() for o, c in curves.items()})
    return summary, results
