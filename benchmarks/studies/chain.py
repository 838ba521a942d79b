"""The chain experiment (fct_ml/chain.py): old -> v2 -> v3 on Fashion-MNIST, one run per seed.

    python benchmarks/studies/chain.py                      # demo preset, seeds 0 1 2
    python benchmarks/studies/chain.py --preset tiny --dataset digits --seeds 0 --out /tmp/x   # a check

The old model sees the dataset's default old classes (Fashion-MNIST: 5,6,7,8,9), the v2 model
those plus --v2-extra (default 0,2: T-shirt and Pullover), v3 every class. Writes
benchmarks/results/chain_<dataset>.{json,md}: {"runs": [one per seed], "mean":
{"gap_closed_chained": {"top1", "mAP"}, "gap_closed_chained_no_side_info": {...},
"gap_closed_direct": {...}}, "std": {...}} (test split; gap closed = share of the old/old ->
v3/v3 gap, percent), plus the same on the validation split and the targets met or missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
GAPS = ("gap_closed_chained", "gap_closed_chained_no_side_info", "gap_closed_direct")


def summarise(runs: list[dict], split: str) -> tuple[dict, dict]:
    key = "gap_closed_test" if split == "test" else "gap_closed_validation"
    mean, std = {}, {}
    for gap in GAPS:
        mean[gap], std[gap] = {}, {}
        for metric in ("top1", "mAP"):
            values = [r[key][gap][metric] for r in runs]
            mean[gap][metric] = round(statistics.fmean(values), 2)
            std[gap][metric] = round(statistics.stdev(values), 2) if len(values) > 1 else 0.0
    return mean, std


def markdown(result: dict) -> str:
    mean, std = result["mean"], result["std"]
    lines = [
        f"# Chain experiment: {result['dataset']}, preset {result['preset']}, seeds"
        f" {', '.join(str(r['seed']) for r in result['runs'])}",
        "",
        f"old model: classes {result['old_classes']}; v2: {result['v2_classes']}; v3: all."
        " Evaluated in v3's space, test split as query and gallery (leave-one-out, L2).",
        "",
        "| case (v3 queries / gallery) | gap closed top-1 (%) | gap closed mAP (%) |",
        "| --- | --- | --- |",
    ]
    names = {
        "gap_closed_chained": "h3(h2(old)), side-info (chained, the product's design)",
        "gap_closed_chained_no_side_info": "h3(h2(old)), no side-info",
        "gap_closed_direct": "h_direct(old), side-info (one h per source space)",
    }
    for gap in GAPS:
        lines.append(
            f"| {names[gap]} | {mean[gap]['top1']:.1f} ± {std[gap]['top1']:.1f} |"
            f" {mean[gap]['mAP']:.1f} ± {std[gap]['mAP']:.1f} |"
        )
    lines += ["", "Per seed, test split (top-1 / mAP, %):", ""]
    lines += ["| seed | old/old | v3/v3 | chained | chained, no side-info | direct |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        c = r["test"]
        cells = [
            f"{c[k]['top1']:.1f} / {c[k]['mAP']:.1f}"
            for k in ("old/old", "new/new", "chained", "chained_no_side_info", "direct")
        ]
        lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    vm = result["validation"]["mean"]
    lines += [
        "",
        "Validation split (mean gap closed, top-1 / mAP %): "
        + "; ".join(
            f"{g.removeprefix('gap_closed_')} {vm[g]['top1']:.1f} / {vm[g]['mAP']:.1f}"
            for g in GAPS
        ),
        "",
        "Targets (issue 13, test split):",
        "",
    ]
    for name, t in result["targets"].items():
        lines.append(f"- {name}: {'met' if t['met'] else 'missed'} ({t['measured']})")
    lines += ["", f"Wall time {result['wall_s']:.0f} s on {result['machine']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--old-classes", default=None, help="default: the dataset's split")
    parser.add_argument("--v2-extra", default="0,2", help="classes v2 adds to the old ones")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/")
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs/chain"),
        help="one JSON per seed; a seed whose JSON exists is read back, not re-run",
    )
    args = parser.parse_args(argv)

    from fct_ml.chain import run_chain
    from fct_ml.data import parse_class_list
    from fct_ml.datasets import default_old_classes, load_dataset
    from fct_ml.presets import preset

    torch.set_num_threads(2)
    data = load_dataset(args.dataset)
    split = args.old_classes or default_old_classes(args.dataset, data.num_classes)
    old = parse_class_list(split, data.num_classes, what="old_classes")
    extra = parse_class_list(args.v2_extra, data.num_classes, what="v2_extra")
    config = preset(args.preset)
    runs = []
    # Seeds land in --runs-dir one by one, so a study can be run a seed at a time (or resume
    # after an interruption); a run's file names everything that determines it.
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        name = f"{args.dataset}_{args.preset}_old{'-'.join(map(str, old))}_v2extra"
        path = args.runs_dir / f"{name}{'-'.join(map(str, extra))}_seed{seed}.json"
        if path.exists():
            runs.append(json.loads(path.read_text()))
            continue
        start = time.perf_counter()
        result = run_chain(data, old, extra, config, seed, log=lambda m: print(m, flush=True))
        run = {**dataclasses.asdict(result), "wall_s": round(time.perf_counter() - start, 1)}
        path.write_text(json.dumps(run))
        runs.append(run)
    mean, std = summarise(runs, "test")
    vmean, vstd = summarise(runs, "validation")
    spread = std["gap_closed_chained"]["mAP"] + std["gap_closed_chained_no_side_info"]["mAP"]
    lead = mean["gap_closed_chained"]["mAP"] - mean["gap_closed_chained_no_side_info"]["mAP"]
    result = {
        "dataset": args.dataset,
        "preset": args.preset,
        "old_classes": list(old),
        "v2_classes": sorted({*old, *extra}),
        "runs": runs,
        "mean": mean,
        "std": std,
        "validation": {"mean": vmean, "std": vstd},
        "targets": {
            "chained with side-info closes >= 85 % of the mAP gap": {
                "met": mean["gap_closed_chained"]["mAP"] >= 85.0,
                "measured": f"{mean['gap_closed_chained']['mAP']:.1f} %",
            },
            "beats no side-info by more than the seed spread (sum of the two std)": {
                "met": lead > spread,
                "measured": f"+{lead:.1f} points vs spread {spread:.1f}",
            },
        },
        # each seed's own run, also when it was read back from --runs-dir
        "wall_s": round(sum(r.get("wall_s", 0.0) for r in runs), 1),
        "wall_s_per_seed": [r.get("wall_s") for r in runs],
        "machine": machine(f"{torch.get_num_threads()} torch threads"),
    }
    stem = f"chain_{args.dataset.replace('-', '_')}"
    write_results(stem, result, markdown(result), args.out or RESULTS)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
