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
from fct_ml.backfill import apply_transformation, backfill_order, backfill_results
from fct_ml.checkpoint import content_digest
from fct_ml.config import from_dict
from fct_ml.data import Dataset
from fct_ml.evaluation import (
    BackfillCurve,
    Case,
    Evaluation,
    error_spread,
    evaluate_cases,
    gap_closed,
    spearman,
)
from fct_ml.flips import flip_counts, flips, query_outcomes
from fct_ml.headline import Headlines, area_columns, negative_flip_column
from fct_ml.models import EmbeddingModel, ModelConfig
from fct_ml.presets import ExperimentConfig
from fct_ml.retrieval import RetrievalResult
from fct_ml.training import EpochRecord, prepare_model

# h's variants, as (side_info, uncertainty): the paper's h with and without side-info, and
# FastFill's (h with the uncertainty head sigma) with and without.
H_VARIANTS = {
    "h": (True, False),
    "h no side-info": (False, False),
    "fastfill": (True, True),
    "fastfill no side-info": (False, True),
}
# Closed-form maps fitted on h's training features (fct_ml.closed_form), as (kind, side_info):
# baselines for the learned h, seconds to fit. Procrustes maps the old embedding alone.
CLOSED_FORM = {
    "linear": ("linear", True),
    "linear no side-info": ("linear", False),
    "procrustes no side-info": ("procrustes", False),
}
# Each FastFill h and the FCT h with the same inputs: the FCT h's random order is the paper's
# baseline for FastFill's sigma order, and the two h's disagreement is the `ensemble` order.
FCT_PARTNER = {"fastfill": "h", "fastfill no side-info": "h no side-info"}
# The BCT baselines, by name, and the stage that trains each: the paper's loss (influence loss
# only) and this project's (influence + alignment to the old model, losses.BCTObjective).
BCT_VARIANTS = {"BCT + alignment": "bct_model", "BCT (paper)": "bct_paper_model"}
BCT_METRICS = ("l2", "cosine")
# Backfilling orders tried besides fct_ml.backfill's (random, sigma, true_error): the squared
# distance between the FastFill h and the FCT h of the same inputs, a two-member ensemble's
# disagreement, as another uncertainty (free: both h's are trained anyway). Tried on the
# validation split only, where orders are chosen: each order costs about a sixth of the test
# split's evaluation, and the test split would report it only once chosen.
EXTRA_ORDERS = ("ensemble",)
TRY_ORDERS_ON = ("validation",)
# The orders whose area is compared with the random order's (each gets a headline number).
COMPARED_ORDERS = ("sigma", "ensemble", "true_error")


def case_of(variant: str) -> str:
    """The case name of new queries against the gallery of h's `variant` ("h no side-info" ->
    "new/h(old) no side-info", "fastfill" -> "new/h(old) fastfill")."""
    if variant == "h":
        return Case.NEW_H_OLD
    return f"{Case.NEW_H_OLD} {variant.removeprefix('h ')}"


def bct_config(variant: str, config: ExperimentConfig) -> ExperimentConfig:
    """The experiment config that trains the BCT model of `variant` (BCT_VARIANTS)."""
    if variant == "BCT (paper)":
        return replace(config, bct=replace(config.bct, alignment_weight=0.0))
    if variant == "BCT + alignment":
        return config
    raise ValueError(f"BCT variant: expected one of {list(BCT_VARIANTS)}, got {variant!r}")


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
    if stage == "bct_paper_model":
        # The paper's BCT is the bct_model stage with its own config (no alignment term).
        return stage_key("bct_model", bct_config("BCT (paper)", config), old_classes)
    return keys[stage]


def cache_fingerprint(dataset: Dataset, config: ExperimentConfig) -> str:
    """The training data a cached stage was trained on: the dataset and its validation split."""
    return f"{dataset.fingerprint()}:{config.validation_fraction}"


class StageCache:
    """Trained models kept in a folder, keyed by everything that determines them (the stage,
    its configs, the run's seed and the training data's fingerprint), so settings that share a
    stage (the same new model, side-info model) train it once. `None` folder: no cache.

    Each entry keeps the seconds its training took (`train_seconds`), so that a study reading
    it still reports what the stage costs: `read_seconds` maps each stage read from the cache to
    that figure (None for an entry written before it was kept)."""

    def __init__(self, folder: Path | None, fingerprint: str, seed: int, device: torch.device):
        self.folder, self.fingerprint, self.seed, self.device = folder, fingerprint, seed, device
        self.read_seconds: dict[str, float | None] = {}

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
            self.read_seconds[stage] = saved.get("train_seconds")
            return prepare_model(model, self.device), [EpochRecord(**r) for r in saved["history"]]
        started = time.perf_counter()
        model, history = train()
        seconds = round(time.perf_counter() - started, 2)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        entry = {
            "config": asdict(model.config),
            "state": state,
            "history": _history(history),
            "train_seconds": seconds,
        }
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
    *,
    orders_to_try: Sequence[str] = EXTRA_ORDERS,
) -> dict[str, Any]:
    """The paper's cases, the baselines and FastFill's curves on one split, query = gallery
    (leave-one-out), with each headline number's paired bootstrap interval over queries.
    `orders_to_try`: which of EXTRA_ORDERS to measure beside random, sigma and true_error.

    new (N, D) the new model's embeddings; others {"old", "bct", "bct (paper)"} (N, old_dim):
    the old model's and the two BCT models' ("bct" is BCT + alignment); transformed
    {variant: (h's gallery (N, D), sigma (N,) or None)} for every variant of H_VARIANTS and
    CLOSED_FORM. Metrics in percent."""
    old = others["old"]
    unseen_mask = torch.isin(labels, torch.tensor(unseen_classes, dtype=labels.dtype))
    variants = [v for v in (*H_VARIANTS, *CLOSED_FORM) if v in transformed]
    galleries = {
        Case.OLD_OLD: (old, old),
        Case.NEW_NEW: (new, new),
        **{case_of(v): (new, transformed[v][0]) for v in variants},
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
    headlines = Headlines(len(labels))
    seen = (~unseen_mask).numpy()
    out: dict[str, Any] = {
        "cases": cases["cases"],
        "cases_unseen_classes": cases["cases_unseen_classes"] or dict.fromkeys(cases["cases"]),
        "cases_seen_classes": cases["cases_seen_classes"],
        "gap_closed": gap_closed(evaluated.cases).as_dict(),
        "gap_closed_no_side_info": gap_closed(
            evaluated.cases, f"{Case.NEW_H_OLD} no side-info"
        ).as_dict(),
        "gap_closed_variants": {
            v: gap_closed(evaluated.cases, case_of(v)).as_dict() for v in variants
        },
    }
    results = evaluated.results
    columns = {
        (case, m): (headlines.top1 if m == "top1" else headlines.ap)(results[case])
        for case in results
        for m in ("top1", "mAP")
    }
    for v in variants:
        for m in ("top1", "mAP"):
            headlines.gap(
                f"gap closed, {v}, {m}",
                columns[(case_of(v), m)],
                columns[(Case.OLD_OLD, m)],
                columns[(Case.NEW_NEW, m)],
            )
    bct = _bct_variants(new, others, transformed["h"][0], labels, unseen_mask, config, evaluated)
    out["bct_variants"] = {name: block["json"] for name, block in bct.items()}
    # Today's table: BCT + alignment under BCT's metric.
    today = out["bct_variants"]["BCT + alignment"][config.bct.metric]
    out["bct_comparison"] = {"metric": config.bct.metric} | {
        k: today[k] for k in ("cases", "cases_unseen_classes", "cases_seen_classes")
    }
    for name, block in bct.items():
        for metric, res in block["results"].items():
            for m in ("top1", "mAP"):
                add = headlines.top1 if m == "top1" else headlines.ap
                for subset, mask in (("seen classes", seen), ("all queries", None)):
                    headlines.delta(
                        f"{name} ({metric}): bct/old - old/old, {subset}, {m}",
                        add(res[Case.BCT_OLD], mask),
                        add(res[Case.OLD_OLD], mask),
                    )
    backfill = backfill_measures(new, labels, transformed, config, backfill_seed, orders_to_try)
    out.update(backfill["json"])
    # Each order's area against the random order's on the same h, and FastFill's own
    # comparison: its h in sigma order against the FCT h in random order.
    for variant, partner in FCT_PARTNER.items():
        area = {o: area_columns(points) for o, points in backfill["results"][variant].items()}
        area["FCT h random"] = area_columns(backfill["results"][partner]["random"])
        for i, m in enumerate(("top1", "mAP")):
            col = {o: headlines.column(a[i], a[2]) for o, a in area.items()}
            for order in (o for o in COMPARED_ORDERS if o in col):
                name = f"{variant}: {order} area - random area, {m}"
                headlines.delta(name, col[order], col["random"])
            name = f"{variant}: sigma area - FCT h random area, {m}"
            headlines.delta(name, col["sigma"], col["FCT h random"])
    out["flips"] = _flips(evaluated, bct, backfill["results"], variants, labels, config, headlines)
    intervals = headlines.compute()
    out["ci95"] = intervals.ci95_as_dicts()
    out["bootstrap"] = intervals.replicates_as_json()
    return out


def _bct_variants(
    new: torch.Tensor,
    others: dict[str, torch.Tensor],
    transformed: torch.Tensor,
    labels: torch.Tensor,
    unseen_mask: torch.Tensor,
    config: ExperimentConfig,
    evaluated: Evaluation,
) -> dict[str, dict[str, Any]]:
    """Both BCT baselines against FCT, every case under each metric of BCT_METRICS: {variant:
    {"json": {metric: {"cases", "cases_seen_classes", "cases_unseen_classes", "criterion"}},
    "results": {metric: {case: RetrievalResult}}}}.

    BCT's criterion (bct/old >= old/old) is checked on the classes the old model saw and on all
    queries, as bct/old - old/old ("criterion"). Under L2 the aligned BCT model's embeddings are
    shorter than the old model's (its alignment term is a regression, which shrinks), so a bct
    query sits closer to every old gallery vector; both metrics are therefore reported, and
    old/old, new/new and new/h(old) are scored under the same metric as bct/old. The cases
    under the run's own metric are reused from `evaluated`."""
    bct_models = {"BCT + alignment": others["bct"], "BCT (paper)": others["bct (paper)"]}
    old = others["old"]
    references = {
        Case.OLD_OLD: (old, old),
        Case.NEW_NEW: (new, new),
        Case.NEW_H_OLD: (new, transformed),
    }
    out: dict[str, dict[str, Any]] = {name: {"json": {}, "results": {}} for name in bct_models}
    for metric in BCT_METRICS:
        galleries = {} if metric == config.metric else dict(references)
        for name, bct in bct_models.items():
            galleries[f"{name} {Case.BCT_OLD}"] = (bct, old)
            galleries[f"{name} {Case.BCT_BCT}"] = (bct, bct)
        scored = evaluate_cases(
            galleries,
            labels,
            unseen_mask=unseen_mask,
            metric=metric,
            chunk_size=config.eval_chunk_size,
        )
        if metric == config.metric:
            for case in references:
                for part in ("cases", "unseen_classes", "seen_classes", "results"):
                    if case in getattr(evaluated, part):
                        getattr(scored, part)[case] = getattr(evaluated, part)[case]
        for name in bct_models:
            keys = {case: case for case in references} | {
                Case.BCT_OLD: f"{name} {Case.BCT_OLD}",
                Case.BCT_BCT: f"{name} {Case.BCT_BCT}",
            }
            block = Evaluation(
                cases={c: scored.cases[k] for c, k in keys.items()},
                unseen_classes={
                    c: scored.unseen_classes[k]
                    for c, k in keys.items()
                    if k in scored.unseen_classes
                },
                seen_classes={
                    c: scored.seen_classes[k] for c, k in keys.items() if k in scored.seen_classes
                },
                results={c: scored.results[k] for c, k in keys.items()},
            )
            as_json = block.as_json()
            criterion = {"all queries": _criterion(block.cases)}
            if block.seen_classes:
                criterion["seen classes"] = _criterion(block.seen_classes)
            out[name]["json"][metric] = {
                "cases": as_json["cases"],
                "cases_unseen_classes": as_json["cases_unseen_classes"]
                or dict.fromkeys(as_json["cases"]),
                "cases_seen_classes": as_json["cases_seen_classes"],
                "criterion": criterion,
            }
            out[name]["results"][metric] = block.results
    return out


def _criterion(cases: dict[str, Any]) -> dict[str, float]:
    """BCT's criterion as margins: bct/old - old/old, top-1 and mAP (>= 0: it holds)."""
    return {
        m: getattr(cases[Case.BCT_OLD], m) - getattr(cases[Case.OLD_OLD], m)
        for m in ("top1", "mAP")
    }


def backfill_measures(
    new: torch.Tensor,
    labels: torch.Tensor,
    transformed: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    config: ExperimentConfig,
    backfill_seed: int,
    orders_to_try: Sequence[str] = EXTRA_ORDERS,
) -> dict[str, Any]:
    """FastFill's curves for each FastFill h (orders random, sigma, true_error and those of
    `orders_to_try`, from EXTRA_ORDERS) and the FCT h's curve in random order (the same
    permutation: FastFill's own baseline), with their areas, each curve's largest fall and
    sigma's diagnostics (the ensemble's correlation too: it costs no curve). {"json": the run's
    keys, "results": {variant: {order: per-point RetrievalResults}}}."""
    fractions = [i / (config.backfill_points - 1) for i in range(config.backfill_points)]
    curves: dict[str, dict[str, Any]] = {}
    falls: dict[str, dict[str, Any]] = {}
    diagnostics: dict[str, Any] = {}
    results: dict[str, dict[str, list[RetrievalResult]]] = {}
    areas: dict[str, dict[str, dict[str, float]]] = {}
    n = len(labels)

    def measured(gallery: torch.Tensor, orders: dict[str, torch.Tensor]):
        found = backfill_results(
            new,
            labels,
            gallery,
            new,
            labels,
            orders,
            fractions,
            leave_one_out=True,
            metric=config.metric,
        )
        return found, {o: BackfillCurve.from_results(fractions, pts) for o, pts in found.items()}

    for variant, partner in FCT_PARTNER.items():
        gallery_h, sigma = transformed[variant]
        fct_h = transformed[partner][0]
        error = (gallery_h - new).pow(2).sum(1)
        # The two h's disagreement: most uncertain (largest) first, as sigma.
        disagreement = (gallery_h - fct_h).pow(2).sum(1)
        # FastFill's three orders as fct_ml.backfill.backfill_study builds them (so the curves
        # are backfill_summary's), then the orders tried, ranked in the same pass.
        random = backfill_order("random", n, generator=torch.Generator().manual_seed(backfill_seed))
        orders = {
            "random": random,
            "sigma": backfill_order("sigma", n, sigma=sigma),
            "true_error": backfill_order("true_error", n, error=error),
        }
        if "ensemble" in orders_to_try:
            orders["ensemble"] = torch.argsort(disagreement, descending=True, stable=True)
        results[variant], found = measured(gallery_h, orders)
        # The FCT h in random order: the permutation FastFill's random order used.
        results[partner], fct = measured(fct_h, {"random": random})
        for name, by_order in ((variant, found), (partner, fct)):
            curves[name] = {o: c.as_dict() for o, c in by_order.items()}
            areas[name] = {o: c.area().as_dict() for o, c in by_order.items()}
            falls[name] = {o: c.largest_fall() for o, c in by_order.items()}
        diagnostics[variant] = {
            "error": error_spread(error.numpy()),
            "spearman_with_error": {
                "sigma": spearman(sigma.numpy(), error.numpy()),
                "ensemble": spearman(disagreement.numpy(), error.numpy()),
            },
        }
    return {
        "json": {
            "backfill_curves": curves,
            "backfill_auc": areas["fastfill"],
            "backfill_auc_no_side_info": areas["fastfill no side-info"],
            "backfill_auc_fct_random": {p: areas[p]["random"] for p in FCT_PARTNER.values()},
            "backfill_largest_fall": falls,
            "sigma_diagnostics": diagnostics,
        },
        "results": results,
    }


def _flips(
    evaluated: Evaluation,
    bct: dict[str, dict[str, Any]],
    backfill: dict[str, dict[str, list[RetrievalResult]]],
    variants: Sequence[str],
    labels: torch.Tensor,
    config: ExperimentConfig,
    headlines: Headlines,
) -> dict[str, Any]:
    """Negative flips against old/old (the system users had before the upgrade), fct_ml.flips:
    for every h variant, the full backfill (new/new) and both BCT models under both metrics,
    each scored under one metric with its own old/old; and the NFR at each point of every
    backfilling curve. Each system's NFR is also a headline number ("NFR, <system>")."""
    y = labels.numpy()
    served = evaluated.results[Case.OLD_OLD]
    systems: dict[str, tuple[RetrievalResult, RetrievalResult, str]] = {
        case_of(v): (served, evaluated.results[case_of(v)], config.metric) for v in variants
    }
    systems[Case.NEW_NEW] = (served, evaluated.results[Case.NEW_NEW], config.metric)
    for name, block in bct.items():
        for metric, res in block["results"].items():
            systems[f"{name} {Case.BCT_OLD} ({metric})"] = (
                res[Case.OLD_OLD],
                res[Case.BCT_OLD],
                metric,
            )
    out: dict[str, Any] = {"served": Case.OLD_OLD, "systems": {}, "backfill": {}}
    for name, (s, p, metric) in systems.items():
        found = flips(query_outcomes(s, p, y))
        out["systems"][name] = {
            "metric": metric,
            **found.all.as_dict(),
            "ci95": {k: i.as_dict() for k, i in found.ci95.items()},
            "regressing_classes": found.regressing_classes(),
        }
        headlines.mean(f"NFR, {name}", headlines.column(*negative_flip_column(s, p)))
    for variant, orders in backfill.items():
        out["backfill"][variant] = {
            order: [flip_counts(query_outcomes(served, p, y)).nfr for p in points]
            for order, points in orders.items()
        }
    return out


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
    """Train the old, side-info, new and both BCT models (the paper's and BCT + alignment), four
    learned transformations and three closed-form ones (fct_ml.pipeline); evaluate the paper's
    cases, query/gallery (also restricted to queries of classes the old model saw and never
    saw), the baselines, the backfilling curves, the negative flips and the headline numbers'
    bootstrap intervals on the test set, and the same on the validation split ("validation").
    Returns the `fct reproduce` JSON (metrics in percent). With `cache_dir`, trained models are
    reused when their stage's configs, seed and data match. `evaluate` scores each split, the
    test split first (default evaluate_split, whose arguments it takes; a wrapper of it can
    record the embeddings each split is scored on)."""
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
    bct_models: dict[str, EmbeddingModel] = {}
    for variant, stage in BCT_VARIANTS.items():
        # Both from the "bct" stage seed: the same start and the same batches, so the two
        # differ only by the alignment term.
        with timed(stage):
            bct_models[variant] = trained(
                stage,
                cache(
                    stage,
                    stage_key(stage, config, old_classes),
                    lambda variant=variant, stage=stage: pipeline.train_bct(
                        dataset,
                        old_model,
                        old_classes,
                        bct_config(variant, config),
                        run,
                        on_epoch=epochs(stage, config.new_train.epochs),
                    ),
                ),
            )

    with timed("features"):
        features = pipeline.training_features(
            dataset, old_model, side_model, new_model, config, run
        )
        models = {
            "old": old_model,
            "side": side_model,
            "new": new_model,
            "bct": bct_models["BCT + alignment"],
            "bct (paper)": bct_models["BCT (paper)"],
        }
        splits = {"test": dataset.test, "validation": val}
        emb = {
            split: {k: pipeline.embed(m, images.images, config) for k, m in models.items()}
            for split, images in splits.items()
        }

    transformed: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = {
        split: {} for split in splits
    }
    h_kinds = {name: ("mlp", side, unc) for name, (side, unc) in H_VARIANTS.items()} | {
        name: (kind, side, False) for name, (kind, side) in CLOSED_FORM.items()
    }
    for name, (kind, side_info, uncertainty) in h_kinds.items():
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
                    kind=kind,
                ),
            )
            for split, e in emb.items():
                transformed[split][name] = apply_transformation(h, e["old"], e["side"])

    results = {}
    for split, images in splits.items():
        with timed(f"evaluation ({split})"):
            results[split] = evaluate(
                emb[split]["new"],
                {k: emb[split][k] for k in ("old", "bct", "bct (paper)")},
                transformed[split],
                images.labels,
                unseen_classes,
                config,
                run.seed_of("backfill"),
                orders_to_try=EXTRA_ORDERS if split in TRY_ORDERS_ON else (),
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
        # The stages read from the stage cache, with the seconds their training took when the
        # entry was written (None: an entry older than that record): what the run would have
        # spent training them (benchmarks/studies/reproduce.py charges them to its wall time).
        "cached_train_seconds": dict(cache.read_seconds),
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
        # Each BCT model's own config ("config" holds BCT + alignment's): what each one ran with.
        "bct_configs": {name: asdict(bct_config(name, config).bct) for name in BCT_VARIANTS},
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
    for name, by_metric in result.get("bct_variants", {}).items():
        for metric, block in by_metric.items():
            parts = ", ".join(
                f"{subset} {c['top1']:+.2f}/{c['mAP']:+.2f}"
                for subset, c in block["criterion"].items()
            )
            lines.append(
                f"{name} ({metric}): bct/old - old/old (top-1/mAP; BCT's criterion: >= 0): {parts}"
            )
    g, g0 = result["gap_closed"], result["gap_closed_no_side_info"]
    lines.append(
        f"gap closed by new/h(old): top-1 {g['top1']:.1f}%, mAP {g['mAP']:.1f}%"
        f"  (no side-info: top-1 {g0['top1']:.1f}%, mAP {g0['mAP']:.1f}%)"
    )
    for variant, gv in result.get("gap_closed_variants", {}).items():
        lines.append(f"  h {variant}: top-1 {gv['top1']:.1f}%, mAP {gv['mAP']:.1f}%")
    for key, title in (
        ("backfill_auc", "with side-info"),
        ("backfill_auc_no_side_info", "no side-info"),
    ):
        parts = ", ".join(f"{o} {v['top1']:.1f}/{v['mAP']:.1f}" for o, v in result[key].items())
        lines.append(f"backfilling area, FastFill h {title} (top-1/mAP): {parts}")
    for variant, v in result.get("backfill_auc_fct_random", {}).items():
        lines.append(
            f"backfilling area, FCT h ({variant}) in random order (top-1/mAP):"
            f" {v['top1']:.1f}/{v['mAP']:.1f}"
        )
    systems = result.get("flips", {}).get("systems", {})
    if systems:
        lines.append("negative flips against old/old (NFR %, relative NFR):")
        for name, f in systems.items():
            rel = "-" if f["relative_nfr"] is None else f"{f['relative_nfr']:.2f}"
            lines.append(f"  {name}: {f['nfr']:.2f}, {rel}")
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
