"""evaluate_cases on examples where every number differs: top-5 below 100 %, the seen and unseen
splits apart from each other and from the whole, L2 and cosine ranking differently."""

from __future__ import annotations

import pytest
import torch

from fct_ml.evaluation import CaseMetrics, evaluate_cases

# Nine items on a line. Items 0 (x=0) and 6 (x=100) share label 0; items 1-5 (x=1..5) have labels
# of their own (no match: left out as queries); items 7, 8 (x=50, 51) share label 6.
X = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0], [50.0], [51.0]])
LABELS = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6, 6])
UNSEEN = LABELS == 6
# By hand, leave-one-out: query 0 ranks 1..5, 7, 8 before item 6: rank 8, AP 1/8, no top-5 hit.
# Query 6 (x=100) ranks 8, 7, 5, 4, 3, 2, 1 before item 0: rank 8, AP 1/8. Queries 7 and 8 find
# each other first: AP 1. Over the 4 queries with a match: top-1 50 %, top-5 50 %,
# mAP (1/8 + 1/8 + 1 + 1) / 4 = 56.25 %. Unseen (7, 8): 100 / 100 / 100. Seen (0, 6): 0 / 0 / 12.5.


def test_metrics_and_the_class_splits_by_hand():
    out = evaluate_cases({"x/x": (X, X)}, LABELS, unseen_mask=UNSEEN)
    assert out.cases["x/x"] == CaseMetrics(top1=50.0, top5=50.0, mAP=56.25)
    assert out.unseen_classes["x/x"] == CaseMetrics(top1=100.0, top5=100.0, mAP=100.0)
    assert out.seen_classes["x/x"] == CaseMetrics(top1=0.0, top5=0.0, mAP=12.5)


def test_no_split_without_a_mask_or_without_unseen_queries():
    for mask in (None, torch.zeros(9, dtype=torch.bool)):
        out = evaluate_cases({"x/x": (X, X)}, LABELS, unseen_mask=mask)
        assert out.unseen_classes == {} and out.seen_classes == {}
        assert out.cases["x/x"].mAP == pytest.approx(56.25)


def test_a_case_of_other_dims_is_skipped_and_the_next_still_evaluated():
    cases = {"a/b": (torch.zeros(9, 2), torch.zeros(9, 3)), "x/x": (X, X)}
    assert list(evaluate_cases(cases, LABELS).cases) == ["x/x"]


def test_the_metric_is_passed_on():
    # a = (1, 0) and b = (10, 0.5) share label 0; c = (0.9, 0.9) has label 1 (no match). L2: a's
    # nearest is c (0.82 vs 81.25): a miss; b's is a: a hit -> top-1 50 %. Cosine: a's nearest
    # is b (almost the same direction): a hit -> 100 %.
    v = torch.tensor([[1.0, 0.0], [10.0, 0.5], [0.9, 0.9]])
    labels = torch.tensor([0, 0, 1])
    l2 = evaluate_cases({"v/v": (v, v)}, labels).cases["v/v"]
    cosine = evaluate_cases({"v/v": (v, v)}, labels, metric="cosine").cases["v/v"]
    assert (l2.top1, cosine.top1) == (50.0, 100.0)
