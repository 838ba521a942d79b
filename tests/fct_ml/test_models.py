"""Tests for fct_ml.models, fct_ml.transformation, fct_ml.side_info's SimCLRModel and
fct_ml.bct.extended_old_classifier: shapes, non-negativity, classifier layout, h's layout."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from fct_ml.augment import to_float
from fct_ml.bct import extended_old_classifier
from fct_ml.models import BACKBONES, EmbeddingModel, ModelConfig, build_model
from fct_ml.side_info import SideInfoConfig, SimCLRModel
from fct_ml.transformation import Transformation, TransformationConfig

# Small inputs per backbone, to stay fast: the CNNs on 8x8, the ResNets (CIFAR stem) on 16x16.
SIZE = {"cnn-xs": 8, "cnn-s": 8, "cnn-m": 8, "resnet18": 16, "resnet50": 16}


def test_every_backbone_has_a_size_here() -> None:
    assert set(SIZE) == set(BACKBONES)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_backbone_builds_and_embeds_non_negative(arch: str, in_channels: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, embed_dim=6, in_channels=in_channels, num_classes=4)
    model = build_model(config).eval()
    assert isinstance(model, EmbeddingModel)
    # The first convolution takes in_channels.
    first_conv = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels
    if arch == "resnet50" and in_channels == 1:
        return  # resnet50: just one forward (below, for in_channels=3), it is slow on 2 cores
    s = SIZE[arch]
    n = 2 if arch.startswith("resnet") else 3
    x = torch.rand(n, in_channels, s, s)
    with torch.no_grad():
        emb = model(x)
    assert emb.shape == (n, 6)
    assert emb.dtype == torch.float32
    assert (emb >= 0).all()  # ReLU before pooling: every coordinate is a mean of non-negatives


def test_cnn_on_28x28() -> None:
    model = build_model(
        ModelConfig(arch="cnn-xs", embed_dim=5, in_channels=1, num_classes=3)
    ).eval()
    with torch.no_grad():
        emb = model(torch.rand(2, 1, 28, 28))
    assert emb.shape == (2, 5)
    assert (emb >= 0).all()


def test_relu_is_applied_before_pooling() -> None:
    # With a hugely negative bias on the 1x1 embedding conv, every pre-pooling value is < 0,
    # so ReLU makes the map all zero and so is its mean. (Without ReLU the mean would be ~-1e6.)
    model = build_model(ModelConfig(arch="cnn-xs", embed_dim=4, num_classes=2)).eval()
    with torch.no_grad():
        model.embed.bias.fill_(-1e6)
        emb = model(torch.rand(2, 1, 8, 8))
    assert torch.equal(emb, torch.zeros(2, 4))


def test_classifier_is_bias_free_linear() -> None:
    model = build_model(ModelConfig(arch="cnn-xs", embed_dim=7, num_classes=5))
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.bias is None
    assert model.classifier.in_features == 7
    assert model.classifier.out_features == 5
    # logits = embedding @ W.T (no bias): with W set by hand,
    # e = [1, 0, 0, 0, 0, 0, 2], W row c = c * ones(7) -> logit c = c * (1 + 2) = 3c.
    with torch.no_grad():
        model.classifier.weight.copy_(torch.arange(5.0)[:, None].expand(5, 7))
    e = torch.tensor([[1.0, 0, 0, 0, 0, 0, 2.0]])
    assert torch.allclose(model.logits(e), torch.tensor([[0.0, 3.0, 6.0, 9.0, 12.0]]))


def test_num_classes_zero_has_no_classifier() -> None:
    model = build_model(ModelConfig(arch="cnn-xs", embed_dim=4, num_classes=0))
    assert model.classifier is None
    with pytest.raises(ValueError, match="no classifier"):
        model.logits(torch.zeros(1, 4))


def test_unknown_arch_raises_naming_it() -> None:
    with pytest.raises(ValueError, match="vgg-zz") as err:
        build_model(ModelConfig(arch="vgg-zz"))
    assert "\n" not in str(err.value)


def test_model_standardises_inputs_itself() -> None:
    # Same weights, different input_mean/std: x=0.5 with mean 0.5 must equal x=0.0 with mean 0.0
    # (both standardise to 0), std equal.
    torch.manual_seed(0)
    a = build_model(ModelConfig(arch="cnn-xs", embed_dim=4, input_mean=0.5, input_std=0.25)).eval()
    b = build_model(ModelConfig(arch="cnn-xs", embed_dim=4, input_mean=0.0, input_std=0.25)).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.allclose(a(torch.full((1, 1, 8, 8), 0.5)), b(torch.zeros(1, 1, 8, 8)))


# ------------------------------------------------------------------------- transformation h

TINY_H = dict(old_dim=5, side_info_dim=3, new_dim=4, branch_width=6, inner_width=8)


@pytest.mark.parametrize("side_info", [True, False])
def test_transformation_shapes(side_info: bool) -> None:
    h = Transformation(TransformationConfig(**TINY_H, side_info=side_info)).eval()
    old, side = torch.randn(3, 5), torch.randn(3, 3)
    with torch.no_grad():
        out = h(old, side) if side_info else h(old)
    assert out.shape == (3, 4)
    # The side branch takes side_info_dim with side-info, old_dim without (fed `old` again).
    assert h.side_branch[0].in_features == (3 if side_info else 5)
    assert h.sigma_head is None
    message = "this transformation has no uncertainty head (uncertainty=False)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        h.forward_with_sigma(old, side)


def test_transformation_needs_side_info_when_configured() -> None:
    h = Transformation(TransformationConfig(**TINY_H, side_info=True)).eval()
    with pytest.raises(ValueError, match="^this transformation needs side_info$"):
        h(torch.randn(2, 5), None)


@pytest.mark.parametrize("side_info", [True, False])
def test_transformation_with_uncertainty(side_info: bool) -> None:
    h = Transformation(TransformationConfig(**TINY_H, side_info=side_info, uncertainty=True)).eval()
    old, side = torch.randn(3, 5), torch.randn(3, 3)
    with torch.no_grad():
        pred, sigma = h.forward_with_sigma(old, side if side_info else None)
        plain = h(old, side if side_info else None)
    assert pred.shape == (3, 4)
    assert sigma.shape == (3,)
    assert torch.equal(pred, plain)  # sigma is a head on h's output, it does not change it
    assert (
        isinstance(h.sigma_head, nn.Linear)
        and h.sigma_head.in_features == 4
        and h.sigma_head.out_features == 1
    )


def test_transformation_layout() -> None:
    h = Transformation(TransformationConfig(**TINY_H))
    # inner: Linear(12, 8)-BN-ReLU, Linear(8, 8)-BN-ReLU, Linear(8, 4) plain with bias, nothing
    # after it.
    last = h.inner[-1]
    assert isinstance(last, nn.Linear)
    assert last.bias is not None
    assert (last.in_features, last.out_features) == (8, 4)
    linears = [m for m in h.inner if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 8), (8, 8), (8, 4)]
    # No activation after the last Linear, by behaviour: a ReLU (or BN-ReLU) at the end could
    # never give a negative output; the plain Linear does on random inputs.
    torch.manual_seed(0)
    with torch.no_grad():
        out = h.eval()(torch.randn(32, 5), torch.randn(32, 3))
    assert out.shape == (32, 4)
    assert (out < 0).any()
    # Every other Linear (inner and both branches) is bias-free and followed by BN then ReLU.
    for seq in (h.old_branch, h.side_branch, h.inner):
        mods = list(seq)
        for i, m in enumerate(mods):
            if isinstance(m, nn.Linear) and m is not last:
                assert m.bias is None
                assert isinstance(mods[i + 1], nn.BatchNorm1d) and isinstance(mods[i + 2], nn.ReLU)
    assert isinstance(h.old_branch[-1], nn.ReLU) and isinstance(h.side_branch[-1], nn.ReLU)


def test_transformation_without_side_info_ignores_side() -> None:
    torch.manual_seed(0)
    h = Transformation(TransformationConfig(**TINY_H, side_info=False)).eval()
    old = torch.randn(4, 5)
    with torch.no_grad():
        a = h(old, torch.randn(4, 3))
        b = h(old, torch.randn(4, 3) * 100)
        c = h(old, None)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


def test_transformation_with_side_info_uses_side() -> None:
    torch.manual_seed(0)
    h = Transformation(TransformationConfig(**TINY_H, side_info=True)).eval()
    old = torch.randn(4, 5)
    with torch.no_grad():
        assert not torch.equal(h(old, torch.randn(4, 3)), h(old, torch.randn(4, 3) + 5))


# ------------------------------------------------------------------------- SimCLR model


def test_simclr_model_projects() -> None:
    config = SideInfoConfig(
        model=ModelConfig(arch="cnn-xs", embed_dim=6, num_classes=0), projection_dim=3
    )
    model = SimCLRModel(config).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        z = model(x)
        side = model.encoder(x)
    assert z.shape == (2, 3)
    assert side.shape == (2, 6)
    assert model.encoder.classifier is None


# ------------------------------------------------------------------------- BCT's old classifier


def _tiny_old_model(num_old: int, embed_dim: int = 4) -> EmbeddingModel:
    torch.manual_seed(0)
    return build_model(
        ModelConfig(arch="cnn-xs", embed_dim=embed_dim, in_channels=1, num_classes=num_old)
    )


def test_extended_old_classifier_seen_rows_and_unseen_means() -> None:
    old_model = _tiny_old_model(num_old=2)
    # Old class i is old_classes[i]: the old model's row 0 is class 3, row 1 is class 1.
    old_classes = (3, 1)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    with torch.no_grad():
        old_model.classifier.weight.copy_(w)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4, 0, 3, 1])
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)

    # Expected unseen rows: mean old embedding (eval mode, no grad) of each unseen class's items.
    old_model.eval()
    with torch.no_grad():
        emb = old_model(to_float(images))
    expected = torch.zeros(5, 4)
    for c in (0, 2, 4):  # unseen classes
        expected[c] = emb[labels == c].mean(0)
    expected[3] = w[0]
    expected[1] = w[1]
    assert expected[[0, 2, 4]].abs().sum() > 0  # the check below means something

    rows = extended_old_classifier(old_model, old_classes, images, labels, 5, batch_size=3)
    assert rows.shape == (5, 4)
    assert torch.equal(rows[3], w[0])
    assert torch.equal(rows[1], w[1])
    assert torch.allclose(rows, expected, atol=1e-6)


def test_extended_old_classifier_all_seen_uses_only_classifier() -> None:
    old_model = _tiny_old_model(num_old=3)
    w = torch.arange(12.0).reshape(3, 4)
    with torch.no_grad():
        old_model.classifier.weight.copy_(w)
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    rows = extended_old_classifier(old_model, (0, 1, 2), images, torch.tensor([0, 1, 2]), 3)
    assert torch.equal(rows, w)


def test_extended_old_classifier_unseen_class_without_items_raises() -> None:
    old_model = _tiny_old_model(num_old=1)
    images = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="class 2"):
        extended_old_classifier(old_model, (0,), images, torch.tensor([0, 1]), 3)


def test_extended_old_classifier_encodes_in_batches_of_batch_size() -> None:
    # The batch size bounds the memory of the old model's pass over the unseen classes' items:
    # 5 unseen items in batches of 2 are 3 forward passes of 2, 2 and 1 items.
    old_model = _tiny_old_model(num_old=1)
    sizes: list[int] = []
    # On the backbone: Frozen calls the model's forward itself, which skips the model's hooks.
    old_model.backbone.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    images = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    extended_old_classifier(old_model, (0,), images, labels, 3, batch_size=2)
    assert sizes == [2, 2, 1]
