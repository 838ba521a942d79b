"""Tests for fct_ml.losses: pure losses worked out by hand, objectives' named parts and gradients."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fct_ml.augment import AugmentConfig, augment
from fct_ml.losses import (
    BCTObjective,
    ClassificationObjective,
    FastFillObjective,
    SimCLRObjective,
    TransformationObjective,
    fastfill_loss,
    nt_xent,
    squared_error,
)
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.transformation import Transformation, TransformationConfig

# --------------------------------------------------------------------------- #
# nt_xent
# --------------------------------------------------------------------------- #


def test_nt_xent_identical_views():
    # z1 = z2 = [e1, e2]. z = [e1, e2, e1, e2]; similarity / t (diagonal excluded):
    #        e1   e2   e1   e2
    #  e1 [ -inf  0   1/t   0 ]   partner: column 2
    #  e2 [  0  -inf   0   1/t]   partner: column 3
    #  e1 [ 1/t   0  -inf   0 ]   partner: column 0
    #  e2 [  0   1/t   0  -inf]   partner: column 1
    # every row: -log(e^(1/t) / (e^(1/t) + 1 + 1)) = log(1 + 2 e^(-1/t))
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    expected = math.log(1 + 2 * math.exp(-1 / t))  # log(1 + 2 e^-2) = 0.239...
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_orthogonal_views_are_normalised():
    # z1 = [e1, e2], z2 = [3 e2, 2 e1] (norms do not matter: cosine similarity).
    # z = [e1, e2, e2, e1]; each view's partner is orthogonal to it (similarity 0), while
    # the other view equal to it scores 1/t and the remaining one 0:
    # every row: -log(e^0 / (e^0 + e^0 + e^(1/t))) = log(2 + e^(1/t)); t = 1 -> log(2 + e)
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[0.0, 3.0], [2.0, 0.0]])
    assert nt_xent(z1, z2, 1.0).item() == pytest.approx(math.log(2 + math.e), rel=1e-6)


def test_nt_xent_45_degrees():
    # u = e1, v = (1, 1)/sqrt2, w = e2; z1 = [u, v], z2 = [v, w] -> z = [u, v, v, w], t = 1.
    # c = cos 45 = 1/sqrt2.  u.v = c, u.w = 0, v.v = 1, v.w = c.
    # row 0 (u, partner col 2 = v): others [v: c, v: c, w: 0]  -> -log(e^c / (2e^c + 1))
    # row 1 (v, partner col 3 = w): others [u: c, v: 1, w: c]  -> -log(e^c / (2e^c + e))
    # row 2 (v, partner col 0 = u): others [u: c, v: 1, w: c]  -> -log(e^c / (2e^c + e))
    # row 3 (w, partner col 1 = v): others [u: 0, v: c, v: c]  -> -log(e^c / (2e^c + 1))
    c = 1 / math.sqrt(2)
    a = math.log((2 * math.exp(c) + 1) / math.exp(c))
    b = math.log((2 * math.exp(c) + math.e) / math.exp(c))
    z1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert nt_xent(z1, z2, 1.0).item() == pytest.approx((2 * a + 2 * b) / 4, rel=1e-6)


def test_nt_xent_has_gradient():
    z1 = torch.tensor([[1.0, 0.5], [0.2, 1.0]], requires_grad=True)
    z2 = torch.tensor([[0.9, 0.4], [0.0, 1.0]], requires_grad=True)
    loss = nt_xent(z1, z2, 0.5)
    assert loss.ndim == 0
    loss.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all()


# --------------------------------------------------------------------------- #
# squared_error and fastfill_loss
# --------------------------------------------------------------------------- #


def test_squared_error_per_sample_sum_over_dims():
    pred = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: 0^2 + 2^2 + 3^2 = 13 ; row 1: 1 + 1 + 1 = 3 (FastFill's ||h - phi_new||^2)
    out = squared_error(pred, target)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([13.0, 3.0])


def test_fastfill_loss_by_hand():
    mse = torch.tensor([1.0, 0.5, 3.0])
    ce = torch.tensor([1.0, 1.5, 0.0])
    sigma = torch.tensor([0.0, math.log(2.0), -1.0])
    expected = [
        0.5 * 1.0 * (1.0 + 1.0) + 0.5 * 0.0,  # = 1
        0.5 * (1 / 2) * (0.5 + 1.5) + 0.5 * math.log(2.0),  # = 0.5 + 0.5 log 2
        0.5 * math.e * (3.0 + 0.0) + 0.5 * (-1.0),  # = 1.5 e - 0.5
    ]
    out = fastfill_loss(mse, ce, sigma)
    assert out.shape == (3,)
    assert out.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mse,ce", [(0.3, 0.2), (2.0, 1.0), (0.01, 0.0)])
def test_fastfill_loss_minimised_at_log_error(mse: float, ce: float):
    best = math.log(mse + ce)
    # a grid of sigmas: the minimum sits at log(mse + ce) (grid step 1e-3)
    grid = torch.linspace(best - 2, best + 2, 4001, dtype=torch.float64)
    values = fastfill_loss(torch.full_like(grid, mse), torch.full_like(grid, ce), grid)
    assert grid[values.argmin()].item() == pytest.approx(best, abs=2e-3)
    # derivative there: -0.5 e^-s (mse + ce) + 0.5 = -0.5 + 0.5 = 0
    s = torch.tensor([best], dtype=torch.float64, requires_grad=True)
    fastfill_loss(
        torch.tensor([mse], dtype=torch.float64), torch.tensor([ce], dtype=torch.float64), s
    ).sum().backward()
    assert s.grad.item() == pytest.approx(0.0, abs=1e-9)
    # and the value there is 0.5 + 0.5 log(mse + ce)
    assert values.min().item() == pytest.approx(0.5 + 0.5 * best, abs=1e-6)


# --------------------------------------------------------------------------- #
# objectives
# --------------------------------------------------------------------------- #


def small_h(**kwargs) -> Transformation:
    torch.manual_seed(0)
    return Transformation(
        TransformationConfig(
            old_dim=4, side_info_dim=3, new_dim=5, branch_width=8, inner_width=8, **kwargs
        )
    )


def feature_batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(n, 4, generator=g)
    side = torch.randn(n, 3, generator=g)
    new = torch.randn(n, 5, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return old, side, new, labels


def test_transformation_objective():
    h = small_h()
    batch = feature_batch()
    out = TransformationObjective(h)(batch)
    assert set(out) == {"loss", "sq_error"}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert not out["sq_error"].requires_grad
    old, side, new, _ = batch
    with torch.no_grad():
        pred = h(old, side)  # train mode: batch statistics, same batch -> same output
    # mean over the 6 samples of the squared L2 error summed over dims
    expected = ((pred - new) ** 2).sum().item() / 6
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["sq_error"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in h.parameters())


def test_fastfill_objective():
    h = small_h(uncertainty=True)
    classifier = torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    batch = feature_batch()
    out = FastFillObjective(h, classifier)(batch)
    assert set(out) == {"loss", "sq_error", "ce", "sigma"}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    for part in ("sq_error", "ce", "sigma"):
        assert not out[part].requires_grad
    old, side, new, labels = batch
    with torch.no_grad():
        pred, sigma = h.forward_with_sigma(old, side)
    sq = ((pred - new) ** 2).sum(1)
    logits = pred @ classifier.T
    ce = torch.logsumexp(logits, 1) - logits[torch.arange(6), labels]  # -log softmax at the label
    expected = (0.5 * torch.exp(-sigma) * (sq + ce) + 0.5 * sigma).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["sq_error"].item() == pytest.approx(sq.mean().item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce.mean().item(), rel=1e-5)
    assert out["sigma"].item() == pytest.approx(sigma.mean().item(), rel=1e-5, abs=1e-6)
    out["loss"].backward()
    assert h.sigma_head.weight.grad is not None
    assert classifier.grad is None  # the classifier is frozen


def _bct_setup():
    torch.manual_seed(0)
    model = EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3)
    ).eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1, 0])
    old_classifier = torch.randn(3, 4, generator=g)
    return model, images, labels, old_classifier


def _cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    # mean over samples of -log(exp(l_y) / sum_c exp(l_c)) = logsumexp(l) - l_y
    return float((torch.logsumexp(logits, 1) - logits[torch.arange(len(labels)), labels]).mean())


def test_bct_objective_parts():
    model, images, labels, old_classifier = _bct_setup()
    aug = AugmentConfig()  # the defaults do nothing (only clamps to [0, 1])
    with torch.no_grad():
        emb = model(images.float() / 255.0)
        ce_new = _cross_entropy_by_hand(model.logits(emb), labels)
        influence = _cross_entropy_by_hand(emb @ old_classifier.T, labels)

    out = BCTObjective(model, old_classifier, aug, 0.0, 0.0, torch.Generator().manual_seed(0))(
        (images, labels)
    )
    assert set(out) == {"loss", "ce_new", "influence"}
    assert out["loss"].requires_grad
    # influence_weight = 0: the loss is the plain new-classifier cross-entropy
    assert out["loss"].item() == pytest.approx(ce_new, rel=1e-4)
    assert out["ce_new"].item() == pytest.approx(ce_new, rel=1e-4)
    assert out["influence"].item() == pytest.approx(influence, rel=1e-4)

    weighted = BCTObjective(model, old_classifier, aug, 0.0, 0.5, torch.Generator().manual_seed(0))(
        (images, labels)
    )
    # loss = ce_new + 0.5 * influence
    assert weighted["loss"].item() == pytest.approx(ce_new + 0.5 * influence, rel=1e-4)


def test_bct_objective_gradients_reach_the_new_model_only():
    model, images, labels, old_classifier = _bct_setup()
    old_classifier.requires_grad_(True)
    out = BCTObjective(
        model, old_classifier, AugmentConfig(), 0.0, 1.0, torch.Generator().manual_seed(0)
    )((images, labels))
    out["loss"].backward()
    assert model.classifier.weight.grad is not None
    assert model.embed.weight.grad is not None
    assert old_classifier.grad is None  # the old classifier is detached


# 0.5: a weight below 1 adds the term too, only a weight of 0 leaves it out.
@pytest.mark.parametrize("weight", [2.0, 0.5])
def test_bct_alignment_term_is_the_summed_squared_distance_to_the_old_embedding(weight):
    model, images, labels, old_classifier = _bct_setup()
    torch.manual_seed(1)
    old_model = EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3)
    ).eval()
    x = images.float() / 255.0
    with torch.no_grad():
        emb, old_emb = model(x), old_model(x)
        ce_new = _cross_entropy_by_hand(model.logits(emb), labels)
        influence = _cross_entropy_by_hand(emb @ old_classifier.T, labels)
        # per item: sum over the 4 dims of (phi_bct - phi_old)^2; then the mean over 5 items
        alignment = float(((emb - old_emb) ** 2).sum(1).mean())
    out = BCTObjective(
        model,
        old_classifier,
        AugmentConfig(),
        0.0,
        0.5,
        torch.Generator().manual_seed(0),
        alignment_weight=weight,
        old_model=old_model,
    )((images, labels))
    assert out["alignment"].item() == pytest.approx(alignment, rel=1e-4)
    expected = ce_new + 0.5 * influence + weight * alignment
    assert out["loss"].item() == pytest.approx(expected, rel=1e-4)
    out["loss"].backward()
    assert all(p.grad is None for p in old_model.parameters())  # the old model stays frozen


def test_bct_alignment_needs_the_old_model():
    model, _, _, old_classifier = _bct_setup()
    message = "BCT: alignment_weight > 0 needs the frozen old model"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        BCTObjective(
            model,
            old_classifier,
            AugmentConfig(),
            0.0,
            1.0,
            torch.Generator().manual_seed(0),
            alignment_weight=1.0,
        )


# --------------------------------------------------------------------------- #
# objectives with augmentation, label smoothing and a cosine classifier
# --------------------------------------------------------------------------- #

FLIP = AugmentConfig(flip=True, brightness=0.2)  # changes the images, drawn from the generator


def _smoothed_ce_by_hand(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    # Label smoothing eps over C classes: the target puts 1 - eps + eps/C on the label and eps/C
    # elsewhere, so per sample (1 - eps) * (-log p_y) + eps * mean_c(-log p_c); then the mean.
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        log_z = math.log(sum(math.exp(v) for v in row))
        nll = [log_z - v for v in row]
        total += (1 - eps) * nll[y] + eps * sum(nll) / len(row)
    return total / len(labels)


def _augmented(images: torch.Tensor, seed: int, views: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = images.float() / 255.0
    return torch.cat([augment(x, FLIP, g) for _ in range(views)])


def test_classification_objective_by_hand():
    model, images, _, _ = _bct_setup()
    x = _augmented(images, 7)
    with torch.no_grad():
        logits = model.logits(model(x))
    # Labels: the first two items as the model predicts them, the other three not, so the
    # accuracy is 2/5 by construction.
    predicted = logits.argmax(1)
    labels = torch.cat([predicted[:2], (predicted[2:] + 1) % 3])
    torch.manual_seed(99)  # the global RNG differs from the objective's generator
    out = ClassificationObjective(model, FLIP, 0.2, torch.Generator().manual_seed(7))(
        (images, labels)
    )
    assert set(out) == {"loss", "ce", "accuracy"}
    assert out["loss"].requires_grad and not out["ce"].requires_grad
    expected = _smoothed_ce_by_hand(logits, labels, 0.2)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["ce"].item() == pytest.approx(expected, rel=1e-5)
    assert out["accuracy"].item() == pytest.approx(0.4)
    # Not the clean images: the augmentation was applied.
    with torch.no_grad():
        clean = model.logits(model(images.float() / 255.0))
    assert _smoothed_ce_by_hand(clean, labels, 0.2) != pytest.approx(expected, rel=1e-5)


class _PixelLogits(torch.nn.Module):
    """(N, 1, 1, 3) images -> their 3 pixels (0..255) as the logits of 3 classes."""

    def forward(self, x):
        return x.flatten(1) * 255.0

    def logits(self, embedding):
        return embedding


def test_classification_accuracy_is_each_rows_argmax_against_its_label():
    # Rows predict 0, 1, 2, 0 against labels 0, 1, 2, 1: 3 of 4 right. The largest logit of the
    # whole batch (9, flat index 4) is no class, so a batch-wide argmax would score 0.
    pixels = [[5, 0, 0], [0, 9, 0], [0, 0, 5], [5, 0, 0]]
    images = torch.tensor(pixels, dtype=torch.uint8).reshape(4, 1, 1, 3)
    labels = torch.tensor([0, 1, 2, 1])
    objective = ClassificationObjective(_PixelLogits(), AugmentConfig(), 0.0, torch.Generator())
    assert objective((images, labels))["accuracy"].item() == pytest.approx(0.75)


class _Flat(torch.nn.Module):
    """(N, 1, 8, 8) -> (N, 3): a fixed linear map of the pixels, a stand-in SimCLR projection."""

    def __init__(self):
        super().__init__()
        self.map = torch.nn.Linear(64, 3, bias=False)
        with torch.no_grad():
            self.map.weight.copy_(torch.randn(3, 64, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):
        return self.map(x.flatten(1))


def test_simclr_objective_is_nt_xent_of_two_augmented_views():
    _, images, _, _ = _bct_setup()
    model = _Flat()
    views = _augmented(images, 11, views=2)  # both views from one generator, in order
    assert not torch.allclose(views[:5], views[5:])
    with torch.no_grad():
        z = model(views)
    expected = nt_xent(z[:5], z[5:], 0.3).item()
    torch.manual_seed(99)
    out = SimCLRObjective(model, FLIP, 0.3, torch.Generator().manual_seed(11))((images,))
    assert set(out) == {"loss", "nt_xent"}
    assert out["loss"].requires_grad and not out["nt_xent"].requires_grad
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["nt_xent"].item() == pytest.approx(expected, rel=1e-5)
    # The temperature is the one given.
    assert nt_xent(z[:5], z[5:], 0.6).item() != pytest.approx(expected, rel=1e-3)


def test_bct_objective_smoothing_augmentation_and_a_cosine_old_classifier():
    model, images, labels, old_classifier = _bct_setup()
    torch.manual_seed(1)
    old_model = EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3)
    ).eval()
    cosine = ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, classifier="cosine")
    x = _augmented(images, 5)
    with torch.no_grad():
        emb, old_emb = model(x), old_model(x)
        ce_new = _smoothed_ce_by_hand(model.logits(emb), labels, 0.1)
        # the cosine classifier: logit_scale * cos(embedding, class row)
        unit = emb / emb.norm(dim=1, keepdim=True)
        rows = old_classifier / old_classifier.norm(dim=1, keepdim=True)
        influence = _smoothed_ce_by_hand(cosine.logit_scale * unit @ rows.T, labels, 0.1)
        alignment = float(((emb - old_emb) ** 2).sum(1).mean())
    torch.manual_seed(99)
    out = BCTObjective(
        model,
        old_classifier,
        FLIP,
        0.1,
        0.5,
        torch.Generator().manual_seed(5),
        old_config=cosine,
        alignment_weight=2.0,
        old_model=old_model,
    )((images, labels))
    assert set(out) == {"loss", "ce_new", "influence", "alignment"}
    assert out["ce_new"].item() == pytest.approx(ce_new, rel=1e-4)
    assert out["influence"].item() == pytest.approx(influence, rel=1e-4)
    assert out["alignment"].item() == pytest.approx(alignment, rel=1e-4)
    assert out["loss"].item() == pytest.approx(ce_new + 0.5 * influence + 2.0 * alignment, rel=1e-4)
    assert not any(out[k].requires_grad for k in ("ce_new", "influence", "alignment"))
    assert not old_model.training  # frozen in eval mode by the objective


def test_bct_objective_freezes_the_old_model_it_is_given():
    model, _, _, old_classifier = _bct_setup()
    old_model = EmbeddingModel(ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1)).train()
    BCTObjective(
        model,
        old_classifier,
        AugmentConfig(),
        0.0,
        1.0,
        torch.Generator(),
        alignment_weight=1.0,
        old_model=old_model,
    )
    assert not old_model.training
    assert not any(p.requires_grad for p in old_model.parameters())


def test_fastfill_objective_weighs_the_cross_entropy_of_a_cosine_classifier():
    h = small_h(uncertainty=True)
    classifier = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    cosine = ModelConfig(classifier="cosine")
    old, side, new, labels = batch = feature_batch()
    out = FastFillObjective(h, classifier, cosine, ce_weight=0.25)(batch)
    with torch.no_grad():
        pred, sigma = h.forward_with_sigma(old, side)
    sq = ((pred - new) ** 2).sum(1)
    unit = pred / pred.norm(dim=1, keepdim=True)
    rows = classifier / classifier.norm(dim=1, keepdim=True)
    logits = cosine.logit_scale * unit @ rows.T
    ce = torch.logsumexp(logits, 1) - logits[torch.arange(6), labels]
    expected = (0.5 * torch.exp(-sigma) * (sq + 0.25 * ce) + 0.5 * sigma).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce.mean().item(), rel=1e-5)
    # The defaults: a dot-product classifier and weight 1.
    plain = FastFillObjective(h, classifier)
    assert plain.ce_weight == 1.0 and plain.new_config.classifier == "linear"
