"""Evaluating an upgrade: the paper's cases on one query/gallery set, in percent."""

from __future__ import annotations

from typing import Any

import torch

from fct_ml.retrieval import Metric, retrieve


def _percent(summary: dict[str, float]) -> dict[str, float]:
    return {
        "top1": 100 * summary["top1"],
        "top5": 100 * summary["top5"],
        "mAP": 100 * summary["mAP"],
    }


def evaluate_cases(
    cases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    *,
    unseen_mask: torch.Tensor | None = None,
    leave_one_out: bool = True,
    metric: Metric = "l2",
    chunk_size: int = 1024,
) -> dict[str, dict[str, Any]]:
    """{case: (query (N, D), gallery (N, D))} over the same N labelled items -> metrics.

    Returns {"cases": {case: {top1, top5, mAP}}, "cases_unseen_classes": ..., "cases_seen_classes": ...}
    in percent; the split by `unseen_mask` (N,) restricts the *queries* (the gallery stays whole).
    Cases whose query and gallery dims differ are skipped (their vectors cannot be compared).
    """
    out: dict[str, dict[str, Any]] = {
        "cases": {},
        "cases_unseen_classes": {},
        "cases_seen_classes": {},
    }
    for case, (query, gallery) in cases.items():
        if query.shape[1] != gallery.shape[1]:
            continue
        result = retrieve(
            query,
            labels,
            gallery,
            labels,
            leave_one_out=leave_one_out,
            metric=metric,
            chunk_size=chunk_size,
        )
        out["cases"][case] = _percent(result.summary())
        if unseen_mask is not None and bool(unseen_mask.any()):
            out["cases_unseen_classes"][case] = _percent(result.summary(unseen_mask))
            out["cases_seen_classes"][case] = _percent(result.summary(~unseen_mask))
    return out


def gap_closed(cases: dict[str, dict[str, float]], case: str = "new/h(old)") -> dict[str, float]:
    """Share (%) of the old/old -> new/new gap that `case` closes, for top-1 and mAP."""
    out = {}
    for metric in ("top1", "mAP"):
        lo, hi = cases["old/old"][metric], cases["new/new"][metric]
        out[metric] = 100 * (cases[case][metric] - lo) / (hi - lo) if hi != lo else float("nan")
    return out
