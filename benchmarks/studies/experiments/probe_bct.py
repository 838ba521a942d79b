"""BCT's criterion on the validation split, from the cached models (benchmarks/studies/experiments/cache.py).

    python benchmarks/studies/experiments/probe_bct.py demo_s0_old_13579_cosine_cnn-s128 ...
    python benchmarks/studies/experiments/probe_bct.py demo_s0_old_13579_linear_cnn-s128:_a1 ...

(`KEY:SUFFIX` reads the BCT model cached as `KEY_bct_SUFFIX`, e.g. with `--bct-align 1`.)

For each old-model key: old/old and bct/old on validation queries of the classes the old model
saw (gallery: the whole validation split), under L2 and cosine, and the embeddings' mean norms.
"""

from __future__ import annotations

import sys

import torch

from fct_ml.evaluation import evaluate_cases

CACHE = "runs/cache"


def main(keys: list[str]) -> None:
    labels = torch.load(f"{CACHE}/labels.pt")["val"]
    for arg in keys:
        key, _, suffix = arg.partition(":")
        old = torch.load(f"{CACHE}/{key}.pt")["val"]
        bct = torch.load(f"{CACHE}/{key}_bct{suffix}.pt")["val"]
        seen = tuple(int(c) for c in key.split("_old_")[1].split("_")[0])
        unseen = ~torch.isin(labels, torch.tensor(seen))
        norms = f"norm old {old.norm(dim=1).mean():.1f} bct {bct.norm(dim=1).mean():.1f}"
        for metric in ("l2", "cosine"):
            out = evaluate_cases(
                {"old/old": (old, old), "bct/old": (bct, old), "bct/bct": (bct, bct)},
                labels,
                unseen_mask=unseen,
                metric=metric,
            ).as_json()
            row = " | ".join(
                f"{case} seen {m['top1']:.1f}/{m['mAP']:.1f}"
                f" all {out['cases'][case]['top1']:.1f}/{out['cases'][case]['mAP']:.1f}"
                for case, m in out["cases_seen_classes"].items()
            )
            print(f"{arg} {metric:6} {norms} | {row}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
