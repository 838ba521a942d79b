"""The paper's experiment end to end: train every model, evaluate every case, draw the
backfilling curves. `fct reproduce` is a thin CLI over `run_experiment`.

Protocol (Ramanujan et al. 2022, apple/ml-fct): the old model and the side-info model see only
the `old_classes` of the training set; the new model, BCT model and h see all of it. The test
set is both query and gallery (leave-one-out), L2 distance on raw features, CMC top-1/top-5
and mAP over the full ranking. Cases are written query/gallery.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch

from fct_ml.augment import policy_for, to_float
from fct_ml.backfill import apply_transformation, backfill_summary
from fct_ml.bct import extended_old_classifier, train_bct_model
from fct_ml.config import replace
from fct_ml.data import DataError, Dataset
from fct_ml.evaluation import evaluate_cases, gap_closed
from fct_ml.models import train_embedding_model
from fct_ml.presets import ExperimentConfig
from fct_ml.side_info import train_side_info_model
from fct_ml.training import EpochRecord, encode
from fct_ml.transformation import train_transformation, training_features

# Stage seeds are offsets of the run's seed, so one stage's randomness never depends on
# what ran before it.
_STAGE_SEED = {
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


def _stage_seed(seed: int, stage: str) -> int:
    return seed * 1000 + _STAGE_SEED[stage]


def _history(records: list[EpochRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]


def run_experiment(
    dataset: Dataset,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    *,
    seed: int = 0,
    device: torch.device = torch.device("cpu"),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the old, side-info, new and BCT models and four transformations; evaluate the paper's
    cases, query/gallery (also restricted to queries of classes the old model never saw) and the backfilling
    curves. Returns the `fct reproduce` JSON (metrics in percent)."""
    old_classes = tuple(sorted(set(old_classes)))
    num_classes = dataset.num_classes
    unseen_classes = tuple(c for c in range(num_classes) if c not in old_classes)
    if not old_classes:
        raise DataError("old_classes is empty: the old model needs at least one class")
    policy = policy_for(dataset.name)
    timings: dict[str, float] = {}
    histories: dict[str, list[dict[str, Any]]] = {}

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

    train, test = dataset.train, dataset.test
    old_train = train.with_classes(old_classes)
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[list(old_classes)] = torch.arange(len(old_classes))
    channels = dataset.channels
    old_cfg = replace(config.old_model, in_channels=channels, num_classes=len(old_classes))
    new_cfg = replace(config.new_model, in_channels=channels, num_classes=num_classes)
    side_cfg = replace(config.side_info, model__in_channels=channels, model__num_classes=0)

    with timed("old_model"):
        old_model, h_old = train_embedding_model(
            old_train.images,
            remap[old_train.labels],
            old_cfg,
            config.old_train,
            policy.supervised,
            device=device,
            seed=_stage_seed(seed, "old"),
            progress=progress,
            desc="old_model",
            on_epoch=epochs("old_model", config.old_train.epochs),
        )
        histories["old_model"] = _history(h_old)
    with timed("side_info_model"):
        side_model, h_side = train_side_info_model(
            old_train.images,
            side_cfg,
            config.side_info_train,
            policy.contrastive,
            device=device,
            seed=_stage_seed(seed, "side_info"),
            progress=progress,
            on_epoch=epochs("side_info_model", config.side_info_train.epochs),
        )
        histories["side_info_model"] = _history(h_side)
    with timed("new_model"):
        new_model, h_new = train_embedding_model(
            train.images,
            train.labels,
            new_cfg,
            config.new_train,
            policy.supervised,
            device=device,
            seed=_stage_seed(seed, "new"),
            progress=progress,
            desc="new_model",
            on_epoch=epochs("new_model", config.new_train.epochs),
        )
        histories["new_model"] = _history(h_new)
    with timed("bct_model"):
        old_classifier = extended_old_classifier(
            old_model,
            old_classes,
            train.images,
            train.labels,
            num_classes,
            batch_size=config.encode_batch_size,
        )
        bct_model, h_bct = train_bct_model(
            train.images,
            train.labels,
            replace(new_cfg, embed_dim=old_cfg.embed_dim),
            config.new_train,
            config.bct,
            old_classifier,
            policy.supervised,
            device=device,
            seed=_stage_seed(seed, "bct"),
            progress=progress,
            on_epoch=epochs("bct_model", config.new_train.epochs),
        )
        histories["bct_model"] = _history(h_bct)

    with timed("features"):
        f_old, f_side, f_new = training_features(
            [old_model, side_model, new_model],
            train.images,
            config.feature_views,
            policy.supervised,
            batch_size=config.encode_batch_size,
            seed=_stage_seed(seed, "features"),
        )
        f_labels = train.labels.repeat(config.feature_views)
        t_old, t_side, t_new, t_bct = (
            encode(m, [test.images], batch_size=config.encode_batch_size, transform=to_float)
            for m in (old_model, side_model, new_model, bct_model)
        )

    h_cfg = replace(
        config.transformation,
        old_dim=old_cfg.embed_dim,
        side_info_dim=side_cfg.model.embed_dim,
        new_dim=new_cfg.embed_dim,
    )
    new_classifier = new_model.classifier.weight.detach()
    variants = {
        "h": (replace(h_cfg, side_info=True, uncertainty=False), "h"),
        "h no side-info": (replace(h_cfg, side_info=False, uncertainty=False), "h_plain"),
        "fastfill": (replace(h_cfg, side_info=True, uncertainty=True), "fastfill"),
        "fastfill no side-info": (
            replace(h_cfg, side_info=False, uncertainty=True),
            "fastfill_plain",
        ),
    }
    transformed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for name, (cfg, stage) in variants.items():
        with timed(f"transformation ({name})"):
            h, hist = train_transformation(
                f_old,
                f_side,
                f_new,
                f_labels,
                cfg,
                config.transformation_train,
                device=device,
                seed=_stage_seed(seed, stage),
                new_classifier=new_classifier,
                progress=progress,
                desc=name,
            )
            histories[f"transformation ({name})"] = _history(hist)
            transformed[name] = apply_transformation(h, t_old, t_side)

    labels = test.labels
    unseen_mask = torch.isin(labels, torch.tensor(unseen_classes, dtype=labels.dtype))
    galleries = {
        "old/old": (t_old, t_old),
        "new/new": (t_new, t_new),
        "new/h(old)": (t_new, transformed["h"][0]),
        "new/h(old) no side-info": (t_new, transformed["h no side-info"][0]),
        "new/h(old) fastfill": (t_new, transformed["fastfill"][0]),
        "new/h(old) fastfill no side-info": (t_new, transformed["fastfill no side-info"][0]),
        "bct/old": (t_bct, t_old),
        "bct/bct": (t_bct, t_bct),
        "new/old": (t_new, t_old),
    }
    with timed("evaluation"):
        evaluated = evaluate_cases(
            galleries,
            labels,
            unseen_mask=unseen_mask,
            metric=config.metric,
            chunk_size=config.eval_chunk_size,
        )
    cases = evaluated["cases"]

    curves: dict[str, Any] = {}
    auc: dict[str, Any] = {}
    for variant, key in (
        ("fastfill", "backfill_auc"),
        ("fastfill no side-info", "backfill_auc_no_side_info"),
    ):
        with timed(f"backfill curves ({variant})"):
            gallery_h, sigma = transformed[variant]
            curves[variant], auc[key] = backfill_summary(
                t_new,
                labels,
                gallery_h,
                sigma,
                config.backfill_points,
                generator=torch.Generator().manual_seed(_stage_seed(seed, "backfill")),
                metric=config.metric,
                chunk_size=config.eval_chunk_size,
            )

    return {
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "old_classes": list(old_classes),
        "seed": seed,
        "device": str(device),
        "cases": cases,
        "cases_unseen_classes": evaluated["cases_unseen_classes"] or {case: None for case in cases},
        "cases_seen_classes": evaluated["cases_seen_classes"],
        "backfill_auc": auc["backfill_auc"],
        "backfill_auc_no_side_info": auc["backfill_auc_no_side_info"],
        "backfill_curves": curves,
        "gap_closed": gap_closed(cases),
        "gap_closed_no_side_info": gap_closed(cases, "new/h(old) no side-info"),
        "timings_s": timings,
        "config": asdict(config),
        "history": histories,
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
