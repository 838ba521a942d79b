"""Presets of the whole experiment: `tiny` (seconds, for tests), `demo` (minutes), `cpu`
(this project's 2-core machine, 16-23 minutes per seed on Fashion-MNIST), `cpu-hard` (the
harder benchmark setting: a weaker, 8-d old model) and `paper`
(ResNet-50-128 and the official hyperparameters, for a GPU and CIFAR-100)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fct_ml.bct import BCTConfig
from fct_ml.config import replace
from fct_ml.models import ModelConfig
from fct_ml.side_info import SideInfoConfig
from fct_ml.training import TrainConfig
from fct_ml.transformation import TransformationConfig


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything `fct reproduce` trains and evaluates. Model `in_channels`/`num_classes` and h's
    input/output dims are filled in from the dataset and the models at run time."""

    old_model: ModelConfig = field(default_factory=ModelConfig)
    new_model: ModelConfig = field(default_factory=ModelConfig)
    side_info: SideInfoConfig = field(default_factory=SideInfoConfig)
    transformation: TransformationConfig = field(default_factory=TransformationConfig)
    bct: BCTConfig = field(default_factory=BCTConfig)
    old_train: TrainConfig = field(default_factory=TrainConfig)
    side_info_train: TrainConfig = field(default_factory=TrainConfig)
    new_train: TrainConfig = field(default_factory=TrainConfig)  # also the BCT model's
    transformation_train: TrainConfig = field(default_factory=TrainConfig)
    # h is trained on features of the training set computed once by the frozen models:
    # one clean pass plus (feature_views - 1) passes over augmented images.
    feature_views: int = 1
    # Fractions 0, 1/(p-1), ..., 1 of the gallery re-embedded; FastFill's grid is i/21, 22 points.
    backfill_points: int = 22
    metric: Literal["l2", "cosine"] = "l2"
    # Share of each class's training items held out as the validation split (fixed seed):
    # every choice is made on it, the test split only reports.
    validation_fraction: float = 0.1
    eval_chunk_size: int = 1024
    encode_batch_size: int = 1024


def _tiny() -> ExperimentConfig:
    model = ModelConfig(arch="cnn-xs", embed_dim=16)
    quick = TrainConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=0.5)
    return ExperimentConfig(
        old_model=model,
        new_model=model,
        side_info=SideInfoConfig(
            model=ModelConfig(arch="cnn-xs", embed_dim=16, num_classes=0), projection_dim=16
        ),
        transformation=TransformationConfig(branch_width=32, inner_width=64),
        old_train=quick,
        side_info_train=quick,
        new_train=quick,
        transformation_train=TrainConfig(
            epochs=4,
            batch_size=64,
            optimizer="adam",
            lr=2e-3,
            weight_decay=0.0,
            warmup_epochs=0.0,
            bn_eval_after=0.5,
        ),
        backfill_points=5,
    )


def _cpu() -> ExperimentConfig:
    # Sized so that one seed of the study on Fashion-MNIST, both BCT baselines and every h
    # included, fits in 25 minutes on 2 CPU cores (measured per stage:
    # benchmarks/results/reproduce_fashion_mnist.json, "timings_s").
    model = ModelConfig(arch="cnn-s", embed_dim=128)
    old = TrainConfig(epochs=10, batch_size=256, lr=0.1, weight_decay=5e-4, warmup_epochs=1.0)
    new = TrainConfig(epochs=8, batch_size=256, lr=0.1, weight_decay=5e-4, warmup_epochs=1.0)
    return ExperimentConfig(
        old_model=model,
        new_model=model,
        side_info=SideInfoConfig(
            model=ModelConfig(arch="cnn-s", embed_dim=128, num_classes=0),
            projection_dim=64,
            temperature=0.2,
        ),
        # The deployed h (FastFill, side-info) chosen on the validation split, 3 seeds, with top-1
        # and mAP both in the criterion (benchmarks/studies/h_select.py): the fewest MACs whose
        # gap-closed intervals clear 85 % top-1 and 90 % mAP is inner width 128 with FastFill's
        # cross-entropy weight 0 (the sigma-weighted squared error alone): 89.2 % top-1
        # [85.7, 93.0] and 94.9 % mAP; the default CE weight 1 missed top-1 (88.2 [84.4, 92.1]).
        # Width 128 is also the knee of h's quality-cost frontier (h_frontier.py).
        transformation=TransformationConfig(branch_width=256, inner_width=128, ce_weight=0.0),
        old_train=old,
        side_info_train=TrainConfig(
            epochs=10,
            batch_size=256,
            lr=0.3,
            weight_decay=1e-4,
            warmup_epochs=1.0,
            label_smoothing=0.0,
        ),
        new_train=new,
        transformation_train=TrainConfig(
            epochs=10,
            batch_size=512,
            optimizer="adam",
            lr=1e-3,
            weight_decay=0.0,
            warmup_epochs=0.0,
            bn_eval_after=0.5,
        ),
        feature_views=2,
        backfill_points=22,
    )


def _demo() -> ExperimentConfig:
    # The cpu preset's models with fewer epochs: `make demo` runs the whole asset graph on
    # Fashion-MNIST in a few minutes on 2 CPU cores.
    cpu = _cpu()
    return replace(
        cpu,
        old_train=replace(cpu.old_train, epochs=4),
        side_info_train=replace(cpu.side_info_train, epochs=4),
        new_train=replace(cpu.new_train, epochs=4),
        transformation_train=replace(cpu.transformation_train, epochs=6),
        feature_views=1,
    )


def _cpu_hard() -> ExperimentConfig:
    # The harder setting: the same new model, side-info model and old classes, but a weaker,
    # 8-d old model (cnn-xs), so h without side-info has more to recover. Chosen on validation
    # (demo preset, seed 0): h without side-info closed 62.9 % of the mAP gap with 8-d and
    # 82.2 % with 32-d (the issue asks for < 80 %); benchmarks/results/experiments.md.
    cpu = _cpu()
    return replace(cpu, old_model=ModelConfig(arch="cnn-xs", embed_dim=8))


def _paper() -> ExperimentConfig:
    # ResNet-50 with a 128-d embedding; h 128->256->256 (x2) -> 512->2048->2048->128, Adam 5e-4,
    # cosine, 80 epochs, BN to eval halfway (apple/ml-fct). Meant for a GPU and CIFAR-100.
    model = ModelConfig(arch="resnet50", embed_dim=128)
    supervised = TrainConfig(
        epochs=100, batch_size=256, lr=0.1, weight_decay=5e-4, warmup_epochs=5.0
    )
    return ExperimentConfig(
        old_model=model,
        new_model=model,
        side_info=SideInfoConfig(
            model=ModelConfig(arch="resnet50", embed_dim=128, num_classes=0),
            projection_dim=128,
            temperature=0.5,
        ),
        transformation=TransformationConfig(branch_width=256, inner_width=2048),
        old_train=supervised,
        side_info_train=TrainConfig(
            epochs=500,
            batch_size=512,
            lr=0.6,
            weight_decay=1e-6,
            warmup_epochs=10.0,
            label_smoothing=0.0,
        ),
        new_train=supervised,
        transformation_train=TrainConfig(
            epochs=80,
            batch_size=256,
            optimizer="adam",
            lr=5e-4,
            weight_decay=0.0,
            warmup_epochs=0.0,
            bn_eval_after=0.5,
        ),
        feature_views=4,
        backfill_points=22,
    )


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "tiny": _tiny,
    "demo": _demo,
    "cpu": _cpu,
    "cpu-hard": _cpu_hard,
    "paper": _paper,
}


def preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {name!r}")
    return PRESETS[name]()
