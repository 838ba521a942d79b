"""Tests for fct_ml.backfill: orders, curves on a hand-worked gallery, curve area, apply_transformation."""

from __future__ import annotations

import re

import pytest
import torch

from fct_ml.backfill import (
    ORDERS,
    all_finite,
    apply_transformation,
    backfill_curves,
    backfill_order,
    backfill_summary,
    with_expected_error,
)
from fct_ml.evaluation import curve_area
from fct_ml.retrieval import pairwise_distance
from fct_ml.trainers import train_transformation
from fct_ml.training import TrainConfig
from fct_ml.transformation import Transformation, TransformationConfig

# --------------------------------------------------------------------------- #
# backfill_order
# --------------------------------------------------------------------------- #


def test_sigma_order_is_most_uncertain_first():
    sigma = torch.tensor([0.1, 0.5, -1.0, 0.3])
    # descending: 0.5 (item 1), 0.3 (item 3), 0.1 (item 0), -1.0 (item 2)
    assert backfill_order("sigma", 4, sigma=sigma).tolist() == [1, 3, 0, 2]


def test_sigma_order_ties_keep_storage_order():
    # stable: equal sigmas keep their index order
    sigma = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert backfill_order("sigma", 4, sigma=sigma).tolist() == [1, 3, 0, 2]


def test_sigma_order_ties_keep_storage_order_among_many():
    # 64 items, sigma 1 at odd indices and 0 at even ones: the odd items first, then the even
    # ones, each group in storage order. (Four items are too few to tell: torch's CPU sort is
    # stable anyway below 17 items; an unstable sort reorders these ties.)
    sigma = torch.tensor([float(i % 2) for i in range(64)])
    expected = list(range(1, 64, 2)) + list(range(0, 64, 2))
    assert backfill_order("sigma", 64, sigma=sigma).tolist() == expected


def test_true_error_order_ties_keep_storage_order_among_many():
    # as for sigma: errors 1 at odd indices, 0 at even ones -> odd items, then even, in order
    error = torch.tensor([float(i % 2) for i in range(64)])
    expected = list(range(1, 64, 2)) + list(range(0, 64, 2))
    assert backfill_order("true_error", 64, error=error).tolist() == expected


def test_true_error_order_is_largest_error_first():
    error = torch.tensor([2.0, 0.0, 5.0, 1.0])
    # descending: 5 (item 2), 2 (item 0), 1 (item 3), 0 (item 1)
    assert backfill_order("true_error", 4, error=error).tolist() == [2, 0, 3, 1]


def test_random_order_is_a_reproducible_permutation():
    a = backfill_order("random", 10, generator=torch.Generator().manual_seed(3))
    b = backfill_order("random", 10, generator=torch.Generator().manual_seed(3))
    c = backfill_order("random", 10, generator=torch.Generator().manual_seed(4))
    assert sorted(a.tolist()) == list(range(10))
    assert torch.equal(a, b)
    assert sorted(c.tolist()) == list(range(10))
    assert not torch.equal(a, c)  # a different seed gives a different order (true for these seeds)


def test_order_errors():
    assert set(ORDERS) == {"random", "sigma", "true_error"}
    # each message in full: it names the order and what it lacks
    with pytest.raises(
        ValueError, match=r"^backfill order 'sigma' needs the transformation's sigma$"
    ):
        backfill_order("sigma", 3)
    with pytest.raises(
        ValueError,
        match=r"^backfill order 'true_error' needs the true error of each transformed item$",
    ):
        backfill_order("true_error", 3)
    with pytest.raises(
        ValueError,
        match="^"
        + re.escape(
            "backfill order: expected one of ('random', 'sigma', 'true_error'), got 'greedy'"
        )
        + "$",
    ):
        backfill_order("greedy", 3)


# --------------------------------------------------------------------------- #
# backfill_curves
#
# 1-D new space, 4 classes, one gallery item per class, queries at the true positions:
#   re-embedded R = 0, 10, 20, 30   (labels 0, 1, 2, 3)
#   transformed T = 9,  1, 20, 30   (items 0 and 1 are wrong: each sits near the other's class)
#   queries       = 0, 10, 20, 30   (labels 0, 1, 2, 3)
# k = 0 (all T): q0 at 0 -> nearest 1 (item 1, label 1) miss; q1 at 10 -> nearest 9 (item 0) miss;
#                q2, q3 hit.  top1 = 2/4
# item 0 re-embedded (gallery 0, 1, 20, 30): q0 -> 0 (item 0) hit; q1 at 10 -> |10-1| = 9 beats
#                |10-0| = 10 and |10-20| = 10 -> item 1 hit; q2, q3 hit.  top1 = 4/4
# k = 4 (all R): top1 = 1
# fractions 0, .25, .5, .75, 1 -> k = 0, 1, 2, 3, 4
# true_error order (error |T-R| = 9, 9, 0, 0) = [0, 1, 2, 3]: item 0 at k=1 -> [1/2, 1, 1, 1, 1]
# sigma order [2, 3, 0, 1]: k=1, 2 replace the already-right items 2, 3 -> unchanged; item 0
#   comes in at k=3 -> [1/2, 1/2, 1/2, 1, 1]
# --------------------------------------------------------------------------- #

R = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
T = torch.tensor([[9.0], [1.0], [20.0], [30.0]])
Y = torch.tensor([0, 1, 2, 3])
FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_backfill_curves_by_hand():
    by_error = backfill_order("true_error", 4, error=(T - R).pow(2).sum(1))
    assert by_error.tolist() == [0, 1, 2, 3]
    sigma = backfill_order("sigma", 4, sigma=torch.tensor([0.2, 0.1, 0.9, 0.5]))
    assert sigma.tolist() == [2, 3, 0, 1]
    transformed = T.clone()
    curves = backfill_curves(
        R, Y, transformed, R, Y, {"true_error": by_error, "sigma": sigma}, FRACTIONS
    )
    assert set(curves) == {"true_error", "sigma"}
    assert [p["top1"] for p in curves["true_error"]] == pytest.approx([1 / 2, 1, 1, 1, 1])
    assert [p["top1"] for p in curves["sigma"]] == pytest.approx([1 / 2, 1 / 2, 1 / 2, 1, 1])
    assert all(p["n_queries"] == 4 for c in curves.values() for p in c)
    # the caller's transformed gallery is not modified
    assert torch.equal(transformed, T)
    # area = mean of points: true_error (1/2 + 1 + 1 + 1 + 1)/5 = 0.9; sigma (3 * 1/2 + 2)/5 = 0.7
    assert curve_area([p["top1"] for p in curves["true_error"]]) == pytest.approx(0.9)
    assert curve_area([p["top1"] for p in curves["sigma"]]) == pytest.approx(0.7)


def test_backfill_curves_replaces_exactly_the_first_k_items():
    # Each gallery item is its own class; queries sit exactly on the re-embedded points
    # r = 0, 10, 20, 30; the transformed items are far away at t = 1000 + i. Order [3, 1, 0, 2]:
    # k=0 (all t): every query's nearest is t0 = 1000 (label 0) -> only q0 hits: 1/4
    # k=1 (item 3 = 30): q3 hits; q0, q1, q2 find 30 first -> 1/4
    # k=2 (items 3, 1 = 30, 10): q1, q3 hit; q0 -> 10 miss; q2 -> 10 and 30 both at 10, both
    #     non-matches -> miss. 2/4
    # k=3 (items 3, 1, 0): q0, q1, q3 hit; q2 -> 10 / 30 miss. 3/4
    # k=4: 1
    r = torch.tensor([[0.0], [10.0], [20.0], [30.0]])
    t = torch.tensor([[1000.0], [1001.0], [1002.0], [1003.0]])
    order = torch.tensor([3, 1, 0, 2])
    curves = backfill_curves(r, Y, t, r, Y, {"custom": order}, FRACTIONS, metric="l2")
    assert [p["top1"] for p in curves["custom"]] == pytest.approx([1 / 4, 1 / 4, 2 / 4, 3 / 4, 1])
    # the end points agree across orders
    other = backfill_curves(
        r, Y, t, r, Y, {"a": torch.tensor([0, 1, 2, 3]), "b": order}, [0.0, 1.0]
    )
    assert other["a"][0] == other["b"][0] == curves["custom"][0]
    assert other["a"][1] == other["b"][1] == curves["custom"][-1]


def test_end_points_do_not_depend_on_order():
    g = torch.Generator().manual_seed(0)
    reembedded = torch.randn(12, 3, generator=g)
    transformed = reembedded + 0.8 * torch.randn(12, 3, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    query = reembedded + 0.1 * torch.randn(12, 3, generator=g)
    orders = {
        "random": backfill_order("random", 12, generator=torch.Generator().manual_seed(1)),
        "sigma": backfill_order("sigma", 12, sigma=torch.randn(12, generator=g)),
        "true_error": backfill_order(
            "true_error", 12, error=(transformed - reembedded).pow(2).sum(1)
        ),
    }
    curves = backfill_curves(
        query, labels, transformed, reembedded, labels, orders, [0.0, 0.5, 1.0], leave_one_out=True
    )
    starts = {name: c[0] for name, c in curves.items()}
    ends = {name: c[-1] for name, c in curves.items()}
    assert starts["random"] == starts["sigma"] == starts["true_error"]
    assert ends["random"] == ends["sigma"] == ends["true_error"]


def test_end_points_are_all_transformed_and_all_reembedded():
    # fraction 0 scores the transformed gallery, fraction 1 the re-embedded one (1-D, labels 0, 1):
    #   transformed = 5, 1 ; re-embedded = 0, 6 ; queries 0 (label 0), 6 (label 1)
    #   all transformed: q0 -> 1 (label 1) miss; q1 -> 5 (label 0) miss -> top1 0
    #   all re-embedded: q0 -> 0 hit; q1 -> 6 hit -> top1 1
    transformed = torch.tensor([[5.0], [1.0]])
    reembedded = torch.tensor([[0.0], [6.0]])
    y = torch.tensor([0, 1])
    curves = backfill_curves(
        reembedded, y, transformed, reembedded, y, {"o": torch.tensor([1, 0])}, [0.0, 1.0]
    )
    assert [p["top1"] for p in curves["o"]] == [0.0, 1.0]


def test_backfill_curves_galleries_of_two_shapes_are_refused_naming_both():
    message = (
        "backfill curves: transformed (4, 1) and re-embedded (3, 1) galleries must have one shape"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        backfill_curves(R, Y, T, R[:3], Y, {"o": torch.arange(4)}, FRACTIONS)


@pytest.mark.parametrize(
    "order",
    [[0, 0, 1, 2], [0, 1, 2], [0, 1, 2, 3, 4]],
    ids=["repeated item", "too short", "too long"],
)
def test_backfill_curves_order_not_a_permutation_is_refused(order: list[int]):
    with pytest.raises(
        ValueError, match=r"^backfill order: expected a permutation of the 4 gallery items$"
    ):
        backfill_curves(R, Y, T, R, Y, {"o": torch.tensor(order)}, FRACTIONS)


# 2-D, leave-one-out, two classes: each class has a short vector and a long one along the same
# direction, and the two short vectors lie close together.
#   item 0 (1, 0) and item 1 (10, 1): class 0 ; item 2 (0, 1) and item 3 (1, 10): class 1
# squared L2: query 0 finds item 2 (2) before item 1 (82) and item 3 (100): a miss, AP 1/2;
#   query 1 finds item 0 (82) before item 2 (100), item 3 (162): a hit, AP 1; queries 2, 3 by
#   symmetry. top1 2/4, mAP (1/2 + 1 + 1/2 + 1)/4 = 3/4.
# cosine: query 0 finds item 1 (1 - 10/sqrt(101) = 0.005) before item 3 (0.90) and item 2 (1);
#   query 1 finds item 0 (0.005) first: every query hits with AP 1. top1 1, mAP 1.
COS_GALLERY = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [1.0, 10.0]])
COS_LABELS = torch.tensor([0, 0, 1, 1])


def test_backfill_curves_rank_by_the_metric_asked_for():
    # transformed = re-embedded: every point scores the same gallery
    def curve(**kwargs):
        return backfill_curves(
            COS_GALLERY,
            COS_LABELS,
            COS_GALLERY,
            COS_GALLERY,
            COS_LABELS,
            {"o": torch.arange(4)},
            [0.0, 1.0],
            leave_one_out=True,
            **kwargs,
        )["o"]

    for point in curve(metric="cosine"):
        assert (point["top1"], point["mAP"]) == pytest.approx((1.0, 1.0))
    for point in curve(metric="l2"):
        assert (point["top1"], point["mAP"]) == pytest.approx((0.5, 0.75))


# --------------------------------------------------------------------------- #
# curve_area
# --------------------------------------------------------------------------- #


def test_curve_area_is_mean_of_points():
    # (0.2 + 0.4 + 0.9) / 3 = 1.5 / 3 = 0.5
    assert curve_area([0.2, 0.4, 0.9]) == pytest.approx(0.5)
    assert curve_area([0.7]) == pytest.approx(0.7)
    assert isinstance(curve_area((1, 0)), float)
    assert curve_area((1, 0)) == 0.5


def test_curve_area_empty_raises():
    with pytest.raises(ValueError, match=r"^curve_area: empty curve$"):
        curve_area([])


# --------------------------------------------------------------------------- #
# apply_transformation
# --------------------------------------------------------------------------- #


def small_h(**kwargs) -> Transformation:
    torch.manual_seed(0)
    return Transformation(
        TransformationConfig(
            old_dim=4, side_info_dim=3, new_dim=5, branch_width=8, inner_width=8, **kwargs
        )
    )


def _inputs(n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


def test_apply_transformation_shapes_and_batching():
    h = small_h()
    old, side = _inputs()
    out, sigma = apply_transformation(h, old, side)
    assert out.shape == (7, 5)
    assert out.dtype == torch.float32
    assert sigma is None
    one, _ = apply_transformation(h, old, side, batch_size=1)
    many, _ = apply_transformation(h, old, side, batch_size=100)
    three, _ = apply_transformation(h, old, side, batch_size=3)  # 3 + 3 + 1
    assert torch.allclose(one, many, atol=1e-6)
    assert torch.allclose(three, many, atol=1e-6)
    assert torch.allclose(out, many, atol=1e-6)
    # the module ends frozen: eval mode, no parameter requires grad, and outputs carry no graph
    assert not h.training
    assert not any(p.requires_grad for p in h.parameters())
    assert not out.requires_grad


def test_apply_transformation_matches_eval_forward():
    # With batch-norm in eval mode (running stats), h is a per-sample function: check against
    # a direct forward on the whole set.
    h = small_h()
    old, side = _inputs()
    out, _ = apply_transformation(h, old, side, batch_size=2)
    with torch.no_grad():
        direct = h.eval()(old, side)
    assert torch.allclose(out, direct, atol=1e-6)


def test_apply_transformation_with_uncertainty():
    h = small_h(uncertainty=True)
    old, side = _inputs()
    out, sigma = apply_transformation(h, old, side)
    assert out.shape == (7, 5)
    assert sigma is not None and sigma.shape == (7,)
    out1, sigma1 = apply_transformation(h, old, side, batch_size=1)
    assert torch.allclose(out1, out, atol=1e-6)
    assert torch.allclose(sigma1, sigma, atol=1e-6)
    # sigma is the head applied to the prediction
    with torch.no_grad():
        expected_sigma = h.sigma_head(out).squeeze(1)
    assert torch.allclose(sigma, expected_sigma, atol=1e-5)
    assert not h.training
    assert not any(p.requires_grad for p in h.parameters())


def test_apply_transformation_without_side_info_ignores_side_input():
    h = small_h(side_info=False)
    old, side = _inputs()
    with_none, _ = apply_transformation(h, old, None)
    assert with_none.shape == (7, 5)
    # side_info=False: the side branch sees the old embedding; a side array passed in is ignored
    with_side, _ = apply_transformation(h, old, side)
    with_noise, _ = apply_transformation(h, old, 100 * torch.randn(7, 3))
    assert torch.allclose(with_none, with_side, atol=1e-6)
    assert torch.allclose(with_none, with_noise, atol=1e-6)


def test_apply_transformation_empty_input():
    old, side = torch.zeros(0, 4), torch.zeros(0, 3)
    out, sigma = apply_transformation(small_h(), old, side)
    assert out.shape == (0, 5) and sigma is None
    out, sigma = apply_transformation(small_h(uncertainty=True), old, side)
    assert out.shape == (0, 5)
    assert sigma is not None and sigma.shape == (0,)


def test_apply_transformation_wrong_dims_name_the_field():
    h = small_h()
    old, side = _inputs()
    with pytest.raises(ValueError, match="old_embedding"):
        apply_transformation(h, torch.zeros(7, 3), side)
    with pytest.raises(ValueError, match="old_embedding"):
        apply_transformation(h, torch.zeros(4), side)
    with pytest.raises(ValueError, match="side_info"):
        apply_transformation(h, old, torch.zeros(7, 4))
    with pytest.raises(ValueError, match="side_info"):
        apply_transformation(h, old, None)  # this h needs side-info
    with pytest.raises(ValueError, match="side_info"):
        apply_transformation(h, old, side[:5])  # row count mismatch


def test_apply_transformation_side_info_errors_give_the_shapes():
    # the whole message: expected and received shapes; rows (5) != columns (3) of side_info and
    # rows (7) != columns (4) of old_embedding, so each count comes from the right axis
    h = small_h()
    old, side = _inputs()
    cases = [
        (torch.zeros(7, 4), "side_info: expected (N, 3), got (7, 4)"),
        (None, "side_info: expected (N, 3), got None"),
        (side[:5], "side_info: 5 rows but old_embedding has 7"),
    ]
    for side_info, message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            apply_transformation(h, old, side_info)


# --------------------------------------------------------------------------- #
# a partly backfilled gallery: transformed items carry their expected error
# --------------------------------------------------------------------------- #


def test_with_expected_error_adds_it_to_the_squared_distance():
    gallery = with_expected_error(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([4.0, 0.0]))
    assert gallery.tolist() == [[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]  # sqrt(4) = 2
    query = with_expected_error(torch.tensor([[1.0, 0.0]]), None)  # (1, 0, 0)
    # item 0: (1 - 0)^2 + 0 + (0 - 2)^2 = 1 + 4 = 5 ; item 1: (1 - 3)^2 = 4
    assert pairwise_distance(query, gallery).tolist() == [[5.0, 4.0]]


def test_with_expected_error_keeps_the_vectors_device():
    # The zero column of re-embedded items (expected error None) is made on the CPU and must
    # follow the vectors to their device (a GPU in use). The meta device stands in for one here:
    # concatenating a CPU column to meta vectors would fail.
    out = with_expected_error(torch.zeros(3, 2, device="meta"), None)
    assert out.device.type == "meta"
    assert out.shape == (3, 3)


def _synthetic_upgrade(seed: int):
    """Four classes in a 16-d new space (class means 0.5 * N(0, I), noise 0.9); the old
    embedding is a fixed linear map of the new one plus noise, so h can only recover its
    conditional mean: (train old, new, labels), (gallery old, new, labels), class means."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 16, generator=g) * 0.5
    mix = torch.randn(16, 16, generator=torch.Generator().manual_seed(99)) / 4.0

    def sample(n: int):
        labels = torch.randint(0, 4, (n,), generator=g)
        new = means[labels] + 0.9 * torch.randn(n, 16, generator=g)
        return new @ mix + 0.7 * torch.randn(n, 16, generator=g), new, labels

    return sample(2000), sample(500), means


@pytest.mark.slow
def test_mixed_gallery_never_below_its_ends_synthetic():
    (old, new, labels), (g_old, g_new, g_labels), means = _synthetic_upgrade(0)
    config = TransformationConfig(
        old_dim=16,
        side_info_dim=16,
        new_dim=16,
        branch_width=32,
        inner_width=64,
        side_info=False,
        uncertainty=True,
    )
    train = TrainConfig(
        epochs=8,
        batch_size=128,
        optimizer="adam",
        lr=2e-3,
        weight_decay=0.0,
        warmup_epochs=0.0,
        bn_eval_after=0.5,
    )
    h, _ = train_transformation(
        old,
        old,
        new,
        labels,
        config,
        train,
        device=torch.device("cpu"),
        seed=0,
        new_classifier=means,
        progress=False,
    )
    # exp(sigma) is calibrated to h's mean squared error on its training features
    pred, sigma = apply_transformation(h, old, None)
    assert float(sigma.exp().mean()) == pytest.approx(
        float((pred - new).pow(2).sum(1).mean()), rel=1e-3
    )

    transformed, sigma = apply_transformation(h, g_old, None)

    def curves(expected_error: bool):
        return backfill_summary(
            g_new,
            g_labels,
            transformed,
            sigma,
            6,
            generator=torch.Generator().manual_seed(0),
            expected_error=expected_error,
        ).curves

    for order, curve in curves(True).items():
        points = curve.mAP
        # within 0.1 points: sigma is calibrated on h's training features, a little optimistic
        assert min(points) >= min(points[0], points[-1]) - 0.1, (order, points)
    # Without the expected error, h's outputs (its conditional means) sit closer to every
    # query than re-embedded items: the mixed gallery ranks worse than both of its ends.
    points = curves(False)["random"].mAP
    assert min(points) < min(points[0], points[-1]) - 0.5, points


def test_sigma_sends_no_gradient_into_h():
    torch.manual_seed(0)
    h = Transformation(
        TransformationConfig(
            old_dim=4, side_info_dim=3, new_dim=5, branch_width=8, inner_width=8, uncertainty=True
        )
    )
    _, sigma = h.forward_with_sigma(torch.randn(6, 4), torch.randn(6, 3))
    sigma.sum().backward()
    assert h.sigma_head.weight.grad is not None
    assert all(p.grad is None for p in h.inner.parameters())


@pytest.mark.parametrize("side_info", [True, False])
def test_a_nan_or_inf_input_is_refused_naming_its_row(side_info: bool):
    h = small_h(side_info=side_info).eval()
    old, side = torch.zeros(4, 4), torch.zeros(4, 3)
    bad_old = old.clone()
    bad_old[2, 1] = float("nan")
    with pytest.raises(
        ValueError, match=r"^old_embedding: row 2 contains NaN or Inf; expected finite vectors$"
    ):
        apply_transformation(h, bad_old, side)
    bad_side = side.clone()
    bad_side[3, 0] = float("inf")
    bad_side[1, 2] = float("-inf")
    if side_info:
        with pytest.raises(ValueError, match=r"^side_info: row 1 contains NaN or Inf"):
            apply_transformation(h, old, bad_side)
    else:  # h does not read side-info: it is not checked
        transformed, _ = apply_transformation(h, old, bad_side)
        assert torch.isfinite(transformed).all()


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([[1.0, -2.0], [0.5, 3.0]], torch.float32, True),
        ([[1.0, float("nan")], [0.5, 3.0]], torch.float32, False),
        ([[1.0, 2.0], [float("-inf"), 3.0]], torch.float32, False),
        # +Inf and -Inf: their sum is NaN, still caught
        ([[float("inf"), float("-inf")]], torch.float32, False),
        # float32's largest values: a float32 sum would overflow, the float64 one does not
        ([[3e38, 3e38], [3e38, 3e38]], torch.float32, True),
        # float64 sums can overflow: then the elementwise test decides
        ([[1e308, 1e308]], torch.float64, True),
        ([[1e308, float("inf")]], torch.float64, False),
        ([[1, 2], [3, 4]], torch.int64, True),
        # one element: a NaN there is not finite (only an empty tensor is finite by default)
        ([float("nan")], torch.float32, False),
        ([float("inf")], torch.float64, False),
        # complex: a NaN imaginary part is not finite (a float64 sum would drop it: the fast
        # path is for real floating types only)
        ([complex(1.0, float("nan")), complex(2.0, 0.0)], torch.complex64, False),
        ([complex(1.0, 2.0)], torch.complex64, True),
    ],
)
def test_all_finite_is_the_elementwise_test(values, dtype, finite):
    t = torch.tensor(values, dtype=dtype)
    assert all_finite(t) is finite
    assert finite == bool(torch.isfinite(t).all())


def test_all_finite_of_nothing_is_true():
    assert all_finite(torch.empty(0, 4)) is True
