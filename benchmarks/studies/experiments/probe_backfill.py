"""Transformation variants and their backfilling curves on the validation split, from cached
features (benchmarks/studies/experiments/cache.py).

    python benchmarks/studies/experiments/probe_backfill.py --old demo_s0_old_13579_cosine_cnn-s128 \
        --side demo_s0_side_13579 --new demo_s0_new_cosine --variants sum,ce128,ce0,mse

Variants: `mse` plain h (FCT), `sum` FastFill with the squared error summed over dims and CE
weight 1 (the paper's loss), `ceW` the same with CE weight W (`ce128` = the former per-dim mean
squared error: the loss is scale-free in sigma, so mean-SE + CE trains like sum-SE + 128 CE),
`...-noside` without side-info, `...+grad` with sigma's gradient flowing back into h's
output (as before the fix; fct_ml now detaches it). FastFill curves are drawn both without
("raw", as before the fix) and with the expected-error coordinate. Prints, per metric:
new/new, new/h(old), each order's 0 % point, area and lowest point below the lower end
("dip"), top-1 and mAP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from fct_ml.backfill import backfill_summary
from fct_ml.evaluation import evaluate_cases, gap_closed
from fct_ml.presets import preset
from fct_ml.transformation import Transformation

sys.path.insert(0, str(Path(__file__).parent))
from cache import train_h  # noqa: E402  (benchmarks/studies/experiments/cache.py, beside this file)


class SigmaWithGrad(Transformation):
    """h as before the fix: sigma's gradient reaches h's output (the `+grad` variants)."""

    def forward_with_sigma(self, old, side=None):
        """-> (prediction (N, new_dim), sigma (N,)), sigma read from the undetached prediction."""
        pred = self(old, side)
        return pred, self.sigma_head(pred).squeeze(1) + self.sigma_offset


CACHE = "runs/cache"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--side", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--variants", default="sum,ce128,ce0,mse")
    ap.add_argument("--metrics", default="l2,cosine")
    ap.add_argument("--points", type=int, default=22)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    labels = torch.load(f"{CACHE}/labels.pt")
    old, side, new = (torch.load(f"{CACHE}/{k}.pt") for k in (args.old, args.side, args.new))
    new_model = torch.load(f"{CACHE}/{args.new}.model", weights_only=False)
    cfg = preset(args.preset)
    for variant in args.variants.split(","):
        base, _, grad = variant.partition("+")
        name, _, noside = base.partition("-")
        fastfill = name != "mse"
        ce_weight = 1.0 if name in ("sum", "mse") else float(name[2:])
        h, hist = train_h(
            old,
            side,
            new,
            labels,
            new_model,
            cfg,
            side_info=not noside,
            uncertainty=fastfill,
            ce_weight=ce_weight,
            transformation=SigmaWithGrad if grad else Transformation,
        )
        with torch.no_grad():
            if fastfill:
                out, sigma = h.forward_with_sigma(old["val"], side["val"])
            else:
                out, sigma = h(old["val"], side["val"]), torch.rand(len(labels["val"]))
        ratio = out.norm(dim=1).mean() / new["val"].norm(dim=1).mean()
        parts = " ".join(f"{k} {v:.4f}" for k, v in hist[-1].parts.items())
        print(
            f"== {variant}: last epoch {parts}; norm h/new {ratio:.3f}",
            flush=True,
        )
        for metric in args.metrics.split(","):
            evaluated = evaluate_cases(
                {
                    "old/old": (old["val"], old["val"]),
                    "new/new": (new["val"], new["val"]),
                    "new/h(old)": (new["val"], out),
                },
                labels["val"],
                metric=metric,
            )
            cases = evaluated.as_json()["cases"]
            gap = gap_closed(evaluated.cases).as_dict()
            print(
                f"  {metric:6} old/old {cases['old/old']['top1']:.1f}/{cases['old/old']['mAP']:.1f}"
                f" gap closed top-1 {gap['top1']:.1f}% mAP {gap['mAP']:.1f}%",
                flush=True,
            )
            for corrected in (False, True) if fastfill else (False,):
                summary = backfill_summary(
                    new["val"],
                    labels["val"],
                    out,
                    sigma,
                    args.points,
                    generator=torch.Generator().manual_seed(10),
                    metric=metric,
                    expected_error=corrected,
                )
                line = [f"  {metric:6} {'expected-error' if corrected else 'raw'}"]
                for m in ("top1", "mAP"):
                    line.append(
                        f"{m}: new/new {cases['new/new'][m]:.1f} h {cases['new/h(old)'][m]:.1f}"
                    )
                    for order, curve in summary.curves.items():
                        points, area = getattr(curve, m), getattr(summary.areas[order], m)
                        dip = min(points) - min(points[0], points[-1])
                        line.append(f"{order} 0% {points[0]:.1f} area {area:.2f} dip {dip:+.2f}")
                print(" | ".join(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
