"""The trainers: each binds a model to its objective (fct_ml.losses) and runs the one training
loop, `fct_ml.training.fit`, from its own seed.

    train_embedding_model   the old and the new model (cross-entropy, label smoothing)
    train_side_info_model   the side-info model psi (SimCLR, no labels)
    train_bct_model         the BCT baseline (influence loss through the old classifier)
    train_transformation    h, with FastFill's loss and sigma calibration when it has a sigma head
    train_closed_form       a closed-form h (linear, procrustes): one solve, no loop

Models hold no loss and losses hold no loop: the model files (models.py, side_info.py, bct.py,
transformation.py) define what is trained, this module how. `fct_ml.pipeline` calls these with
each stage's data, configuration and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fct_ml.augment import AugmentConfig
from fct_ml.bct import BCTConfig
from fct_ml.closed_form import RIDGE, ClosedFormMap, fit_closed_form
from fct_ml.losses import (
    BCTObjective,
    ClassificationObjective,
    FastFillObjective,
    SimCLRObjective,
    TransformationObjective,
)
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.side_info import SideInfoConfig, SimCLRModel
from fct_ml.training import EpochRecord, TrainConfig, fit, prepare_model, seed_everything
from fct_ml.transformation import Transformation, TransformationConfig, calibrate_sigma


def train_embedding_model(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: ModelConfig,
    train: TrainConfig,
    aug: AugmentConfig,
    *,
    device: torch.device,
    seed: int,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    desc: str = "model",
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """Supervised training (cross-entropy, label smoothing) on images (N, C, H, W) uint8, labels (N,)
    in [0, config.num_classes). Used for the old and the new model."""
    if labels.numel() and (labels.min() < 0 or labels.max() >= config.num_classes):
        raise ValueError(
            f"{desc}: labels must lie in [0, {config.num_classes}), got"
            f" {labels.min()}..{labels.max()}"
        )
    generator = seed_everything(seed)
    model = prepare_model(EmbeddingModel(config), device)
    objective = ClassificationObjective(model, aug, train.label_smoothing, generator)
    history = fit(
        model,
        objective,
        (images, labels),
        train,
        generator=generator,
        desc=desc,
        progress=progress,
        on_epoch=on_epoch,
    )
    return model, history


def train_side_info_model(
    images: torch.Tensor,
    config: SideInfoConfig,
    train: TrainConfig,
    aug: AugmentConfig,
    *,
    device: torch.device,
    seed: int,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """Train psi on (N, C, H, W) uint8 images, no labels; returns the encoder (side-info model)."""
    if config.model.num_classes != 0:
        raise ValueError(
            "side-info model: model.num_classes must be 0 (it is trained without labels)"
        )
    generator = seed_everything(seed)
    model = prepare_model(SimCLRModel(config), device)
    objective = SimCLRObjective(model, aug, config.temperature, generator)
    history = fit(
        model,
        objective,
        (images,),
        train,
        generator=generator,
        desc="side_info_model",
        progress=progress,
        on_epoch=on_epoch,
    )
    return model.encoder.eval(), history


def train_bct_model(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: ModelConfig,
    train: TrainConfig,
    bct: BCTConfig,
    old_classifier: torch.Tensor,
    aug: AugmentConfig,
    *,
    device: torch.device,
    seed: int,
    old_config: ModelConfig | None = None,
    old_model: EmbeddingModel | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> tuple[EmbeddingModel, list[EpochRecord]]:
    """Train a BCT model on all classes; `old_classifier` (num_classes, D) from
    `extended_old_classifier`, scored as the old model (`old_config`) scores it. `old_model`
    (frozen) is needed when `bct.alignment_weight > 0`."""
    if old_classifier.shape[1] != config.embed_dim:
        raise ValueError(
            f"BCT: the new embed_dim ({config.embed_dim}) must equal the old one"
            f" ({old_classifier.shape[1]})"
        )
    generator = seed_everything(seed)
    model = prepare_model(EmbeddingModel(config), device)
    objective = BCTObjective(
        model,
        old_classifier.to(device),
        aug,
        train.label_smoothing,
        bct.influence_weight,
        generator,
        old_config=old_config,
        alignment_weight=bct.alignment_weight,
        old_model=prepare_model(old_model, device) if old_model is not None else None,
    )
    history = fit(
        model,
        objective,
        (images, labels),
        train,
        generator=generator,
        desc="bct_model",
        progress=progress,
        on_epoch=on_epoch,
    )
    return model, history


def train_transformation(
    old_embedding: torch.Tensor,
    side_info: torch.Tensor,
    new_embedding: torch.Tensor,
    labels: torch.Tensor,
    config: TransformationConfig,
    train: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    new_classifier: torch.Tensor | None = None,
    new_config: ModelConfig | None = None,
    progress: bool = True,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    desc: str = "transformation",
    transformation: type[Transformation] = Transformation,
) -> tuple[Transformation, list[EpochRecord]]:
    """Fit h on aligned features of the training set (each (N, dim), labels (N,)).

    With `config.uncertainty` the FastFill loss is used, which needs the frozen new model's
    classifier weight `new_classifier` (num_classes, new_dim), scored as `new_config` says.
    `transformation`: h's class (a subclass may change its forward, as a study's variant does).
    """
    for name, t in (
        ("old_embedding", old_embedding),
        ("side_info", side_info),
        ("new_embedding", new_embedding),
    ):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or Inf; cannot train the transformation on it")
    if old_embedding.shape[1] != config.old_dim or new_embedding.shape[1] != config.new_dim:
        raise ValueError(
            f"transformation dims: expected old {config.old_dim} and new {config.new_dim}, "
            f"got old {old_embedding.shape[1]} and new {new_embedding.shape[1]}"
        )
    if config.side_info and side_info.shape[1] != config.side_info_dim:
        raise ValueError(
            f"side_info: expected dim {config.side_info_dim}, got {side_info.shape[1]}"
        )
    generator = seed_everything(seed)
    h = transformation(config).to(device)
    if config.uncertainty:
        if new_classifier is None:
            raise ValueError("FastFill needs the new model's classifier weight")
        objective = FastFillObjective(
            h, new_classifier.to(device), new_config, ce_weight=config.ce_weight
        )
    else:
        objective = TransformationObjective(h)
    data = (old_embedding.float(), side_info.float(), new_embedding.float(), labels)
    history = fit(
        h,
        objective,
        data,
        train,
        generator=generator,
        desc=desc,
        progress=progress,
        on_epoch=on_epoch,
    )
    if config.uncertainty:
        calibrate_sigma(h, data[0], data[1], data[2])
    return h, history


def train_closed_form(
    old_embedding: torch.Tensor,
    side_info: torch.Tensor,
    new_embedding: torch.Tensor,
    kind: str,
    *,
    side_info_used: bool = True,
    ridge: float = RIDGE,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> tuple[ClosedFormMap, list[EpochRecord]]:
    """Fit a closed-form h of `kind` (fct_ml.closed_form) on aligned features (each (N, dim)).

    Its history is one record: the fit's wall seconds and its mean squared error on the
    features ("sq_error", the MLP's loss part of that name), so its training time and fit are
    recorded where the MLP's are."""
    started = time.perf_counter()
    h = fit_closed_form(
        kind, old_embedding, side_info, new_embedding, side_info_used=side_info_used, ridge=ridge
    )
    seconds = time.perf_counter() - started
    with torch.no_grad():
        pred = h(old_embedding.float(), side_info.float() if h.config.side_info else None)
        sq_error = float((pred - new_embedding.float()).pow(2).sum(1).mean())
    history = [EpochRecord(epoch=1, seconds=seconds, lr=0.0, parts={"sq_error": sq_error})]
    if on_epoch is not None:
        on_epoch(history[0])
    return h, history
