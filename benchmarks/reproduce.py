"""Reproduce the paper's experiment over several seeds and write the committed results.

    python benchmarks/reproduce.py --dataset fashion-mnist --preset cpu --seeds 0 1 2

Each seed runs `fct reproduce` in its own process (wall time measured around it). Writes
benchmarks/results/reproduce_<dataset>.json ({"runs", "mean", "std", "targets", ...}) and a
markdown table with the paper's numbers beside ours, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
AGGREGATED = (
    "cases",
    "cases_unseen_classes",
    "cases_seen_classes",
    "backfill_auc",
    "backfill_auc_no_side_info",
    "gap_closed",
    "gap_closed_no_side_info",
)

# apple/ml-fct README (ResNet-50-128): top-1 / top-5 / mAP in percent; FastFill paper: areas.
PAPER = {
    "CIFAR-100": {
        "old/old": (32.9, 59.3, 16.1),
        "new/new": (56.4, 77.5, 36.5),
        "new/h(old)": (50.6, 74.2, 34.2),
        "new/h(old) no side-info": (47.2, None, None),
        "gap_closed_top1": 75,
    },
    "ImageNet-1k": {
        "old/old": (46.4, 65.1, 28.3),
        "new/new": (68.4, 84.7, 45.6),
        "new/h(old)": (65.1, 82.7, 44.0),
        "new/h(old) no side-info": (61.8, None, None),
        "gap_closed_top1": 85,
    },
    "FastFill CIFAR-100 top-1 area": {"random": 49.1, "sigma": 53.6},
}


def _walk(runs: list[Any], fn) -> Any:
    """Apply fn to the list of leaf values found at the same place in each run."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _walk([r[k] for r in runs], fn) for k in first}
    if first is None or any(r is None for r in runs):
        return None
    return fn([float(r) for r in runs])


def aggregate(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    mean = {k: _walk([r[k] for r in runs], statistics.fmean) for k in AGGREGATED}
    std = {
        k: _walk([r[k] for r in runs], lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        for k in AGGREGATED
    }
    return mean, std


def check_targets(
    runs: list[dict[str, Any]], mean: dict[str, Any], std: dict[str, Any], wall: list[float]
) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it holds."""
    targets = []

    def add(name: str, value: float, goal: str, ok: bool) -> None:
        targets.append({"target": name, "measured": round(value, 2), "goal": goal, "met": bool(ok)})

    add("gap closed, mAP (%)", mean["gap_closed"]["mAP"], ">= 90", mean["gap_closed"]["mAP"] >= 90)
    add(
        "gap closed, top-1 (%)",
        mean["gap_closed"]["top1"],
        ">= 85",
        mean["gap_closed"]["top1"] >= 85,
    )
    unseen = mean["cases_unseen_classes"]
    margin = unseen["new/h(old)"]["mAP"] - unseen["new/h(old) no side-info"]["mAP"]
    spread = max(
        std["cases_unseen_classes"]["new/h(old)"]["mAP"],
        std["cases_unseen_classes"]["new/h(old) no side-info"]["mAP"],
    )
    add(
        "side-info gain, unseen-class mAP (points)",
        margin,
        f"> seed spread ({spread:.2f})",
        margin > spread,
    )
    fct_vs_bct = mean["cases"]["new/h(old)"]["mAP"] - mean["cases"]["bct/old"]["mAP"]
    add("new/h(old) - bct/old, mAP (points)", fct_vs_bct, ">= 10", fct_vs_bct >= 10)
    for key, label in (
        ("backfill_auc", "with side-info"),
        ("backfill_auc_no_side_info", "no side-info"),
    ):
        a = mean[key]
        share = (a["sigma"]["mAP"] - a["random"]["mAP"]) / max(
            1e-9, a["oracle"]["mAP"] - a["random"]["mAP"]
        )
        add(
            f"FastFill {label}: sigma area - random area, mAP",
            a["sigma"]["mAP"] - a["random"]["mAP"],
            "> 0",
            a["sigma"]["mAP"] > a["random"]["mAP"],
        )
        add(
            f"FastFill {label}: share of random->oracle covered by sigma",
            100 * share,
            ">= 50 %",
            share >= 0.5,
        )
    add("slowest seed, wall minutes", max(wall) / 60, "<= 25", max(wall) <= 25 * 60)
    return targets


def markdown(result: dict[str, Any]) -> str:
    mean, std, runs = result["mean"], result["std"], result["runs"]
    seeds = [r["seed"] for r in runs]
    cell = lambda m, s, k: f"{m[k]:.1f} ± {s[k]:.1f}"  # noqa: E731
    lines = [
        f"# FCT reproduction on {result['dataset']} (preset `{result['preset']}`)",
        "",
        (
            f"Seeds {seeds}; old classes {runs[0]['old_classes']}; test set as query and gallery"
            " (leave-one-out), L2 on raw features. Mean ± sample std over seeds, percent. Produced"
            f" by `python benchmarks/reproduce.py --dataset {result['dataset']} --preset"
            f" {result['preset']} --seeds {' '.join(map(str, seeds))}` on {result['machine']}."
        ),
        "",
        "| case (query/gallery) | top-1 | top-5 | mAP | unseen-class top-1 | unseen-class mAP |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in mean["cases"]:
        m, s = mean["cases"][case], std["cases"][case]
        mu, su = mean["cases_unseen_classes"][case], std["cases_unseen_classes"][case]
        lines.append(
            f"| {case} | {cell(m, s, 'top1')} | {cell(m, s, 'top5')} | {cell(m, s, 'mAP')} | "
            f"{cell(mu, su, 'top1')} | {cell(mu, su, 'mAP')} |"
        )
    g, gs = mean["gap_closed"], std["gap_closed"]
    g0, g0s = mean["gap_closed_no_side_info"], std["gap_closed_no_side_info"]
    lines += [
        "",
        (
            f"Gap closed by new/h(old) (old/old → new/new): top-1 {cell(g, gs, 'top1')} %, mAP"
            f" {cell(g, gs, 'mAP')} %; without side-info: top-1 {cell(g0, g0s, 'top1')} %, mAP"
            f" {cell(g0, g0s, 'mAP')} %."
        ),
        "",
        (
            "Backfilling (FastFill h; area = mean over the curve's points, fraction re-embedded 0"
            " … 1):"
        ),
        "",
        "| h | order | area top-1 | area mAP |",
        "| --- | --- | --- | --- |",
    ]
    for key, label in (
        ("backfill_auc", "with side-info"),
        ("backfill_auc_no_side_info", "no side-info"),
    ):
        for order, v in mean[key].items():
            s = std[key][order]
            lines.append(f"| {label} | {order} | {cell(v, s, 'top1')} | {cell(v, s, 'mAP')} |")
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "| --- | --- | --- | --- |",
    ]
    for t in result["targets"]:
        lines.append(
            f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else '**no**'} |"
        )
    lines += [
        "",
        "Wall time per seed (minutes): " + ", ".join(f"{w / 60:.1f}" for w in result["wall_s"]),
        "",
        "## The paper's numbers (apple/ml-fct README, ResNet-50-128; top-1 / top-5 / mAP)",
        "",
        (
            "| dataset | old/old | new/new | new/h(old) | new/h(old) no side-info | gap closed"
            " (top-1) |"
        ),
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ds in ("CIFAR-100", "ImageNet-1k"):
        p = PAPER[ds]
        fmt = lambda t: " / ".join("–" if v is None else f"{v}" for v in t)  # noqa: E731
        lines.append(
            f"| {ds} | {fmt(p['old/old'])} | {fmt(p['new/new'])} | {fmt(p['new/h(old)'])} | "
            f"{fmt(p['new/h(old) no side-info'])} | {p['gap_closed_top1']}% |"
        )
    ff = PAPER["FastFill CIFAR-100 top-1 area"]
    lines += [
        "",
        f"FastFill (CIFAR-100, top-1 area): random {ff['random']}, sigma {ff['sigma']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old-classes", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--from-runs",
        nargs="*",
        default=None,
        help="aggregate existing run JSONs instead of running",
    )
    args = parser.parse_args()

    runs, wall = [], []
    if args.from_runs:
        for path in args.from_runs:
            run = json.loads(Path(path).read_text())
            runs.append(run)
            wall.append(run.get("wall_s", sum(run["timings_s"].values())))
    else:
        tmp = Path(tempfile.mkdtemp(prefix="fct-reproduce-"))
        for seed in args.seeds:
            out = tmp / f"seed{seed}.json"
            cmd = [
                sys.executable,
                "-m",
                "fct_ml.cli",
                "reproduce",
                "--dataset",
                args.dataset,
                "--preset",
                args.preset,
                "--seed",
                str(seed),
                "--out",
                str(out),
                "--device",
                args.device,
            ]
            if args.old_classes:
                cmd += ["--old-classes", args.old_classes]
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            seconds = time.perf_counter() - start
            run = json.loads(out.read_text())
            run["wall_s"] = round(seconds, 1)
            runs.append(run)
            wall.append(seconds)
    mean, std = aggregate(runs)
    import os
    import platform

    result = {
        "dataset": runs[0]["dataset"],
        "preset": runs[0].get("preset", args.preset),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} CPUs, device {runs[0].get('device', '?')}"
        ),
        "runs": runs,
        "mean": mean,
        "std": std,
        "wall_s": [round(w, 1) for w in wall],
    }
    result["targets"] = check_targets(runs, mean, std, wall)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"reproduce_{result['dataset'].replace('-', '_').split(':')[0]}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
