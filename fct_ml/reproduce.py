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

from fct_ml import pipeline
from fct_ml.backfill import apply_transformation, backfill_summary
from fct_ml.checkpoint import content_digest
from fct_ml.data import Dataset
from fct_ml.evaluation import evaluate_cases, gap_closed
from fct_ml.presets import ExperimentConfig
from fct_ml.training import EpochRecord

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
    """Train the old, side-info, new and BCT models and four transformations (fct_ml.pipeline);
    evaluate the paper's cases, query/gallery (also restricted to queries of classes the old model
    never saw) and the backfilling curves. Returns the `fct reproduce` JSON (metrics in percent)."""
    old_classes = pipeline.old_class_tuple(old_classes)
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
            pipeline.train_old_model(
                dataset,
                old_classes,
                config,
                run,
                on_epoch=epochs("old_model", config.old_train.epochs),
            ),
        )
    with timed("side_info_model"):
        side_model = trained(
            "side_info_model",
            pipeline.train_side_info(
                dataset,
                old_classes,
                config,
                run,
                on_epoch=epochs("side_info_model", config.side_info_train.epochs),
            ),
        )
    with timed("new_model"):
        new_model = trained(
            "new_model",
            pipeline.train_new_model(
                dataset, config, run, on_epoch=epochs("new_model", config.new_train.epochs)
            ),
        )
    with timed("bct_model"):
        bct_model = trained(
            "bct_model",
            pipeline.train_bct(
                dataset,
                old_model,
                old_classes,
                config,
                run,
                on_epoch=epochs("bct_model", config.new_train.epochs),
            ),
        )

    with timed("features"):
        features = pipeline.training_features(
            dataset, old_model, side_model, new_model, config, run
        )
        test = dataset.test
        t_old, t_side, t_new, t_bct = (
            pipeline.embed(m, test.images, config)
            for m in (old_model, side_model, new_model, bct_model)
        )

    transformed: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
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
                generator=torch.Generator().manual_seed(run.seed_of("backfill")),
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
