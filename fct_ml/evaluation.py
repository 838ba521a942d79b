"""Evaluating an upgrade: the paper's cases on one query/gallery set, in percent.

The case names (`Case`) and the typed results (`CaseMetrics`, `Evaluation`, `GapClosed`, and the
backfilling curves of fct_ml.backfill: `BackfillCurve`, `CurveArea`, `BackfillSummary`) are defined
here once; the report, its checks and the CLI read them by attribute. Importing this
module does not import torch (the record types load in a code location that must start fast).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from fct_ml.retrieval import Metric, RetrievalResult


class Case(StrEnum):
    """A case of the paper: query model / gallery vectors. A member is its name as a str."""

    OLD_OLD = "old/old"  # the old model on its own gallery: the lower bound
    NEW_NEW = "new/new"  # the new model on a re-embedded gallery: the upper bound
    NEW_H_OLD = "new/h(old)"  # new queries against the transformed gallery: FCT
    NEW_OLD = "new/old"  # new queries against the old gallery: incompatible
    BCT_OLD = "bct/old"  # the BCT baseline's queries against the old gallery
    BCT_BCT = "bct/bct"  # the BCT model on its own gallery


@dataclass(frozen=True)
class CaseMetrics:
    """Retrieval metrics of one case, in percent."""

    top1: float
    top5: float
    mAP: float  # noqa: N815 (the metric's usual name, and the key of the JSON written)

    def as_dict(self) -> dict[str, float]:
        """{"top1", "top5", "mAP"}: the shape written to JSON and asset metadata."""
        return {"top1": self.top1, "top5": self.top5, "mAP": self.mAP}


@dataclass(frozen=True)
class GapClosed:
    """Share (%) of the old/old -> new/new gap that a case closes (NaN when there is no gap)."""

    top1: float
    mAP: float  # noqa: N815 (as CaseMetrics.mAP)

    def as_dict(self) -> dict[str, float]:
        """{"top1", "mAP"}: the shape written to JSON and asset metadata."""
        return {"top1": self.top1, "mAP": self.mAP}


@dataclass(frozen=True)
class Evaluation:
    """Metrics per case: over every query, and split by whether the query's class is unseen
    (both splits empty when there was no unseen-class query or no mask)."""

    cases: dict[str, CaseMetrics] = field(default_factory=dict)
    unseen_classes: dict[str, CaseMetrics] = field(default_factory=dict)
    seen_classes: dict[str, CaseMetrics] = field(default_factory=dict)
    # The per-query outcomes behind `cases` (fct_ml.retrieval.RetrievalResult), for the paired
    # bootstrap and the negative flips of a study; not part of the metrics' value or JSON.
    results: dict[str, RetrievalResult] = field(default_factory=dict, compare=False, repr=False)

    def as_json(self) -> dict[str, dict[str, dict[str, float]]]:
        """{"cases", "cases_unseen_classes", "cases_seen_classes"}: {case: {top1, top5, mAP}}."""
        return {
            "cases": _as_dicts(self.cases),
            "cases_unseen_classes": _as_dicts(self.unseen_classes),
            "cases_seen_classes": _as_dicts(self.seen_classes),
        }


@dataclass(frozen=True)
class CurveArea:
    """Area under one order's backfilling curve, in percent: the mean of its points."""

    top1: float
    mAP: float  # noqa: N815 (as CaseMetrics.mAP)

    def as_dict(self) -> dict[str, float]:
        """{"top1", "mAP"}: the shape written to JSON and asset metadata."""
        return {"top1": self.top1, "mAP": self.mAP}


@dataclass(frozen=True)
class BackfillCurve:
    """One order's backfilling curve, in percent: the metrics with `fractions[i]` of the gallery
    re-embedded (FastFill's grid i/(points-1)). The three tuples have one length."""

    fractions: tuple[float, ...]
    top1: tuple[float, ...]
    mAP: tuple[float, ...]  # noqa: N815 (as CaseMetrics.mAP)

    def __post_init__(self) -> None:
        if not len(self.fractions) == len(self.top1) == len(self.mAP):
            raise ValueError(
                f"backfill curve: {len(self.fractions)} fractions, {len(self.top1)} top-1 and"
                f" {len(self.mAP)} mAP points"
            )

    @classmethod
    def from_results(
        cls, fractions: Sequence[float], points: Sequence[RetrievalResult]
    ) -> BackfillCurve:
        """The curve, in percent, of the per-query outcomes at each of its points
        (fct_ml.backfill.backfill_results' list for one order)."""
        summaries = [p.summary() for p in points]
        return cls(
            fractions=tuple(fractions),
            top1=tuple(100 * s["top1"] for s in summaries),
            mAP=tuple(100 * s["mAP"] for s in summaries),
        )

    def area(self) -> CurveArea:
        """The curve's area for both metrics (`curve_area`)."""
        return CurveArea(top1=curve_area(self.top1), mAP=curve_area(self.mAP))

    def largest_fall(self) -> dict[str, float]:
        """{"top1", "mAP"}: the curve's largest fall from its running maximum (`largest_fall`),
        in points; 0 for a curve that never falls."""
        return {"top1": largest_fall(self.top1), "mAP": largest_fall(self.mAP)}

    def as_dict(self) -> dict[str, list[float]]:
        """{"fractions", "top1", "mAP"}: the shape written to JSON and asset metadata."""
        return {"fractions": list(self.fractions), "top1": list(self.top1), "mAP": list(self.mAP)}


@dataclass(frozen=True)
class BackfillSummary:
    """FastFill's backfilling curves and their areas, by order (random, sigma, true_error)."""

    curves: dict[str, BackfillCurve]
    areas: dict[str, CurveArea]

    def curves_as_dicts(self) -> dict[str, dict[str, list[float]]]:
        """{order: {"fractions", "top1", "mAP"}}: the JSON shape of the curves."""
        return {order: c.as_dict() for order, c in self.curves.items()}

    def areas_as_dicts(self) -> dict[str, dict[str, float]]:
        """{order: {"top1", "mAP"}}: the JSON shape of the areas."""
        return {order: a.as_dict() for order, a in self.areas.items()}


def curve_area(values: Sequence[float]) -> float:
    """Area under a backfilling curve sampled at evenly spaced fractions: the mean of its points."""
    if len(values) == 0:
        raise ValueError("curve_area: empty curve")
    return float(sum(values) / len(values))


def largest_fall(values: Sequence[float]) -> float:
    """The largest fall of a curve from its running maximum: max over j of (max of values[:j+1])
    - values[j], 0 for a curve that never falls.

    A backfilling curve should only rise as items are re-embedded. Comparing the lowest point with
    the lower end point misses a curve that rises and then falls back above both ends
    (10, 12, 11 falls by 1 and its lowest point is an end); this counts every fall after the
    highest point so far, including a fall from the start."""
    if len(values) == 0:
        raise ValueError("largest_fall: empty curve")
    peak, fall = float("-inf"), 0.0
    for v in values:
        peak = max(peak, float(v))
        fall = max(fall, peak - float(v))
    return fall


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two (N,) samples: the Pearson correlation of their ranks,
    ties given their average rank. NaN when either sample is constant or N < 2."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: expected two (N,) samples, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the highest rank of each distinct value
    return (last - (counts - 1) / 2.0)[inverse]


def error_spread(error: Sequence[float]) -> dict[str, float]:
    """How much h's per-item error ||h(x) - phi_new(x)||^2 varies across items: is there
    anything for an order to predict? {"mean", "std" (sample), "cv" (std / mean), "p10",
    "p50", "p90", "p90_over_p10"}."""
    e = np.asarray(error, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2:
        raise ValueError(f"error spread: expected (N,) errors with N >= 2, got {e.shape}")
    mean, std = float(e.mean()), float(e.std(ddof=1))
    p10, p50, p90 = (float(v) for v in np.percentile(e, [10, 50, 90]))
    return {
        "mean": mean,
        "std": std,
        "cv": std / mean if mean > 0 else float("nan"),
        "p10": p10,
        "p50": p50,
        "p90": p90,
        "p90_over_p10": p90 / p10 if p10 > 0 else float("nan"),
    }


def _as_dicts(cases: Mapping[str, CaseMetrics]) -> dict[str, dict[str, float]]:
    return {case: m.as_dict() for case, m in cases.items()}


def _percent(summary: dict[str, float]) -> CaseMetrics:
    return CaseMetrics(
        top1=100 * summary["top1"], top5=100 * summary["top5"], mAP=100 * summary["mAP"]
    )


def evaluate_cases(
    cases: dict[str, tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor,
    *,
    unseen_mask: torch.Tensor | None = None,
    leave_one_out: bool = True,
    metric: Metric = "l2",
    chunk_size: int = 1024,
) -> Evaluation:
    """{case: (query (N, D), gallery (N, D))} over the same N labelled items -> metrics in percent.

    The split by `unseen_mask` (N,) restricts the *queries* (the gallery stays whole). Cases
    whose query and gallery dims differ are skipped (their vectors cannot be compared).
    """
    # Here, not at import: retrieval imports torch (seconds), and the record types above are
    # imported by every Dagster code location.
    from fct_ml.retrieval import retrieve

    out = Evaluation()
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
        out.cases[case] = _percent(result.summary())
        out.results[case] = result
        if unseen_mask is not None and bool(unseen_mask.any()):
            out.unseen_classes[case] = _percent(result.summary(unseen_mask))
            out.seen_classes[case] = _percent(result.summary(~unseen_mask))
    return out


def gap_closed(cases: Mapping[str, CaseMetrics], case: str = Case.NEW_H_OLD) -> GapClosed:
    """Share (%) of the old/old -> new/new gap that `case` closes, for top-1 and mAP."""
    lo, hi, got = cases[Case.OLD_OLD], cases[Case.NEW_NEW], cases[case]

    def share(metric: str) -> float:
        low, high = getattr(lo, metric), getattr(hi, metric)
        return 100 * (getattr(got, metric) - low) / (high - low) if high != low else float("nan")

    return GapClosed(top1=share("top1"), mAP=share("mAP"))
