"""Reproduce the paper's experiment over several seeds and settings; write the committed results.

    python benchmarks/studies/reproduce.py --dataset fashion-mnist --presets cpu cpu-hard --seeds 0 1 2

Each (seed, setting) runs `fct reproduce` in its own process (wall time measured around it);
settings share trained stages through `--cache-dir`. Writes
benchmarks/results/reproduce_<dataset>.json ({"runs", "settings": {setting: {"mean", "std",
"targets", ...}}, "claims", ...}; each run carries its "setting" and its "validation" metrics)
and a markdown table per setting with the papers' numbers beside ours, and prints it.
"""

from __future__ import annotations

import argparse
import json
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

RESULTS = Path(__file__).resolve().parents[1] / "results"
AGGREGATED = (
    "cases",
    "cases_unseen_classes",
    "cases_seen_classes",
    "backfill_auc",
    "backfill_auc_no_side_info",
    "gap_closed",
    "gap_closed_no_side_info",
    "bct_comparison",
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


# The targets per setting: gap closed by new/h(old) with side-info, in percent.
GAP_TARGETS = {"cpu": {"mAP": 90.0, "top1": 85.0}, "cpu-hard": {"mAP": 75.0}}


def _walk(runs: list[Any], fn) -> Any:
    """Apply fn to the list of leaf values found at the same place in each run."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _walk([r[k] for r in runs], fn) for k in first}
    if isinstance(first, list):
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
    keys = [k for k in AGGREGATED if k in runs[0]] + ["backfill_curves"]
    mean = {k: _walk([r[k] for r in runs], statistics.fmean) for k in keys}
    std = {k: _walk([r[k] for r in runs], _std) for k in keys}
    if all("validation" in r for r in runs):
        vk = [k for k in AGGREGATED if k in runs[0]["validation"]]
        mean["validation"] = {
            k: _walk([r["validation"][k] for r in runs], statistics.fmean) for k in vk
        }
        std["validation"] = {k: _walk([r["validation"][k] for r in runs], _std) for k in vk}
    return mean, std


def cached_stages(run: dict[str, Any]) -> list[str]:
    """The training stages a run read from the stage cache (timed at well under a second)."""
    training = ("old_model", "side_info_model", "new_model", "bct_model")
    return [s for s in training if run.get("timings_s", {}).get(s, 1.0) < 0.5]


def charge_cached_stages(run: dict[str, Any], earlier: list[dict[str, Any]]) -> None:
    """Give each stage `run` read from the stage cache the training time it took in the earlier
    run that trained it (the same model digest: the very weights), and add it to the run's wall
    time, so that a study reusing cached models reports the time of training every stage."""
    for stage in cached_stages(run):
        digest = run["model_digests"][stage]
        trained = next(
            (
                e
                for e in earlier
                if e["model_digests"].get(stage) == digest and stage not in cached_stages(e)
            ),
            None,
        )
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


def check_targets(
    setting: str,
    runs: list[dict[str, Any]],
    mean: dict[str, Any],
    std: dict[str, Any],
    wall: list[float],
) -> list[dict[str, Any]]:
    """The issue's targets for one setting, each with the measured value and whether it holds."""
    targets = []

    def add(name: str, value: float, goal: str, ok: bool) -> None:
        targets.append({"target": name, "measured": round(value, 2), "goal": goal, "met": bool(ok)})

    for metric, goal in GAP_TARGETS.get(setting, {}).items():
        g = mean["gap_closed"][metric]
        add(f"gap closed by new/h(old), {metric} (%)", g, f">= {goal:g}", g >= goal)
    hard = "hard" in setting  # the harder setting's own targets
    g0 = mean["gap_closed_no_side_info"]["mAP"]
    if hard:
        add("harder: gap closed without side-info, mAP (%)", g0, "< 80", g0 < 80)
    # BCT's targets, on its own table (every case under BCT's metric).
    bct_metric = mean["bct_comparison"]["metric"]
    seen = [r["bct_comparison"]["cases_seen_classes"] for r in runs]
    for metric in ("top1", "mAP"):
        worst = min(c["bct/old"][metric] - c["old/old"][metric] for c in seen)
        add(
            f"BCT: bct/old - old/old on seen classes, {metric}, worst seed ({bct_metric})",
            worst,
            ">= 0 (every seed)",
            worst >= 0,
        )
    bct_cases = mean["bct_comparison"]["cases"]
    price = bct_cases["bct/bct"]["mAP"] - bct_cases["new/new"]["mAP"]
    add(f"BCT's price: bct/bct - new/new, mAP ({bct_metric})", price, "< 0", price < 0)
    fct_vs_bct = bct_cases["new/h(old)"]["mAP"] - bct_cases["bct/old"]["mAP"]
    add(f"new/h(old) - bct/old, mAP ({bct_metric})", fct_vs_bct, ">= 10", fct_vs_bct >= 10)
    unseen, unseen_std = mean["cases_unseen_classes"], std["cases_unseen_classes"]
    margin = unseen["new/h(old)"]["mAP"] - unseen["new/h(old) no side-info"]["mAP"]
    spread = max(unseen_std["new/h(old)"]["mAP"], unseen_std["new/h(old) no side-info"]["mAP"])
    add(
        "side-info gain, unseen-class mAP",
        margin,
        f"> 2 x seed spread ({2 * spread:.2f})",
        margin > 2 * spread,
    )
    curves, curves_std = mean["backfill_curves"][DEPLOYED], std["backfill_curves"][DEPLOYED]
    for metric in ("top1", "mAP"):
        worst, tol = float("inf"), 0.0
        for order, c in curves.items():
            lower = min(c[metric][0], c[metric][-1])
            dip = min(c[metric]) - lower
            if dip < worst:
                worst, tol = dip, max(curves_std[order][metric])
        add(
            f"backfill ({DEPLOYED} h): lowest point - lower end point, {metric}, worst order",
            worst,
            f">= -seed spread ({tol:.2f})",
            worst >= -tol,
        )
    areas, areas_std = mean["backfill_auc"], std["backfill_auc"]
    for metric in ("top1", "mAP"):
        gain = areas["sigma"][metric] - areas["random"][metric]
        spread = max(areas_std["sigma"][metric], areas_std["random"][metric])
        if not hard:
            add(f"sigma area - random area, {metric}", gain, "(reported)", True)
        else:
            add(
                f"harder: sigma area - random area, {metric}",
                gain,
                f"> seed spread ({spread:.2f})",
                gain > spread,
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
    if hard:  # the time target is the `cpu` setting's; this one's time is shown
        add(f"slowest seed, wall minutes ({how})", max(wall) / 60, "(reported)", True)
    else:
        add(
            f"slowest seed, wall minutes ({how})",
            max(wall) / 60,
            "<= 25",
            max(wall) <= 25 * 60,
        )
    return targets


def _cell(m: dict[str, float] | None, s: dict[str, float] | None, k: str) -> str:
    if m is None or s is None:
        return "–"
    return f"{m[k]:.1f} ± {s[k]:.1f}"


def _setting_markdown(setting: str, block: dict[str, Any]) -> list[str]:
    mean, std, runs = block["mean"], block["std"], block["runs"]
    lines = [
        f"## Setting `{setting}`: old classes {runs[0]['old_classes']}, seeds"
        f" {[r['seed'] for r in runs]}",
        "",
        "Test set as query and gallery (leave-one-out); the validation columns are the same"
        " metrics on the validation split (carved from the training set; every choice was made"
        f" there). Metric: {runs[0]['config']['metric']}.",
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
    bm, bs = mean["bct_comparison"], std["bct_comparison"]
    lines += [
        "",
        f"BCT against FCT, every case under the **{bm['metric']}** metric (BCT's criterion,"
        " bct/old ≥ old/old on the classes the old model saw, holds under cosine and not under"
        " L2: see the README):",
        "",
        "| case (query/gallery) | top-1 | mAP | seen-class top-1 | seen-class mAP |"
        " unseen-class top-1 | unseen-class mAP |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case in bm["cases"]:
        m, s = bm["cases"][case], bs["cases"][case]
        ms, ss = bm["cases_seen_classes"].get(case), bs["cases_seen_classes"].get(case)
        mu, su = bm["cases_unseen_classes"].get(case), bs["cases_unseen_classes"].get(case)
        lines.append(
            f"| {case} | {_cell(m, s, 'top1')} | {_cell(m, s, 'mAP')} | {_cell(ms, ss, 'top1')} |"
            f" {_cell(ms, ss, 'mAP')} | {_cell(mu, su, 'top1')} | {_cell(mu, su, 'mAP')} |"
        )
    g, gs = mean["gap_closed"], std["gap_closed"]
    g0, g0s = mean["gap_closed_no_side_info"], std["gap_closed_no_side_info"]
    lines += [
        "",
        f"Gap closed by new/h(old) (old/old → new/new): top-1 {_cell(g, gs, 'top1')} %, mAP"
        f" {_cell(g, gs, 'mAP')} %; without side-info: top-1 {_cell(g0, g0s, 'top1')} %, mAP"
        f" {_cell(g0, g0s, 'mAP')} %.",
        "",
        "Backfilling (FastFill h; area = mean over the curve's points, fraction re-embedded"
        f" i/{len(next(iter(mean['backfill_curves'][DEPLOYED].values()))['mAP']) - 1}):",
        "",
        "| h | order | area top-1 | area mAP | lowest point − lower end, top-1 | same, mAP |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, variant, label in (
        ("backfill_auc", "fastfill", "with side-info"),
        ("backfill_auc_no_side_info", "fastfill no side-info", "no side-info"),
    ):
        for order, v in mean[key].items():
            s = std[key][order]
            c = mean["backfill_curves"][variant][order]
            dips = [min(c[k]) - min(c[k][0], c[k][-1]) for k in ("top1", "mAP")]
            lines.append(
                f"| {label} | {order} | {_cell(v, s, 'top1')} | {_cell(v, s, 'mAP')} |"
                f" {dips[0]:+.2f} | {dips[1]:+.2f} |"
            )
    c = mean["backfill_curves"][DEPLOYED]
    lines += ["", "Curve points (mean over seeds, mAP), FastFill h with side-info:", ""]
    for order, pts in c.items():
        lines.append(f"- {order}: " + " ".join(f"{v:.1f}" for v in pts["mAP"]))
    lines += ["", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for t in block["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "Wall time per seed (minutes): " + ", ".join(f"{w / 60:.1f}" for w in block["wall_s"]),
        "",
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# FCT reproduction on {result['dataset']}",
        "",
        f"Produced by `{result['command']}` on {result['machine']}. Mean ± sample std over"
        " seeds, percent. Models are trained on the training set minus the validation split.",
        "",
    ]
    if result.get("note"):
        lines += [f"**How this run was made.** {result['note']}", ""]
    for setting, block in result["settings"].items():
        lines += _setting_markdown(setting, block)
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
    """The papers' relative claims, checked against each setting's means."""
    out = []
    for setting, block in settings.items():
        c, a = block["mean"]["cases"], block["mean"]["backfill_auc"]
        b = block["mean"]["bct_comparison"]["cases"]
        checks = [
            (
                "FCT: new/h(old) > new/h(old) no side-info (top-1)",
                c["new/h(old)"]["top1"] > c["new/h(old) no side-info"]["top1"],
            ),
            ("FCT: new/h(old) > old/old (mAP)", c["new/h(old)"]["mAP"] > c["old/old"]["mAP"]),
            ("FCT: new/h(old) > bct/old (mAP)", b["new/h(old)"]["mAP"] > b["bct/old"]["mAP"]),
            ("BCT: bct/old > old/old (mAP)", b["bct/old"]["mAP"] > b["old/old"]["mAP"]),
            (
                "FastFill: sigma area > random area (top-1)",
                a["sigma"]["top1"] > a["random"]["top1"],
            ),
            ("FastFill: sigma area > random area (mAP)", a["sigma"]["mAP"] > a["random"]["mAP"]),
        ]
        out += [
            f"- `{setting}`: {claim}: {'holds' if ok else '**does not hold**'}"
            for claim, ok in checks
        ]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument(
        "--presets",
        "--preset",
        nargs="+",
        default=["cpu", "cpu-hard"],
        help="one setting per preset",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old-classes", default=None)
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
        help="aggregate existing run JSONs instead of running",
    )
    parser.add_argument(
        "--stage-times-from",
        nargs="*",
        default=None,
        help="earlier run JSONs: a stage read from the stage cache is charged the training time"
        " it took where it was trained (matched by model digest)",
    )
    parser.add_argument(
        "--note",
        default="",
        help="a paragraph on how this study was run (seeds missing, machine load), put in the markdown",
    )
    args = parser.parse_args()

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
                if out.exists():
                    runs.append(json.loads(out.read_text()))
                    continue
                partial = out.with_suffix(".partial.json")
                cmd = [
                    sys.executable,
                    "-m",
                    "fct_ml.cli",
                    "reproduce",
                    "--dataset",
                    args.dataset,
                    "--preset",
                    name,
                    "--seed",
                    str(seed),
                    "--out",
                    str(partial),
                    "--device",
                    args.device,
                    "--cache-dir",
                    args.cache_dir,
                ]
                if args.old_classes:
                    cmd += ["--old-classes", args.old_classes]
                start = time.perf_counter()
                subprocess.run(cmd, check=True)
                run = json.loads(partial.read_text())
                run["wall_s"] = round(time.perf_counter() - start, 1)
                runs.append(run)
                out.write_text(json.dumps(run))
                partial.unlink()
    if args.stage_times_from:
        earlier = [json.loads(Path(p).read_text()) for p in args.stage_times_from]
        for run in runs:
            charge_cached_stages(run, earlier)

    settings: dict[str, Any] = {}
    for run in runs:
        settings.setdefault(run.get("setting", run.get("preset", "?")), []).append(run)
    blocks = {}
    for setting, group in settings.items():
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
        blocks[setting] = {
            "runs": group,
            "mean": mean,
            "std": std,
            "wall_s": [r["wall_s"] for r in group],
        }
        blocks[setting]["targets"] = check_targets(setting, group, mean, std, wall)
    result = {
        "dataset": runs[0]["dataset"],
        # the note is printed on its own below, not repeated in the command
        "command": "python benchmarks/studies/reproduce.py "
        + " ".join(sys.argv[1 : sys.argv.index("--note") if "--note" in sys.argv else None]),
        "machine": machine(f"device {runs[0].get('device', '?')}"),
        "runs": runs,
        "settings": {k: {kk: v for kk, v in b.items() if kk != "runs"} for k, b in blocks.items()},
        "wall_s": [r["wall_s"] for r in runs],
        "note": args.note,
    }
    result["claims"] = relative_claims(blocks)

    stem = f"reproduce_{result['dataset'].replace('-', '_').split(':')[0]}"
    md = markdown({**result, "settings": blocks})
    write_results(stem, result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
