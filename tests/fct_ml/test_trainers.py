"""Tests for fct_ml.trainers, fast: each trainer is `fit` of its model's objective from its seed
(spelled out by hand beside it), reports every epoch, shows a progress bar only when asked, and
refuses bad input in one line naming it. Tiny inputs: twelve 8x8 images for BCT, sixteen vectors
for h, two epochs at most."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fct_ml.augment import AugmentConfig
from fct_ml.bct import BCTConfig
from fct_ml.losses import BCTObjective, FastFillObjective, TransformationObjective
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.trainers import train_bct_model, train_transformation
from fct_ml.training import TrainConfig, fit, prepare_model, seed_everything
from fct_ml.transformation import Transformation, TransformationConfig, calibrate_sigma
from tests.fct_ml.tiny import TINY_H, tiny_features, tiny_images

CPU = torch.device("cpu")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- train_bct_model


def test_train_bct_model_is_fit_of_the_bct_objective_from_the_seed():
    images, labels = tiny_images()
    config = ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3)
    old_config = ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, classifier="cosine")
    torch.manual_seed(2)
    old = EmbeddingModel(old_config)
    rows = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    train = TrainConfig(epochs=2, batch_size=6, lr=0.05, warmup_epochs=0.0, label_smoothing=0.2)
    bct = BCTConfig(influence_weight=0.5, alignment_weight=0.7)
    aug = AugmentConfig(flip=True)
    records = []
    model, history = train_bct_model(
        images,
        labels,
        config,
        train,
        bct,
        rows,
        aug,
        device=CPU,
        seed=3,
        old_config=old_config,
        old_model=old,
        progress=False,
        on_epoch=records.append,
    )
    # The same training spelled out: seed, model, BCT's objective with every term, the loop.
    generator = seed_everything(3)
    expected = prepare_model(EmbeddingModel(config), CPU)
    objective = BCTObjective(
        expected,
        rows,
        aug,
        0.2,
        0.5,
        generator,
        old_config=old_config,
        alignment_weight=0.7,
        old_model=old,
    )
    expected_history = fit(
        expected, objective, (images, labels), train, generator=generator, progress=False
    )
    assert _same_weights(model, expected)
    assert [r.parts for r in history] == [r.parts for r in expected_history]
    assert set(history[0].parts) == {"loss", "ce_new", "influence", "alignment"}
    assert records == history
    assert model.config == config


def _small_bct_args(images, labels, old_dim: int = 4) -> tuple:
    """train_bct_model's positional arguments for a 4-d cnn-xs on 3 classes, one epoch of
    batches of 6, no alignment term, old classifier rows of width `old_dim`."""
    return (
        images,
        labels,
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3),
        TrainConfig(epochs=1, batch_size=6),
        BCTConfig(alignment_weight=0.0),
        torch.zeros(3, old_dim),
        AugmentConfig(),
    )


def test_train_bct_model_refuses_another_embedding_width():
    images, labels = tiny_images()
    with pytest.raises(
        ValueError, match=r"^BCT: the new embed_dim \(4\) must equal the old one \(5\)$"
    ):
        train_bct_model(*_small_bct_args(images, labels, old_dim=5), device=CPU, seed=0)


def test_bct_without_training_data_is_refused_naming_the_stage():
    images, labels = tiny_images()
    with pytest.raises(ValueError, match="^bct_model: no training data$"):
        train_bct_model(*_small_bct_args(images[:0], labels[:0]), device=CPU, seed=0)


def test_train_bct_model_shows_a_progress_bar_only_when_asked(capsys):
    images, labels = tiny_images()
    args = _small_bct_args(images, labels)
    train_bct_model(*args, device=CPU, seed=0, progress=False)
    assert capsys.readouterr().err == ""
    train_bct_model(*args, device=CPU, seed=0, progress=True)
    # tqdm's bar on stderr, named after the stage: 1 epoch of 12 // 6 = 2 steps.
    assert "bct_model: 100%" in capsys.readouterr().err


# ---------------------------------------------------------------- train_transformation

TRAIN = TrainConfig(
    epochs=2, batch_size=8, optimizer="adam", lr=1e-2, weight_decay=0.0, warmup_epochs=0.0
)


def test_training_h_is_fit_of_the_l2_objective_from_the_seed():
    old, side, new, labels = tiny_features()
    config = TransformationConfig(**TINY_H)
    h, history = train_transformation(
        old, side, new, labels, config, TRAIN, device=CPU, seed=5, progress=False
    )
    # The same training spelled out: seed, h, FCT's L2 objective, the one training loop.
    generator = seed_everything(5)
    expected = Transformation(config)
    expected_history = fit(
        expected,
        TransformationObjective(expected),
        (old, side, new, labels),
        TRAIN,
        generator=generator,
        progress=False,
    )
    assert _same_weights(h, expected)
    assert [r.parts for r in history] == [r.parts for r in expected_history]
    assert set(history[0].parts) == {"loss", "sq_error"}
    assert len(history) == 2 and not h.training
    assert float(h.sigma_offset) == 0.0  # no sigma head, nothing calibrated
    # Another seed trains another h.
    other, _ = train_transformation(
        old, side, new, labels, config, TRAIN, device=CPU, seed=6, progress=False
    )
    assert not _same_weights(h, other)


def test_fastfill_training_uses_the_new_classifier_as_scored_and_calibrates_sigma():
    old, side, new, labels = tiny_features()
    config = TransformationConfig(**TINY_H, uncertainty=True, ce_weight=0.5)
    classifier = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    cosine = ModelConfig(classifier="cosine")
    records = []
    h, history = train_transformation(
        old,
        side,
        new,
        labels,
        config,
        TRAIN,
        device=CPU,
        seed=5,
        new_classifier=classifier,
        new_config=cosine,
        progress=False,
        on_epoch=records.append,
    )
    generator = seed_everything(5)
    expected = Transformation(config)
    fit(
        expected,
        FastFillObjective(expected, classifier, cosine, ce_weight=0.5),
        (old, side, new, labels),
        TRAIN,
        generator=generator,
        progress=False,
    )
    expected_offset = calibrate_sigma(expected, old, side, new)
    assert _same_weights(h, expected)
    assert float(h.sigma_offset) == pytest.approx(expected_offset, abs=1e-6)
    assert set(history[0].parts) == {"loss", "sq_error", "ce", "sigma"}
    assert records == history  # on_epoch saw every epoch's record
    # After calibration exp(sigma) is, on average, h's squared error on its training features.
    with torch.no_grad():
        pred, sigma = h.eval().forward_with_sigma(old, side)
    sq = (pred - new).pow(2).sum(1)
    assert float(sigma.exp().mean()) == pytest.approx(float(sq.mean()), rel=1e-4)


def test_training_h_shows_a_progress_bar_only_when_asked(capsys):
    old, side, new, labels = tiny_features()
    config = TransformationConfig(**TINY_H)
    train_transformation(old, side, new, labels, config, TRAIN, device=CPU, seed=5, progress=False)
    assert capsys.readouterr().err == ""
    train_transformation(old, side, new, labels, config, TRAIN, device=CPU, seed=5, progress=True)
    # tqdm's bar on stderr, named after the stage: 2 epochs of 16 // 8 = 2 steps each.
    assert "transformation: 100%" in capsys.readouterr().err


def test_fastfill_needs_the_new_classifier():
    old, side, new, labels = tiny_features()
    config = TransformationConfig(**TINY_H, uncertainty=True)
    with pytest.raises(ValueError, match="^FastFill needs the new model's classifier weight$"):
        train_transformation(old, side, new, labels, config, TRAIN, device=CPU, seed=0)


@pytest.mark.parametrize("bad", ["old_embedding", "side_info", "new_embedding"])
def test_a_nan_input_is_refused_naming_it(bad):
    old, side, new, labels = tiny_features()
    inputs = {"old_embedding": old, "side_info": side, "new_embedding": new}
    inputs[bad] = inputs[bad].clone()
    inputs[bad][3, 1] = float("inf") if bad == "side_info" else float("nan")
    with pytest.raises(
        ValueError, match=f"^{bad}: contains NaN or Inf; cannot train the transformation on it$"
    ):
        train_transformation(
            inputs["old_embedding"],
            inputs["side_info"],
            inputs["new_embedding"],
            labels,
            TransformationConfig(**TINY_H),
            TRAIN,
            device=CPU,
            seed=0,
        )


def test_wrong_dims_are_refused_naming_both():
    old, side, new, labels = tiny_features()
    config = TransformationConfig(**TINY_H)
    message = r"^transformation dims: expected old 3 and new 2, got old 4 and new 2$"
    with pytest.raises(ValueError, match=message):
        train_transformation(
            torch.zeros(16, 4), side, new, labels, config, TRAIN, device=CPU, seed=0
        )
    message = r"^transformation dims: expected old 3 and new 2, got old 3 and new 5$"
    with pytest.raises(ValueError, match=message):
        train_transformation(
            old, side, torch.zeros(16, 5), labels, config, TRAIN, device=CPU, seed=0
        )
    with pytest.raises(ValueError, match=r"^side_info: expected dim 2, got 4$"):
        train_transformation(
            old, torch.zeros(16, 4), new, labels, config, TRAIN, device=CPU, seed=0
        )
    # Without side-info its width is not checked (h reads the old embedding twice).
    h, _ = train_transformation(
        old,
        torch.zeros(16, 4),
        new,
        labels,
        TransformationConfig(**TINY_H, side_info=False),
        TRAIN,
        device=CPU,
        seed=0,
        progress=False,
    )
    assert h.side_branch[0].in_features == 3


def test_h_without_training_data_is_refused_naming_the_stage():
    old, side, new, labels = (t[:0] for t in tiny_features())
    with pytest.raises(ValueError, match="^transformation: no training data$"):
        train_transformation(
            old, side, new, labels, TransformationConfig(**TINY_H), TRAIN, device=CPU, seed=0
        )
