"""Headline numbers and their paired bootstrap, on three queries worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fct_ml.flips import bootstrap_means
from fct_ml.headline import (
    Headlines,
    area_columns,
    interval_of_mean,
    negative_flip_column,
    percentile_interval,
)
from fct_ml.retrieval import RetrievalResult

# flips.bootstrap_indices(3, 4, seed 0), i.e. np.random.default_rng(0).integers(0, 3, size=3)
# four times: [2 1 1], [0 0 0], [0 0 0], [2 1 2].
A = np.array([10.0, 20.0, 60.0])
B = np.array([0.0, 10.0, 30.0])
C = np.array([40.0, 40.0, 90.0])


def test_a_paired_delta_on_three_queries_by_hand():
    heads = Headlines(3)
    a, b = heads.column(A), heads.column(B)
    heads.delta("a - b", a, b)
    out = heads.compute(resamples=4, seed=0)
    # mean(A) - mean(B) = 30 - 13.33 = 16.67. Resamples (same indices for A and B):
    # [2 1 1]: (60+20+20)/3 - (30+10+10)/3 = 16.67; [0 0 0]: 10 - 0 = 10 (twice);
    # [2 1 2]: (60+20+60)/3 - (30+10+30)/3 = 23.33.
    assert out.replicates["a - b"] == pytest.approx([50 / 3, 10, 10, 70 / 3])
    # Sorted 10, 10, 16.67, 23.33: the 2.5th percentile sits at position 0.075 (10), the
    # 97.5th at 2.925: 16.67 + 0.925 * (23.33 - 16.67) = 22.83.
    ci = out.ci95["a - b"]
    assert ci.estimate == pytest.approx(50 / 3)
    assert ci.low == pytest.approx(10.0)
    assert ci.high == pytest.approx(50 / 3 + 0.925 * 20 / 3)


def test_the_gap_closed_on_three_queries_by_hand():
    heads = Headlines(3)
    heads.gap("gap", heads.column(A), heads.column(B), heads.column(C))
    out = heads.compute(resamples=4, seed=0)
    # 100 (30 - 13.33) / (56.67 - 13.33) = 38.46. Resamples: [2 1 1]: 100 (33.33 - 16.67) /
    # (56.67 - 16.67) = 41.67; [0 0 0]: 100 (10 - 0) / (40 - 0) = 25 (twice); [2 1 2]:
    # 100 (46.67 - 23.33) / (73.33 - 23.33) = 46.67.
    assert out.ci95["gap"].estimate == pytest.approx(100 * (50 / 3) / (130 / 3))
    assert out.replicates["gap"] == pytest.approx([125 / 3, 25, 25, 140 / 3])
    assert out.ci95["gap"].low == pytest.approx(25.0)
    assert out.ci95["gap"].high == pytest.approx(125 / 3 + 0.925 * 5)


def test_a_mask_leaves_a_query_out_of_every_resample():
    heads = Headlines(3)
    heads.mean("kept", heads.column(np.array([5.0, 1000.0, 7.0]), np.array([True, False, True])))
    out = heads.compute(resamples=4, seed=0)
    # Query 1 never counts: [2 1 1] -> 7, [0 0 0] -> 5, [2 1 2] -> 7.
    assert out.ci95["kept"].estimate == pytest.approx(6.0)
    assert out.replicates["kept"] == pytest.approx([7, 5, 5, 7])


def test_it_draws_the_resamples_flips_draws():
    # The same indices as fct_ml.flips: a delta's interval equals bootstrap_means' of the
    # per-query differences, at the default 1,000 resamples.
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=50), rng.normal(size=50)
    heads = Headlines(50)
    heads.delta("d", heads.column(x), heads.column(y))
    ours = heads.compute().ci95["d"]
    theirs = bootstrap_means({"d": x - y})["d"]
    assert (ours.estimate, ours.low, ours.high) == pytest.approx(
        (theirs.estimate, theirs.low, theirs.high)
    )


def test_the_interval_of_a_mean_over_seeds_averages_their_resamples():
    # Two seeds, four resamples each: the mean's resamples are 2, 3, 4, 5; the 2.5th
    # percentile at position 0.075 is 2.075, the 97.5th at 2.925 is 4.925.
    i = interval_of_mean([1.0, 3.0], [[1, 2, 3, 4], [3, 4, 5, 6]])
    assert (i.estimate, i.low, i.high) == pytest.approx((2.0, 2.075, 4.925))
    with pytest.raises(ValueError, match=r"^interval of a mean: 2 estimates"):
        interval_of_mean([1.0, 3.0], [[1, 2, 3, 4]])


def test_nan_resamples_are_left_out_and_none_gives_no_interval():
    assert percentile_interval(1.0, np.array([np.nan, 2.0, 2.0])).low == 2.0
    empty = percentile_interval(1.0, np.array([np.nan]))
    assert empty.estimate == 1.0 and math.isnan(empty.low) and math.isnan(empty.high)


def _result(right: list[bool], ap: list[float], has_match: list[bool] | None = None):
    n = len(right)
    return RetrievalResult(
        average_precision=torch.tensor(ap),
        hits=torch.tensor([[r, True] for r in right]),
        has_match=torch.tensor(has_match if has_match is not None else [True] * n),
        topk=(1, 5),
    )


def test_top1_and_ap_columns_count_as_the_summary_does():
    r = _result([True, False, True], [0.5, 0.25, 1.0], has_match=[True, True, False])
    heads = Headlines(3)
    heads.mean("top1", heads.top1(r))
    heads.mean("ap", heads.ap(r))
    out = heads.compute(resamples=2, seed=0).ci95
    # The query without a match is left out, as RetrievalResult.summary leaves it out.
    assert out["top1"].estimate == pytest.approx(100 * r.summary()["top1"]) == 50.0
    assert out["ap"].estimate == pytest.approx(100 * r.summary()["mAP"]) == 37.5


def test_a_querys_area_is_its_mean_over_the_curves_points():
    points = [_result([False, True], [0.2, 0.6]), _result([True, True], [0.4, 1.0])]
    top1, ap, keep = area_columns(points)
    assert top1 == pytest.approx([50.0, 100.0])
    assert ap == pytest.approx([30.0, 80.0])
    assert keep.tolist() == [True, True]
    # The mean of a column is the curve's area: mean over points of each point's metric.
    assert ap.mean() == pytest.approx(np.mean([100 * p.summary()["mAP"] for p in points]))


def test_a_negative_flip_is_right_before_and_wrong_after():
    served = _result([True, True, False, False], [1, 1, 0, 0])
    proposed = _result([True, False, True, False], [1, 0, 1, 0], [True, True, True, False])
    flips, keep = negative_flip_column(served, proposed)
    assert flips.tolist() == [0.0, 100.0, 0.0, 0.0]
    assert keep.tolist() == [True, True, True, False]


def test_bad_columns_and_names_are_refused_by_name():
    heads = Headlines(3)
    with pytest.raises(ValueError, match=r"^headline column: expected \(3,\) values and mask"):
        heads.column(np.zeros(2))
    a = heads.column(A)
    heads.mean("m", a)
    with pytest.raises(ValueError, match=r"^headline 'm': named twice$"):
        heads.mean("m", a)
    with pytest.raises(ValueError, match=r"^headline 'x': unknown column in \(7,\)$"):
        heads.mean("x", 7)
    with pytest.raises(ValueError, match=r"^headlines: needs at least one query, got 0$"):
        Headlines(0)
