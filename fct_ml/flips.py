"""What changes for each query between two systems: negative flips, their rate, and paired
bootstrap intervals.

Two systems answer the same queries over the same labelled items: the one users get now
(*served*, S) and the one that would replace it (*proposed*, P). Model-update research
(Yan et al., "Positive-Congruent Training", CVPR 2021) calls a query whose top-1 was right
under S and is wrong under P a **negative flip**, the reverse a positive flip, and measures
regressions by

    NFR          = negative flips / queries
    relative NFR = NFR / ((1 - err_S) * err_P)

where err is the top-1 error rate. The denominator is the NFR two systems with these error
rates would have if their errors were independent: a relative NFR below 1 means P's errors
avoid S's right answers more than chance would, above 1 that they seek them out.

Per query the AP changes too; `Flips` counts the queries whose AP falls by more than a
threshold (0.1 by default), a regression top-1 cannot see (a query whose first match holds
while the rest of its ranking falls apart).

Headline deltas get a paired bootstrap interval over queries: each resample draws the same
query indices for S and P, so what the interval measures is the spread of the *difference*,
not of two independent means (`paired_bootstrap`, `bootstrap_means`).

Pure numpy; the per-query outcomes come from `fct_ml.retrieval.RetrievalResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fct_ml.retrieval import RetrievalResult

# A query's AP falling by more than this counts as a regression of its ranking (AP in [0, 1]).
AP_DROP = 0.1
# Paired bootstrap defaults: 1,000 resamples (a 95 % percentile interval's ends then rest on
# 25 resamples each), a fixed seed so a report is reproducible.
RESAMPLES = 1000
BOOTSTRAP_SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class QueryOutcomes:
    """Per-query results of S and P over the same Q queries, aligned by position.

    query (Q,) int: the query's row in the retrievals it came from; label (Q,) int; right_*
    (Q,) bool: the top-1 item has the query's label; ap_* (Q,) float in [0, 1]: average
    precision of the query's full ranking."""

    query: np.ndarray
    label: np.ndarray
    right_served: np.ndarray
    right_proposed: np.ndarray
    ap_served: np.ndarray
    ap_proposed: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.label)
        for name in ("query", "right_served", "right_proposed", "ap_served", "ap_proposed"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"query outcomes: {name} has {len(getattr(self, name))} queries, label has {n}"
                )

    @property
    def negative(self) -> np.ndarray:
        """(Q,) bool: right under S, wrong under P."""
        return self.right_served & ~self.right_proposed

    @property
    def positive(self) -> np.ndarray:
        """(Q,) bool: wrong under S, right under P."""
        return ~self.right_served & self.right_proposed

    @property
    def ap_change(self) -> np.ndarray:
        """(Q,) float: AP under P minus AP under S."""
        return self.ap_proposed - self.ap_served

    def subset(self, keep: np.ndarray) -> QueryOutcomes:
        """The outcomes of the queries where `keep` (Q,) bool is true (or at those indices)."""
        return QueryOutcomes(
            query=self.query[keep],
            label=self.label[keep],
            right_served=self.right_served[keep],
            right_proposed=self.right_proposed[keep],
            ap_served=self.ap_served[keep],
            ap_proposed=self.ap_proposed[keep],
        )


def query_outcomes(
    served: RetrievalResult, proposed: RetrievalResult, labels: np.ndarray
) -> QueryOutcomes:
    """Per-query outcomes from two retrievals of the same queries (labels (Q,)). Queries with
    no match in either gallery are left out, as `RetrievalResult.summary` leaves them out, so
    every rate here is over the queries the cases' metrics count."""
    if len(served.average_precision) != len(proposed.average_precision) or len(labels) != len(
        served.average_precision
    ):
        raise ValueError(
            f"query outcomes: served has {len(served.average_precision)} queries, proposed"
            f" {len(proposed.average_precision)}, labels {len(labels)}; expected one set"
        )
    keep = (served.has_match & proposed.has_match).numpy()
    k1_s, k1_p = served.topk.index(1), proposed.topk.index(1)
    return QueryOutcomes(
        query=np.flatnonzero(keep),
        label=np.asarray(labels)[keep].astype(np.int64),
        right_served=served.hits[:, k1_s].numpy()[keep],
        right_proposed=proposed.hits[:, k1_p].numpy()[keep],
        ap_served=served.average_precision.numpy()[keep].astype(np.float64),
        ap_proposed=proposed.average_precision.numpy()[keep].astype(np.float64),
    )


@dataclass(frozen=True)
class FlipCounts:
    """S against P over one set of queries. Rates, top-1 and mAP are in percent (as
    fct_ml.evaluation.CaseMetrics); relative NFR is a ratio, None where its denominator is 0
    (S never right, or P never wrong)."""

    queries: int
    right_served: int
    right_proposed: int
    negative_flips: int
    positive_flips: int
    ap_drops: int  # queries whose AP fell by more than Flips.ap_drop
    top1_served: float
    top1_proposed: float
    map_served: float
    map_proposed: float
    nfr: float
    pfr: float
    relative_nfr: float | None
    ap_drop_share: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Interval:
    """A statistic and its bootstrap percentile interval, in the statistic's own unit."""

    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Flips:
    """`flips`'s result: every query (`all`), each class (`by_class`, by label) and the paired
    bootstrap intervals of the headline deltas P - S in percentage points (`ci95`: "mAP",
    "top1" and "NFR", the last P's NFR against S itself, i.e. the NFR's own interval)."""

    all: FlipCounts
    by_class: dict[int, FlipCounts] = field(default_factory=dict)
    ci95: dict[str, Interval] = field(default_factory=dict)
    ap_drop: float = AP_DROP
    resamples: int = RESAMPLES
    seed: int = BOOTSTRAP_SEED

    def regressing_classes(self, k: int = 3) -> list[int]:
        """The labels of the (at most) `k` classes with the highest NFR, then most negative
        flips, then the largest mAP drop; classes without a negative flip are left out."""
        ranked = sorted(
            (c for c, counts in self.by_class.items() if counts.negative_flips > 0),
            key=lambda c: (
                -self.by_class[c].nfr,
                -self.by_class[c].negative_flips,
                self.by_class[c].map_proposed - self.by_class[c].map_served,
                c,
            ),
        )
        return ranked[:k]


def relative_nfr(nfr: float, err_served: float, err_proposed: float) -> float | None:
    """NFR / ((1 - err_S) * err_P), all three as fractions; None when the denominator is 0."""
    denominator = (1.0 - err_served) * err_proposed
    return None if denominator <= 0 else nfr / denominator


def flip_counts(outcomes: QueryOutcomes, *, ap_drop: float = AP_DROP) -> FlipCounts:
    """Flips, rates and metrics of S and P over every query of `outcomes` (none: all zero, rates
    NaN)."""
    n = len(outcomes.label)
    negative, positive = int(outcomes.negative.sum()), int(outcomes.positive.sum())
    right_s, right_p = int(outcomes.right_served.sum()), int(outcomes.right_proposed.sum())
    drops = int((outcomes.ap_change < -ap_drop).sum())

    def pct(count: float) -> float:
        return 100.0 * count / n if n else float("nan")

    return FlipCounts(
        queries=n,
        right_served=right_s,
        right_proposed=right_p,
        negative_flips=negative,
        positive_flips=positive,
        ap_drops=drops,
        top1_served=pct(right_s),
        top1_proposed=pct(right_p),
        map_served=pct(float(outcomes.ap_served.sum())),
        map_proposed=pct(float(outcomes.ap_proposed.sum())),
        nfr=pct(negative),
        pfr=pct(positive),
        relative_nfr=(relative_nfr(negative / n, 1 - right_s / n, 1 - right_p / n) if n else None),
        ap_drop_share=pct(drops),
    )


def flips(
    outcomes: QueryOutcomes,
    *,
    ap_drop: float = AP_DROP,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> Flips:
    """Negative and positive flips, NFR and relative NFR, top-1 and mAP of S and P, and the
    share of queries whose AP drops by more than `ap_drop`: over every query and per class;
    with paired bootstrap intervals (`resamples`, 0: none) of the deltas P - S of mAP and top-1
    and of the NFR, in percentage points."""
    by_class = {
        int(c): flip_counts(outcomes.subset(outcomes.label == c), ap_drop=ap_drop)
        for c in np.unique(outcomes.label)
    }
    ci95: dict[str, Interval] = {}
    if resamples > 0 and len(outcomes.label):
        ci95 = bootstrap_means(
            {
                "mAP": 100.0 * outcomes.ap_change,
                "top1": 100.0
                * (outcomes.right_proposed.astype(np.float64) - outcomes.right_served),
                "NFR": 100.0 * outcomes.negative.astype(np.float64),
            },
            resamples=resamples,
            seed=seed,
            level=level,
        )
    return Flips(
        all=flip_counts(outcomes, ap_drop=ap_drop),
        by_class=by_class,
        ci95=ci95,
        ap_drop=ap_drop,
        resamples=resamples,
        seed=seed,
    )


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED):
    """The resamples' query indices, one (n,) int64 array at a time: resample r is the r-th
    `rng.integers(0, n, size=n)` of `rng = np.random.default_rng(seed)`. One array at a time, so
    memory stays O(n) for any number of resamples."""
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield rng.integers(0, n, size=n)


def paired_bootstrap(
    statistic: Callable[[np.ndarray], float | np.ndarray],
    n: int,
    *,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile bootstrap over n paired queries: `statistic(indices (n,))` -> a value (or
    (K,) values) computed from the queries at those indices, the *same* indices for every case
    it compares. Returns (the statistic on all queries, low, high), each a (K,) array, the ends
    being numpy's linear-interpolated percentiles (1 - level) / 2 and (1 + level) / 2 of the
    resampled values."""
    if n < 1 or resamples < 1:
        raise ValueError(f"bootstrap: needs n >= 1 and resamples >= 1, got {n} and {resamples}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must lie in (0, 1), got {level}")
    estimate = np.atleast_1d(np.asarray(statistic(np.arange(n)), dtype=np.float64))
    values = np.stack(
        [
            np.atleast_1d(np.asarray(statistic(idx), dtype=np.float64))
            for idx in bootstrap_indices(n, resamples, seed)
        ]
    )  # (resamples, K)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail], axis=0)
    return estimate, low, high


def bootstrap_means(
    values: Mapping[str, np.ndarray],
    *,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = LEVEL,
) -> dict[str, Interval]:
    """{name: per-query values (n,)} -> {name: Interval of their mean}, every name resampled with
    the same indices (`paired_bootstrap`). Pass per-query differences (P - S) to get the
    interval of a delta."""
    names = list(values)
    if not names:
        return {}
    stacked = np.stack([np.asarray(values[k], dtype=np.float64) for k in names])  # (K, n)
    estimate, low, high = paired_bootstrap(
        lambda idx: stacked[:, idx].mean(axis=1),
        stacked.shape[1],
        resamples=resamples,
        seed=seed,
        level=level,
    )
    return {
        k: Interval(float(estimate[i]), float(low[i]), float(high[i])) for i, k in enumerate(names)
    }


def worst_negative_flips(outcomes: QueryOutcomes, k: int = 6) -> np.ndarray:
    """Indices (at most k,) into `outcomes` of the negative flips whose AP fell most (ties: the
    lower index first)."""
    candidates = np.flatnonzero(outcomes.negative)
    order = np.argsort(outcomes.ap_change[candidates], kind="stable")
    return candidates[order[:k]]
