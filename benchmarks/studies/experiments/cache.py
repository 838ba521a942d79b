"""Train the expensive models of one setting once and cache their features (runs/cache/).

    python benchmarks/studies/experiments/cache.py --preset demo --classifier cosine --seed 0

Everything is trained on the training set minus the validation split and evaluated on the
validation split only. Caches: old, side-info, new and BCT models' features of the train
(minus validation) and validation images, under runs/cache/<key>.pt, one file per model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fct_ml.augment import to_float
from fct_ml.bct import extended_old_classifier
from fct_ml.config import replace
from fct_ml.data import load_fashion_mnist, split_validation
from fct_ml.datasets import policy_for
from fct_ml.presets import preset
from fct_ml.trainers import (
    train_bct_model,
    train_embedding_model,
    train_side_info_model,
    train_transformation,
)
from fct_ml.training import encode
from fct_ml.transformation import Transformation, TransformationConfig, training_features

CACHE = Path("runs/cache")
VAL_FRACTION = 0.1


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def train_h(
    old,
    side,
    new,
    labels,
    new_model,
    cfg,
    *,
    side_info,
    uncertainty,
    ce_weight,
    transformation=Transformation,
):
    """h trained on cached features ({"train", "val"} dicts as saved here), as the probes share it:
    the preset's widths and schedule, seed 6, on CPU. `transformation`: h's class (default
    fct_ml's Transformation). Returns (h in eval mode, history)."""
    h_cfg = TransformationConfig(
        old_dim=old["train"].shape[1],
        side_info_dim=side["train"].shape[1],
        new_dim=new["train"].shape[1],
        branch_width=cfg.transformation.branch_width,
        inner_width=cfg.transformation.inner_width,
        side_info=side_info,
        uncertainty=uncertainty,
        ce_weight=ce_weight,
    )
    h, history = train_transformation(
        old["train"],
        side["train"],
        new["train"],
        labels["train"],
        h_cfg,
        cfg.transformation_train,
        device=torch.device("cpu"),
        seed=6,
        new_classifier=new_model.classifier.weight.detach(),
        new_config=new_model.config,
        progress=False,
        transformation=transformation,
    )
    return h.eval(), history


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--classifier", default="linear", choices=["linear", "cosine"])
    ap.add_argument("--old-classes", default="1,3,5,7,9")
    ap.add_argument("--old-arch", default=None)
    ap.add_argument("--old-dim", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stages", default="old,side,new,bct")
    ap.add_argument("--bct-align", type=float, default=0.0, help="BCTConfig.alignment_weight")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg = preset(args.preset)
    ds = load_fashion_mnist()
    train, val = split_validation(ds.train, VAL_FRACTION, seed=0)
    old_classes = tuple(int(c) for c in args.old_classes.split(","))
    policy = policy_for(ds.name)
    dev = torch.device("cpu")
    s = args.seed
    old_cfg = replace(
        cfg.old_model,
        num_classes=len(old_classes),
        classifier=args.classifier,
        **({"arch": args.old_arch} if args.old_arch else {}),
        **({"embed_dim": args.old_dim} if args.old_dim else {}),
    )
    new_cfg = replace(cfg.new_model, num_classes=10, classifier=args.classifier)
    split = args.old_classes.replace(",", "")
    old_key = f"{args.preset}_s{s}_old_{split}_{args.classifier}_{old_cfg.arch}{old_cfg.embed_dim}"
    CACHE.mkdir(parents=True, exist_ok=True)
    old_train = train.with_classes(old_classes)
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(old_classes)] = torch.arange(len(old_classes))

    def save(key: str, model: torch.nn.Module) -> None:
        f_train = training_features(
            [model], train.images, 1, policy.supervised, batch_size=1024, seed=5
        )[0]
        f_val = encode(model, [val.images], batch_size=1024, transform=to_float)
        torch.save(
            {"state": model.state_dict(), "train": f_train, "val": f_val}, CACHE / f"{key}.pt"
        )

    stages = args.stages.split(",")
    if "old" in stages:
        t = time.time()
        old, _ = train_embedding_model(
            old_train.images,
            remap[old_train.labels],
            old_cfg,
            cfg.old_train,
            policy.supervised,
            device=dev,
            seed=s * 1000 + 1,
            progress=False,
            desc="old",
        )
        save(old_key, old)
        torch.save(old, CACHE / f"{old_key}.model")
        log(f"old {old_key} {time.time() - t:.0f}s")
    if "side" in stages:
        t = time.time()
        side_cfg = replace(cfg.side_info, model__num_classes=0)
        side, _ = train_side_info_model(
            old_train.images,
            side_cfg,
            cfg.side_info_train,
            policy.contrastive,
            device=dev,
            seed=s * 1000 + 2,
            progress=False,
        )
        save(f"{args.preset}_s{s}_side_{split}", side)
        log(f"side {time.time() - t:.0f}s")
    if "new" in stages:
        t = time.time()
        new, _ = train_embedding_model(
            train.images,
            train.labels,
            new_cfg,
            cfg.new_train,
            policy.supervised,
            device=dev,
            seed=s * 1000 + 3,
            progress=False,
            desc="new",
        )
        save(f"{args.preset}_s{s}_new_{args.classifier}", new)
        torch.save(new, CACHE / f"{args.preset}_s{s}_new_{args.classifier}.model")
        log(f"new {time.time() - t:.0f}s")
    if "bct" in stages:
        t = time.time()
        old = torch.load(CACHE / f"{old_key}.model", weights_only=False)
        rows = extended_old_classifier(old, old_classes, train.images, train.labels, 10)
        bct, _ = train_bct_model(
            train.images,
            train.labels,
            replace(new_cfg, embed_dim=old_cfg.embed_dim),
            cfg.new_train,
            replace(cfg.bct, alignment_weight=args.bct_align),
            rows,
            policy.supervised,
            device=dev,
            seed=s * 1000 + 4,
            old_config=old.config,
            old_model=old,
            progress=False,
        )
        save(f"{old_key}_bct" + (f"_a{args.bct_align:g}" if args.bct_align else ""), bct)
        log(f"bct {time.time() - t:.0f}s")
    torch.save({"train": train.labels, "val": val.labels}, CACHE / "labels.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
