"""Losses, each returning named parts ("loss" is the one minimised).

Objectives bind a trainable model, frozen inputs and an augmentation to a loss, so that the
single loop in `training.fit` can train any stage. Pure loss functions take tensors only, so
tests can check them by hand on tiny inputs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fct_ml.augment import AugmentConfig, augment, to_float
from fct_ml.models import ModelConfig, classifier_logits

# ---------------------------------------------------------------- pure loss functions


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent: z1, z2 (N, D) projections of two views of the same N images.

    Each of the 2N views must pick its partner among the other 2N - 1 by cosine similarity
    / temperature; returns the mean cross-entropy (a scalar).
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
    n = z1.shape[0]
    sim = z @ z.T / temperature  # (2N, 2N)
    sim.fill_diagonal_(float("-inf"))  # a view is not its own partner
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared L2 distance ||pred - target||^2, summed over the feature dims as in
    the FastFill paper: (N, D), (N, D) -> (N,). (A mean over dims would shrink it D-fold
    against FastFill's cross-entropy, which then pulls h's outputs onto class centres.)"""
    return (pred.float() - target.float()).pow(2).sum(dim=1)


def fastfill_loss(
    sq_error: torch.Tensor, ce: torch.Tensor, sigma: torch.Tensor, ce_weight: float = 1.0
) -> torch.Tensor:
    """FastFill's per-sample loss 0.5*exp(-sigma)*(SE + ce_weight*CE) + 0.5*sigma, (N,) -> (N,).

    Minimised over sigma at sigma = log(SE + ce_weight*CE): sigma learns the log of the error.
    """
    return 0.5 * torch.exp(-sigma) * (sq_error + ce_weight * ce) + 0.5 * sigma


# ---------------------------------------------------------------- objectives


class ClassificationObjective:
    """Cross-entropy of model.logits(model(augment(x))) against y (old and new models)."""

    def __init__(
        self,
        model: nn.Module,
        aug: AugmentConfig,
        label_smoothing: float,
        generator: torch.Generator,
    ):
        self.model, self.aug, self.label_smoothing, self.generator = (
            model,
            aug,
            label_smoothing,
            generator,
        )

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        images, labels = batch
        x = augment(to_float(images), self.aug, self.generator).contiguous(
            memory_format=torch.channels_last
        )
        logits = self.model.logits(self.model(x))
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": ce, "ce": ce.detach(), "accuracy": acc}


class BCTObjective:
    """BCT (Shen et al. 2020): new classifier loss + influence loss through the frozen old classifier.

    `old_classifier` (num_classes, D) holds the old model's classifier rows for the classes it
    saw and, for the classes it never saw, the mean old-model embedding of their training
    items (the BCT paper's treatment of new classes), so every sample gets an influence term.
    The influence logits are scored as the old model scores its own (`old_config.classifier`:
    raw dot product, or the scaled cosine of a normalised softmax).

    With `alignment_weight > 0` and the frozen `old_model`, an alignment term
    `||phi_bct(x) - phi_old(x)||^2` (summed over dimensions, mean over the batch, on the same
    augmented view) is added. Why: cross-entropy only sees logit *differences*, so the influence
    loss constrains at most (classes - 1) directions of the embedding. With 10 classes in a
    128-d space the other directions are free and differ between the two models, and bct/old
    fails BCT's own criterion; the BCT paper's old classifiers had thousands of classes, which
    constrain every direction. The alignment fixes the free directions.
    """

    def __init__(
        self,
        model: nn.Module,
        old_classifier: torch.Tensor,
        aug: AugmentConfig,
        label_smoothing: float,
        influence_weight: float,
        generator: torch.Generator,
        old_config: ModelConfig | None = None,
        *,
        alignment_weight: float = 0.0,
        old_model: nn.Module | None = None,
    ):
        if alignment_weight > 0 and old_model is None:
            raise ValueError("BCT: alignment_weight > 0 needs the frozen old model")
        self.model, self.aug, self.generator = model, aug, generator
        self.old_classifier = old_classifier.detach()
        self.old_config = old_config or ModelConfig()
        self.label_smoothing, self.influence_weight = label_smoothing, influence_weight
        self.alignment_weight = alignment_weight
        self.old_model = old_model.eval().requires_grad_(False) if old_model is not None else None

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        images, labels = batch
        x = augment(to_float(images), self.aug, self.generator).contiguous(
            memory_format=torch.channels_last
        )
        emb = self.model(x).float()
        ce_new = F.cross_entropy(
            self.model.logits(emb).float(), labels, label_smoothing=self.label_smoothing
        )
        ce_old = F.cross_entropy(
            classifier_logits(emb, self.old_classifier, self.old_config),
            labels,
            label_smoothing=self.label_smoothing,
        )
        loss = ce_new + self.influence_weight * ce_old
        out = {"ce_new": ce_new.detach(), "influence": ce_old.detach()}
        if self.alignment_weight > 0:
            assert self.old_model is not None  # checked in __init__
            with torch.no_grad():
                target = self.old_model(x).float()  # (B, D): the old model, same view
            alignment = (emb - target).square().sum(1).mean()
            loss = loss + self.alignment_weight * alignment
            out["alignment"] = alignment.detach()
        return {"loss": loss, **out}


class SimCLRObjective:
    """Two augmented views of each image, NT-Xent on their projections (no labels used)."""

    def __init__(
        self, model: nn.Module, aug: AugmentConfig, temperature: float, generator: torch.Generator
    ):
        self.model, self.aug, self.temperature, self.generator = model, aug, temperature, generator

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        (images,) = batch
        x = to_float(images)
        views = torch.cat(
            [augment(x, self.aug, self.generator), augment(x, self.aug, self.generator)]
        )
        z = self.model(views.contiguous(memory_format=torch.channels_last))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        return {"loss": loss, "nt_xent": loss.detach()}


class TransformationObjective:
    """h(old_embedding, side_info) regressed onto the frozen new model's embedding: the mean
    over samples of the squared L2 error (FCT's L2 loss)."""

    def __init__(self, h: nn.Module):
        self.h = h

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        old, side, new, _labels = batch
        se = squared_error(self.h(old, side), new).mean()
        return {"loss": se, "sq_error": se.detach()}


class FastFillObjective:
    """FastFill (Jaeckle et al. 2023): h with an uncertainty head sigma, loss weighted by exp(-sigma).

    The cross-entropy goes through the frozen new model's classifier `new_classifier` (C, D),
    scored as the new model scores its own (`new_config.classifier`), weighted by `ce_weight`.
    """

    def __init__(
        self,
        h: nn.Module,
        new_classifier: torch.Tensor,
        new_config: ModelConfig | None = None,
        ce_weight: float = 1.0,
    ):
        self.h = h
        self.new_classifier = new_classifier.detach()
        self.new_config = new_config or ModelConfig()
        self.ce_weight = ce_weight

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        old, side, new, labels = batch
        pred, sigma = self.h.forward_with_sigma(old, side)
        sq = squared_error(pred, new)
        logits = classifier_logits(pred.float(), self.new_classifier, self.new_config)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = fastfill_loss(sq, ce, sigma.float(), self.ce_weight).mean()
        return {
            "loss": loss,
            "sq_error": sq.mean().detach(),
            "ce": ce.mean().detach(),
            "sigma": sigma.mean().detach(),
        }
