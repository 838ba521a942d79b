"""A study run's headline numbers and their paired bootstrap intervals over queries.

Every seed of a study is scored on the same test set, so the seed spread says nothing about
which queries happened to be drawn: a difference of 0.26 points of seen-class top-1 is about
13 queries. Each headline number is therefore also given a 95 % percentile interval from
resampling the queries (fct_ml.flips.bootstrap_indices: 1,000 resamples, seed 0), the *same*
resample for every case the number compares, so the interval measures the spread of the
difference, not of two independent means.

A headline number is a function of the means of a few per-query columns (top-1 right or
wrong, AP, a query's area under a backfilling curve, a negative flip), each over its own
queries (a mask: the queries with a match, or of the classes the old model saw):

    mean    mean(a)
    delta   mean(a) - mean(b)
    gap     100 * (mean(h) - mean(old)) / (mean(new) - mean(old))   (share of a gap closed)

`Headlines.compute` returns each number's estimate, interval and the resampled values
themselves: a study over seeds averages those per resample (every seed draws the same query
indices, the test set being one) and takes the percentiles of the averages, which is the
interval of the seeds' mean (`interval_of_mean`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fct_ml.flips import BOOTSTRAP_SEED, LEVEL, RESAMPLES, Interval, bootstrap_indices

if TYPE_CHECKING:
    from fct_ml.retrieval import RetrievalResult

Kind = Literal["mean", "delta", "gap"]


@dataclass(frozen=True)
class HeadlineResult:
    """Each headline number's estimate and interval (`ci95`), and its resampled values
    (`replicates`, one per resample, in resample order), by name."""

    ci95: dict[str, Interval]
    replicates: dict[str, np.ndarray]
    queries: int
    resamples: int
    seed: int
    level: float

    def ci95_as_dicts(self) -> dict[str, dict[str, float]]:
        """{name: {"estimate", "low", "high"}}: the JSON shape of the intervals."""
        return {name: i.as_dict() for name, i in self.ci95.items()}

    def replicates_as_json(self, digits: int = 2) -> dict[str, object]:
        """The resampled values, rounded to `digits` decimals, with what they were drawn from
        ({"queries", "resamples", "seed", "level", "values": {name: [...]}})."""
        return {
            "queries": self.queries,
            "resamples": self.resamples,
            "seed": self.seed,
            "level": self.level,
            "values": {
                name: [None if not np.isfinite(v) else round(float(v), digits) for v in values]
                for name, values in self.replicates.items()
            },
        }


def percentile_interval(estimate: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """The percentile interval of `replicates` (R,) at `level`, as fct_ml.flips.paired_bootstrap
    computes it (numpy's linear-interpolated percentiles); NaN replicates are left out."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(float(estimate), float("nan"), float("nan"))
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high))


def interval_of_mean(
    estimates: Sequence[float], replicates: Sequence[Sequence[float | None]], level: float = LEVEL
) -> Interval:
    """The interval of the mean over seeds of one headline number: `estimates` (S,) and
    `replicates` (S, R), the seeds' resampled values drawn with the same query indices. The
    mean's resampled values are the per-resample means over seeds."""
    stacked = np.array(
        [[np.nan if v is None else v for v in row] for row in replicates], dtype=np.float64
    )
    if stacked.ndim != 2 or stacked.shape[0] != len(estimates) or stacked.shape[1] == 0:
        raise ValueError(
            f"interval of a mean: {len(estimates)} estimates and replicates of shape"
            f" {stacked.shape}; expected one row of resampled values per estimate"
        )
    return percentile_interval(float(np.mean(estimates)), stacked.mean(axis=0), level)


class Headlines:
    """Per-query columns over one set of Q queries, and the headline numbers built on their
    means. Add columns (`column`, `top1`, `ap`), name numbers (`mean`, `delta`, `gap`), then
    `compute`."""

    def __init__(self, queries: int):
        if queries < 1:
            raise ValueError(f"headlines: needs at least one query, got {queries}")
        self.queries = queries
        self._values: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._numbers: dict[str, tuple[Kind, tuple[int, ...]]] = {}

    def column(self, values: np.ndarray, mask: np.ndarray | None = None) -> int:
        """A per-query column (Q,) counted over the queries where `mask` (Q,) bool holds (all
        when None); returns its index for `mean`, `delta` and `gap`."""
        values = np.asarray(values, dtype=np.float64)
        mask = np.ones(self.queries, dtype=bool) if mask is None else np.asarray(mask, bool)
        if values.shape != (self.queries,) or mask.shape != (self.queries,):
            raise ValueError(
                f"headline column: expected ({self.queries},) values and mask, got"
                f" {values.shape} and {mask.shape}"
            )
        # A masked-out value never counts; zeroed so that a NaN there cannot spread.
        self._values.append(np.where(mask, values, 0.0))
        self._masks.append(mask)
        return len(self._values) - 1

    def top1(self, result: RetrievalResult, mask: np.ndarray | None = None) -> int:
        """Column: 100 where the query's top-1 item matches, else 0, over the queries with a
        match (and `mask`), as `RetrievalResult.summary` counts top-1."""
        right = result.hits[:, result.topk.index(1)].numpy()
        return self.column(100.0 * right, self._keep(result, mask))

    def ap(self, result: RetrievalResult, mask: np.ndarray | None = None) -> int:
        """Column: 100 x the query's average precision, over the queries with a match (and
        `mask`)."""
        return self.column(100.0 * result.average_precision.numpy(), self._keep(result, mask))

    def _keep(self, result: RetrievalResult, mask: np.ndarray | None) -> np.ndarray:
        keep = result.has_match.numpy().astype(bool)
        return keep if mask is None else keep & np.asarray(mask, dtype=bool)

    def _name(self, name: str, kind: Kind, columns: tuple[int, ...]) -> None:
        if name in self._numbers:
            raise ValueError(f"headline {name!r}: named twice")
        if any(not 0 <= c < len(self._values) for c in columns):
            raise ValueError(f"headline {name!r}: unknown column in {columns}")
        self._numbers[name] = (kind, columns)

    def mean(self, name: str, a: int) -> None:
        """`name` = mean of column a."""
        self._name(name, "mean", (a,))

    def delta(self, name: str, a: int, b: int) -> None:
        """`name` = mean(a) - mean(b): a paired difference."""
        self._name(name, "delta", (a, b))

    def gap(self, name: str, h: int, old: int, new: int) -> None:
        """`name` = 100 (mean(h) - mean(old)) / (mean(new) - mean(old)): the share (%) of the
        old -> new gap that h closes (NaN where there is no gap)."""
        self._name(name, "gap", (h, old, new))

    @property
    def names(self) -> list[str]:
        return list(self._numbers)

    def _statistic(self, values: np.ndarray, masks: np.ndarray):
        kinds = [(kind, cols) for kind, cols in self._numbers.values()]

        def statistic(idx: np.ndarray) -> np.ndarray:
            weight = np.bincount(idx, minlength=self.queries).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                means = (values @ weight) / (masks @ weight)
                out = np.empty(len(kinds))
                for i, (kind, cols) in enumerate(kinds):
                    if kind == "mean":
                        out[i] = means[cols[0]]
                    elif kind == "delta":
                        out[i] = means[cols[0]] - means[cols[1]]
                    else:
                        h, old, new = (means[c] for c in cols)
                        out[i] = 100.0 * (h - old) / (new - old) if new != old else np.nan
            return out

        return statistic

    def compute(
        self, *, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED, level: float = LEVEL
    ) -> HeadlineResult:
        """Every named number on all queries, and on each of `resamples` resamples of the
        queries (fct_ml.flips.bootstrap_indices, the same indices for every number)."""
        if resamples < 1:
            raise ValueError(f"headlines: resamples must be >= 1, got {resamples}")
        names = self.names
        if not names:
            return HeadlineResult({}, {}, self.queries, resamples, seed, level)
        values = np.stack(self._values)  # (C, Q)
        masks = np.stack(self._masks).astype(np.float64)
        statistic = self._statistic(values, masks)
        estimate = statistic(np.arange(self.queries))
        drawn = np.stack(
            [statistic(idx) for idx in bootstrap_indices(self.queries, resamples, seed)]
        )  # (R, K)
        return HeadlineResult(
            ci95={
                name: percentile_interval(float(estimate[k]), drawn[:, k], level)
                for k, name in enumerate(names)
            },
            replicates={name: drawn[:, k] for k, name in enumerate(names)},
            queries=self.queries,
            resamples=resamples,
            seed=seed,
            level=level,
        )


def area_columns(
    points: Sequence[RetrievalResult],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, its share of a backfilling curve's area: (top-1 (Q,), AP (Q,), in percent,
    each the mean over the curve's points, and the mask of queries with a match at every
    point). The mean of a column over its mask is the curve's area (fct_ml.evaluation.
    curve_area of the points' metrics), when every point counts the same queries, as a
    backfill's points do (the items' labels never change)."""
    if not points:
        raise ValueError("area columns: a curve needs at least one point")
    keep = np.logical_and.reduce([p.has_match.numpy().astype(bool) for p in points])
    top1 = np.mean([100.0 * p.hits[:, p.topk.index(1)].numpy() for p in points], axis=0)
    ap = np.mean([100.0 * p.average_precision.numpy() for p in points], axis=0)
    return top1, ap, keep


def negative_flip_column(
    served: RetrievalResult, proposed: RetrievalResult
) -> tuple[np.ndarray, np.ndarray]:
    """Per query: 100 where the served system's top-1 is right and the proposed one's wrong
    (a negative flip), else 0; and the mask of queries with a match in both. Its mean is the
    NFR of fct_ml.flips, in percent."""
    right_s = served.hits[:, served.topk.index(1)].numpy()
    right_p = proposed.hits[:, proposed.topk.index(1)].numpy()
    keep = (served.has_match & proposed.has_match).numpy().astype(bool)
    return 100.0 * (right_s & ~right_p), keep
