"""Which old-class split? Side-info's gain on the validation split, one candidate split at a time.

    python benchmarks/studies/experiments/probe_split.py --splits 1,3,5,7,9 0,1,2,3,4 5,6,7,8,9 0,2,4,6,8

For each split of Fashion-MNIST's ten classes into five the old model sees and five it does
not, trains (or reads from runs/cache/, benchmarks/studies/experiments/cache.py) the old and side-info
models on the split's classes and the new model once, then the product's h (FastFill, with and
without side-info), and reports on the VALIDATION split only: gap closed by new/h(old) and the
side-info gain on unseen-class queries (mAP, top-1). The split the study uses is the one with the
largest unseen-class mAP gain: a benchmark where the old model lacks what side-info must carry.
Writes benchmarks/results/split_choice.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fct_ml.evaluation import evaluate_cases, gap_closed
from fct_ml.presets import preset

sys.path.insert(0, str(Path(__file__).parent))
import cache  # noqa: E402  (benchmarks/studies/experiments/cache.py, beside this file)

RESULTS = Path(__file__).resolve().parents[2] / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks.common
from benchmarks.common import write_results  # noqa: E402


def _keys(args, split: str) -> tuple[str, str, str]:
    cfg = preset(args.preset)
    digits = split.replace(",", "")
    old = f"{args.preset}_s{args.seed}_old_{digits}_linear_{cfg.old_model.arch}{cfg.old_model.embed_dim}"
    return (
        old,
        f"{args.preset}_s{args.seed}_side_{digits}",
        f"{args.preset}_s{args.seed}_new_linear",
    )


def _train_missing(args, split: str) -> None:
    old, side, new = _keys(args, split)
    stages = [
        s
        for s, k in (("old", old), ("side", side), ("new", new))
        if not (cache.CACHE / f"{k}.pt").exists()
    ]
    if stages:
        cache.main(
            [
                "--preset",
                args.preset,
                "--seed",
                str(args.seed),
                "--old-classes",
                split,
                "--stages",
                ",".join(stages),
            ]
        )


def probe(args, split: str) -> dict:
    _train_missing(args, split)
    old_key, side_key, new_key = _keys(args, split)
    labels = torch.load(cache.CACHE / "labels.pt")
    old, side, new = (torch.load(cache.CACHE / f"{k}.pt") for k in (old_key, side_key, new_key))
    new_model = torch.load(cache.CACHE / f"{new_key}.model", weights_only=False)
    cfg = preset(args.preset)
    seen = torch.tensor([int(c) for c in split.split(",")])
    unseen_mask = ~torch.isin(labels["val"], seen)
    cases = {"old/old": (old["val"], old["val"]), "new/new": (new["val"], new["val"])}
    for side_info in (True, False):
        # The FastFill h, the one the product deploys.
        h, _ = cache.train_h(
            old,
            side,
            new,
            labels,
            new_model,
            cfg,
            side_info=side_info,
            uncertainty=True,
            ce_weight=cfg.transformation.ce_weight,
        )
        with torch.no_grad():
            out = h(old["val"], side["val"])
        cases["new/h(old)" if side_info else "new/h(old) no side-info"] = (new["val"], out)
    typed = evaluate_cases(cases, labels["val"], unseen_mask=unseen_mask)
    evaluated = typed.as_json()  # written as JSON
    unseen = evaluated["cases_unseen_classes"]
    with_si, without = unseen["new/h(old)"], unseen["new/h(old) no side-info"]
    return {
        "split": split,
        "cases": evaluated["cases"],
        "cases_unseen_classes": unseen,
        "gap_closed": gap_closed(typed.cases).as_dict(),
        "side_info_gain_unseen": {m: round(with_si[m] - without[m], 2) for m in ("top1", "mAP")},
    }


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--splits", nargs="+", default=["1,3,5,7,9", "0,1,2,3,4", "5,6,7,8,9", "0,2,4,6,8"]
    )
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    rows = []
    for split in args.splits:
        rows.append(probe(args, split))
        r = rows[-1]
        print(
            f"{split}: gap closed mAP {r['gap_closed']['mAP']:.1f} %, side-info gain on unseen"
            f" mAP {r['side_info_gain_unseen']['mAP']:+.2f}, top-1 {r['side_info_gain_unseen']['top1']:+.2f}",
            flush=True,
        )
    chosen = max(rows, key=lambda r: r["side_info_gain_unseen"]["mAP"])["split"]
    result = {
        "command": "python benchmarks/studies/experiments/probe_split.py " + " ".join(argv),
        "split_evaluated_on": "validation",
        "preset": args.preset,
        "seed": args.seed,
        "criterion": "largest side-info gain on unseen-class mAP (validation)",
        "chosen": chosen,
        "splits": rows,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    lines = [
        "# Which classes the old model sees: the split chosen on validation",
        "",
        f"`{result['command']}` ({args.preset} preset, seed {args.seed}, {result['wall_s'] / 60:.0f} min"
        " with the models it trained). Validation split only (10 % of each training class); the"
        " test set is not read. Old and side-info models see the split's five classes; the new"
        " model and h see all ten. h is the product's (FastFill), with and without side-info.",
        "",
        "| old classes | old/old mAP | new/new mAP | new/h(old) mAP | gap closed mAP (%)"
        " | unseen-class mAP, h with / without side-info | side-info gain, unseen mAP"
        " | same, top-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        c, u, g = r["cases"], r["cases_unseen_classes"], r["side_info_gain_unseen"]
        mAP = {case: c[case]["mAP"] for case in ("old/old", "new/new", "new/h(old)")}
        unseen = (u["new/h(old)"]["mAP"], u["new/h(old) no side-info"]["mAP"])
        lines.append(
            f"| {r['split']} | {mAP['old/old']:.1f} | {mAP['new/new']:.1f}"
            f" | {mAP['new/h(old)']:.1f} | {r['gap_closed']['mAP']:.1f}"
            f" | {unseen[0]:.1f} / {unseen[1]:.1f} | {g['mAP']:+.2f} | {g['top1']:+.2f} |"
        )
    lines += ["", f"Criterion: {result['criterion']}. Chosen: **{chosen}**.", ""]
    write_results("split_choice", result, "\n".join(lines), RESULTS)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
