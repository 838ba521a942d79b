"""The stages that train and connect the models, defined once.

`fct reproduce` (fct_ml.reproduce) runs every stage in one process; the Dagster assets
(fct_assets.base.assets, fct_assets.upgrade.assets) run one stage per asset, on checkpoints
loaded from the previous ones. Both call these functions with the run's seed, so the same
config and seed give the same models.

    old model (old classes, labels remapped) ─┐
    side-info model (old classes, no labels) ─┼─> training features ─> transformation h (variants)
    new model (all classes) ──────────────────┘
    BCT model (all classes, old classifier as influence)

Each stage seeds itself from the run's seed and its own name (`stage_seed`), so one stage's
randomness never depends on what ran before it or in which process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fct_ml.augment import to_float
from fct_ml.bct import extended_old_classifier
from fct_ml.closed_form import ClosedFormMap
from fct_ml.config import replace
from fct_ml.data import DataError, Dataset, ImageSet, split_validation
from fct_ml.datasets import policy_for
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.presets import ExperimentConfig
from fct_ml.trainers import (
    train_bct_model,
    train_closed_form,
    train_embedding_model,
    train_side_info_model,
    train_transformation,
)
from fct_ml.training import EpochRecord, encode
from fct_ml.transformation import Transformation, TransformationConfig
from fct_ml.transformation import training_features as _features_of

OnEpoch = Callable[[EpochRecord], None] | None
CPU = torch.device("cpu")

# Stage seeds are offsets of the run's seed (seed * 1000 + offset).
STAGE_SEED = {
    "old": 1,
    "side_info": 2,
    "new": 3,
    "bct": 4,
    "features": 5,
    "h": 6,
    "h_plain": 7,
    "fastfill": 8,
    "fastfill_plain": 9,
    "backfill": 10,
}


def stage_seed(seed: int, stage: str) -> int:
    """The seed of one stage of a run seeded `seed`."""
    return seed * 1000 + STAGE_SEED[stage]


@dataclass(frozen=True)
class Run:
    """How stages run: the run's seed (each stage derives its own), the device, progress bars."""

    seed: int = 0
    device: torch.device = CPU
    progress: bool = False

    def seed_of(self, stage: str) -> int:
        return stage_seed(self.seed, stage)


@functools.lru_cache(maxsize=4)
def _splits(dataset: Dataset, fraction: float) -> tuple[ImageSet, ImageSet]:
    return split_validation(dataset.train, fraction)


def fit_split(dataset: Dataset, config: ExperimentConfig) -> ImageSet:
    """The training items every stage trains on: the training set minus the validation split
    (`config.validation_fraction` of each class, fixed seed), in the study and the product
    alike, so both train the same models."""
    return _splits(dataset, config.validation_fraction)[0]


def validation_split(dataset: Dataset, config: ExperimentConfig) -> ImageSet:
    """The held-out part of the training set: choices are made on its metrics."""
    return _splits(dataset, config.validation_fraction)[1]


def old_class_tuple(old_classes: Sequence[int]) -> tuple[int, ...]:
    """The old model's classes, sorted and unique; refuses an empty list."""
    classes = tuple(sorted(set(old_classes)))
    if not classes:
        raise DataError("old_classes is empty: the old model needs at least one class")
    return classes


def old_label_remap(num_classes: int, old_classes: Sequence[int]) -> torch.Tensor:
    """(num_classes,) dataset label -> the old model's class index (old_classes[i] -> i); -1 for
    a class it never saw."""
    classes = old_class_tuple(old_classes)
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    return remap


def old_model_config(dataset: Dataset, old_classes: Sequence[int], config: ExperimentConfig):
    return replace(
        config.old_model,
        in_channels=dataset.channels,
        num_classes=len(old_class_tuple(old_classes)),
    )


def new_model_config(dataset: Dataset, config: ExperimentConfig) -> ModelConfig:
    return replace(config.new_model, in_channels=dataset.channels, num_classes=dataset.num_classes)


# The training stages share one signature (dataset, [classes,] config, run; on_epoch) on purpose:
# each reads as one stage of the paper, side by side, and callers swap one for another.
def train_old_model(
    dataset: Dataset,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    run: Run,
    *,
    on_epoch: OnEpoch = None,
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """phi_old: supervised on the training items of `old_classes` only, labels remapped to
    0..len(old_classes)-1."""
    train = fit_split(dataset, config).with_classes(old_class_tuple(old_classes))
    remap = old_label_remap(dataset.num_classes, old_classes)
    return train_embedding_model(
        train.images,
        remap[train.labels],
        old_model_config(dataset, old_classes, config),
        config.old_train,
        policy_for(dataset.name).supervised,
        device=run.device,
        seed=run.seed_of("old"),
        progress=run.progress,
        desc="old_model",
        on_epoch=on_epoch,
    )


def train_side_info(
    dataset: Dataset,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    run: Run,
    *,
    on_epoch: OnEpoch = None,
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """psi: SimCLR without labels on the images of `old_classes` (what the old model saw)."""
    train = fit_split(dataset, config).with_classes(old_class_tuple(old_classes))
    side_cfg = replace(config.side_info, model__in_channels=dataset.channels, model__num_classes=0)
    return train_side_info_model(
        train.images,
        side_cfg,
        config.side_info_train,
        policy_for(dataset.name).contrastive,
        device=run.device,
        seed=run.seed_of("side_info"),
        progress=run.progress,
        on_epoch=on_epoch,
    )


def train_new_model(
    dataset: Dataset,
    config: ExperimentConfig,
    run: Run,
    *,
    on_epoch: OnEpoch = None,
    desc: str = "new_model",
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """phi_new: supervised on every class of the training set."""
    train = fit_split(dataset, config)
    return train_embedding_model(
        train.images,
        train.labels,
        new_model_config(dataset, config),
        config.new_train,
        policy_for(dataset.name).supervised,
        device=run.device,
        seed=run.seed_of("new"),
        progress=run.progress,
        desc=desc,
        on_epoch=on_epoch,
    )


def train_bct(
    dataset: Dataset,
    old_model: EmbeddingModel,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    run: Run,
    *,
    on_epoch: OnEpoch = None,
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """The BCT baseline: a new model in the old model's space (the old classifier, extended to
    every class, as influence loss), trained on all classes with the new model's schedule."""
    train = fit_split(dataset, config)
    old_classifier = extended_old_classifier(
        old_model,
        old_class_tuple(old_classes),
        train.images,
        train.labels,
        dataset.num_classes,
        batch_size=config.encode_batch_size,
    )
    bct_cfg = replace(
        new_model_config(dataset, config),
        embed_dim=old_model_config(dataset, old_classes, config).embed_dim,
    )
    return train_bct_model(
        train.images,
        train.labels,
        bct_cfg,
        config.new_train,
        config.bct,
        old_classifier,
        policy_for(dataset.name).supervised,
        device=run.device,
        seed=run.seed_of("bct"),
        old_config=old_model.config,
        old_model=old_model,
        progress=run.progress,
        on_epoch=on_epoch,
    )


@dataclass(frozen=True)
class Features:
    """What h is trained on: the frozen models' features of the training set, aligned by row
    (one clean pass plus `feature_views - 1` augmented passes)."""

    old: torch.Tensor  # (views * N, old_dim)
    side_info: torch.Tensor  # (views * N, side_info_dim)
    new: torch.Tensor  # (views * N, new_dim)
    labels: torch.Tensor  # (views * N,)


def training_features(
    dataset: Dataset,
    old_model: EmbeddingModel,
    side_info_model: EmbeddingModel,
    new_model: EmbeddingModel,
    config: ExperimentConfig,
    run: Run,
) -> Features:
    """Features of the training set by the three frozen models on the run's device, the same augmented
    image through every model."""
    models = [m.to(run.device) for m in (old_model, side_info_model, new_model)]
    f_old, f_side, f_new = _features_of(
        models,
        fit_split(dataset, config).images,
        config.feature_views,
        policy_for(dataset.name).supervised,
        batch_size=config.encode_batch_size,
        seed=run.seed_of("features"),
    )
    labels = fit_split(dataset, config).labels
    return Features(f_old, f_side, f_new, labels.repeat(config.feature_views))


def h_stage(*, side_info: bool, uncertainty: bool) -> str:
    """The stage (and seed) name of one variant of h."""
    return ("fastfill" if uncertainty else "h") + ("" if side_info else "_plain")


def transformation_config(
    features: Features, config: ExperimentConfig, *, side_info: bool, uncertainty: bool
) -> TransformationConfig:
    return replace(
        config.transformation,
        old_dim=features.old.shape[1],
        side_info_dim=features.side_info.shape[1],
        new_dim=features.new.shape[1],
        side_info=side_info,
        uncertainty=uncertainty,
    )


def train_h(
    features: Features,
    new_model: EmbeddingModel,
    config: ExperimentConfig,
    run: Run,
    *,
    side_info: bool,
    uncertainty: bool,
    on_epoch: OnEpoch = None,
    desc: str = "transformation",
    kind: str = "mlp",
) -> tuple[Transformation | ClosedFormMap, list[EpochRecord]]:
    """h(old_embedding, side_info) -> new space; `side_info=False` feeds h the old embedding
    alone, `uncertainty=True` adds FastFill's sigma head (trained with the new classifier).
    `kind`: "mlp" (the paper's h, trained) or a closed-form map fitted on the same features,
    "linear" or "procrustes" (fct_ml.closed_form; no sigma, procrustes without side-info)."""
    if kind != "mlp":
        return train_closed_form(
            features.old,
            features.side_info,
            features.new,
            kind,
            side_info_used=side_info,
            on_epoch=on_epoch,
        )
    return train_transformation(
        features.old,
        features.side_info,
        features.new,
        features.labels,
        transformation_config(features, config, side_info=side_info, uncertainty=uncertainty),
        config.transformation_train,
        device=run.device,
        seed=run.seed_of(h_stage(side_info=side_info, uncertainty=uncertainty)),
        # An external new model may have no classifier; h then trains without FastFill's CE.
        new_classifier=(
            None if new_model.classifier is None else new_model.classifier.weight.detach()
        ),
        new_config=new_model.config,
        progress=run.progress,
        on_epoch=on_epoch,
        desc=desc,
    )


def embed(model: torch.nn.Module, images: torch.Tensor, config: ExperimentConfig) -> torch.Tensor:
    """(N, C, H, W) uint8 images -> (N, D) embeddings on the CPU by a frozen model, on the
    model's device."""
    return encode(model, [images], batch_size=config.encode_batch_size, transform=to_float)
