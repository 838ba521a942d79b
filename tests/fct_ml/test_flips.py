"""Negative flips, NFR, relative NFR, AP drops and the paired bootstrap, on hand-worked cases."""

import math

import numpy as np
import pytest
import torch

from fct_ml.flips import (
    QueryOutcomes,
    bootstrap_means,
    flip_counts,
    flips,
    paired_bootstrap,
    query_outcomes,
    relative_nfr,
    worst_negative_flips,
)
from fct_ml.retrieval import RetrievalResult, retrieve

# Six queries, classes 0 (q0-q2) and 1 (q3-q5); S = served, P = proposed.
#
#   query  label  S right  P right  flip       S AP   P AP   AP change  drop > 0.1
#   q0     0      yes      yes      -          1.00   1.00    0.00       no
#   q1     0      yes      no       negative   1.00   0.50   -0.50       yes
#   q2     0      no       yes      positive   0.50   1.00   +0.50       no
#   q3     1      yes      no       negative   1.00   0.95   -0.05       no
#   q4     1      no       no       -          0.25   0.25    0.00       no
#   q5     1      yes      no       negative   0.80   0.50   -0.30       yes
LABEL = np.array([0, 0, 0, 1, 1, 1])
RIGHT_S = np.array([True, True, False, True, False, True])
RIGHT_P = np.array([True, False, True, False, False, False])
AP_S = np.array([1.0, 1.0, 0.5, 1.0, 0.25, 0.8])
AP_P = np.array([1.0, 0.5, 1.0, 0.95, 0.25, 0.5])


def six() -> QueryOutcomes:
    return QueryOutcomes(
        query=np.arange(6),
        label=LABEL,
        right_served=RIGHT_S,
        right_proposed=RIGHT_P,
        ap_served=AP_S,
        ap_proposed=AP_P,
    )


def test_flips_on_six_hand_worked_queries():
    got = flips(six(), resamples=0)
    a = got.all
    # S right on q0, q1, q3, q5 = 4 of 6; P right on q0, q2 = 2 of 6.
    assert (a.queries, a.right_served, a.right_proposed) == (6, 4, 2)
    # Negative flips q1, q3, q5 = 3; positive flip q2 = 1.
    assert (a.negative_flips, a.positive_flips) == (3, 1)
    assert a.nfr == pytest.approx(100 * 3 / 6)  # 50 %
    assert a.pfr == pytest.approx(100 * 1 / 6)  # 16.7 %
    # err_S = 2/6, err_P = 4/6: (1 - 2/6) * 4/6 = 16/36; NFR 3/6 / (16/36) = 9/8.
    assert a.relative_nfr == pytest.approx(1.125)
    assert a.top1_served == pytest.approx(100 * 4 / 6)
    assert a.top1_proposed == pytest.approx(100 * 2 / 6)
    # mAP: S (1 + 1 + 0.5 + 1 + 0.25 + 0.8) / 6 = 4.55 / 6; P (1 + 0.5 + 1 + 0.95 + 0.25 + 0.5)
    # / 6 = 4.2 / 6.
    assert a.map_served == pytest.approx(100 * 4.55 / 6)
    assert a.map_proposed == pytest.approx(100 * 4.2 / 6)
    # AP drops by more than 0.1: q1 (-0.5) and q5 (-0.3); q3's -0.05 is within it.
    assert (a.ap_drops, a.ap_drop_share) == (2, pytest.approx(100 * 2 / 6))

    c0, c1 = got.by_class[0], got.by_class[1]
    # Class 0 (q0-q2): S right q0, q1 = 2; P right q0, q2 = 2; negative q1, positive q2.
    # err_S = err_P = 1/3: (2/3)(1/3) = 2/9; NFR 1/3 / (2/9) = 1.5.
    assert (c0.queries, c0.right_served, c0.right_proposed) == (3, 2, 2)
    assert (c0.negative_flips, c0.positive_flips, c0.ap_drops) == (1, 1, 1)
    assert c0.nfr == pytest.approx(100 / 3)
    assert c0.relative_nfr == pytest.approx(1.5)
    assert c0.map_served == pytest.approx(100 * 2.5 / 3)
    assert c0.map_proposed == pytest.approx(100 * 2.5 / 3)
    # Class 1 (q3-q5): S right q3, q5 = 2; P right none; negatives q3, q5; drop only q5.
    # err_S = 1/3, err_P = 1: (2/3)(1) = 2/3; NFR 2/3 / (2/3) = 1.
    assert (c1.queries, c1.right_served, c1.right_proposed) == (3, 2, 0)
    assert (c1.negative_flips, c1.positive_flips, c1.ap_drops) == (2, 0, 1)
    assert c1.nfr == pytest.approx(200 / 3)
    assert c1.relative_nfr == pytest.approx(1.0)
    assert c1.map_served == pytest.approx(100 * 2.05 / 3)
    assert c1.map_proposed == pytest.approx(100 * 1.7 / 3)
    # Class 1 regresses most (NFR 66.7 % against 33.3 %).
    assert got.regressing_classes() == [1, 0]
    # The worst negative flips by AP change: q1 (-0.5), q5 (-0.3), q3 (-0.05).
    assert worst_negative_flips(six()).tolist() == [1, 5, 3]
    assert worst_negative_flips(six(), k=1).tolist() == [1]


def test_swapping_served_and_proposed_changes_every_directed_count():
    swapped = QueryOutcomes(
        query=np.arange(6),
        label=LABEL,
        right_served=RIGHT_P,
        right_proposed=RIGHT_S,
        ap_served=AP_P,
        ap_proposed=AP_S,
    )
    got = flips(swapped, resamples=0).all
    # P -> S: q2 is now the one negative flip, q1, q3, q5 positive.
    assert (got.negative_flips, got.positive_flips) == (1, 3)
    assert got.nfr == pytest.approx(100 / 6)
    # err_S' = 4/6, err_P' = 2/6: (2/6)(2/6) = 4/36; NFR 1/6 / (4/36) = 1.5.
    assert got.relative_nfr == pytest.approx(1.5)
    # Only q2's AP falls by more than 0.1 (1.0 -> 0.5).
    assert got.ap_drops == 1


def retrieval(hits_top1, ap) -> RetrievalResult:
    hits = torch.tensor(hits_top1)[:, None]
    return RetrievalResult(
        average_precision=torch.tensor(ap, dtype=torch.float32),
        hits=torch.cat([hits, torch.ones_like(hits)], dim=1),
        has_match=torch.ones(len(ap), dtype=torch.bool),
        topk=(1, 5),
    )


def test_query_outcomes_keep_served_and_proposed_in_their_places():
    served = retrieval(RIGHT_S.tolist(), AP_S.tolist())
    proposed = retrieval(RIGHT_P.tolist(), AP_P.tolist())
    got = query_outcomes(served, proposed, LABEL)
    assert got.right_served.tolist() == RIGHT_S.tolist()
    assert got.right_proposed.tolist() == RIGHT_P.tolist()
    assert np.allclose(got.ap_served, AP_S) and np.allclose(got.ap_proposed, AP_P)
    assert flips(got, resamples=0).all.negative_flips == 3


def test_query_outcomes_leave_out_queries_without_a_match():
    # 1-d points; item 2 is the only one of class 1, so leave-one-out it has no match.
    points = torch.tensor([[0.0], [1.0], [5.0], [0.4]])
    labels = torch.tensor([0, 0, 1, 0])
    result = retrieve(points, labels, points, labels, leave_one_out=True)
    got = query_outcomes(result, result, labels.numpy())
    assert got.query.tolist() == [0, 1, 3]
    assert flip_counts(got).queries == 3
    with pytest.raises(ValueError, match="served has 4 queries, proposed 4, labels 3"):
        query_outcomes(result, result, labels.numpy()[:3])


def test_relative_nfr_is_none_where_undefined():
    assert relative_nfr(0.0, 1.0, 0.5) is None  # S never right
    assert relative_nfr(0.0, 0.2, 0.0) is None  # P never wrong
    assert relative_nfr(0.1, 0.2, 0.25) == pytest.approx(0.1 / (0.8 * 0.25))
    empty = flip_counts(six().subset(np.zeros(6, dtype=bool)))
    assert empty.queries == 0 and empty.relative_nfr is None and math.isnan(empty.nfr)


def test_bootstrap_on_a_tiny_paired_sample_by_hand():
    # np.random.default_rng(0).integers(0, 3, size=3), four times: [2 1 1], [0 0 0], [0 0 0],
    # [2 1 2]. With per-query differences d = (1, 2, 4) the resampled means are
    # (4 + 2 + 2) / 3 = 8/3, 1, 1, (4 + 2 + 4) / 3 = 10/3; sorted 1, 1, 8/3, 10/3.
    # numpy's linear percentiles: 2.5 % at position 0.075 -> 1; 97.5 % at position 2.925 ->
    # 8/3 + 0.925 * (10/3 - 8/3).
    d = np.array([1.0, 2.0, 4.0])
    got = bootstrap_means({"d": d}, resamples=4, seed=0)["d"]
    assert got.estimate == pytest.approx(7 / 3)
    assert got.low == pytest.approx(1.0)
    assert got.high == pytest.approx(8 / 3 + 0.925 * 2 / 3)


def test_bootstrap_resamples_the_cases_together():
    rng = np.random.default_rng(5)
    served = rng.normal(size=50)
    proposed = served + 0.5  # every query gains exactly 0.5
    ci = bootstrap_means({"delta": proposed - served, "served": served}, seed=1)
    # Paired, the delta has no spread at all; the served mean itself does.
    assert ci["delta"].low == pytest.approx(0.5) and ci["delta"].high == pytest.approx(0.5)
    assert ci["served"].high - ci["served"].low > 0.2
    # The same indices for every statistic: the general form gives the same numbers.
    estimate, low, high = paired_bootstrap(lambda idx: served[idx].mean(), 50, seed=1)
    assert (low[0], high[0]) == (ci["served"].low, ci["served"].high)
    assert estimate[0] == pytest.approx(served.mean())


def test_bootstrap_refuses_what_it_cannot_resample():
    with pytest.raises(ValueError, match="needs n >= 1"):
        paired_bootstrap(lambda idx: 0.0, 0)
    with pytest.raises(ValueError, match="level must lie in"):
        paired_bootstrap(lambda idx: 0.0, 3, level=1.0)


def test_flips_intervals_use_the_headline_deltas():
    got = flips(six(), resamples=200, seed=3)
    # Each estimate is the full-sample value in points: mAP 70 - 75.83, top-1 33.3 - 66.7, NFR.
    assert got.ci95["mAP"].estimate == pytest.approx(100 * (4.2 - 4.55) / 6)
    assert got.ci95["top1"].estimate == pytest.approx(100 * (2 - 4) / 6)
    assert got.ci95["NFR"].estimate == pytest.approx(50.0)
    for interval in got.ci95.values():
        assert interval.low <= interval.estimate <= interval.high
    # NFR per query is 0 or 100: its interval stays inside [0, 100].
    assert 0 <= got.ci95["NFR"].low and got.ci95["NFR"].high <= 100
