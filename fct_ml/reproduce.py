"""The paper's experiment end to end: train every model, evaluate every case, draw the
backfilling curves. `fct reproduce` is a thin CLI over `run_experiment`.

Protocol (Ramanujan et al. 2022, apple/ml-fct): the old model and the side-info model see only
the `old_classes` of the training set; the new model, BCT model and h see all of it. A
validation split (`config.validation_fraction` of each class) is carved from the training set
first and never trained on: every choice is made on its metrics, the test set only reports.
Each split is both query and gallery (leave-one-out), the preset's metric (L2 on raw features
by default), CMC top-1/top-5 and mAP over the full ranking. Cases are written query/gallery.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from fct_ml import pipeline
from fct_ml.backfill import apply_transformation, backfill_summary
from fct_ml.checkpoint import content_digest
from fct_ml.config import from_dict
from fct_ml.data import Dataset
from fct_ml.evaluation import Case, evaluate_cases, gap_closed
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.presets import ExperimentConfig
from fct_ml.training import EpochRecord, prepare_model

# h's variants, as (side_info, uncertainty): the paper's h with and without side-info, and
# FastFill's (h with the uncertainty head sigma) with and without.
H_VARIANTS = {
    "h": (True, False),
    "h no side-info": (False, False),
    "fastfill": (True, True),
    "fastfill no side-info": (False, True),
}


def _history(records: list[EpochRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def stage_key(stage: str, config: ExperimentConfig, old_classes: Sequence[int]) -> list[Any]:
    """What determines a trained model stage besides the seed and the data: its StageCache key.
    One definition, so that a script reusing `fct reproduce --cache-dir` finds its models."""
    keys = {
        "old_model": [config.old_model, config.old_train, old_classes],
        "side_info_model": [config.side_info, config.side_info_train, old_classes],
        "new_model": [config.new_model, config.new_train],
        "bct_model": [
            config.old_model,
            config.old_train,
            config.new_model,
            config.new_train,
            config.bct,
            old_classes,
        ],
    }
    return keys[stage]


def cache_fingerprint(dataset: Dataset, config: ExperimentConfig) -> str:
    """The training data a cached stage was trained on: the dataset and its validation split."""
    return f"{dataset.fingerprint()}:{config.validation_fraction}"


class StageCache:
    """Trained models kept in a folder, keyed by everything that determines them (the stage,
    its configs, the run's seed and the training data's fingerprint), so settings that share a
    stage (the same new model, side-info model) train it once. `None` folder: no cache."""

    def __init__(self, folder: Path | None, fingerprint: str, seed: int, device: torch.device):
        self.folder, self.fingerprint, self.seed, self.device = folder, fingerprint, seed, device

    def __call__(
        self,
        stage: str,
        key: Any,
        train: Callable[[], tuple[EmbeddingModel, list[EpochRecord]]],
    ) -> tuple[EmbeddingModel, list[EpochRecord]]:
        if self.folder is None:
            return train()
        blob = json.dumps([stage, key, self.seed, self.fingerprint], sort_keys=True, default=str)
        path = self.folder / f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}.pt"
        if path.exists():
            # Tensors, numbers and strings only: no pickled code is loaded.
            saved = torch.load(path, weights_only=True, map_location="cpu")
            model = EmbeddingModel(from_dict(ModelConfig, saved["config"]))
            model.load_state_dict(saved["state"])
            return prepare_model(model, self.device), [EpochRecord(**r) for r in saved["history"]]
        model, history = train()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        entry = {"config": asdict(model.config), "state": state, "history": _history(history)}
        torch.save(entry, tmp)
        tmp.replace(path)  # a crash never leaves a half-written entry
        return model, history


def evaluate_split(
    new: torch.Tensor,
    others: dict[str, torch.Tensor],
    transformed: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    labels: torch.Tensor,
    unseen_classes: Sequence[int],
    config: ExperimentConfig,
    backfill_seed: int,
) -> dict[str, Any]:
    """The paper's cases and FastFill's curves on one split, query = gallery (leave-one-out).

    new (N, D) the new model's embeddings; others {"old", "bct"} (N, old_dim); transformed
    {variant: (h's gallery (N, D), sigma (N,) or None)}. Metrics in percent."""
    old, bct = others["old"], others["bct"]
    unseen_mask = torch.isin(labels, torch.tensor(unseen_classes, dtype=labels.dtype))
    galleries = {
        Case.OLD_OLD: (old, old),
        Case.NEW_NEW: (new, new),
        Case.NEW_H_OLD: (new, transformed["h"][0]),
        f"{Case.NEW_H_OLD} no side-info": (new, transformed["h no side-info"][0]),
        f"{Case.NEW_H_OLD} fastfill": (new, transformed["fastfill"][0]),
        f"{Case.NEW_H_OLD} fastfill no side-info": (new, transformed["fastfill no side-info"][0]),
        Case.NEW_OLD: (new, old),
    }
    evaluated = evaluate_cases(
        galleries,
        labels,
        unseen_mask=unseen_mask,
        metric=config.metric,
        chunk_size=config.eval_chunk_size,
    )
    # The result is written as JSON: plain dicts from here on.
    cases = evaluated.as_json()
    out: dict[str, Any] = {
        "cases": cases["cases"],
        "cases_unseen_classes": cases["cases_unseen_classes"] or dict.fromkeys(cases["cases"]),
        "cases_seen_classes": cases["cases_seen_classes"],
        "gap_closed": gap_closed(evaluated.cases).as_dict(),
        "gap_closed_no_side_info": gap_closed(
            evaluated.cases, f"{Case.NEW_H_OLD} no side-info"
        ).as_dict(),
        "bct_comparison": bct_comparison(
            new, old, bct, transformed["h"][0], labels, unseen_mask, config
        ),
        "backfill_curves": {},
    }
    for variant, key in (
        ("fastfill", "backfill_auc"),
        ("fastfill no side-info", "backfill_auc_no_side_info"),
    ):
        gallery_h, sigma = transformed[variant]
        summary = backfill_summary(
            new,
            labels,
            gallery_h,
            sigma,
            config.backfill_points,
            generator=torch.Generator().manual_seed(backfill_seed),
            metric=config.metric,
        )
        out["backfill_curves"][variant] = summary.curves_as_dicts()
        out[key] = summary.areas_as_dicts()
    return out


def bct_comparison(
    new: torch.Tensor,
    old: torch.Tensor,
    bct: torch.Tensor,
    transformed: torch.Tensor,
    labels: torch.Tensor,
    unseen_mask: torch.Tensor,
    config: ExperimentConfig,
) -> dict[str, Any]:
    """BCT against FCT, every case under BCT's metric (`config.bct.metric`).

    BCT's criterion (bct/old >= old/old) holds under the cosine metric, not under L2: the
    aligned BCT model's embeddings are shorter than the old model's (its alignment term is a
    regression, which shrinks), so under L2 a bct query sits closer to every old gallery
    vector. Comparing across metrics would be unfair either way, so this table puts old/old,
    new/new and new/h(old) under the same metric as bct/old and bct/bct."""
    evaluated = evaluate_cases(
        {
            Case.OLD_OLD: (old, old),
            Case.NEW_NEW: (new, new),
            Case.NEW_H_OLD: (new, transformed),
            Case.BCT_OLD: (bct, old),
            Case.BCT_BCT: (bct, bct),
        },
        labels,
        unseen_mask=unseen_mask,
        metric=config.bct.metric,
        chunk_size=config.eval_chunk_size,
    )
    cases = evaluated.as_json()  # written as JSON
    return {
        "metric": config.bct.metric,
        "cases": cases["cases"],
        "cases_unseen_classes": cases["cases_unseen_classes"] or dict.fromkeys(cases["cases"]),
        "cases_seen_classes": cases["cases_seen_classes"],
    }


def run_experiment(
    dataset: Dataset,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    log: Callable[[str], None] = print,
    cache_dir: Path | None = None,
    evaluate: Callable[..., dict[str, Any]] = evaluate_split,
) -> dict[str, Any]:
    """Train the old, side-info, new and BCT models and four transformations (fct_ml.pipeline);
    evaluate the paper's cases, query/gallery (also restricted to queries of classes the old model
    never saw) and the backfilling curves on the test set, and the same on the validation split
    ("validation"). Returns the `fct reproduce` JSON (metrics in percent). With `cache_dir`,
    trained models are reused when their stage's configs, seed and data match. `evaluate` scores
    each split, the test split first (default evaluate_split, whose arguments it takes; a
    wrapper of it can record the embeddings each split is scored on)."""
    old_classes = pipeline.old_class_tuple(old_classes)
    # Every stage trains on the training set minus the validation split (pipeline.fit_split).
    val = pipeline.validation_split(dataset, config)
    cache = StageCache(cache_dir, cache_fingerprint(dataset, config), seed, device)
    unseen_classes = tuple(c for c in range(dataset.num_classes) if c not in old_classes)
    timings: dict[str, float] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    digests: dict[str, str] = {}

    def timed(stage: str):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                log(f"[{stage}] ...")

            def __exit__(self, *exc):
                timings[stage] = round(time.perf_counter() - self.t, 2)
                if exc[0] is None:
                    log(f"[{stage}] done in {timings[stage]:.1f} s")

        return _T()

    def epochs(stage: str, total: int) -> Callable[[EpochRecord], None]:
        def report(r: EpochRecord) -> None:
            parts = " ".join(f"{k} {v:.4f}" for k, v in r.parts.items())
            log(f"[{stage}] epoch {r.epoch}/{total} {parts} ({r.seconds:.1f} s)")

        return report

    def trained(stage: str, model_and_history):
        model, history = model_and_history
        histories[stage] = _history(history)
        digests[stage] = content_digest(model)
        return model

    run = pipeline.Run(seed=seed, device=device, progress=progress)
    with timed("old_model"):
        old_model = trained(
            "old_model",
            cache(
                "old_model",
                stage_key("old_model", config, old_classes),
                lambda: pipeline.train_old_model(
                    dataset,
                    old_classes,
                    config,
                    run,
                    on_epoch=epochs("old_model", config.old_train.epochs),
                ),
            ),
        )
    with timed("side_info_model"):
        side_model = trained(
            "side_info_model",
            cache(
                "side_info_model",
                stage_key("side_info_model", config, old_classes),
                lambda: pipeline.train_side_info(
                    dataset,
                    old_classes,
                    config,
                    run,
                    on_epoch=epochs("side_info_model", config.side_info_train.epochs),
                ),
            ),
        )
    with timed("new_model"):
        new_model = trained(
            "new_model",
            cache(
                "new_model",
                stage_key("new_model", config, old_classes),
                lambda: pipeline.train_new_model(
                    dataset, config, run, on_epoch=epochs("new_model", config.new_train.epochs)
                ),
            ),
        )
    with timed("bct_model"):
        bct_model = trained(
            "bct_model",
            cache(
                "bct_model",
                stage_key("bct_model", config, old_classes),
                lambda: pipeline.train_bct(
                    dataset,
                    old_model,
                    old_classes,
                    config,
                    run,
                    on_epoch=epochs("bct_model", config.new_train.epochs),
                ),
            ),
        )

    with timed("features"):
        features = pipeline.training_features(
            dataset, old_model, side_model, new_model, config, run
        )
        models = {"old": old_model, "side": side_model, "new": new_model, "bct": bct_model}
        splits = {"test": dataset.test, "validation": val}
        emb = {
            split: {k: pipeline.embed(m, images.images, config) for k, m in models.items()}
            for split, images in splits.items()
        }

    transformed: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {
        split: {} for split in splits
    }
    for name, (side_info, uncertainty) in H_VARIANTS.items():
        stage = f"transformation ({name})"
        with timed(stage):
            h = trained(
                stage,
                pipeline.train_h(
                    features,
                    new_model,
                    config,
                    run,
                    side_info=side_info,
                    uncertainty=uncertainty,
                    desc=name,
                ),
            )
            for split, e in emb.items():
                transformed[split][name] = apply_transformation(h, e["old"], e["side"])

    results = {}
    for split, images in splits.items():
        with timed(f"evaluation ({split})"):
            results[split] = evaluate(
                emb[split]["new"],
                {"old": emb[split]["old"], "bct": emb[split]["bct"]},
                transformed[split],
                images.labels,
                unseen_classes,
                config,
                run.seed_of("backfill"),
            )

    return {
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "old_classes": list(old_classes),
        "seed": seed,
        "device": str(device),
        **results["test"],
        "validation": results["validation"],
        "timings_s": timings,
        # The config that ran: h's dims come from the features (the preset holds placeholders,
        # e.g. old_dim 128 where `cpu-hard`'s old model is 8-d).
        "config": asdict(
            replace(
                config,
                transformation=replace(
                    config.transformation,
                    old_dim=features.old.shape[1],
                    side_info_dim=features.side_info.shape[1],
                    new_dim=features.new.shape[1],
                ),
            )
        ),
        "history": histories,
        # Content digests of every trained model (config + weights): the assets record the same
        # digest for the same config and seed.
        "model_digests": digests,
    }


def format_table(result: dict[str, Any]) -> str:
    """The paper-style table of a run: all queries, and queries of classes the old model never saw."""

    def cell(m: dict[str, float] | None) -> str:
        if m is None:
            return f"{'-':>6} {'-':>6} {'-':>6}"
        return f"{m['top1']:6.1f} {m['top5']:6.1f} {m['mAP']:6.1f}"

    width = max(len(c) for c in result["cases"]) + 2
    lines = [
        f"{result['dataset']}  old classes {result['old_classes']}  seed {result['seed']}",
        f"{'case (query/gallery)':<{width}} {'all queries':^20}   {'unseen-class queries':^20}",
        (
            f"{'':<{width}} {'top-1':>6} {'top-5':>6} {'mAP':>6}   {'top-1':>6} {'top-5':>6}"
            f" {'mAP':>6}"
        ),
    ]
    for case, m in result["cases"].items():
        lines.append(
            f"{case:<{width}} {cell(m)}   {cell(result['cases_unseen_classes'].get(case))}"
        )
    bct = result["bct_comparison"]
    lines.append(f"BCT against FCT, every case under the {bct['metric']} metric:")
    for case, m in bct["cases"].items():
        lines.append(f"{case:<{width}} {cell(m)}   {cell(bct['cases_unseen_classes'].get(case))}")
    seen = bct["cases_seen_classes"]
    if seen:
        lines.append(
            "seen-class queries: bct/old {0[top1]:.1f}/{0[mAP]:.1f} against old/old"
            " {1[top1]:.1f}/{1[mAP]:.1f} (top-1/mAP; BCT's criterion: bct/old >= old/old)".format(
                seen[Case.BCT_OLD], seen[Case.OLD_OLD]
            )
        )
    g, g0 = result["gap_closed"], result["gap_closed_no_side_info"]
    lines.append(
        f"gap closed by new/h(old): top-1 {g['top1']:.1f}%, mAP {g['mAP']:.1f}%"
        f"  (no side-info: top-1 {g0['top1']:.1f}%, mAP {g0['mAP']:.1f}%)"
    )
    for key, title in (
        ("backfill_auc", "with side-info"),
        ("backfill_auc_no_side_info", "no side-info"),
    ):
        parts = ", ".join(f"{o} {v['top1']:.1f}/{v['mAP']:.1f}" for o, v in result[key].items())
        lines.append(f"backfilling area, FastFill h {title} (top-1/mAP): {parts}")
    return "\n".join(lines)


def dumps(result: dict[str, Any]) -> str:
    """JSON with NaN written as null (strict JSON readers refuse NaN)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(result), indent=2)
