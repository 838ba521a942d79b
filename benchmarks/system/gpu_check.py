"""A quick GPU check of fct_ml (14 s on the H200 it last ran on): mixed-precision training steps of the
CPU and paper backbones, and the per-item cost of h against a new-model forward pass.

    bash benchmarks/system/gpu_check.sh        # on a machine with CUDA; needs torch + torchvision only

Prints a table and writes benchmarks/results/gpu_check.json (or to $OUT when set); the committed
result of its last run is renamed after its device, benchmarks/results/gpu_check_h200.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.common
from benchmarks.common import RESULTS, write_results  # noqa: E402
from fct_ml.augment import AugmentConfig
from fct_ml.backfill import apply_transformation
from fct_ml.models import ModelConfig
from fct_ml.trainers import train_embedding_model
from fct_ml.training import TrainConfig, encode, resolve_device
from fct_ml.transformation import Transformation, TransformationConfig


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up (cuDNN autotuning, lazy init)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return (time.perf_counter() - start) / repeat


# (label, arch, channels, side, items): a GPU run; FCT_GPU_CHECK_SMALL=1 shrinks it for a CPU smoke
# test.
SIZES = (("cnn-s 28x28", "cnn-s", 1, 28, 16384), ("resnet50 32x32", "resnet50", 3, 32, 4096))
if os.environ.get("FCT_GPU_CHECK_SMALL"):
    SIZES = tuple((a, b, c, d, 512) for a, b, c, d, _ in SIZES)


def main() -> int:
    device = resolve_device("auto")
    out: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    rows = []
    for name, arch, channels, size, n in SIZES:
        images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,))
        cfg = ModelConfig(arch=arch, embed_dim=128, in_channels=channels, num_classes=10)
        start = time.perf_counter()
        model, history = train_embedding_model(
            images,
            labels,
            cfg,
            TrainConfig(epochs=2, batch_size=256),
            AugmentConfig(flip=True, translate=0.1),
            device=device,
            seed=0,
            progress=False,
        )
        train_ips = n / history[-1].seconds
        finite = all(torch.isfinite(torch.tensor(r.parts["loss"])) for r in history)
        embed_s = timed(
            lambda m=model, x=images: encode(
                m, [x], batch_size=1024, transform=lambda t: t.float() / 255
            )
        )
        rows.append(
            {
                "model": name,
                "train_items_per_s": round(train_ips),
                "embed_items_per_s": round(n / embed_s),
                "loss_finite": bool(finite),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    for inner in (1024, 2048):
        h = Transformation(TransformationConfig(inner_width=inner, uncertainty=True)).to(device)
        n_h = 4096 if os.environ.get("FCT_GPU_CHECK_SMALL") else 262144
        old, side = torch.rand(n_h, 128), torch.rand(n_h, 128)
        h_s = timed(lambda h=h, o=old, s=side: apply_transformation(h, o, s, batch_size=65536))
        rows.append({"model": f"h inner {inner}", "embed_items_per_s": round(len(old) / h_s)})
    out["rows"] = rows
    by = {r["model"]: r for r in rows}
    out["reembed_over_h"] = {
        "cnn-s vs h1024": (
            by["h inner 1024"]["embed_items_per_s"] / by["cnn-s 28x28"]["embed_items_per_s"]
        ),
        "resnet50 vs h2048": (
            by["h inner 2048"]["embed_items_per_s"] / by["resnet50 32x32"]["embed_items_per_s"]
        ),
    }
    print(f"device: {out['device']}, torch {out['torch']}")
    for r in rows:
        print("  " + ", ".join(f"{k} {v}" for k, v in r.items()))
    print(
        "  h per item is cheaper than a new-model forward by: "
        + ", ".join(f"{k} {v:.0f}x" for k, v in out["reembed_over_h"].items())
    )
    write_results("gpu_check", out, None, os.environ.get("OUT") or RESULTS)
    return 0 if all(r.get("loss_finite", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
