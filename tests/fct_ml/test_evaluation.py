"""evaluate_cases and gap_closed on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from fct_ml.evaluation import (
    BackfillCurve,
    Case,
    CaseMetrics,
    Evaluation,
    GapClosed,
    error_spread,
    evaluate_cases,
    gap_closed,
    largest_fall,
    spearman,
)
from fct_ml.retrieval import RetrievalResult


def test_evaluate_cases_by_hand():
    # Four items on a line, labels [0, 0, 1, 1]; leave-one-out.
    # Gallery "good": 0, 1, 10, 11 -> every item's nearest other item shares its label:
    #   top-1 = 100 %, AP = 1 for all.
    # Gallery "bad": 0, 10, 1, 11 (items 1 and 2 swapped places):
    #   item 0 (at 0): others at 10 (label 0, match), 1 (label 1), 11 (label 1):
    #     ranking 1(no), 10(match), 11 -> top-1 miss, AP = 1/2
    #   item 1 (at 10): others 0 (match, d=10), 1 (d=9), 11 (d=1) -> ranking 11, 1, 0 -> AP = 1/3
    #   item 2 (at 1): others 0 (d=1), 10 (d=9), 11 (match, d=10) -> AP = 1/3
    #   item 3 (at 11): others 10 (d=1, no), 1 (d=10, match), 0 (d=11) -> AP = 1/2
    #   mAP = (1/2 + 1/3 + 1/3 + 1/2) / 4 = 5/12; top-1 = 0.
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    bad = torch.tensor([[0.0], [10.0], [1.0], [11.0]])
    unseen = torch.tensor([False, False, True, True])
    out = evaluate_cases({"good": (good, good), "bad": (bad, bad)}, labels, unseen_mask=unseen)
    assert out.cases["good"] == CaseMetrics(top1=100.0, top5=100.0, mAP=100.0)
    assert out.cases["bad"].top1 == 0.0
    assert out.cases["bad"].mAP == pytest.approx(100 * 5 / 12)
    # Unseen-class queries are items 2 and 3: mAP = (1/3 + 1/2) / 2 = 5/12 as well.
    assert out.unseen_classes["bad"].mAP == pytest.approx(100 * 5 / 12)
    assert out.seen_classes["bad"].mAP == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)


def test_cases_of_different_dims_are_skipped():
    labels = torch.tensor([0, 0])
    out = evaluate_cases({"x": (torch.zeros(2, 3), torch.zeros(2, 4))}, labels)
    assert out == Evaluation()


def test_gap_closed_by_hand():
    cases = {
        Case.OLD_OLD: CaseMetrics(top1=40.0, top5=50.0, mAP=20.0),
        Case.NEW_NEW: CaseMetrics(top1=80.0, top5=90.0, mAP=60.0),
        Case.NEW_H_OLD: CaseMetrics(top1=70.0, top5=85.0, mAP=50.0),
        "other": CaseMetrics(top1=50.0, top5=60.0, mAP=30.0),
    }
    # (70 - 40) / (80 - 40) = 75 %; (50 - 20) / (60 - 20) = 75 %
    assert gap_closed(cases) == GapClosed(top1=75.0, mAP=75.0)
    # (50 - 40) / 40 = 25 %; (30 - 20) / 40 = 25 %
    assert gap_closed(cases, "other") == GapClosed(top1=25.0, mAP=25.0)
    cases[Case.NEW_NEW] = cases[Case.OLD_OLD]
    assert all(math.isnan(v) for v in gap_closed(cases).as_dict().values())


def test_case_names_and_the_json_shape():
    # The names are the ones the report, the UI and the written JSON use.
    assert [str(c) for c in Case] == [
        "old/old",
        "new/new",
        "new/h(old)",
        "new/old",
        "bct/old",
        "bct/bct",
    ]
    m = CaseMetrics(top1=1.0, top5=2.0, mAP=3.0)
    out = Evaluation(cases={Case.OLD_OLD: m}, unseen_classes={}, seen_classes={Case.OLD_OLD: m})
    assert out.as_json() == {
        "cases": {"old/old": {"top1": 1.0, "top5": 2.0, "mAP": 3.0}},
        "cases_unseen_classes": {},
        "cases_seen_classes": {"old/old": {"top1": 1.0, "top5": 2.0, "mAP": 3.0}},
    }
    assert GapClosed(top1=4.0, mAP=5.0).as_dict() == {"top1": 4.0, "mAP": 5.0}


def test_evaluate_cases_keeps_each_cases_per_query_outcomes():
    # The per-query outcomes the bootstrap and the flips read: the "bad" gallery of the first
    # test, item by item (APs 1/2, 1/3, 1/3, 1/2; no top-1 hit).
    labels = torch.tensor([0, 0, 1, 1])
    bad = torch.tensor([[0.0], [10.0], [1.0], [11.0]])
    out = evaluate_cases({"bad": (bad, bad)}, labels)
    result = out.results["bad"]
    assert result.average_precision.tolist() == pytest.approx([1 / 2, 1 / 3, 1 / 3, 1 / 2])
    assert result.hits[:, 0].tolist() == [False] * 4
    # Not part of the metrics' value: two evaluations with equal metrics are equal.
    assert out == Evaluation(cases=dict(out.cases))


def test_largest_fall_counts_a_fall_after_a_rise():
    # 10, 12, 11: the lowest point is an end, so "lowest point - lower end" reads 0; the curve
    # still fell by 1 after its peak.
    assert largest_fall([10.0, 12.0, 11.0]) == pytest.approx(1.0)
    assert min([10.0, 12.0, 11.0]) - min(10.0, 11.0) == 0.0
    # Two falls, the larger counts: 12 -> 11 (1), then 13 -> 9.5 (3.5).
    assert largest_fall([10.0, 12.0, 11.0, 13.0, 9.5, 14.0]) == pytest.approx(3.5)
    assert largest_fall([5.0, 4.0]) == pytest.approx(1.0)  # a fall from the start counts
    assert largest_fall([1.0, 1.0, 2.0, 3.0]) == 0.0  # never falls
    curve = BackfillCurve(fractions=(0.0, 0.5, 1.0), top1=(10.0, 12.0, 11.0), mAP=(1.0, 2.0, 3.0))
    assert curve.largest_fall() == {"top1": pytest.approx(1.0), "mAP": 0.0}
    with pytest.raises(ValueError, match=r"^largest_fall: empty curve$"):
        largest_fall([])


def test_spearman_by_hand():
    # Ranks of b: 1, 3, 2, 4; d^2 sums to 2: 1 - 6 * 2 / (4 * 15) = 0.8.
    assert spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties share their average rank: a -> 1.5, 1.5, 3 (centred -.5, -.5, 1), b -> 1, 2, 3
    # (centred -1, 0, 1): 1.5 / sqrt(1.5 * 2) = 0.866.
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant sample has no ranking
    with pytest.raises(ValueError, match=r"^spearman: expected two \(N,\) samples"):
        spearman([1, 2], [1, 2, 3])


def test_error_spread_by_hand():
    # 1, 2, 3, 4: mean 2.5, sample std sqrt(5/3) = 1.291; percentiles (linear) 1.3, 2.5, 3.7.
    s = error_spread([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))
    assert s["cv"] == pytest.approx(math.sqrt(5 / 3) / 2.5)
    assert (s["p10"], s["p50"], s["p90"]) == pytest.approx((1.3, 2.5, 3.7))
    assert s["p90_over_p10"] == pytest.approx(3.7 / 1.3)


def test_a_curve_from_the_per_query_outcomes_of_its_points():
    # Two points of four queries: top-1 hits 1 of 4 then 4 of 4; APs averaging 0.5 then 1.
    def point(hits: list[bool], ap: list[float]) -> RetrievalResult:
        return RetrievalResult(
            average_precision=torch.tensor(ap),
            hits=torch.tensor([[h, h] for h in hits]),
            has_match=torch.ones(4, dtype=torch.bool),
            topk=(1, 5),
        )

    curve = BackfillCurve.from_results(
        (0.0, 1.0),
        [point([True, False, False, False], [1.0, 0.5, 0.25, 0.25]), point([True] * 4, [1.0] * 4)],
    )
    assert curve.fractions == (0.0, 1.0)
    assert curve.top1 == pytest.approx((25.0, 100.0))
    assert curve.mAP == pytest.approx((50.0, 100.0))
