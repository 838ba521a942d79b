"""BCT's own criterion on digits: new queries against the old gallery do at least as well as
old/old on the classes the old model saw (Shen et al. 2020), with the alignment term, and fail
it badly without (the paper's loss alone constrains only classes - 1 of the 16 directions).

Two trainings of a 16-d cnn-xs for 10 epochs on ~1,300 digits: ~15 s on the 2-core CPU (marked
slow). The fast tests below check BCT's defaults and the extended old classifier on a few 8x8
images; tests/fct_ml/test_trainers.py checks train_bct_model's wiring."""

from __future__ import annotations

import pytest
import torch

from fct_ml.augment import to_float
from fct_ml.bct import BCTConfig, extended_old_classifier
from fct_ml.config import replace
from fct_ml.data import load_digits_dataset
from fct_ml.datasets import policy_for
from fct_ml.evaluation import CaseMetrics, evaluate_cases
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.trainers import train_bct_model, train_embedding_model
from fct_ml.training import TrainConfig, encode
from tests.fct_ml.tiny import tiny_images

OLD_CLASSES = (0, 1, 2, 3, 4)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def seen_class_cases() -> dict[float, dict[str, CaseMetrics]]:
    """{alignment_weight: seen-class metrics of old/old, bct/old, bct/bct} under cosine."""
    ds = load_digits_dataset()
    policy = policy_for(ds.name).supervised
    config = ModelConfig(arch="cnn-xs", embed_dim=16, num_classes=len(OLD_CLASSES))
    train = TrainConfig(epochs=10, batch_size=64, lr=0.05, warmup_epochs=0.5)
    old_set = ds.train.with_classes(OLD_CLASSES)  # labels 0..4 are already the old model's
    old, _ = train_embedding_model(
        old_set.images, old_set.labels, config, train, policy, device=CPU, seed=1, progress=False
    )
    rows = extended_old_classifier(old, OLD_CLASSES, ds.train.images, ds.train.labels, 10)
    test = ds.test
    e_old = encode(old, [test.images], batch_size=512, transform=to_float)
    unseen = ~torch.isin(test.labels, torch.tensor(OLD_CLASSES))
    out = {}
    for weight in (0.0, 1.0):
        bct, _ = train_bct_model(
            ds.train.images,
            ds.train.labels,
            replace(config, num_classes=10),
            train,
            BCTConfig(alignment_weight=weight),
            rows,
            policy,
            device=CPU,
            seed=4,
            old_config=old.config,
            old_model=old,
            progress=False,
        )
        e_bct = encode(bct, [test.images], batch_size=512, transform=to_float)
        cases = {"old/old": (e_old, e_old), "bct/old": (e_bct, e_old), "bct/bct": (e_bct, e_bct)}
        out[weight] = evaluate_cases(
            cases, test.labels, unseen_mask=unseen, metric="cosine"
        ).seen_classes
    return out


@pytest.mark.slow
def test_aligned_bct_meets_bcts_criterion_on_the_seen_classes(seen_class_cases):
    # Measured: old/old 91.1 / 90.6, bct/old 96.3 / 90.9 (top-1 / mAP); the tolerance on mAP
    # absorbs run-to-run noise, the failure below is 40+ points.
    c = seen_class_cases[1.0]
    assert c["bct/old"].top1 >= c["old/old"].top1
    assert c["bct/old"].mAP >= c["old/old"].mAP - 2


@pytest.mark.slow
def test_the_papers_loss_alone_fails_it_here(seen_class_cases):
    # Measured: bct/old 20.7 / 44.8 against old/old 91.1 / 90.6. If this ever holds, the
    # alignment term may no longer be needed: revisit BCTConfig.alignment_weight.
    c = seen_class_cases[0.0]
    assert c["bct/old"].top1 < c["old/old"].top1 - 20


# ---------------------------------------------------------------- fast: the wiring, by hand


def test_the_defaults_are_aligned_bct_scored_under_cosine():
    assert BCTConfig() == BCTConfig(influence_weight=1.0, alignment_weight=1.0, metric="cosine")


def test_extended_old_classifier_with_a_cosine_classifier_averages_directions():
    # A cosine classifier compares directions only: an unseen class's row is the mean of its
    # items' *normalised* old embeddings.
    torch.manual_seed(0)
    old = EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=1, classifier="cosine")
    ).eval()
    images, _ = tiny_images(6)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    with torch.no_grad():
        emb = old(to_float(images))
    unit = emb / emb.norm(dim=1, keepdim=True)
    rows = extended_old_classifier(old, (0,), images, labels, 3, batch_size=4)
    assert torch.allclose(rows[1], unit[1:3].mean(0), atol=1e-6)
    assert torch.allclose(rows[2], unit[3:6].mean(0), atol=1e-6)
    assert not torch.allclose(rows[2], emb[3:6].mean(0), atol=1e-3)
    assert torch.equal(rows[0], old.classifier.weight.detach()[0])
