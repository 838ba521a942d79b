"""The chain experiment: two upgrades in a row, old -> v2 -> v3, with the stages of
fct_ml.pipeline.

    old model   classes A (the dataset's default old classes)         trained once
    side-info   SimCLR on the images of classes A                      stored once, kept forever
    v2 model    classes B = A + `v2_extra` (more classes)              first upgrade
    v3 model    every class                                             second upgrade

    h2:  (old, side-info) -> v2                       applied to the stored old vectors
    h3:  (v2, side-info)  -> v3   chained             applied to h2's output (what gallery_v2 holds)
    h3 direct: (old, side-info) -> v3                 for comparison (one h per source space)
    the same chain without side-info                  (h2 and h3 read their input vector alone)

Each h trains on the training items' features by the models it maps between (the frozen
models' own vectors, not h2's outputs): that is what the product does (an h is trained when
its version is made, from the deployed model's checkpoint), and what lets the chain drift,
which is what side-info, stored once, is there to limit.

Evaluation in the final space (v3): query set = gallery, leave-one-out, L2, on the validation
split (where the choices are made) and on the test split (reported). Cases: old/old, v3/v3
(new/new), v3/h3(h2(old)) with and without side-info, v3/h3direct(old); gap closed = share of
the old/old -> v3/v3 gap, in percent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from fct_ml.backfill import apply_transformation
from fct_ml.data import Dataset, ImageSet
from fct_ml.evaluation import Case, CaseMetrics, GapClosed, evaluate_cases, gap_closed
from fct_ml.pipeline import (
    Run,
    embed,
    old_class_tuple,
    train_h,
    train_new_model,
    train_old_model,
    train_side_info,
    training_features,
    validation_split,
)
from fct_ml.presets import ExperimentConfig

CASES = (Case.OLD_OLD, Case.NEW_NEW, "chained", "chained_no_side_info", "direct")
# The v2 model's seed is the run's seed shifted: it trains with pipeline's old-model stage (a
# class subset, labels remapped), whose stage seed would otherwise equal the old model's.
V2_SEED_SHIFT = 500


@dataclass(frozen=True)
class ChainResult:
    """One seed: metrics (percent) per case on the validation and test splits, gap closed."""

    seed: int
    old_classes: tuple[int, ...]
    v2_classes: tuple[int, ...]
    validation: dict[str, CaseMetrics]
    test: dict[str, CaseMetrics]
    gap_closed_validation: dict[str, GapClosed]
    gap_closed_test: dict[str, GapClosed]
    timings_s: dict[str, float]


def _gaps(cases: dict[str, CaseMetrics]) -> dict[str, GapClosed]:
    return {
        f"gap_closed_{name}": gap_closed(cases, name)
        for name in ("chained", "chained_no_side_info", "direct")
    }


def run_chain(
    data: Dataset,
    old_classes: Sequence[int],
    v2_extra: Sequence[int],
    config: ExperimentConfig,
    seed: int,
    *,
    device: torch.device = torch.device("cpu"),
    log: Callable[[str], None] = print,
) -> ChainResult:
    """old -> v2 -> v3 on `data` for one seed (see the module docstring)."""
    old_classes = old_class_tuple(old_classes)
    v2_classes = old_class_tuple([*old_classes, *v2_extra])
    run = Run(seed=seed, device=device)
    timings: dict[str, float] = {}

    def stage(name: str, fn):
        started = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - started, 1)
        log(f"chain seed {seed}: {name} {timings[name]:.0f} s")
        return out

    # The v2 model uses the new model's architecture on its class subset.
    v2_config = replace(config, old_model=config.new_model, old_train=config.new_train)
    old, _ = stage("old model", lambda: train_old_model(data, old_classes, config, run))
    side, _ = stage("side-info model", lambda: train_side_info(data, old_classes, config, run))
    v2, _ = stage(
        "v2 model",
        lambda: train_old_model(
            data, v2_classes, v2_config, Run(seed=seed + V2_SEED_SHIFT, device=device)
        ),
    )
    v3, _ = stage("v3 model", lambda: train_new_model(data, config, run))

    def h(source, target, side_info: bool, name: str):
        features = training_features(data, source, side, target, config, run)
        model, _ = train_h(features, target, config, run, side_info=side_info, uncertainty=False)
        return model.eval()

    h2 = stage("h2 old->v2", lambda: h(old, v2, True, "h2"))
    h3 = stage("h3 v2->v3", lambda: h(v2, v3, True, "h3"))
    h2_plain = stage("h2 no side-info", lambda: h(old, v2, False, "h2_plain"))
    h3_plain = stage("h3 no side-info", lambda: h(v2, v3, False, "h3_plain"))
    h_direct = stage("h direct old->v3", lambda: h(old, v3, True, "h_direct"))

    def cases_on(images: ImageSet) -> dict[str, CaseMetrics]:
        models = [m.to(device) for m in (old, side, v3)]
        f_old, f_side, f_v3 = (embed(m, images.images, config) for m in models)
        hs = [m.to(device) for m in (h2, h3, h2_plain, h3_plain, h_direct)]
        chained = apply_transformation(hs[1], apply_transformation(hs[0], f_old, f_side)[0], f_side)
        plain = apply_transformation(hs[3], apply_transformation(hs[2], f_old, None)[0], None)
        direct = apply_transformation(hs[4], f_old, f_side)
        result = evaluate_cases(
            {
                Case.OLD_OLD: (f_old, f_old),
                Case.NEW_NEW: (f_v3, f_v3),
                "chained": (f_v3, chained[0]),
                "chained_no_side_info": (f_v3, plain[0]),
                "direct": (f_v3, direct[0]),
            },
            images.labels,
            metric=config.metric,
            chunk_size=config.eval_chunk_size,
        )
        return result.cases

    validation = stage("evaluation (validation)", lambda: cases_on(validation_split(data, config)))
    test = stage("evaluation (test)", lambda: cases_on(data.test))
    return ChainResult(
        seed=seed,
        old_classes=old_classes,
        v2_classes=v2_classes,
        validation=validation,
        test=test,
        gap_closed_validation=_gaps(validation),
        gap_closed_test=_gaps(test),
        timings_s=timings,
    )
