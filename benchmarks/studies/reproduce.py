"""Reproduce the paper's experiment over several seeds and settings; write the committed results.

    python benchmarks/studies/reproduce.py --dataset fashion-mnist --presets cpu cpu-hard --seeds 0 1 2 \
        --untuned-splits 0,2,4,6,8 0-4

Each (seed, setting) runs `fct reproduce` in its own process (wall time measured around it);
settings share trained stages through `--cache-dir`. Then each of `--untuned-splits` (other
classes for the old model) runs once, `--untuned-preset` (cpu), seed `--untuned-seed` (0),
nothing re-tuned for it. Writes benchmarks/results/reproduce_<dataset>.json ({"runs",
"settings": {setting: {"mean", "std", "headlines", "verdicts", "targets", ...}}, "untuned_splits",
"claims", ...}; each run carries its "setting", its "validation" metrics and, for its headline
numbers, a paired bootstrap interval over queries ("ci95")) and a markdown table per setting
with the papers' numbers beside ours, and prints it.

Uncertainty. Every seed is scored on the same test set, so the seed spread leaves out which
queries were drawn. Each headline number also gets the 95 % interval of its mean over seeds
from the runs' bootstrap resamples (fct_ml.headline: the same 1,000 query resamples in every
run and for every case compared). A target is "met" only when that interval clears its goal,
"within noise" when the goal lies inside it, "missed" otherwise; a comparison of two backfill
orders is "better" or "worse" only when its mean exceeds its seed spread and its interval
excludes 0, "within its spread" otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402
from fct_ml.evaluation import largest_fall  # noqa: E402
from fct_ml.headline import interval_of_mean  # noqa: E402
from fct_ml.reproduce import dumps  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
AGGREGATED = (
    "cases",
    "cases_unseen_classes",
    "cases_seen_classes",
    "backfill_auc",
    "backfill_auc_no_side_info",
    "backfill_auc_fct_random",
    "backfill_largest_fall",
    "gap_closed",
    "gap_closed_no_side_info",
    "gap_closed_variants",
    "bct_comparison",
    "bct_variants",
    "sigma_diagnostics",
    "flips",
)
# The h the product deploys is FastFill's (with side-info); its curves carry the backfill targets.
DEPLOYED = "fastfill"

# Theirs, not ours: one source, the apple/ml-fct README as it stands since FastFill was added
# (the FCT and FastFill tables of its "CIFAR-100 Experiments" and "ImageNet-1k Experiments"
# sections; ResNet-50-128, single runs). Each row: (case, side-info, backfilling order, top-1,
# top-5, mAP) in percent. FCT rows are plain retrieval; FastFill rows are areas under the
# backfilling curve (AUC), whose old/old and new/new rows are the curve's two ends.
PAPER_SOURCE = "apple/ml-fct README (FCT and FastFill tables; ResNet-50-128, single runs)"
PAPER_FCT = {
    "CIFAR-100": [
        ("old/old", "n/a", "none", 34.2, 60.6, 16.5),
        ("new/new", "n/a", "none", 56.5, 77.0, 36.3),
        ("FCT new/h(old)", "no", "none", 47.2, 72.6, 25.8),
        ("FCT new/h(old)", "yes", "none", 50.2, 73.7, 32.2),
    ],
    "ImageNet-1k": [
        ("old/old", "n/a", "none", 46.4, 65.1, 28.3),
        ("new/new", "n/a", "none", 68.4, 84.7, 45.6),
        ("FCT new/h(old)", "no", "none", 61.8, 80.5, 39.9),
        ("FCT new/h(old)", "yes", "none", 65.1, 82.7, 44.0),
    ],
}
PAPER_FASTFILL_AUC = {
    "CIFAR-100": [
        ("old/old", "n/a", "n/a", 34.2, 60.6, 16.5),
        ("new/new", "n/a", "n/a", 56.5, 77.0, 36.3),
        ("FCT new/h(old)", "no", "random", 49.1, 73.6, 29.1),
        ("FastFill new/h(old)", "no", "uncertainty (σ)", 53.6, 75.3, 32.5),
    ],
    "ImageNet-1k": [
        ("old/old", "n/a", "n/a", 46.6, 65.2, 28.5),
        ("new/new", "n/a", "n/a", 68.2, 84.6, 45.3),
        ("FCT new/h(old)", "no", "random", 62.8, 81.1, 40.5),
        ("FastFill new/h(old)", "no", "uncertainty (σ)", 66.5, 83.6, 44.8),
        ("FCT new/h(old)", "yes", "random", 64.7, 82.4, 42.6),
        ("FastFill new/h(old)", "yes", "uncertainty (σ)", 67.8, 84.2, 46.2),
    ],
}


def paper_gap_closed(dataset: str, metric: int) -> float:
    """Their FCT h with side-info: share of the old/old → new/new gap closed, in percent.

    metric indexes (top-1, top-5, mAP) as 0, 1, 2; computed from PAPER_FCT, not quoted."""
    rows = {(case, side): vals for case, side, _, *vals in PAPER_FCT[dataset]}
    old, new = rows[("old/old", "n/a")][metric], rows[("new/new", "n/a")][metric]
    h = rows[("FCT new/h(old)", "yes")][metric]
    return 100.0 * (h - old) / (new - old)


# The issue's targets per setting: gap closed by new/h(old) with side-info, in percent, for the
# deployed h (FastFill's) and for the paper's h.
GAP_TARGETS = {"cpu": {"top1": 85.0, "mAP": 90.0}, "cpu-hard": {"mAP": 75.0}}
# The h variants whose gap closed is a target, and how the tables name them.
GAP_VARIANTS = {
    "fastfill": "FastFill h with side-info (deployed)",
    "h": "FCT h with side-info",
}
METRICS = ("top1", "mAP")
METRIC_NAMES = {"top1": "top-1", "mAP": "mAP"}
# The other class splits `make reproduce-benchmark` runs once each, nothing re-tuned.
UNTUNED_SPLITS = ("0,2,4,6,8", "0-4")
# Per-run keys that are not numbers to average over seeds.
NOT_AVERAGED = {"regressing_classes", "ci95", "bootstrap"}


def _walk(runs: list[Any], fn) -> Any:
    """Apply fn to the list of leaf values found at the same place in each run (keys of
    NOT_AVERAGED are left out)."""
    first = runs[0]
    if isinstance(first, dict):
        return {
            k: _walk([r.get(k) for r in runs], fn)
            for k in first
            if k not in NOT_AVERAGED and all(isinstance(r, dict) and k in r for r in runs)
        }
    if isinstance(first, list):
        if any(not isinstance(r, list) or len(r) != len(first) for r in runs):
            return None
        return [_walk([r[i] for r in runs], fn) for i in range(len(first))]
    if first is None or any(r is None for r in runs):
        return None
    if isinstance(first, str):  # a label such as bct_comparison's "metric": kept if all agree
        return first if all(r == first for r in runs) else None
    return fn([float(r) for r in runs])


def _std(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and sample std over runs of the test metrics, the curves and the validation ones."""
    keys = [k for k in (*AGGREGATED, "backfill_curves") if all(k in r for r in runs)]
    mean = {k: _walk([r[k] for r in runs], statistics.fmean) for k in keys}
    std = {k: _walk([r[k] for r in runs], _std) for k in keys}
    if all("validation" in r for r in runs):
        vk = [
            k for k in (*AGGREGATED, "backfill_curves") if all(k in r["validation"] for r in runs)
        ]
        mean["validation"] = {
            k: _walk([r["validation"][k] for r in runs], statistics.fmean) for k in vk
        }
        std["validation"] = {k: _walk([r["validation"][k] for r in runs], _std) for k in vk}
    return mean, std


def _split_of(run: dict[str, Any], split: str) -> dict[str, Any]:
    return run if split == "test" else run.get("validation", {})


def headlines(runs: list[dict[str, Any]], split: str = "test") -> dict[str, dict[str, Any]]:
    """Each headline number of the runs' `split`: {name: {"mean", "std" (sample, over seeds),
    "seeds" (each run's value), "ci95": [low, high] (the mean's paired bootstrap interval over
    queries, fct_ml.headline.interval_of_mean)}}. Numbers some run lacks are left out; runs
    without bootstrap resamples give intervals of None."""
    parts = [_split_of(r, split) for r in runs]
    if not parts or any("ci95" not in p for p in parts):
        return {}
    boots = [p.get("bootstrap") for p in parts]
    drawn = all(b is not None for b in boots)
    if drawn:
        first = boots[0]
        for b, run in zip(boots, runs, strict=True):
            for key in ("queries", "resamples", "seed", "level"):
                if b[key] != first[key]:
                    raise SystemExit(
                        f"{run.get('setting')} seed {run.get('seed')}: its {split} bootstrap has"
                        f" {key} {b[key]}, another run {first[key]}; the seeds' resamples must"
                        " be the same to average them"
                    )
    out: dict[str, dict[str, Any]] = {}
    for name in parts[0]["ci95"]:
        if any(name not in p["ci95"] for p in parts):
            continue
        values = [p["ci95"][name]["estimate"] for p in parts]
        if any(v is None for v in values):
            continue
        entry: dict[str, Any] = {
            "mean": statistics.fmean(values),
            "std": _std(values),
            "seeds": values,
            "ci95": None,
        }
        if drawn and all(name in b["values"] for b in boots):
            interval = interval_of_mean(
                values, [b["values"][name] for b in boots], level=boots[0]["level"]
            )
            entry["ci95"] = [interval.low, interval.high]
        out[name] = entry
    return out


def status(op: str, goal: float, value: float, ci95: list[float] | None) -> str:
    """ "met", "within noise" or "missed" for the target `value op goal` (op ">=", ">", "<" or
    "<="): with an interval, met only when the whole interval satisfies it, missed when none
    of it does, within noise when the goal lies inside it; without one, by the value."""
    holds = {
        ">=": lambda v: v >= goal,
        ">": lambda v: v > goal,
        "<": lambda v: v < goal,
        "<=": lambda v: v <= goal,
    }[op]
    if ci95 is None or any(v is None or not math.isfinite(v) for v in ci95):
        return "met" if holds(value) else "missed"
    low, high = ci95
    if holds(low) and holds(high):
        return "met"
    if not holds(low) and not holds(high):
        return "missed"
    return "within noise"


def verdict(delta: float, spread: float, ci95: list[float] | None) -> str:
    """One order against another: "better" when the mean difference exceeds its seed spread
    and its interval lies above 0, "worse" when it is below minus the spread and its interval
    lies below 0, "within its spread" otherwise (either test alone when the other is missing)."""
    low, high = ci95 if ci95 is not None else (-math.inf, math.inf)
    if delta > spread and (ci95 is None or low > 0):
        return "better"
    if delta < -spread and (ci95 is None or high < 0):
        return "worse"
    return "within its spread"


def order_verdicts(heads: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every comparison of backfilling orders (fct_ml.reproduce's "<h>: <order> area - random
    area" and FastFill's own, "<h>: sigma area - FCT h random area"), on each split, with its
    verdict (`verdict`, spread = the sample std over seeds of the difference)."""
    out = []
    for split, numbers in heads.items():
        for name, h in numbers.items():
            if " area - " not in name:
                continue
            comparison, metric = name.rsplit(", ", 1)
            out.append(
                {
                    "split": split,
                    "comparison": comparison,
                    "metric": metric,
                    "delta": h["mean"],
                    "spread": h["std"],
                    "ci95": h["ci95"],
                    "verdict": verdict(h["mean"], h["std"], h["ci95"]),
                }
            )
    return out


def cached_stages(run: dict[str, Any]) -> list[str]:
    """The training stages a run read from the stage cache and whose training time it has not
    yet been charged. A run records what it read itself (`cached_train_seconds` names every
    stage read, its value None where the cache kept no time); only runs written before that
    record are judged by their timing (well under a second), which a tiny preset's real
    training can also be."""
    training = ("old_model", "side_info_model", "new_model", "bct_model", "bct_paper_model")
    if "cached_train_seconds" in run:
        charged = run.get("charged_from", {})
        return [s for s in training if s in run["cached_train_seconds"] and s not in charged]
    return [s for s in training if s in run.get("timings_s", {}) and run["timings_s"][s] < 0.5]


def charge_cached_stages(run: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    """Give each stage `run` read from the stage cache the training time it took, and add it to
    the run's wall time, so that a study reusing cached models reports the time of training
    every stage. The time is the cache entry's own record (`cached_train_seconds`, written with
    the model), else that of the earlier run that trained it (the same model digest: the very
    weights)."""
    for stage in cached_stages(run):
        recorded = run.get("cached_train_seconds", {}).get(stage)
        if recorded is not None:
            run["wall_s"] = round(run["wall_s"] - run["timings_s"][stage] + recorded, 1)
            run["timings_s"][stage] = recorded
            run.setdefault("charged_from", {})[stage] = f"the stage cache's record: {recorded} s"
            continue
        digest = run.get("model_digests", {}).get(stage, "")
        trained = next(
            (
                e
                for e in earlier
                if e["model_digests"].get(stage) == digest and stage not in cached_stages(e)
            ),
            None,
        )
        if trained is None and not earlier:
            # Nothing says what it cost: the wall time leaves it out, and the run says so.
            run.setdefault("uncharged_stages", []).append(stage)
            continue
        if trained is None:
            raise SystemExit(
                f"--stage-times-from: no run trained {stage} of {run['setting']} seed"
                f" {run['seed']} (digest {digest[:12]})"
            )
        seconds = trained["timings_s"][stage]
        run["wall_s"] = round(run["wall_s"] - run["timings_s"][stage] + seconds, 1)
        run["timings_s"][stage] = seconds
        run.setdefault("charged_from", {})[stage] = (
            f"{trained['setting']}_seed{trained['seed']}: {seconds} s"
        )


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, digits)


def check_targets(
    setting: str,
    runs: list[dict[str, Any]],
    mean: dict[str, Any],
    std: dict[str, Any],
    wall: list[float],
    heads: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The issue's targets for one setting, each with the measured value (mean over seeds), the
    95 % interval of that mean where it is a headline number, the worst seed, and its status
    ("met", "within noise", "missed"; `status`), or "reported" for a row with no goal (its
    verdict then in "goal"). `heads`: `headlines(runs)` (test split)."""
    heads = heads if heads is not None else headlines(runs)
    targets = []

    def add(
        name: str,
        value: float,
        goal: str,
        state: str,
        ci95: list[float] | None = None,
        worst: float | None = None,
    ) -> None:
        targets.append(
            {
                "target": name,
                "measured": _round(value),
                "goal": goal,
                "status": state,
                "met": state == "met",
                "ci95": None if ci95 is None else [_round(v) for v in ci95],
                "worst_seed": _round(worst),
            }
        )

    def headline(name: str) -> dict[str, Any] | None:
        return heads.get(name)

    def goal_row(name: str, number: str, op: str, goal: float, worst_of=min) -> None:
        h = headline(number)
        if h is None:
            return
        add(
            name,
            h["mean"],
            f"{op} {goal:g}",
            status(op, goal, h["mean"], h["ci95"]),
            h["ci95"],
            worst_of(h["seeds"]),
        )

    for variant, label in GAP_VARIANTS.items():
        for metric, goal in GAP_TARGETS.get(setting, {}).items():
            goal_row(
                f"gap closed by new/h(old), {label}, {METRIC_NAMES[metric]} (%)",
                f"gap closed, {variant}, {metric}",
                ">=",
                goal,
            )
    hard = "hard" in setting  # the harder setting's own targets
    if hard:
        goal_row(
            "harder: gap closed without side-info, FCT h, mAP (%)",
            "gap closed, h no side-info, mAP",
            "<",
            80.0,
            worst_of=max,
        )
    # BCT's criterion, bct/old - old/old >= 0, for both variants, both metrics, on the classes
    # the old model saw and on every query.
    for name in runs[0].get("bct_variants", {}):
        for metric in runs[0]["bct_variants"][name]:
            for subset in ("seen classes", "all queries"):
                for m in METRICS:
                    goal_row(
                        f"{name} ({metric}): bct/old - old/old, {subset}, {METRIC_NAMES[m]}",
                        f"{name} ({metric}): bct/old - old/old, {subset}, {m}",
                        ">=",
                        0.0,
                    )
    for name, by_metric in mean.get("bct_variants", {}).items():
        cases = by_metric[runs[0]["config"]["bct"]["metric"]]["cases"]
        metric = runs[0]["config"]["bct"]["metric"]
        price = cases["bct/bct"]["mAP"] - cases["new/new"]["mAP"]
        add(
            f"{name}'s price: bct/bct - new/new, mAP ({metric})",
            price,
            "< 0",
            status("<", 0.0, price, None),
        )
        lead = cases["new/h(old)"]["mAP"] - cases["bct/old"]["mAP"]
        add(
            f"new/h(old) - {name} bct/old, mAP ({metric})",
            lead,
            ">= 10",
            status(">=", 10.0, lead, None),
        )
    unseen, unseen_std = mean["cases_unseen_classes"], std["cases_unseen_classes"]
    margin = unseen["new/h(old)"]["mAP"] - unseen["new/h(old) no side-info"]["mAP"]
    spread = max(unseen_std["new/h(old)"]["mAP"], unseen_std["new/h(old) no side-info"]["mAP"])
    add(
        "side-info gain, FCT h, unseen-class mAP",
        margin,
        f"> 2 x seed spread ({2 * spread:.2f})",
        status(">", 2 * spread, margin, None),
    )
    # Monotonicity: the largest fall of each curve from its running maximum (any fall after
    # a rise, or from the start), of the mean curve, against the seed spread of its points.
    curves, curves_std = mean["backfill_curves"][DEPLOYED], std["backfill_curves"][DEPLOYED]
    for metric in METRICS:
        worst, tol, worst_order = -1.0, 0.0, ""
        for order, c in curves.items():
            fall = largest_fall(c[metric])
            if fall > worst:
                worst, tol, worst_order = fall, max(curves_std[order][metric]), order
        seeds = [
            max(largest_fall(c[metric]) for c in r["backfill_curves"][DEPLOYED].values())
            for r in runs
        ]
        add(
            f"backfill ({DEPLOYED} h): largest fall of a mean curve from its running maximum,"
            f" {METRIC_NAMES[metric]}, worst order ({worst_order})",
            worst,
            f"<= seed spread ({tol:.2f})",
            status("<=", tol, worst, None),
            worst=max(seeds),
        )
    # sigma against random, and FastFill's own comparison, on the deployed h: reported with
    # their verdict; the harder setting's target asks sigma to win by more than its spread.
    for comparison in ("sigma area - random area", "sigma area - FCT h random area"):
        for metric in METRICS:
            h = headline(f"{DEPLOYED}: {comparison}, {metric}")
            if h is None:
                continue
            v = verdict(h["mean"], h["std"], h["ci95"])
            if hard and comparison == "sigma area - random area":
                state = {"better": "met", "worse": "missed"}.get(v, "within noise")
                goal = f"> 0 by more than its spread ({h['std']:.2f})"
            else:
                state, goal = "reported", f"(reported; verdict: {v})"
            add(
                f"{DEPLOYED} h: {comparison}, {METRIC_NAMES[metric]}",
                h["mean"],
                goal,
                state,
                h["ci95"],
                min(h["seeds"]),
            )
    cached = sorted({s for r in runs for s in cached_stages(r)})
    charged = sorted({s for r in runs for s in r.get("charged_from", {})})
    if cached:
        how = f"all of the seed's runs: this setting reused {', '.join(cached)}"
    elif charged:
        how = (
            f"its own run, with {', '.join(charged)} from the stage cache charged the training"
            " time measured where they were trained"
        )
    else:
        how = "its own runs, every stage trained"
    minutes = max(wall) / 60
    if hard:  # the issue's time target is the `cpu` setting's; this one's time is shown
        add(f"slowest seed, wall minutes ({how})", minutes, "(reported)", "reported")
    elif cached:  # a stage's training time is unknown: the wall time leaves it out
        add(f"slowest seed, wall minutes ({how})", minutes, "<= 25", "not measured")
    else:
        add(
            f"slowest seed, wall minutes ({how})", minutes, "<= 25", status("<=", 25, minutes, None)
        )
    return targets


def _cell(m: dict[str, float] | None, s: dict[str, float] | None, k: str) -> str:
    if m is None or s is None or m.get(k) is None or s.get(k) is None:
        return "–"
    return f"{m[k]:.1f} ± {s[k]:.1f}"


def _ci(h: dict[str, Any] | None, digits: int = 2) -> str:
    """A headline number as "mean ± seed std [low, high]"."""
    if h is None:
        return "–"
    ci = h["ci95"]
    interval = "" if ci is None else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{h['mean']:.{digits}f} ± {h['std']:.{digits}f}{interval}"


def _setting_markdown(setting: str, block: dict[str, Any]) -> list[str]:
    mean, std, runs = block["mean"], block["std"], block["runs"]
    heads = block.get("headlines", {}).get("test", {})
    lines = [
        f"## Setting `{setting}`: old classes {runs[0]['old_classes']}, seeds"
        f" {[r['seed'] for r in runs]}",
        "",
        "Test set as query and gallery (leave-one-out); the validation columns are the same"
        " metrics on the validation split (carved from the training set; every choice was made"
        f" there). Metric: {runs[0]['config']['metric']}. `new/h(old) linear …` and"
        " `… procrustes …` are the closed-form maps (ridge regression and orthogonal Procrustes"
        " with scale, fitted on h's training features).",
        "",
        "| case (query/gallery) | top-1 | top-5 | mAP | seen-class top-1 | seen-class mAP |"
        " unseen-class top-1 | unseen-class mAP | validation top-1 | validation mAP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    val_mean = mean.get("validation", {}).get("cases", {})
    val_std = std.get("validation", {}).get("cases", {})
    for case in mean["cases"]:
        m, s = mean["cases"][case], std["cases"][case]
        ms, ss = mean["cases_seen_classes"].get(case), std["cases_seen_classes"].get(case)
        mu, su = mean["cases_unseen_classes"].get(case), std["cases_unseen_classes"].get(case)
        mv, sv = val_mean.get(case), val_std.get(case)
        lines.append(
            f"| {case} | {_cell(m, s, 'top1')} | {_cell(m, s, 'top5')} | {_cell(m, s, 'mAP')} |"
            f" {_cell(ms, ss, 'top1')} | {_cell(ms, ss, 'mAP')} | {_cell(mu, su, 'top1')} |"
            f" {_cell(mu, su, 'mAP')} | {_cell(mv, sv, 'top1')} | {_cell(mv, sv, 'mAP')} |"
        )
    lines += [
        "",
        "Gap closed (old/old → new/new, %) by each h: mean ± seed std [95 % interval of the"
        " mean over test queries, paired bootstrap]:",
        "",
        "| h | top-1 | mAP |",
        "| --- | --- | --- |",
    ]
    for variant in mean.get("gap_closed_variants", {}):
        lines.append(
            f"| {variant} | {_ci(heads.get(f'gap closed, {variant}, top1'), 1)} |"
            f" {_ci(heads.get(f'gap closed, {variant}, mAP'), 1)} |"
        )
    lines += _bct_markdown(mean, std, heads)
    lines += _backfill_markdown(mean, std, block)
    lines += _flips_markdown(mean, heads)
    lines += [
        "",
        "| target | measured | 95 % interval | worst seed | goal | status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for t in block["targets"]:
        ci = "–" if t.get("ci95") is None else f"[{t['ci95'][0]}, {t['ci95'][1]}]"
        worst = "–" if t.get("worst_seed") is None else t["worst_seed"]
        state = t.get("status", "met" if t["met"] else "missed")
        shown = state if state in ("met", "reported") else f"**{state}**"
        lines.append(
            f"| {t['target']} | {t['measured']} | {ci} | {worst} | {t['goal']} | {shown} |"
        )
    lines += [
        "",
        "Wall time per seed (minutes): " + ", ".join(f"{w / 60:.1f}" for w in block["wall_s"]),
        "",
    ]
    return lines


def _bct_markdown(mean: dict[str, Any], std: dict[str, Any], heads: dict[str, Any]) -> list[str]:
    """Both BCT variants under both metrics: the cases, and the criterion as margins."""
    variants = mean.get("bct_variants")
    if not variants:
        bm, bs = mean["bct_comparison"], std["bct_comparison"]
        variants = {"BCT + alignment": {bm["metric"]: bm}}
        std_variants = {"BCT + alignment": {bm["metric"]: bs}}
    else:
        std_variants = std["bct_variants"]
    lines = [
        "",
        "The BCT baselines: `BCT (paper)` trains with the influence loss only (Shen et al.),"
        " `BCT + alignment` adds ||φ_bct(x) − φ_old(x)||² (this project's, fct_ml/losses.py"
        " says why). Every case of a table is scored under its metric.",
    ]
    for name, by_metric in variants.items():
        for metric, bm in by_metric.items():
            bs = std_variants[name][metric]
            lines += [
                "",
                f"**{name}**, every case under **{metric}**:",
                "",
                "| case (query/gallery) | top-1 | mAP | seen-class top-1 | seen-class mAP |"
                " unseen-class top-1 | unseen-class mAP |",
                "| --- | --- | --- | --- | --- | --- | --- |",
            ]
            for case in bm["cases"]:
                m, s = bm["cases"][case], bs["cases"][case]
                ms, ss = bm["cases_seen_classes"].get(case), bs["cases_seen_classes"].get(case)
                mu = (bm.get("cases_unseen_classes") or {}).get(case)
                su = (bs.get("cases_unseen_classes") or {}).get(case)
                lines.append(
                    f"| {case} | {_cell(m, s, 'top1')} | {_cell(m, s, 'mAP')} |"
                    f" {_cell(ms, ss, 'top1')} | {_cell(ms, ss, 'mAP')} |"
                    f" {_cell(mu, su, 'top1')} | {_cell(mu, su, 'mAP')} |"
                )
            crit = [
                f"{subset}: top-1 {_ci(heads.get(f'{name} ({metric}): bct/old - old/old, {subset}, top1'))},"
                f" mAP {_ci(heads.get(f'{name} ({metric}): bct/old - old/old, {subset}, mAP'))}"
                for subset in ("seen classes", "all queries")
            ]
            lines += ["", "BCT's criterion, bct/old − old/old (≥ 0 holds): " + "; ".join(crit)]
    return lines


def _backfill_markdown(
    mean: dict[str, Any], std: dict[str, Any], block: dict[str, Any]
) -> list[str]:
    points = len(next(iter(mean["backfill_curves"][DEPLOYED].values()))["mAP"])
    lines = [
        "",
        "Backfilling (area = mean over the curve's points, fraction re-embedded"
        f" i/{points - 1}; largest fall = of the mean curve from its running maximum). Orders:"
        " `random`; `sigma`, FastFill's uncertainty; `ensemble`, the squared distance between"
        " the FastFill h and the FCT h of the same inputs; `true_error`, the true"
        " ||h(x) − φ_new(x)||² (an oracle). `FCT h, random` is the paper's baseline: the h"
        " without σ, in random order (the same permutation).",
        "",
        "| h | order | area top-1 | area mAP | largest fall, top-1 | largest fall, mAP |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = [
        ("backfill_auc", "fastfill", "FastFill h with side-info"),
        ("backfill_auc_no_side_info", "fastfill no side-info", "FastFill h no side-info"),
    ]
    for key, variant, label in rows:
        for order, v in mean[key].items():
            s = std[key][order]
            c = mean["backfill_curves"][variant][order]
            falls = [largest_fall(c[k]) for k in METRICS]
            lines.append(
                f"| {label} | {order} | {_cell(v, s, 'top1')} | {_cell(v, s, 'mAP')} |"
                f" {falls[0]:.2f} | {falls[1]:.2f} |"
            )
    for partner, v in mean.get("backfill_auc_fct_random", {}).items():
        s = std["backfill_auc_fct_random"][partner]
        c = mean["backfill_curves"][partner]["random"]
        falls = [largest_fall(c[k]) for k in METRICS]
        label = "FCT h with side-info" if partner == "h" else "FCT h no side-info"
        lines.append(
            f"| {label} | random | {_cell(v, s, 'top1')} | {_cell(v, s, 'mAP')} |"
            f" {falls[0]:.2f} | {falls[1]:.2f} |"
        )
    c = mean["backfill_curves"][DEPLOYED]
    lines += ["", "Curve points (mean over seeds, mAP), FastFill h with side-info:", ""]
    for order, pts in c.items():
        lines.append(f"- {order}: " + " ".join(f"{v:.1f}" for v in pts["mAP"]))
    fct = mean["backfill_curves"].get("h", {}).get("random")
    if fct:
        lines.append("- FCT h, random: " + " ".join(f"{v:.1f}" for v in fct["mAP"]))
    verdicts = block.get("verdicts", [])
    if verdicts:
        lines += [
            "",
            "Orders compared (area difference, points: mean ± seed std [95 % interval of the"
            " mean over queries]; verdict: better or worse only by more than the seed spread"
            " with an interval excluding 0):",
            "",
            "| split | comparison | metric | difference | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        for v in verdicts:
            h = {"mean": v["delta"], "std": v["spread"], "ci95": v["ci95"]}
            lines.append(
                f"| {v['split']} | {v['comparison']} | {METRIC_NAMES.get(v['metric'], v['metric'])}"
                f" | {_ci(h)} | {v['verdict']} |"
            )
    diag = mean.get("validation", {}).get("sigma_diagnostics") or mean.get("sigma_diagnostics")
    if diag:
        lines += [
            "",
            "Is there anything for an order to predict? (validation split, mean over seeds) h's"
            " per-item error ||h(x) − φ_new(x)||²: spread, and its Spearman rank correlation"
            " with σ and with the ensemble's disagreement:",
            "",
            "| h | error mean | cv (std/mean) | p90/p10 | Spearman σ | Spearman ensemble |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for variant, d in diag.items():
            e, rho = d["error"], d["spearman_with_error"]
            lines.append(
                f"| {variant} | {_num(e.get('mean'))} | {_num(e.get('cv'))} |"
                f" {_num(e.get('p90_over_p10'))} | {_num(rho.get('sigma'))} |"
                f" {_num(rho.get('ensemble'))} |"
            )
    return lines


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _flips_markdown(mean: dict[str, Any], heads: dict[str, Any]) -> list[str]:
    flips = mean.get("flips")
    if not flips:
        return []
    lines = [
        "",
        "Negative flips against old/old (a query right under old/old and wrong after the"
        " upgrade; NFR in % of queries [95 % interval of the mean], relative NFR = NFR /"
        " ((1 − err_old) · err_new), below 1: fewer than independent errors would make):",
        "",
        "| system (query/gallery) | metric | NFR | relative NFR | top-1 old/old → system |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, f in flips["systems"].items():
        lines.append(
            f"| {name} | {f.get('metric', '–')} | {_ci(heads.get(f'NFR, {name}'))} |"
            f" {_num(f.get('relative_nfr'))} | {_num(f.get('top1_served'), 1)} →"
            f" {_num(f.get('top1_proposed'), 1)} |"
        )
    along = flips.get("backfill", {}).get(DEPLOYED, {})
    if along:
        lines += ["", "NFR (%) along the backfilling curves, FastFill h with side-info:", ""]
        for order, pts in along.items():
            lines.append(f"- {order}: " + " ".join(_num(v, 1) for v in pts))
        fct = flips["backfill"].get("h", {}).get("random")
        if fct:
            lines.append("- FCT h, random: " + " ".join(_num(v, 1) for v in fct))
    return lines


def untuned_markdown(untuned: dict[str, Any]) -> list[str]:
    """The separate table of the untuned class splits (one seed each)."""
    if not untuned:
        return []
    lines = [
        "## Other class splits, nothing re-tuned",
        "",
        "One seed each, the presets as tuned for the default split, nothing chosen again;"
        " reported whatever they show. Gap closed by new/h(old) (%), BCT's criterion"
        " (bct/old − old/old, seen classes, points) and σ − random area (points), each with"
        " its 95 % interval over test queries.",
        "",
        "| old classes | preset | seed | old/old top-1 / mAP | new/new top-1 / mAP |"
        " gap closed, FastFill h (deployed), top-1 | same, mAP | gap closed, FCT h, top-1 |"
        " same, mAP | BCT (paper) criterion, top-1 (cosine) | BCT + alignment criterion,"
        " top-1 (cosine) | FastFill h σ − random area, mAP | σ − FCT h random area, mAP |"
        " wall min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def one(run: dict[str, Any], name: str) -> str:
        i = run.get("ci95", {}).get(name)
        if i is None:
            return "–"
        return f"{i['estimate']:.2f} [{i['low']:.2f}, {i['high']:.2f}]"

    for entry in untuned.values():
        run = entry["run"]
        c = run["cases"]
        reused = cached_stages(run)
        cached = f" ({', '.join(reused)} from the stage cache)" if reused else ""
        lines.append(
            f"| {run['old_classes']} | {run.get('preset', '?')} | {run['seed']} |"
            f" {c['old/old']['top1']:.1f} / {c['old/old']['mAP']:.1f} |"
            f" {c['new/new']['top1']:.1f} / {c['new/new']['mAP']:.1f} |"
            f" {one(run, 'gap closed, fastfill, top1')} | {one(run, 'gap closed, fastfill, mAP')} |"
            f" {one(run, 'gap closed, h, top1')} | {one(run, 'gap closed, h, mAP')} |"
            f" {one(run, 'BCT (paper) (cosine): bct/old - old/old, seen classes, top1')} |"
            f" {one(run, 'BCT + alignment (cosine): bct/old - old/old, seen classes, top1')} |"
            f" {one(run, 'fastfill: sigma area - random area, mAP')} |"
            f" {one(run, 'fastfill: sigma area - FCT h random area, mAP')} |"
            f" {run['wall_s'] / 60:.1f}{cached} |"
        )
    lines.append("")
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# FCT reproduction on {result['dataset']}",
        "",
        f"Produced by `{result['command']}` on {result['machine']}. Mean ± sample std over"
        " seeds, percent; [low, high] is the 95 % interval of the mean over the test queries"
        " (paired bootstrap, 1,000 resamples, the same resample for every case compared)."
        " Models are trained on the training set minus the validation split. The settings"
        " share the new model and the side-info model (the same config and seed): they are not"
        " independent settings.",
        "",
    ]
    if result.get("note"):
        lines += [f"**How this run was made.** {result['note']}", ""]
    for setting, block in result["settings"].items():
        lines += _setting_markdown(setting, block)
    lines += untuned_markdown(result.get("untuned_splits", {}))
    lines += [
        "## Theirs: the papers' numbers (not measured here)",
        "",
        f"From one source, the {PAPER_SOURCE}. Percent.",
        "",
    ]
    header = [
        "| dataset | case | side-info | backfilling | top-1 | top-5 | mAP |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += ["FCT, without backfilling:", ""] + header
    for ds, rows in PAPER_FCT.items():
        lines += [f"| {ds} | {c} | {si} | {bf} | {a} | {b} | {m} |" for c, si, bf, a, b, m in rows]
    gaps = ", ".join(
        f"{ds} {paper_gap_closed(ds, 0):.1f} % top-1 / {paper_gap_closed(ds, 2):.1f} % mAP"
        for ds in PAPER_FCT
    )
    lines += ["", f"Gap closed by their FCT h with side-info, from these rows: {gaps}.", ""]
    lines += [
        "FastFill, area under the backfilling curve (old/old and new/new are its two ends):",
        "",
    ] + header
    for ds, rows in PAPER_FASTFILL_AUC.items():
        lines += [f"| {ds} | {c} | {si} | {bf} | {a} | {b} | {m} |" for c, si, bf, a, b, m in rows]
    lines += [""]
    if result.get("claims"):
        lines += ["## Which of their relative claims hold here", ""] + result["claims"] + [""]
    return "\n".join(lines)


def relative_claims(settings: dict[str, Any]) -> list[str]:
    """The papers' relative claims, checked against each setting's means. A claim that is a
    headline number (a difference with an interval) says "holds", "within noise" or "does not
    hold": BCT's criterion by the targets' rule (its interval against 0), an order of
    backfilling by `verdict` (by more than its seed spread and interval, or within them)."""
    out = []
    for setting, block in settings.items():
        c = block["mean"]["cases"]
        heads = block.get("headlines", {}).get("test", {})
        checks: list[tuple[str, str]] = [
            (
                "FCT: new/h(old) > new/h(old) no side-info (top-1)",
                "holds"
                if c["new/h(old)"]["top1"] > c["new/h(old) no side-info"]["top1"]
                else "does not hold",
            ),
            (
                "FCT: new/h(old) > old/old (mAP)",
                "holds" if c["new/h(old)"]["mAP"] > c["old/old"]["mAP"] else "does not hold",
            ),
        ]
        variants = block["mean"].get("bct_variants", {})
        for name, by_metric in variants.items():
            for metric, b in by_metric.items():
                cases = b["cases"]
                checks.append(
                    (
                        f"FCT: new/h(old) > {name} bct/old (mAP, {metric})",
                        "holds"
                        if cases["new/h(old)"]["mAP"] > cases["bct/old"]["mAP"]
                        else "does not hold",
                    )
                )
                for subset in ("seen classes", "all queries"):
                    h = heads.get(f"{name} ({metric}): bct/old - old/old, {subset}, mAP")
                    if h is not None:
                        checks.append(
                            (
                                f"BCT: {name} bct/old ≥ old/old ({subset}, mAP, {metric})",
                                # BCT's criterion is also a target row: the same rule
                                # (its interval against 0), so the two never disagree.
                                _claim(status(">=", 0.0, h["mean"], h["ci95"]), h),
                            )
                        )
        for comparison, claim in (
            ("sigma area - random area", "FastFill: sigma area > random area"),
            ("sigma area - FCT h random area", "FastFill: FastFill h in σ order > FCT h random"),
        ):
            for variant, label in (
                ("fastfill", "with side-info"),
                ("fastfill no side-info", "no side-info"),
            ):
                for metric in METRICS:
                    h = heads.get(f"{variant}: {comparison}, {metric}")
                    if h is not None:
                        checks.append(
                            (
                                f"{claim} ({label}, {METRIC_NAMES[metric]})",
                                _claim(verdict(h["mean"], h["std"], h["ci95"]), h),
                            )
                        )
        out += [f"- `{setting}`: {claim}: {state}" for claim, state in checks]
    return out


def _claim(v: str, h: dict[str, Any]) -> str:
    """A claim's word from a `verdict` ("better", "worse") or a target's `status` ("met",
    "missed"); anything else is within noise."""
    state = {
        "better": "holds",
        "met": "holds",
        "worse": "**does not hold**",
        "missed": "**does not hold**",
    }.get(v, "within noise")
    return f"{state} ({_ci(h)})"


def strip_bootstrap(run: dict[str, Any]) -> dict[str, Any]:
    """The run without its bootstrap resamples (1,000 values per headline number: the study
    needs them to compute its intervals, the committed results do not)."""
    out = {k: v for k, v in run.items() if k != "bootstrap"}
    if isinstance(out.get("validation"), dict):
        out["validation"] = {k: v for k, v in out["validation"].items() if k != "bootstrap"}
    return out


def setting_block(
    setting: str, group: list[dict[str, Any]], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """A setting's aggregate: mean, std, headlines (both splits), verdicts and targets."""
    mean, std = aggregate(group)
    # A run that trained every stage itself (the first setting of a seed, on an empty
    # cache) is timed on its own; one that took stages from the shared cache is charged
    # the wall time of every run of its seed, so that sharing never hides training time.
    wall = [
        g["wall_s"]
        if not cached_stages(g)
        else sum(r["wall_s"] for r in runs if r["seed"] == g["seed"])
        for g in group
    ]
    heads = {"test": headlines(group, "test"), "validation": headlines(group, "validation")}
    block = {
        "runs": group,
        "mean": mean,
        "std": std,
        "headlines": heads,
        "verdicts": order_verdicts(heads),
        "wall_s": [r["wall_s"] for r in group],
    }
    block["targets"] = check_targets(setting, group, mean, std, wall, heads["test"])
    return block


def _run_one(
    args: argparse.Namespace,
    preset: str,
    seed: int,
    out: Path,
    old_classes: str | None,
    marks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `fct reproduce` in its own process, its wall time measured around it; the JSON, with
    `marks` added (an untuned split's name), is written to `out` once complete (a run whose
    JSON exists is read back, not re-run)."""
    if out.exists():
        return json.loads(out.read_text())
    partial = out.with_suffix(".partial.json")
    cmd = [
        sys.executable,
        "-m",
        "fct_ml.cli",
        "reproduce",
        "--dataset",
        args.dataset,
        "--preset",
        preset,
        "--seed",
        str(seed),
        "--out",
        str(partial),
        "--device",
        args.device,
        "--cache-dir",
        args.cache_dir,
    ]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if old_classes:
        cmd += ["--old-classes", old_classes]
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    run = json.loads(partial.read_text())
    run["wall_s"] = round(time.perf_counter() - start, 1)
    run.update(marks or {})
    out.write_text(json.dumps(run))
    partial.unlink()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="dataset folder (fct reproduce's)")
    parser.add_argument(
        "--presets",
        "--preset",
        nargs="+",
        default=["cpu", "cpu-hard"],
        help="one setting per preset",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old-classes", default=None)
    parser.add_argument(
        "--untuned-splits",
        nargs="*",
        default=list(UNTUNED_SPLITS),
        help="other old-class splits, run once each with nothing re-tuned (none: skip)",
    )
    parser.add_argument("--untuned-preset", default="cpu")
    parser.add_argument("--untuned-seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--cache-dir",
        default="runs/stage-cache",
        help="trained stages shared between settings (same config and seed)",
    )
    parser.add_argument(
        "--runs-dir",
        default="runs/reproduce-benchmark",
        help="one JSON per (setting, seed); a run whose JSON exists is read back, not re-run",
    )
    parser.add_argument(
        "--from-runs",
        nargs="*",
        default=None,
        help="aggregate existing run JSONs instead of running (a run the study made for an"
        " untuned split carries its `untuned_split`)",
    )
    parser.add_argument(
        "--stage-times-from",
        nargs="*",
        default=None,
        help="earlier run JSONs: a stage read from the stage cache is charged the training time"
        " it took where it was trained (matched by model digest)",
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="write reproduce_<dataset>.{json,md} here (default benchmarks/results)",
    )
    parser.add_argument(
        "--note",
        default="",
        help="a paragraph on how this study was run (seeds missing, machine load), put in the markdown",
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    runs: list[dict[str, Any]] = []
    if args.from_runs:
        for path in args.from_runs:
            run = json.loads(Path(path).read_text())
            run.setdefault("wall_s", sum(run["timings_s"].values()))
            runs.append(run)
    else:
        # Runs land in --runs-dir one by one, so an interrupted study resumes where it stopped
        # (a run is redone only if its JSON is missing).
        runs_dir = Path(args.runs_dir)
        runs_dir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for name in args.presets:
                out = runs_dir / f"{name}_seed{seed}.json"
                runs.append(_run_one(args, name, seed, out, args.old_classes))
        for split in args.untuned_splits:
            label = split.replace(",", "-")
            out = runs_dir / f"{args.untuned_preset}_old{label}_seed{args.untuned_seed}.json"
            marks = {"untuned_split": split}
            runs.append(_run_one(args, args.untuned_preset, args.untuned_seed, out, split, marks))
    # Every run is charged the training time of the stages it read from the stage cache.
    earlier = [json.loads(Path(p).read_text()) for p in args.stage_times_from or ()]
    for run in runs:
        charge_cached_stages(run, earlier)

    main_runs = [r for r in runs if "untuned_split" not in r]
    settings: dict[str, Any] = {}
    for run in main_runs:
        settings.setdefault(run.get("setting", run.get("preset", "?")), []).append(run)
    blocks = {
        setting: setting_block(setting, group, main_runs) for setting, group in settings.items()
    }
    untuned = {
        r["untuned_split"]: {
            "run": r,
            "old_classes": r["old_classes"],
            "cached_stages": cached_stages(r),
        }
        for r in runs
        if "untuned_split" in r
    }
    stripped = [strip_bootstrap(r) for r in runs]
    result = {
        "dataset": runs[0]["dataset"],
        # the note is printed on its own below, not repeated in the command
        "command": "python benchmarks/studies/reproduce.py "
        + " ".join(argv[: argv.index("--note") if "--note" in argv else None]),
        "machine": machine(f"device {runs[0].get('device', '?')}"),
        "runs": stripped,
        "settings": {k: {kk: v for kk, v in b.items() if kk != "runs"} for k, b in blocks.items()},
        "untuned_splits": {
            k: {kk: v for kk, v in u.items() if kk != "run"}
            | {"seed": u["run"]["seed"], "ci95": u["run"].get("ci95", {})}
            for k, u in untuned.items()
        },
        "wall_s": [r["wall_s"] for r in runs],
        "note": args.note,
    }
    result["claims"] = relative_claims(blocks)

    stem = f"reproduce_{result['dataset'].replace('-', '_').split(':')[0]}"
    md = markdown({**result, "settings": blocks, "untuned_splits": untuned})
    # NaN (a gap that cannot be measured) written as null: strict JSON readers refuse NaN.
    write_results(stem, result, md, out=args.out_dir or RESULTS, dumps=dumps)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
