"""The GPU check of fct: h in bf16, a 1M-item backfill and the new model's training, each figure
measured on CUDA and on the CPU by the same code in one run.

    bash benchmarks/system/gpu_check.sh                # on a CUDA machine
    python benchmarks/system/gpu_check.py --cpu-only   # the CPU half alone

The CUDA sizes are chosen to end within 5 minutes on one H100; no GPU has run this version yet.
The CPU half took 23-66 s here (2 cores, load average 3-6, imports included).

Figures (random weights and synthetic inputs throughout: throughput does not depend on the
values, so no dataset and no trained model is needed):

* `h_bf16`: h alone, the product's transformation (FastFill with side-info, the `cpu` preset's
  dims) as the product calls it (`Frozen(h, "forward_with_sigma")`: bf16 autocast on CUDA, fp32
  on the CPU, where autocast is off), over inputs already on the device. Target on CUDA:
  >= 10M items/s.
* `backfill_arrays`, `backfill_arrays_wide`: the transform backfill end to end over a gallery
  held as host arrays (random old embeddings and side-info of h's dims): per page of
  `rows_per_batch` rows, `fct_ml.backfill.apply_transformation` (inputs checked finite, pinned
  copy to the device, h, outputs back to the host), the page checked finite and written into
  the output arrays. Timed: the whole loop, first page read to last page written; the gallery's
  creation is not. At the product's default page (4,096 rows) and at 65,536. Target on CUDA:
  >= 1M items/s on 1M items.
* `backfill_lancedb`: the same gallery in a LanceDB `gallery_store` table, backfilled by
  `fct_assets.upgrade.backfill.backfill_version` (LanceDB pages -> h -> one LanceDB commit, no
  item re-embedded, no ANN index), the product's own path. Timed: that call. Needs fct's full
  install (lancedb, dagster); elsewhere it is reported "not run". Same target.
* `train_new_model`: the `demo` and `cpu` presets' new model trained by the product's loop
  (`train_embedding_model`: the preset's batch and optimiser, Fashion-MNIST's augmentation,
  bf16 autocast on CUDA) on synthetic 1x28x28 images; images/s of the last epoch (the first
  warms up). Presets whose new model and training match are measured once.
* `reembed_new_model`: the trained new model embedding the same images (`encode`), images/s:
  what re-embedding a gallery costs per item beside h.

Without CUDA the CPU half runs and the result says "GPU: not run". A figure that fails is
reported with its one-line error and the others still run (exit status 1). Writes
gpu_check.{json,md} to $OUT when set, else benchmarks/results/, after every figure (a run cut
short keeps what it measured). benchmarks/results/gpu_check_h200.json is the record of an
earlier version of this script (cnn-s and ResNet-50 training, h inner 1024/2048) on an H200.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("LANCE_LOG", "error")  # as the other benchmarks, when lancedb is installed
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks.common
from benchmarks.common import RESULTS, load_average, machine, write_results  # noqa: E402
from fct_ml.augment import to_float  # noqa: E402
from fct_ml.backfill import apply_transformation  # noqa: E402
from fct_ml.config import replace  # noqa: E402
from fct_ml.datasets import policy_for  # noqa: E402
from fct_ml.presets import preset  # noqa: E402
from fct_ml.trainers import train_embedding_model  # noqa: E402
from fct_ml.training import Frozen, encode, resolve_device  # noqa: E402
from fct_ml.transformation import Transformation  # noqa: E402

# The product's default page of a backfill (fct_assets.lib.config's BackfillConfig.rows_per_batch;
# tests/test_perf_benchmarks.py holds the two equal), and a page 16x larger, which a GPU may want.
ROWS_PER_BATCH = 4096
WIDE_ROWS_PER_BATCH = 65536
TARGETS = {"h_bf16": 10_000_000, "backfill": 1_000_000}  # items/s on CUDA (issue 29, part 5)
PRESETS = ("demo", "cpu")
# Fashion-MNIST's images and classes; 54,000 is its training split less validation (10 %).
IMAGE_SHAPE, NUM_CLASSES, DATASET = (1, 28, 28), 10, "fashion-mnist"


@dataclass(frozen=True)
class Sizes:
    """How much each figure processes on one device."""

    h_items: int  # items held on the device for h alone
    h_batch: int  # items per call of h
    backfill_items: int  # the gallery's size for the backfills
    train_items: int  # synthetic images per training epoch (and re-embedded)
    train_epochs: int  # the last one is timed
    repeat: int  # timed passes of h and of the array backfills (median), after one warm-up


CUDA_SIZES = Sizes(
    h_items=1 << 20,
    h_batch=262_144,
    backfill_items=1_000_000,
    train_items=54_000,
    train_epochs=2,
    repeat=5,
)
# Small enough that the CPU half takes about a minute on this project's 2 cores.
CPU_SIZES = Sizes(
    h_items=65_536,
    h_batch=8192,
    backfill_items=50_000,
    train_items=4096,
    train_epochs=2,
    repeat=3,
)


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    target: int | None  # minimum on CUDA, or None


FIGURES = (
    Figure("h_bf16", "h alone (bf16 autocast on CUDA, fp32 on CPU)", "items/s", TARGETS["h_bf16"]),
    Figure(
        "backfill_arrays",
        f"backfill end to end, arrays, {ROWS_PER_BATCH:,} rows/page (default)",
        "items/s",
        TARGETS["backfill"],
    ),
    Figure(
        "backfill_arrays_wide",
        f"backfill end to end, arrays, {WIDE_ROWS_PER_BATCH:,} rows/page",
        "items/s",
        TARGETS["backfill"],
    ),
    Figure(
        "backfill_lancedb",
        f"backfill end to end, LanceDB `backfill_version`, {ROWS_PER_BATCH:,} rows/page",
        "items/s",
        TARGETS["backfill"],
    ),
    Figure("train_new_model", "new model training (presets: {presets})", "images/s", None),
    Figure("reembed_new_model", "new model re-embedding images", "images/s", None),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Median wall time of `repeat` calls of `fn`, after one warm-up call (CUDA context, cuBLAS
    handles, the caching allocators); the device is synchronised around each call."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def product_h(device: torch.device) -> Transformation:
    """The h an upgrade trains with the `cpu` (and `demo`) preset: FastFill's sigma head, with
    side-info, its dims from the preset's models; random weights (timing only), in eval mode."""
    cfg = preset("cpu")
    config = replace(
        cfg.transformation,
        old_dim=cfg.old_model.embed_dim,
        side_info_dim=cfg.side_info.model.embed_dim,
        new_dim=cfg.new_model.embed_dim,
        side_info=True,
        uncertainty=True,
    )
    return Transformation(config).eval().to(device)


def synthetic_gallery(n: int, old_dim: int, side_dim: int, seed: int = 0):
    """(n, old_dim) old embeddings and (n, side_dim) side-info, float32 in [0, 1) (non-negative,
    as the models' ReLU embeddings are)."""
    rng = np.random.default_rng(seed)
    return (
        rng.random((n, old_dim), dtype=np.float32),
        rng.random((n, side_dim), dtype=np.float32),
    )


def h_items_per_s(device: torch.device, sizes: Sizes) -> dict:
    """h alone over `sizes.h_items` items already on `device`, `sizes.h_batch` per call."""
    h = product_h(device)
    frozen = Frozen(h, method="forward_with_sigma")
    old, side = (
        torch.from_numpy(a).to(device)
        for a in synthetic_gallery(sizes.h_items, h.config.old_dim, h.config.side_info_dim)
    )

    def one_pass() -> None:
        for start in range(0, sizes.h_items, sizes.h_batch):
            frozen(old[start : start + sizes.h_batch], side[start : start + sizes.h_batch])

    seconds = median_seconds(one_pass, device, sizes.repeat)
    return {"value": sizes.h_items / seconds, "seconds": seconds, "items": sizes.h_items}


def backfill_arrays(
    h: Transformation, old: np.ndarray, side: np.ndarray, rows_per_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The transform backfill of a gallery held as arrays, page by page as a backfill shard
    runs it: `apply_transformation` over each page (its inputs checked finite, h on h's device),
    the page checked finite, then written into the output arrays. -> (embeddings (N, new_dim),
    sigma (N,))."""
    n = old.shape[0]
    embeddings = np.empty((n, h.config.new_dim), dtype=np.float32)
    sigma = np.empty(n, dtype=np.float32)
    for start in range(0, n, rows_per_batch):
        stop = min(start + rows_per_batch, n)
        mapped, uncertainty = apply_transformation(
            h,
            torch.from_numpy(old[start:stop]),
            torch.from_numpy(side[start:stop]),
            batch_size=rows_per_batch,
        )
        page = mapped.numpy()
        if not np.isfinite(page).all():
            raise ValueError(f"backfill: NaN or Inf in h's output for rows {start}..{stop - 1}")
        embeddings[start:stop] = page
        sigma[start:stop] = uncertainty.numpy()
    return embeddings, sigma


def backfill_arrays_items_per_s(device: torch.device, sizes: Sizes, rows_per_batch: int) -> dict:
    h = product_h(device)
    old, side = synthetic_gallery(sizes.backfill_items, h.config.old_dim, h.config.side_info_dim)
    result: dict = {}

    def one_pass() -> None:
        result["out"] = backfill_arrays(h, old, side, rows_per_batch)

    seconds = median_seconds(one_pass, device, sizes.repeat)
    # bf16 on CUDA against fp32 on the CPU, on the first page: a broken device path shows here.
    rows = min(rows_per_batch, sizes.backfill_items)
    reference, _ = apply_transformation(
        h.cpu(), torch.from_numpy(old[:rows]), torch.from_numpy(side[:rows])
    )
    got = torch.from_numpy(result["out"][0][:rows])
    error = float((got - reference).norm() / reference.norm().clamp_min(1e-12))
    return {
        "value": sizes.backfill_items / seconds,
        "seconds": seconds,
        "items": sizes.backfill_items,
        "rows_per_batch": rows_per_batch,
        "relative_error_vs_cpu_fp32": error,
    }


def backfill_lancedb_items_per_s(device: torch.device, sizes: Sizes) -> dict:
    """`backfill_version` over a `gallery_store` table of `sizes.backfill_items` random rows."""
    try:
        # Deferred: the product's storage layer needs fct's full install (lancedb, dagster),
        # which a bare GPU machine lacks; the rest of this check runs without it.
        from benchmarks.perf import backfill as bench
        from fct_assets.lib import storage
        from fct_assets.lib.resources import FctResource
        from fct_assets.upgrade.backfill import backfill_version
    except ImportError as err:
        return {"not_run": f"needs fct's full install (lancedb, dagster): {err}"}
    h = product_h(device)
    if (h.config.old_dim, h.config.side_info_dim) != (bench.DIM, bench.DIM):
        raise ValueError(
            f"backfill_lancedb: h reads {h.config.old_dim}/{h.config.side_info_dim}-d vectors,"
            f" benchmarks/perf/backfill.py stores {bench.DIM}-d ones"
        )
    n, page = sizes.backfill_items, 65536
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fct-gpu-check-") as tmp:
        # The run's own thread count: the resource would otherwise set torch's to its budget.
        fct = FctResource(
            lancedb_uri=tmp,
            preset="cpu",
            device=str(device),
            torch_threads=torch.get_num_threads(),
        )
        batches = (bench.store_batch(s, min(page, n - s), rng, None) for s in range(0, n, page))
        info = storage.publish(fct.connect(), storage.GALLERY_STORE, bench.store_schema(), batches)
        store, checkpoint = bench.store_records(
            info["version"], n, bench.make_new_model(bench.PAIRS["cpu_default"][0])
        )
        start = time.perf_counter()
        out = backfill_version(
            fct, "v2", store, h, checkpoint, 0.0, ROWS_PER_BATCH, log=lambda _: None
        )
        seconds = time.perf_counter() - start
    if out.rows != n:
        raise RuntimeError(f"backfill_lancedb: {out.rows} rows published, the gallery holds {n}")
    return {
        "value": n / seconds,
        "seconds": seconds,
        "items": n,
        "rows_per_batch": ROWS_PER_BATCH,
        "backfill_items_per_s_recorded": out.backfill_items_per_s,
    }


def training_groups(presets: tuple[str, ...] = PRESETS) -> list[tuple[list[str], object, object]]:
    """[(preset names, new model config, training config)], presets that train the same new
    model the same way in one group."""
    groups: list[tuple[list[str], object, object]] = []
    for name in presets:
        cfg = preset(name)
        model = replace(cfg.new_model, in_channels=IMAGE_SHAPE[0], num_classes=NUM_CLASSES)
        train = replace(cfg.new_train, epochs=1)  # compared without the epoch count
        for names, m, t in groups:
            if (m, t) == (model, train):
                names.append(name)
                break
        else:
            groups.append(([name], model, train))
    return groups


def train_items_per_s(device: torch.device, sizes: Sizes) -> dict:
    """Each group's new model trained on synthetic images; its last epoch's images/s, and the
    trained model re-embedding those images."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (sizes.train_items, *IMAGE_SHAPE), dtype=torch.uint8, generator=gen
    )
    labels = torch.randint(0, NUM_CLASSES, (sizes.train_items,), generator=gen)
    train_rows, embed_rows = [], []
    for names, model_config, train in training_groups():
        train = replace(train, epochs=sizes.train_epochs)
        model, history = train_embedding_model(
            images,
            labels,
            model_config,
            train,
            policy_for(DATASET).supervised,
            device=device,
            seed=0,
            progress=False,
        )
        batch = min(train.batch_size, sizes.train_items)
        seen = (sizes.train_items // batch) * batch  # the loop drops the last partial batch
        what = {
            "presets": names,
            "arch": model_config.arch,
            "embed_dim": model_config.embed_dim,
            "batch_size": train.batch_size,
            "optimizer": train.optimizer,
        }
        train_rows.append({**what, "value": seen / history[-1].seconds, "items": seen})
        seconds = median_seconds(
            lambda m=model: encode(m, [images], batch_size=1024, transform=to_float), device, 1
        )
        embed_rows.append(
            {**what, "value": sizes.train_items / seconds, "items": sizes.train_items}
        )
    return {"train_new_model": train_rows, "reembed_new_model": embed_rows}


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def measure_device(
    device: torch.device, sizes: Sizes, record: Callable[[str, dict], None], lancedb: bool = True
) -> None:
    """Every figure on `device`; `record(key, entry)` receives each as it is measured: {"value",
    ...}, {"not_run": why} or {"failed": one line}."""
    steps: list[tuple[tuple[str, ...], Callable[[], dict]]] = [
        (("h_bf16",), lambda: {"h_bf16": h_items_per_s(device, sizes)}),
        (
            ("backfill_arrays",),
            lambda: {"backfill_arrays": backfill_arrays_items_per_s(device, sizes, ROWS_PER_BATCH)},
        ),
        (
            ("backfill_arrays_wide",),
            lambda: {
                "backfill_arrays_wide": backfill_arrays_items_per_s(
                    device, sizes, WIDE_ROWS_PER_BATCH
                )
            },
        ),
        (
            ("backfill_lancedb",),
            lambda: {
                "backfill_lancedb": backfill_lancedb_items_per_s(device, sizes)
                if lancedb
                else {"not_run": "left out (--no-lancedb)"}
            },
        ),
        (("train_new_model", "reembed_new_model"), lambda: train_items_per_s(device, sizes)),
    ]
    for keys, step in steps:
        try:
            measured = step()
        except Exception as err:  # one figure's failure must not lose the others
            measured = {k: {"failed": one_line(err)} for k in keys}
        for key in keys:
            record(key, measured[key])


def entry_value(entry: dict | list | None) -> float | None:
    """The figure's number: its value, or the slowest of a per-group list; None if not measured."""
    if isinstance(entry, list):
        values = [e.get("value") for e in entry]
        return min(values) if values and None not in values else None
    return entry.get("value") if entry else None


def entry_status(entry: dict | list | None) -> str:
    if entry is None:
        return "not run"
    if isinstance(entry, list):
        return "ok"
    if "failed" in entry:
        return f"failed: {entry['failed']}"
    if "not_run" in entry:
        return f"not run: {entry['not_run']}"
    return "ok"


def summarise(result: dict) -> list[dict]:
    """One row per figure: CUDA and CPU values, their status, the target and whether CUDA met it."""
    cuda, cpu, presets = result["cuda"], result["cpu"], _presets(result)
    rows = []
    for f in FIGURES:
        value = entry_value(cuda.get(f.key))
        if f.target is None:
            verdict = None
        elif value is None:
            verdict = "not run"
        else:
            verdict = "met" if value >= f.target else "missed"
        rows.append(
            {
                "figure": f.key,
                "label": f.label.format(presets=presets),
                "unit": f.unit,
                "cuda": value,
                "cpu": entry_value(cpu.get(f.key)),
                "cuda_status": entry_status(cuda.get(f.key)),
                "cpu_status": entry_status(cpu.get(f.key)),
                "target_cuda_min": f.target,
                "target": verdict,
            }
        )
    return rows


def _number(v: float | None, status: str) -> str:
    if v is None:
        return status.split(":")[0] if status != "ok" else "-"
    return f"{v:,.0f}"


def _presets(result: dict) -> str:
    for half in ("cuda", "cpu"):
        groups = result[half].get("train_new_model")
        if isinstance(groups, list):
            return "; ".join(
                f"{', '.join(g['presets'])}: {g['arch']} {g['embed_dim']}-d, batch"
                f" {g['batch_size']}, {g['optimizer']}"
                for g in groups
            )
    return ", ".join(PRESETS)


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [
        "# GPU check",
        "",
        f"`bash benchmarks/system/gpu_check.sh` on {result['machine']}.",
        "",
        f"**GPU: {result['gpu']}**",
        "",
        "| figure | unit | CUDA | CPU | target on CUDA | |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in result["figures"]:
        target = f"≥ {row['target_cuda_min']:,}" if row["target_cuda_min"] else ""
        lines.append(
            f"| {row['label']} | {row['unit']} | {_number(row['cuda'], row['cuda_status'])}"
            f" | {_number(row['cpu'], row['cpu_status'])} | {target} | {row['target'] or ''} |"
        )
    lines += ["", "Sizes (items per figure):", ""]
    for half in ("cuda", "cpu"):
        if sizes.get(half):
            s = sizes[half]
            lines.append(
                f"- {half.upper()}: h {s['h_items']:,} items resident, {s['h_batch']:,} per call;"
                f" backfills {s['backfill_items']:,} items; training {s['train_items']:,} synthetic"
                f" images x {s['train_epochs']} epochs (last timed); medians of {s['repeat']}"
                " passes after a warm-up."
            )
    # A CUDA figure not run because no GPU was is said once, in the GPU line above.
    gpu_run = result["gpu"].startswith("run")
    problems = [
        f"- {row['figure']} ({half.upper()}): {row[f'{half}_status']}"
        for row in result["figures"]
        for half in ("cuda", "cpu")
        if row[f"{half}_status"] != "ok" and (half == "cpu" or gpu_run)
    ]
    if problems:
        lines += ["", "Not measured:", "", *problems]
    lines += [
        "",
        "Random weights and synthetic inputs (throughput does not depend on their values). h is"
        " the `cpu` preset's FastFill h with side-info. The array backfills time the page loop"
        " (apply_transformation, finite checks, host copies); the LanceDB one times"
        " `backfill_version` (read, h, one commit). benchmarks/system/gpu_check.py says more.",
    ]
    return "\n".join(lines) + "\n"


def run(
    *,
    cuda: bool,
    cpu_sizes: Sizes = CPU_SIZES,
    cuda_sizes: Sizes = CUDA_SIZES,
    out: Path | str | None = None,
    lancedb: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """The CPU half, then the CUDA half when `cuda`; writes gpu_check.{json,md} to `out` after
    every figure and returns the result."""
    out = out or os.environ.get("OUT") or RESULTS
    if cuda and not torch.cuda.is_available():
        why = (
            f"torch {torch.__version__} has no CUDA build"
            if torch.version.cuda is None
            else "no CUDA device (torch.cuda.is_available() is False)"
        )
        gpu, cuda = f"not run: {why}", False
    elif cuda:
        gpu = f"run on {torch.cuda.get_device_name(0)}"
    else:
        gpu = "not run: --cpu-only"
    result: dict = {
        "machine": machine(f"load {load_average()}"),
        "gpu": gpu,
        "torch": torch.__version__,
        "cpu_torch_threads": torch.get_num_threads(),
        "sizes": {"cpu": asdict(cpu_sizes), "cuda": asdict(cuda_sizes) if cuda else None},
        "targets_cuda_items_per_s": TARGETS,
        "complete": False,
        "cpu": {},
        "cuda": {},
    }

    def save() -> None:
        result["figures"] = summarise(result)
        write_results("gpu_check", result, markdown(result), out)

    def recorder(half: str) -> Callable[[str, dict], None]:
        def record(key: str, entry: dict) -> None:
            result[half][key] = entry
            value = entry_value(entry)
            log(f"  {half} {key}: {f'{value:,.0f}' if value is not None else entry_status(entry)}")
            save()

        return record

    log(f"GPU: {gpu}")
    log(f"CPU half ({torch.get_num_threads()} torch threads):")
    measure_device(torch.device("cpu"), cpu_sizes, recorder("cpu"), lancedb)
    if cuda:
        log("CUDA half:")
        measure_device(resolve_device("cuda"), cuda_sizes, recorder("cuda"), lancedb)
    result["complete"] = True
    save()
    return result


def failed(result: dict) -> bool:
    """True when a figure raised (not when one was not run or missed its target)."""
    return any(
        row[f"{half}_status"].startswith("failed")
        for row in result["figures"]
        for half in ("cuda", "cpu")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU half alone")
    parser.add_argument(
        "--require-cuda", action="store_true", help="exit 2 when no CUDA device is found"
    )
    parser.add_argument("--no-lancedb", action="store_true", help="leave out the LanceDB backfill")
    args = parser.parse_args(argv)
    result = run(cuda=not args.cpu_only, lancedb=not args.no_lancedb)
    print()
    print(markdown(result))
    if args.require_cuda and not result["gpu"].startswith("run"):
        print(f"gpu_check: GPU {result['gpu']}", file=sys.stderr)
        return 2
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
