"""BCT's own criterion on digits: new queries against the old gallery do at least as well as
old/old on the classes the old model saw (Shen et al. 2020), with the alignment term, and fail
it badly without (the paper's loss alone constrains only classes - 1 of the 16 directions).

Two trainings of a 16-d cnn-xs for 10 epochs on ~1,300 digits: ~15 s on the 2-core CPU (marked
slow). The fast tests below check train_bct_model's wiring and the extended old classifier on a
few 8x8 images."""

from __future__ import annotations

import pytest
import torch

from fct_ml.augment import AugmentConfig, to_float
from fct_ml.bct import BCTConfig, extended_old_classifier, train_bct_model
from fct_ml.config import replace
from fct_ml.data import load_digits_dataset
from fct_ml.datasets import policy_for
from fct_ml.evaluation import CaseMetrics, evaluate_cases
from fct_ml.losses import BCTObjective
from fct_ml.models import EmbeddingModel, ModelConfig, train_embedding_model
from fct_ml.training import TrainConfig, encode, fit, prepare_model, seed_everything

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


def _tiny_images(n: int = 12):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return images, torch.arange(n) % 3


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_bct_model_is_fit_of_the_bct_objective_from_the_seed():
    images, labels = _tiny_images()
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
    images, labels = _tiny_images()
    with pytest.raises(
        ValueError, match=r"^BCT: the new embed_dim \(4\) must equal the old one \(5\)$"
    ):
        train_bct_model(*_small_bct_args(images, labels, old_dim=5), device=CPU, seed=0)


def test_extended_old_classifier_with_a_cosine_classifier_averages_directions():
    # A cosine classifier compares directions only: an unseen class's row is the mean of its
    # items' *normalised* old embeddings.
    torch.manual_seed(0)
    old = EmbeddingModel(
        ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=1, classifier="cosine")
    ).eval()
    images, _ = _tiny_images(6)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    with torch.no_grad():
        emb = old(to_float(images))
    unit = emb / emb.norm(dim=1, keepdim=True)
    rows = extended_old_classifier(old, (0,), images, labels, 3, batch_size=4)
    assert torch.allclose(rows[1], unit[1:3].mean(0), atol=1e-6)
    assert torch.allclose(rows[2], unit[3:6].mean(0), atol=1e-6)
    assert not torch.allclose(rows[2], emb[3:6].mean(0), atol=1e-3)
    assert torch.equal(rows[0], old.classifier.weight.detach()[0])


def test_no_training_data_is_refused_naming_the_stage():
    images, labels = _tiny_images()
    with pytest.raises(ValueError, match="^bct_model: no training data$"):
        train_bct_model(*_small_bct_args(images[:0], labels[:0]), device=CPU, seed=0)


def test_train_bct_model_shows_a_progress_bar_only_when_asked(capsys):
    images, labels = _tiny_images()
    args = _small_bct_args(images, labels)
    train_bct_model(*args, device=CPU, seed=0, progress=False)
    assert capsys.readouterr().err == ""
    train_bct_model(*args, device=CPU, seed=0, progress=True)
    # tqdm's bar on stderr, named after the stage: 1 epoch of 12 // 6 = 2 steps.
    assert "bct_model: 100%" in capsys.readouterr().err
