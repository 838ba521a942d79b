"""backfill_summary: FastFill's curves and areas, checked against values worked out by hand, with
sigma equal to the true error (so the sigma order is the true-error order) and reversed."""

from __future__ import annotations

import json

import pytest
import torch

from fct_ml.backfill import ORDERS, backfill_curves, backfill_summary
from fct_ml.evaluation import BackfillCurve, CurveArea

# Four items in 1-D, two classes. The new model puts each class in its own cluster; h maps item 0
# (class 0) into class 1's cluster and every other item exactly where the new model does.
NEW = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
LABELS = torch.tensor([0, 0, 1, 1])
TRANSFORMED = torch.tensor([[10.05], [0.1], [10.0], [10.1]])
ERROR = (TRANSFORMED - NEW).pow(2).sum(1)  # (4,): item 0 only

# By hand (new queries, leave-one-out, squared L2), with item 0 still transformed: query 0 finds
# item 1 first (top-1 hit, AP 1); query 1 ranks item 2 (9.9) before item 0 (9.95): AP 1/2;
# queries 2 and 3 find item 0 at 0.05 before their class-mate: AP 1/2 each. So top-1 25 %, mAP
# 62.5 %. With item 0 re-embedded the gallery equals the new embeddings: 100 % and 100 %.
WRONG = {"top1": 25.0, "mAP": 62.5}
RIGHT = {"top1": 100.0, "mAP": 100.0}


def _summary(sigma: torch.Tensor):
    # The order alone: no expected-error coordinate (its own test below).
    return backfill_summary(
        NEW,
        LABELS,
        TRANSFORMED,
        sigma,
        5,
        generator=torch.Generator().manual_seed(0),
        expected_error=False,
    )


def test_sigma_equal_to_the_error_re_embeds_the_wrong_item_first():
    summary = _summary(ERROR)
    curves, areas = summary.curves, summary.areas
    assert curves["sigma"].fractions == (0.0, 0.25, 0.5, 0.75, 1.0)
    for metric in ("top1", "mAP"):
        expected = [WRONG[metric]] + [RIGHT[metric]] * 4
        assert getattr(curves["sigma"], metric) == pytest.approx(expected)
        assert getattr(curves["true_error"], metric) == pytest.approx(expected)
        assert getattr(areas["sigma"], metric) == pytest.approx(sum(expected) / 5)
    assert areas["sigma"].as_dict() == pytest.approx({"top1": 85.0, "mAP": 92.5})


def test_the_reversed_order_re_embeds_the_wrong_item_last():
    # sigma = -error: the least uncertain first. The three exact items change nothing; the curve
    # stays at its start until the last point.
    summary = _summary(-ERROR)
    curves, areas = summary.curves, summary.areas
    for metric in ("top1", "mAP"):
        assert getattr(curves["sigma"], metric) == pytest.approx(
            [WRONG[metric]] * 4 + [RIGHT[metric]]
        )
    assert areas["sigma"].as_dict() == pytest.approx({"top1": 40.0, "mAP": 70.0})
    # The true-error order does not read sigma.
    assert curves["true_error"].top1 == pytest.approx([25.0, 100.0, 100.0, 100.0, 100.0])


def _larger_gallery():
    """300 items, 6 classes in 8-D. h maps a tenth of the items into the next class's cluster
    and the rest close to where the new model puts them: (new, labels, transformed, error)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 6
    centres = 6.0 * torch.randn(6, 8, generator=g)
    new = centres[labels] + 0.5 * torch.randn(300, 8, generator=g)
    transformed = new + 0.1 * torch.randn(300, 8, generator=g)
    astray = torch.arange(300) % 10 == 0
    transformed[astray] = centres[(labels[astray] + 1) % 6] + 0.5 * torch.randn(30, 8, generator=g)
    return new, labels, transformed, (transformed - new).pow(2).sum(1)


def test_sigma_as_the_true_error_dominates_the_reversed_order_on_a_larger_gallery():
    # With sigma = the true error, the sigma order IS the true-error order.
    new, labels, transformed, error = _larger_gallery()

    def run(sigma):
        return backfill_summary(
            new,
            labels,
            transformed,
            sigma,
            11,
            generator=torch.Generator().manual_seed(0),
            expected_error=False,
        )

    ordered_run, reversed_run = run(error), run(-error)
    curves, areas = ordered_run.curves, ordered_run.areas
    reversed_curves, reversed_areas = reversed_run.curves, reversed_run.areas
    for metric in ("top1", "mAP"):
        assert getattr(curves["sigma"], metric) == getattr(curves["true_error"], metric)
        ordered, backwards = (
            getattr(curves["sigma"], metric),
            getattr(reversed_curves["sigma"], metric),
        )
        assert ordered[0] == backwards[0] and ordered[-1] == backwards[-1]
        assert all(a >= b for a, b in zip(ordered, backwards)), (ordered, backwards)
        assert getattr(areas["sigma"], metric) > getattr(reversed_areas["sigma"], metric) + 2.0


def test_the_expected_error_coordinate_moves_only_transformed_items():
    # sigma = log of the expected squared error: item 0 is expected 4.0 off (squared), the others
    # 0. The gallery's item 0 moves 2 away along a new axis; queries and re-embedded items are
    # at 0 there. At fraction 0: query 0 still finds item 1 first (AP 1); query 1 (0.1) now
    # ranks item 0 (sqrt(9.95^2 + 4) = 10.15) after items 2 and 3 (9.9, 10.0): AP 1/3; queries
    # 2 and 3 find their class-mate (0.1) before item 0 (sqrt(0.05^2 + 4)): AP 1. Top-1 75 %,
    # mAP 83.3 %.
    sigma = torch.log(torch.tensor([4.0, 1e-12, 1e-12, 1e-12]))
    curves = backfill_summary(
        NEW,
        LABELS,
        TRANSFORMED,
        sigma,
        5,
        generator=torch.Generator().manual_seed(0),
        expected_error=True,
    ).curves
    assert curves["sigma"].top1[0] == pytest.approx(75.0)
    assert curves["sigma"].mAP[0] == pytest.approx((1 + 1 / 3 + 1 + 1) / 4 * 100)
    assert curves["sigma"].top1[1:] == pytest.approx([100.0] * 4)


def test_summary_names_the_three_orders_and_their_fields():
    summary = _summary(ERROR)
    assert list(summary.curves) == ["random", "sigma", "true_error"]
    assert list(summary.areas) == ["random", "sigma", "true_error"]
    # Its JSON: the shape reproduce's results and the eval report were written in before it was
    # typed. The sigma order at this sigma: the curve and area of the first test.
    curves, areas = summary.curves_as_dicts(), summary.areas_as_dicts()
    for order in ORDERS:
        assert set(curves[order]) == {"fractions", "top1", "mAP"}
        assert set(areas[order]) == {"top1", "mAP"}
    assert curves["sigma"]["fractions"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curves["sigma"]["top1"] == pytest.approx([25.0, 100.0, 100.0, 100.0, 100.0])
    assert curves["sigma"]["mAP"] == pytest.approx([62.5, 100.0, 100.0, 100.0, 100.0])
    assert areas["sigma"] == pytest.approx({"top1": 85.0, "mAP": 92.5})
    assert json.loads(json.dumps(curves)) == curves  # plain lists and floats


def test_an_area_is_the_mean_of_each_metric_s_points():
    # top-1 (10 + 20 + 60) / 3 = 30; mAP (0 + 50 + 100) / 3 = 50.
    curve = BackfillCurve(
        fractions=(0.0, 0.5, 1.0), top1=(10.0, 20.0, 60.0), mAP=(0.0, 50.0, 100.0)
    )
    assert curve.area() == CurveArea(top1=30.0, mAP=50.0)
    assert curve.as_dict() == {
        "fractions": [0.0, 0.5, 1.0],
        "top1": [10.0, 20.0, 60.0],
        "mAP": [0.0, 50.0, 100.0],
    }


def test_a_curve_refuses_metrics_of_another_length_than_its_fractions():
    with pytest.raises(
        ValueError, match=r"^backfill curve: 2 fractions, 3 top-1 and 2 mAP points$"
    ):
        BackfillCurve(fractions=(0.0, 1.0), top1=(1.0, 2.0, 3.0), mAP=(1.0, 2.0))


def test_random_curve_follows_the_generator():
    # The random order is torch.randperm drawn from the caller's generator: two calls with one
    # seed give one curve, equal to the curve of that permutation built by hand (and another
    # seed gives another curve: on this gallery the curve tells the orders apart).
    new, labels, transformed, error = _larger_gallery()

    def random_curve(seed: int) -> tuple[float, ...]:
        return (
            backfill_summary(
                new, labels, transformed, error, 11, generator=torch.Generator().manual_seed(seed)
            )
            .curves["random"]
            .mAP
        )

    order = torch.randperm(300, generator=torch.Generator().manual_seed(5))
    by_hand = backfill_curves(
        new,
        labels,
        transformed,
        new,
        labels,
        {"random": order},
        [i / 10 for i in range(11)],
        leave_one_out=True,
    )["random"]
    assert random_curve(5) == random_curve(5) == tuple(100 * p["mAP"] for p in by_hand)
    assert random_curve(6) != random_curve(5)


def test_expected_error_is_off_by_default():
    # sigma as in the expected-error test below: with the coordinate, top-1 at fraction 0 is 75 %;
    # without it 25 % (WRONG). A call that does not say gets the latter.
    sigma = torch.log(torch.tensor([4.0, 1e-12, 1e-12, 1e-12]))

    def summary(**kwargs):
        return backfill_summary(
            NEW, LABELS, TRANSFORMED, sigma, 5, generator=torch.Generator().manual_seed(0), **kwargs
        )

    default = summary()
    assert default == summary(expected_error=False)
    assert default.curves["sigma"].top1[0] == pytest.approx(WRONG["top1"])
    assert summary(expected_error=True).curves["sigma"].top1[0] == pytest.approx(75.0)


def test_summary_ranks_by_the_metric_asked_for():
    # 2-D, two classes, each a short and a long vector along one direction, the short vectors
    # close together (as in test_backfill.py's metric test). transformed = new: every curve is
    # flat. Squared L2 (leave-one-out): queries 0 and 2 find the other class's short vector
    # first (miss, AP 1/2), queries 1 and 3 their class-mate (hit, AP 1): top-1 50 %, mAP 75 %.
    # Cosine: every query finds its class-mate first: 100 % and 100 %.
    new = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [1.0, 10.0]])
    labels = torch.tensor([0, 0, 1, 1])
    sigma = torch.zeros(4)

    def areas(**kwargs):
        return backfill_summary(
            new, labels, new, sigma, 3, generator=torch.Generator().manual_seed(0), **kwargs
        ).areas

    for area in areas(metric="cosine").values():
        assert area.as_dict() == pytest.approx({"top1": 100.0, "mAP": 100.0})
    for area in areas(metric="l2").values():
        assert area.as_dict() == pytest.approx({"top1": 50.0, "mAP": 75.0})
