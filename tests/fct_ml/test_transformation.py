"""Tests for fct_ml.transformation, fast: sigma's calibration and the training features worked
out by hand; h's inner depth, low-rank variant, parameter count and multiply-accumulates by hand.
tests/fct_ml/test_models.py checks h's layout and shapes, tests/fct_ml/test_trainers.py training
h and its refusals of bad input."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn

from fct_ml.augment import AugmentConfig, augment, to_float
from fct_ml.config import ConfigError, from_dict, replace
from fct_ml.training import seed_everything
from fct_ml.transformation import (
    Transformation,
    TransformationConfig,
    calibrate_sigma,
    mlp,
    training_features,
    transformation_macs,
)
from tests.fct_ml.tiny import TINY_H, tiny_features


def test_the_defaults_are_the_official_recipe():
    # apple/ml-fct: 128-d old, side-info and new embeddings, branches 128->256->256, the inner
    # MLP 512->2048->2048->128, side-info on, no sigma head, FastFill's CE weighted 1.
    assert TransformationConfig() == TransformationConfig(
        old_dim=128,
        side_info_dim=128,
        new_dim=128,
        branch_width=256,
        inner_width=2048,
        side_info=True,
        uncertainty=False,
        ce_weight=1.0,
        inner_depth=2,
        inner_rank=0,
    )
    h = Transformation(TransformationConfig())
    assert h.sigma_head is None
    assert float(h.sigma_offset) == 0.0


# ---------------------------------------------------------------- sigma and its calibration


def _h_with_constant_sigma(bias: float) -> Transformation:
    """A tiny h whose sigma head outputs `bias` for every item (zero weight)."""
    torch.manual_seed(0)
    h = Transformation(TransformationConfig(**TINY_H, uncertainty=True)).eval()
    with torch.no_grad():
        h.sigma_head.weight.zero_()
        h.sigma_head.bias.fill_(bias)
    return h


def test_sigma_is_the_head_on_the_detached_output_plus_the_offset():
    h = _h_with_constant_sigma(0.25)
    old, side, _, _ = tiny_features(4)
    with torch.no_grad():
        h.sigma_offset.fill_(1.5)
    pred, sigma = h.forward_with_sigma(old, side)
    assert torch.allclose(sigma, torch.full((4,), 1.75))
    # sigma sends no gradient into h's output: only the head learns from it.
    sigma.sum().backward()
    assert h.sigma_head.bias.grad is not None
    assert all(p.grad is None for p in h.inner.parameters())
    assert all(p.grad is None for p in h.old_branch.parameters())
    pred.sum().backward()
    assert all(p.grad is not None for p in h.inner.parameters())


def test_calibrate_sigma_by_hand():
    h = _h_with_constant_sigma(0.0)  # raw sigma 0: exp(sigma) = 1 per item
    old, side, _, _ = tiny_features(4)
    with torch.no_grad():
        pred = h(old, side)
    # Errors of squared norms 1, 4, 0 and 3: their sum is 8, over 4 items whose exp(sigma)
    # sums to 4, so the offset is log(8 / 4) = log 2.
    delta = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [1.0, math.sqrt(2.0)]])
    new = pred + delta
    h.sigma_offset.fill_(5.0)  # an earlier calibration is replaced, not added to
    offset = calibrate_sigma(h, old, side, new, batch_size=3)
    assert offset == pytest.approx(math.log(2.0), rel=1e-5)
    assert float(h.sigma_offset) == pytest.approx(math.log(2.0), rel=1e-5)
    # Raw sigma 1: exp sums to 4e, offset log(8 / 4e) = log 2 - 1; the batch size changes nothing.
    h2 = _h_with_constant_sigma(1.0)
    assert calibrate_sigma(h2, old, side, new, batch_size=1) == pytest.approx(
        math.log(2.0) - 1.0, rel=1e-5
    )
    # exp(sigma) underflowing to ~0 is floored at 1e-12 too: log(8 / 1e-12).
    h3 = _h_with_constant_sigma(-100.0)
    assert calibrate_sigma(h3, old, side, new) == pytest.approx(math.log(8.0 / 1e-12), rel=1e-5)
    # A perfect h: the error sum is floored at 1e-12 rather than taking log(0).
    assert calibrate_sigma(h, old, side, pred) == pytest.approx(math.log(1e-12 / 4.0), rel=1e-6)


# ---------------------------------------------------------------- training features


class _Linear(nn.Module):
    """(N, 1, 4, 4) images -> (N, out) by a fixed linear map of the pixels."""

    def __init__(self, out: int, seed: int):
        super().__init__()
        self.map = nn.Linear(16, out, bias=False)
        with torch.no_grad():
            self.map.weight.copy_(
                torch.randn(out, 16, generator=torch.Generator().manual_seed(seed))
            )

    def forward(self, x):
        return self.map(x.flatten(1))


def test_training_features_by_hand():
    images = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    aug = AugmentConfig(flip=True, brightness=0.3)
    a, b = _Linear(2, 1), _Linear(3, 2)
    torch.manual_seed(123)  # the global RNG is in another state than the seed puts it in
    got_a, got_b = training_features([a, b], images, 2, aug, batch_size=2, seed=7)
    # View 0: the clean images. View 1: each batch of 2 (then the last 1) augmented once, in
    # order, by the generator seeded with 7, the same batch going through both models.
    g = torch.Generator().manual_seed(7)
    x = to_float(images)
    views = torch.cat([x, *(augment(x[s : s + 2], aug, g) for s in range(0, 5, 2))])
    with torch.no_grad():
        assert torch.allclose(got_a, a(views)) and got_a.shape == (10, 2)
        assert torch.allclose(got_b, b(views)) and got_b.shape == (10, 3)
    assert not torch.allclose(views[:5], views[5:])  # the second view is augmented
    # One model, one view: the clean features only.
    (clean,) = training_features([a], images, 1, aug, batch_size=4, seed=7)
    with torch.no_grad():
        assert torch.allclose(clean, a(x))
    assert a.training is False  # the models ran frozen


def test_training_features_draw_augmentations_from_their_generator_not_the_global_rng():
    # seed_everything seeds torch's global RNG and the generator it returns alike, so features
    # drawn from either would be the same; the augmentations must come from the generator, which
    # leaves the global RNG where seeding put it for whatever runs next.
    images = torch.randint(0, 256, (5, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    aug = AugmentConfig(flip=True, brightness=0.3)
    training_features([_Linear(2, 1)], images, 3, aug, batch_size=2, seed=7)
    after = torch.rand(4)
    seed_everything(7)
    assert torch.equal(after, torch.rand(4))


# ---------------------------------------------------------------- depth, rank and cost

# old 3, side 2, new 4, branches 5 wide, inner 6 wide: small enough to count by hand.
SMALL = dict(old_dim=3, side_info_dim=2, new_dim=4, branch_width=5, inner_width=6)


def _params(h: nn.Module) -> int:
    return sum(p.numel() for p in h.parameters())


@pytest.mark.parametrize(
    "depth, rank, params, macs",
    [
        # Branches, the same for every row: old Linear(3,5) 15 + BN(5) 10 + Linear(5,5) 25 +
        # BN 10 = 60 parameters; side Linear(2,5) 10 + 10 + 25 + 10 = 55. MACs: 15 + 25 + 10 +
        # 25 = 75. Inner input 2 * 5 = 10. A BN of width 6 has 12 parameters; the last
        # Linear(6,4) has a bias: 28 parameters, 24 MACs.
        # depth 1: Linear(10,6) 60 + BN 12 + last 28 = 100; MACs 60 + 24 = 84.
        (1, 0, 60 + 55 + 100, 75 + 84),
        # depth 2 (today's): + Linear(6,6) 36 + BN 12 -> inner 148; MACs 60 + 36 + 24 = 120.
        (2, 0, 60 + 55 + 148, 75 + 120),
        # depth 3: two Linear(6,6)-BN -> inner 196; MACs 60 + 36 + 36 + 24 = 156.
        (3, 0, 60 + 55 + 196, 75 + 156),
        # depth 2, rank 2: Linear(6,6) 36 becomes Linear(6,2) 12 + Linear(2,6) 12 = 24 -> inner
        # 136; MACs 60 + 24 + 24 = 108.
        (2, 2, 60 + 55 + 136, 75 + 108),
        # depth 2, rank 1 (the smallest rank, still factorised): Linear(6,1) 6 + Linear(1,6) 6
        # = 12 -> inner 124; MACs 60 + 12 + 24 = 96.
        (2, 1, 60 + 55 + 124, 75 + 96),
        # depth 3, rank 2: both square layers factorised -> inner 172; MACs 60 + 24 + 24 + 24
        # = 132. Step 0 (10 -> 6) and the last layer are never factorised.
        (3, 2, 60 + 55 + 172, 75 + 132),
    ],
)
def test_parameters_and_macs_by_hand(depth, rank, params, macs):
    config = TransformationConfig(**SMALL, inner_depth=depth, inner_rank=rank)
    h = Transformation(config)
    assert _params(h) == params
    assert transformation_macs(config) == macs
    # The count is h's Linear layers, one multiply-accumulate per weight: the built module's.
    linears = [m for m in h.modules() if isinstance(m, nn.Linear)]
    assert sum(m.in_features * m.out_features for m in linears) == macs
    with torch.no_grad():
        assert h.eval()(torch.randn(2, 3), torch.randn(2, 2)).shape == (2, 4)
    # FastFill's sigma head: Linear(4,1) with a bias, 5 parameters, 4 MACs.
    with_sigma = replace(config, uncertainty=True)
    assert _params(Transformation(with_sigma)) == params + 5
    assert transformation_macs(with_sigma) == macs + 4
    # Without side-info the side branch reads the old embedding (3 wide, not 2): + 5 MACs.
    plain = replace(config, side_info=False)
    assert _params(Transformation(plain)) == params + 5
    assert transformation_macs(plain) == macs + 5


def test_macs_of_the_presets_widths_by_hand():
    # The official h (inner 2048): branches 2 * (128*256 + 256*256) = 196,608; inner
    # 512*2048 + 2048*2048 + 2048*128 = 5,505,024.
    assert transformation_macs(TransformationConfig()) == 196_608 + 5_505_024
    # The cpu preset's (inner 1024) with FastFill's head: 196,608 + 512*1024 + 1024*1024 +
    # 1024*128 = 1,703,936, + 128 for sigma.
    cpu = TransformationConfig(inner_width=1024, uncertainty=True)
    assert transformation_macs(cpu) == 196_608 + 1_703_936 + 128
    # Rank 64 replaces 1024*1024 = 1,048,576 by 2 * 1024 * 64 = 131,072.
    low = replace(cpu, inner_rank=64)
    assert transformation_macs(low) == 196_608 + 1_703_936 - 1_048_576 + 131_072 + 128


def test_the_default_layout_keeps_its_parameter_names_and_shapes():
    # Checkpoints written before inner_depth and inner_rank existed hold exactly these tensors
    # (besides the branches): the defaults must build the same ones to load them.
    h = Transformation(TransformationConfig(**SMALL, uncertainty=True))
    inner = {k: tuple(v.shape) for k, v in h.state_dict().items() if k.startswith("inner.")}
    bn6 = {"weight": (6,), "bias": (6,), "running_mean": (6,), "running_var": (6,)}
    expected = {
        "inner.0.weight": (6, 10),
        **{f"inner.1.{k}": s for k, s in bn6.items()},
        "inner.1.num_batches_tracked": (),
        "inner.3.weight": (6, 6),
        **{f"inner.4.{k}": s for k, s in bn6.items()},
        "inner.4.num_batches_tracked": (),
        "inner.6.weight": (4, 6),
        "inner.6.bias": (4,),
    }
    assert inner == expected
    others = {k for k in h.state_dict() if not k.startswith("inner.")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    branch = {
        key
        for b in ("old_branch", "side_branch")
        for key in (f"{b}.0.weight", f"{b}.3.weight", *(f"{b}.{i}.{k}" for i in (1, 4) for k in bn))
    }
    assert others == branch | {"sigma_head.weight", "sigma_head.bias", "sigma_offset"}


def test_low_rank_is_a_product_with_no_nonlinearity_between():
    torch.manual_seed(0)
    low = Transformation(TransformationConfig(**SMALL, inner_rank=2)).eval()
    assert [type(m).__name__ for m in low.inner[3]] == ["Linear", "Linear"]
    down, up = low.inner[3]
    assert (down.in_features, down.out_features, up.out_features) == (6, 2, 6)
    assert down.bias is None and up.bias is None  # a BN follows, as after the full layer
    # The same h at full rank, its 6x6 weight the product up @ down, computes the same thing.
    full = Transformation(TransformationConfig(**SMALL)).eval()
    state = {k: v for k, v in low.state_dict().items() if not k.startswith("inner.3.")}
    state["inner.3.weight"] = up.weight @ down.weight
    full.load_state_dict(state)
    old, side = torch.randn(8, 3), torch.randn(8, 2)
    with torch.no_grad():
        assert torch.allclose(low(old, side), full(old, side), atol=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("inner_depth", 0, r"^inner_depth: expected an integer >= 1, got 0$"),
        ("inner_depth", -2, r"^inner_depth: expected an integer >= 1, got -2$"),
        ("inner_rank", -1, r"^inner_rank: expected an integer >= 0 \(0: full rank\), got -1$"),
    ],
)
def test_bad_depth_or_rank_is_refused_in_one_line(field, value, message):
    with pytest.raises(ConfigError, match=message):
        TransformationConfig(**{field: value})
    # The same refusal when the config comes from a mapping (a checkpoint's metadata, JSON).
    with pytest.raises(ConfigError, match=message):
        from_dict(TransformationConfig, {field: value})
    # A wrong type is from_dict's: it names the field too.
    with pytest.raises(ConfigError, match=f"^{field}: expected an integer, got '2'$"):
        from_dict(TransformationConfig, {field: "2"})


@pytest.mark.parametrize("rank", [8, 1])  # 1: the smallest rank is a rank too
def test_a_rank_with_no_square_layer_to_factorise_is_refused(rank):
    message = (
        f"inner_rank: {rank} needs inner_depth >= 2 (depth 1 has no inner_width x"
        " inner_width layer to factorise)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        TransformationConfig(inner_depth=1, inner_rank=rank)


def test_mlp_without_a_rank_keeps_the_listed_steps_full():
    # low_rank only lists the steps a rank would factorise; with no rank given (0: full) every
    # step is one Linear, as in the branches, which are built without a rank.
    full = mlp([2, 3, 3], plain_last=True, low_rank=[1])
    assert [type(m).__name__ for m in full] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (full[3].in_features, full[3].out_features) == (3, 3) and full[3].bias is not None
    # The same step with a rank given is the pair 3 -> 1 -> 3.
    low = mlp([2, 3, 3], plain_last=True, rank=1, low_rank=[1])
    assert [(m.in_features, m.out_features) for m in low[3]] == [(3, 1), (1, 3)]
