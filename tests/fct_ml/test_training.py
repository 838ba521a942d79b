"""Tests for fct_ml.training: schedule, the fit loop, BN freezing, Frozen, encode, device, seeding."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from fct_ml.augment import to_float
from fct_ml.training import (
    EpochRecord,
    Frozen,
    TrainConfig,
    encode,
    fit,
    lr_factor,
    resolve_device,
    seed_everything,
)
from fct_ml.transformation import Transformation, TransformationConfig

# ------------------------------------------------------------------------- lr schedule


def test_lr_factor_warmup_is_linear() -> None:
    # warm-up 4 steps: (step + 1) / 4 -> 0.25, 0.5, 0.75, 1.0
    assert [lr_factor(s, 10, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_lr_factor_cosine() -> None:
    # total 10, warm-up 4: cosine over the 6 steps after warm-up, progress = (step - 4) / 6.
    assert lr_factor(4, 10, 4) == pytest.approx(1.0)  # progress 0: 0.5 * (1 + cos 0) = 1
    # progress 1/6: 0.5 * (1 + cos(pi/6)) = 0.5 * (1 + 0.8660254) = 0.9330127
    assert lr_factor(5, 10, 4) == pytest.approx(0.9330127, abs=1e-7)
    assert lr_factor(7, 10, 4) == pytest.approx(
        0.5
    )  # midpoint, progress 3/6: 0.5 * (1 + cos(pi/2)) = 0.5
    assert lr_factor(10, 10, 4) == pytest.approx(0.0, abs=1e-12)  # end: 0.5 * (1 + cos(pi)) = 0
    assert lr_factor(12, 10, 4) == pytest.approx(0.0, abs=1e-12)  # past the end: clamped


def test_lr_factor_without_warmup() -> None:
    assert lr_factor(0, 8, 0) == 1.0
    assert lr_factor(4, 8, 0) == pytest.approx(0.5)  # progress 4/8: cos(pi/2) = 0 -> 0.5


# ------------------------------------------------------------------------- fit

W_TRUE = torch.tensor([[1.0], [-2.0], [0.5]])


def regression_data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 3, generator=g)
    return x, x @ W_TRUE  # y (n, 1), exactly linear


class MSEObjective:
    def __init__(self, model: nn.Module):
        self.model, self.calls, self.bn_training = model, 0, []

    def __call__(self, batch):
        x, y = batch
        self.calls += 1
        self.bn_training.append(
            [m.training for m in self.model.modules() if isinstance(m, nn.BatchNorm1d)]
        )
        mse = (self.model(x) - y).pow(2).mean()
        return {"loss": mse, "mse": mse.detach(), "half": 0.5 * mse.detach()}


SGD = TrainConfig(
    epochs=5,
    batch_size=16,
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    weight_decay=0.0,
    warmup_epochs=0.0,
)


def train_linear(seed: int, config: TrainConfig = SGD) -> tuple[nn.Module, list[EpochRecord]]:
    generator = seed_everything(seed)
    model = nn.Linear(3, 1)  # initialised from the seeded global RNG
    history = fit(
        model, MSEObjective(model), regression_data(), config, generator=generator, progress=False
    )
    return model, history


def test_fit_decreases_the_loss_and_records_each_epoch() -> None:
    model, history = train_linear(0)
    assert [r.epoch for r in history] == [1, 2, 3, 4, 5]
    for r in history:
        assert isinstance(r, EpochRecord)
        assert set(r.parts) == {"loss", "mse", "half"}
        assert r.parts["half"] == pytest.approx(0.5 * r.parts["mse"], rel=1e-5)
        assert r.parts["loss"] == pytest.approx(r.parts["mse"], rel=1e-6)
        assert r.seconds >= 0
    losses = [r.parts["loss"] for r in history]
    assert losses[-1] < losses[0]
    assert losses[-1] < 0.1 * losses[0]
    # 64 rows / 16 = 4 steps per epoch, 20 in all, no warm-up. lr at the end of epoch 1 is
    # lr_factor(4, 20, 0) = 0.5 * (1 + cos(pi * 4/20)) = 0.5 * (1 + 0.809017) = 0.9045085, times
    # 0.1.
    assert history[0].lr == pytest.approx(0.09045085, abs=1e-7)
    assert history[-1].lr == pytest.approx(0.0, abs=1e-12)  # cosine down to zero
    assert not model.training  # fit leaves the model in eval mode
    assert torch.allclose(model.weight.detach(), W_TRUE.T, atol=0.2)


def test_fit_drops_the_last_partial_batch() -> None:
    generator = seed_everything(0)
    model = nn.Linear(3, 1)
    objective = MSEObjective(model)
    x, y = regression_data(70)  # 70 // 16 = 4 full batches per epoch, 6 rows dropped
    fit(model, objective, (x, y), SGD, generator=generator, progress=False)
    assert objective.calls == 5 * 4


def test_fit_without_data_raises() -> None:
    model = nn.Linear(3, 1)
    empty = (torch.empty(0, 3), torch.empty(0, 1))
    with pytest.raises(ValueError, match="my_stage"):
        fit(
            model,
            MSEObjective(model),
            empty,
            SGD,
            generator=torch.Generator(),
            desc="my_stage",
            progress=False,
        )


def test_fit_with_batch_size_zero_raises() -> None:
    model = nn.Linear(3, 1)
    config = TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        fit(
            model,
            MSEObjective(model),
            regression_data(),
            config,
            generator=torch.Generator(),
            progress=False,
        )


def test_fit_is_deterministic_for_a_seed() -> None:
    a, ha = train_linear(7)
    b, hb = train_linear(7)
    c, _ = train_linear(8)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert [r.parts for r in ha] == [r.parts for r in hb]
    assert not torch.equal(a.weight, c.weight)


def test_bn_eval_after_freezes_running_stats_for_the_second_half() -> None:
    def run(bn_eval_after):
        generator = seed_everything(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        bn = model[1]
        snapshots = []
        weights = []
        objective = MSEObjective(model)
        config = TrainConfig(
            epochs=4,
            batch_size=16,
            optimizer="adam",
            lr=1e-2,
            weight_decay=0.0,
            warmup_epochs=0.0,
            bn_eval_after=bn_eval_after,
        )

        def on_epoch(record: EpochRecord) -> None:
            snapshots.append(
                (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
            )
            weights.append(model[0].weight.detach().clone())

        history = fit(
            model,
            objective,
            regression_data(),
            config,
            generator=generator,
            progress=False,
            on_epoch=on_epoch,
        )
        assert len(history) == 4
        return snapshots, weights, objective

    # bn_eval_after=0.5 of 4 epochs: int(0.5 * 4) = 2, so epochs 3 and 4 run BN in eval mode.
    snapshots, weights, objective = run(0.5)
    assert [s[2] for s in snapshots] == [
        4,
        8,
        8,
        8,
    ]  # 4 steps per epoch update the stats, then none
    assert not torch.equal(snapshots[0][0], snapshots[1][0])  # epoch 2 still updates
    assert torch.equal(snapshots[1][0], snapshots[2][0]) and torch.equal(
        snapshots[2][0], snapshots[3][0]
    )
    assert torch.equal(snapshots[1][1], snapshots[3][1])
    assert objective.bn_training == [[True]] * 8 + [[False]] * 8
    # The other layers keep training in the second half.
    assert not torch.equal(weights[2], weights[3])

    # Control: without bn_eval_after the statistics keep moving to the end.
    snapshots, _, objective = run(None)
    assert [s[2] for s in snapshots] == [4, 8, 12, 16]
    assert not torch.equal(snapshots[2][0], snapshots[3][0])
    assert objective.bn_training == [[True]] * 16


def test_nan_loss_raises_naming_the_stage() -> None:
    generator = seed_everything(0)
    model = nn.Linear(3, 1)

    def objective(batch):
        x, _ = batch
        loss = model(x).sum() * float("nan")
        return {"loss": loss}

    with pytest.raises(FloatingPointError, match="old_model") as err:
        fit(
            model,
            objective,
            regression_data(),
            SGD,
            generator=generator,
            desc="old_model",
            progress=False,
        )
    assert "epoch 1, step 1" in str(err.value)


# ------------------------------------------------------------------------- Frozen, encode


def test_frozen_module_is_eval_no_grad() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).train()
    frozen = Frozen(module)
    assert not any(m.training for m in module.modules())
    assert not any(p.requires_grad for p in module.parameters())
    x = torch.randn(4, 3, requires_grad=True)
    out = frozen(x)
    assert out.shape == (4, 2) and out.dtype == torch.float32
    assert not out.requires_grad and out.grad_fn is None
    # BN in eval mode uses running stats (0 mean, unit var at init): out = linear(x) / sqrt(1 +
    # eps).
    with torch.no_grad():
        expected = module[0](x) / math.sqrt(1 + module[1].eps)
    assert torch.allclose(out, expected, atol=1e-6)
    assert int(module[1].num_batches_tracked) == 0  # running statistics untouched


def test_frozen_method_returning_a_tuple() -> None:
    h = Transformation(
        TransformationConfig(
            old_dim=3, side_info_dim=2, new_dim=4, branch_width=5, inner_width=6, uncertainty=True
        )
    )
    pred, sigma = Frozen(h, method="forward_with_sigma")(torch.randn(2, 3), torch.randn(2, 2))
    assert pred.shape == (2, 4) and sigma.shape == (2,)
    assert not pred.requires_grad and not sigma.requires_grad


def test_encode_in_batches_equals_one_forward() -> None:
    torch.manual_seed(0)
    h = Transformation(
        TransformationConfig(old_dim=3, side_info_dim=2, new_dim=4, branch_width=5, inner_width=6)
    )
    old, side = torch.randn(10, 3), torch.randn(10, 2)
    out = encode(h, [old, side], batch_size=3)  # batches of 3, 3, 3, 1
    h.eval()
    with torch.no_grad():
        expected = h(old, side)
    assert out.shape == (10, 4)
    assert torch.allclose(out, expected, atol=1e-6)


def test_encode_applies_transform_to_the_first_input() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8)
    out = encode(module, [images], batch_size=2, transform=to_float)
    with torch.no_grad():
        expected = module(images.float() / 255.0)
    assert torch.allclose(out, expected, atol=1e-6)


# ------------------------------------------------------------------------- device, seeding


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_auto_is_cpu_here() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_resolve_device_passes_other_names_through() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_seed_everything() -> None:
    g = seed_everything(1234)
    assert isinstance(g, torch.Generator)
    assert g.initial_seed() == 1234
    assert torch.equal(
        torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(1234))
    )
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(1234)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
