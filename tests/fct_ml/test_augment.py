"""Augmentation: the per-dataset policies, checked by what they do to an image, and the views that
train h (the same augmented image through every model)."""

from __future__ import annotations

import copy

import pytest
import torch

from fct_ml.augment import AugmentConfig, augment, to_float
from fct_ml.datasets import policy_for
from fct_ml.models import ModelConfig, build_model
from fct_ml.transformation import training_features


def _gradient(n: int = 256, size: int = 28) -> torch.Tensor:
    """(n, 1, size, size): dark on the left, bright on the right."""
    ramp = torch.linspace(0.0, 1.0, size)
    return ramp.view(1, 1, 1, size).expand(n, 1, size, size).clone()


def _slopes(x: torch.Tensor) -> torch.Tensor:
    """(N,): how much brighter each image gets from left to right (negative: mirrored)."""
    columns = x.mean(dim=(1, 2))  # (N, W)
    centred = torch.arange(x.shape[-1], dtype=x.dtype) - (x.shape[-1] - 1) / 2
    return (columns * centred).sum(1)


@pytest.mark.parametrize("kind", ["supervised", "contrastive"])
def test_digits_are_never_mirrored(kind):
    # A mirrored 2 is no digit: every augmented view keeps the left-to-right order.
    config = getattr(policy_for("digits"), kind)
    assert not config.flip
    views = augment(_gradient(), config, torch.Generator().manual_seed(0))
    assert (_slopes(views) > 0).all()


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar100", "imagefolder:/photos"])
def test_clothes_and_photos_are_mirrored_about_half_the_time(dataset):
    views = augment(_gradient(), policy_for(dataset).supervised, torch.Generator().manual_seed(0))
    mirrored = int((_slopes(views) < 0).sum())
    assert 256 * 0.35 < mirrored < 256 * 0.65


def test_unknown_dataset_has_no_policy():
    with pytest.raises(ValueError, match=r"^augmentation: no policy for dataset 'mnist' \(known: "):
        policy_for("mnist")


def test_the_default_config_changes_nothing_and_output_stays_in_range():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment(x.clone(), AugmentConfig()), x)
    jittered = augment(x, AugmentConfig(brightness=0.9, contrast=0.9), torch.Generator())
    assert jittered.min() >= 0.0 and jittered.max() <= 1.0
    assert torch.equal(
        to_float(torch.tensor([0, 255], dtype=torch.uint8)), torch.tensor([0.0, 1.0])
    )


def test_the_same_augmented_image_goes_through_every_model():
    # Two copies of one model: if each saw its own augmentation of an image, their features of
    # the augmented views would differ.
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn-xs", embed_dim=8, in_channels=1, num_classes=3))
    images = (255 * _gradient(12)).to(torch.uint8)
    images[:, :, :6] = 0  # not symmetric top to bottom either
    first, second = training_features(
        [model, copy.deepcopy(model)],
        images,
        3,
        policy_for("digits").contrastive,
        batch_size=5,
        seed=0,
    )
    assert first.shape == second.shape == (3 * 12, 8)
    assert torch.equal(first, second)
    # View 0 is the clean image; views 1 and 2 are augmented, each differently.
    clean, view1, view2 = first.split(12)
    assert not torch.allclose(clean, view1) and not torch.allclose(view1, view2)
    clean_again = training_features(
        [model], images, 1, policy_for("digits").contrastive, batch_size=5, seed=1
    )[0]
    assert torch.equal(clean, clean_again)
