"""The quality-cost frontier of h (the transformation), chosen on the validation split.

    python benchmarks/studies/h_frontier.py --cache-dir /work/main/runs/stage-cache --require-cached
    python benchmarks/studies/h_frontier.py --smoke      # tiny preset on digits, seed 0: a quick check

Quality. For each seed the old, side-info and new models come from the stage cache that `fct
reproduce --cache-dir` fills (keyed as fct_ml.reproduce.StageCache keys them: stage, configs,
seed, dataset fingerprint and validation fraction), so a study's models are reused, not
retrained; h's training features are fct_ml.pipeline's, as reproduce computes them. Each
variant of h is trained as the product trains its h: FastFill with side-info
(`pipeline.train_h(side_info=True, uncertainty=True)`, the preset's transformation_train, the
"fastfill" stage seed), only `inner_width`, `inner_depth` and `inner_rank` changed. bf16 and
int8 reuse the trained default h: CPU autocast to bfloat16, and
torch.ao.quantization.quantize_dynamic on its Linear layers. Measured on the VALIDATION split
(the test split is never read): new/h(old) mAP (query the new model, gallery h(old),
leave-one-out, fct_ml.evaluation) and the area under the backfilling curve in the product's
order, sigma (fct_ml.backfill.backfill_summary, mAP). Mean and sample std over seeds.

Cost, measured at the end of each invocation for every variant in turn (rounds interleaved, so
a change of machine load hits all variants alike): MACs (fct_ml.transformation.
transformation_macs: Linear layers only); items/s of h alone in memory (one batch of
`--batch` stored vectors through the module, median of `--rounds` after `--warmup`); items/s
end to end: the product's transform backfill (fct_assets.upgrade.backfill.backfill_version: LanceDB
read -> h -> one LanceDB commit, nothing re-embedded) of `--e2e-items` random stored vectors.
torch threads: `--threads` (default os.cpu_count()).

The default is the knee: the variant with the fewest MACs whose mean validation mAP AND mean
backfill area are each at most `--tolerance` (1.0) points below today's h's; at equal MACs
fp32 before bf16 before int8 (a precision is an inference option of the same h, not a cheaper
h). Resumable: one JSON per seed under `--runs-dir` (written after each variant) and each
trained h's checkpoint beside it. Writes h_frontier.json, h_frontier.md and h_frontier.png (mAP
against MACs) to `--out-dir` (benchmarks/results for the cpu preset on Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from fct_ml import pipeline
from fct_ml.backfill import apply_transformation, backfill_summary
from fct_ml.checkpoint import load_checkpoint, save_checkpoint
from fct_ml.config import replace
from fct_ml.data import Dataset, parse_class_list
from fct_ml.datasets import default_old_classes, load_dataset
from fct_ml.evaluation import evaluate_cases
from fct_ml.models import EmbeddingModel
from fct_ml.presets import ExperimentConfig, preset
from fct_ml.reproduce import StageCache, cache_fingerprint, dumps, stage_key
from fct_ml.training import Frozen
from fct_ml.transformation import Transformation, TransformationConfig, transformation_macs

# Set before fct_assets loads lancedb (the end-to-end timing): lance's warnings (one per table
# a backfill creates) would flood the output. lancedb's own binding reads LANCEDB_LOG.
os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("LANCEDB_LOG", "error")

sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
CPU = torch.device("cpu")
Precision = Literal["fp32", "bf16", "int8"]
# At equal MACs the knee prefers the precision the product runs now (see choose_default).
PRECISION_ORDER = ("fp32", "bf16", "int8")
# The metrics averaged over seeds (validation split, percent).
METRICS = (
    "mAP",
    "top1",
    "mAP_unseen_classes",
    "backfill_area_mAP",
    "backfill_area_top1",
    "backfill_area_random_mAP",
    "train_s",
)


@dataclass(frozen=True)
class Variant:
    """One h of the frontier: an architecture (trained) or a precision of one (inference only)."""

    inner_width: int
    inner_depth: int = 2
    inner_rank: int = 0
    precision: Precision = "fp32"

    @property
    def name(self) -> str:
        rank = f"-r{self.inner_rank}" if self.inner_rank else ""
        precision = "" if self.precision == "fp32" else f"-{self.precision}"
        return f"w{self.inner_width}-d{self.inner_depth}{rank}{precision}"

    @property
    def trained(self) -> Variant:
        """The fp32 variant whose weights this one runs (itself when fp32)."""
        return Variant(self.inner_width, self.inner_depth, self.inner_rank)


# The h each preset's frontier is built around. The cpu preset's h had inner width 1024 when its
# frontier was measured; the knee that study chose (width 128) is the preset's h since, and the
# sweep stays around 1024 so that this script reproduces the study behind that choice.
AROUND_WIDTH = {"cpu": 1024}


def baseline_h(preset_name: str) -> TransformationConfig:
    """The h the frontier of `preset_name` is compared with (its row "today's h")."""
    h = preset(preset_name).transformation
    return replace(h, inner_width=AROUND_WIDTH.get(preset_name, h.inner_width))


def variants_for(h: TransformationConfig) -> list[Variant]:
    """The frontier around the preset's h (inner width W, depth 2, full rank): W, W/2, W/4, W/8
    at depth 2; depth 1 at W and W/4; rank W/16 at W; W in bf16 and int8. For the cpu preset
    (W = 1024): 1024/512/256/128, depth 1 at 1024 and 256, rank 64, as the issue lists them."""
    w = h.inner_width
    if h.inner_depth != 2 or h.inner_rank != 0 or w < 16:
        raise ValueError(
            f"transformation: the frontier is built around a depth-2 full-rank h at least 16 wide,"
            f" got width {w}, depth {h.inner_depth}, rank {h.inner_rank}"
        )
    return [
        Variant(w),
        Variant(w // 2),
        Variant(w // 4),
        Variant(w // 8),
        Variant(w, inner_depth=1),
        Variant(w // 4, inner_depth=1),
        Variant(w, inner_rank=w // 16),
        Variant(w, precision="bf16"),
        Variant(w, precision="int8"),
    ]


def select(variants: list[Variant], names: Sequence[str] | None) -> list[Variant]:
    """The variants named (all when None), plus today's h (the baseline every row is compared
    with) and the fp32 h each chosen precision runs; in the frontier's order."""
    if names is None:
        return list(variants)
    known = {v.name: v for v in variants}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown[0]!r} (known: {', '.join(known)})")
    wanted = {variants[0].name, *names, *(known[n].trained.name for n in names)}
    return [v for v in variants if v.name in wanted]


# ----------------------------------------------------------------------------- inference


class _Bf16(nn.Module):
    """h run under CPU bfloat16 autocast. Frozen (fct_ml.training) turns autocast off on the CPU
    around every call, so the switch back on lives inside this module's own forward; it then
    goes through apply_transformation and the product's backfill like any h."""

    def __init__(self, h: Transformation):
        super().__init__()
        self.h = h

    @property
    def config(self) -> TransformationConfig:
        return self.h.config

    @property
    def sigma_head(self) -> nn.Module | None:
        return self.h.sigma_head

    def forward(self, old: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.h(old, side)

    def forward_with_sigma(self, old: torch.Tensor, side: torch.Tensor | None = None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.h.forward_with_sigma(old, side)


def inference_module(h: Transformation, precision: Precision) -> nn.Module:
    """The trained fp32 h as the variant runs it, in eval mode on the CPU."""
    h = h.eval().cpu()
    if precision == "fp32":
        return h
    if precision == "bf16":
        return _Bf16(h).eval()
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao (not a dependency here); the
        # pinned torch still has it, and it is the one int8 path for nn.Linear on the CPU.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(h, {nn.Linear}, dtype=torch.qint8).eval()


# ----------------------------------------------------------------------------- quality


def measure_quality(
    h: nn.Module,
    emb: dict[str, torch.Tensor],
    labels: torch.Tensor,
    unseen_classes: Sequence[int],
    config: ExperimentConfig,
    backfill_seed: int,
) -> dict[str, Any]:
    """new/h(old) and the backfilling curves' areas on one split (the validation one), in
    percent, through the library's own functions (apply_transformation, evaluate_cases,
    backfill_summary), as fct_ml.reproduce.evaluate_split measures them."""
    gallery, sigma = apply_transformation(h, emb["old"], emb["side"])
    unseen = torch.isin(labels, torch.tensor(list(unseen_classes), dtype=labels.dtype))
    evaluated = evaluate_cases(
        {"new/h(old)": (emb["new"], gallery)},
        labels,
        unseen_mask=unseen,
        metric=config.metric,
        chunk_size=config.eval_chunk_size,
    ).as_json()
    case = evaluated["cases"]["new/h(old)"]
    unseen_case = evaluated["cases_unseen_classes"].get("new/h(old)")
    areas = backfill_summary(
        emb["new"],
        labels,
        gallery,
        sigma,
        config.backfill_points,
        generator=torch.Generator().manual_seed(backfill_seed),
        metric=config.metric,
    ).areas
    return {
        "mAP": case["mAP"],
        "top1": case["top1"],
        "top5": case["top5"],
        "mAP_unseen_classes": None if unseen_case is None else unseen_case["mAP"],
        # The product re-embeds the most uncertain items first: sigma is its order.
        "backfill_area_mAP": areas["sigma"].mAP,
        "backfill_area_top1": areas["sigma"].top1,
        "backfill_area_random_mAP": areas["random"].mAP,
        "backfill_areas": {order: a.as_dict() for order, a in areas.items()},
    }


def setting_of(
    dataset: Dataset, old_classes: Sequence[int], config: ExperimentConfig, preset_name: str
) -> dict[str, Any]:
    """What a seed's record depends on besides the variant: a resumed record must match it."""
    setting = {
        "preset": preset_name,
        "dataset": dataset.name,
        "dataset_fingerprint": dataset.fingerprint(),
        "old_classes": list(old_classes),
        "validation_fraction": config.validation_fraction,
        "transformation": asdict(config.transformation),
        "transformation_train": asdict(config.transformation_train),
        "feature_views": config.feature_views,
        "backfill_points": config.backfill_points,
        "metric": config.metric,
    }
    return json.loads(json.dumps(setting))  # tuples as lists, as read back from the file


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dumps(data) + "\n")  # NaN/Inf as null: strict JSON readers refuse them
    tmp.replace(path)  # an interrupted run never leaves half a record


def read_seed_record(path: Path, setting: dict[str, Any], seed: int) -> dict[str, Any]:
    """The seed's record so far (empty if none); one made with another setting is refused."""
    if not path.exists():
        return {"seed": seed, "setting": setting, "variants": {}, "stages": {}, "timings_s": {}}
    record = json.loads(path.read_text())
    for key, value in setting.items():
        if record.get("setting", {}).get(key) != value:
            raise SystemExit(
                f"{path}: made with another {key} ({record.get('setting', {}).get(key)!r}, now"
                f" {value!r}); remove it or pass another --runs-dir"
            )
    return record


def run_seed(
    seed: int,
    dataset: Dataset,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    variants: list[Variant],
    *,
    setting: dict[str, Any],
    runs_dir: Path,
    cache_dir: Path | None,
    require_cached: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and measure every variant not yet in the seed's record; returns the record."""
    path = runs_dir / f"seed{seed}.json"
    record = read_seed_record(path, setting, seed)
    todo = [v for v in variants if v.name not in record["variants"]]
    if not todo:
        log(f"[seed {seed}] every variant already in {path}")
        return record
    run = pipeline.Run(seed=seed, device=CPU, progress=False)
    cache = StageCache(cache_dir, cache_fingerprint(dataset, config), seed, CPU)

    def stage(name: str, train: Callable[[], Any]):
        # fct_ml.reproduce's own keys, so the models `fct reproduce --cache-dir` cached are found.
        def missing():
            if require_cached:
                raise SystemExit(
                    f"{name}: not in the stage cache {cache_dir} for seed {seed};"
                    " run `fct reproduce --cache-dir` first or drop --require-cached"
                )
            record["stages"][name] = "trained"
            return train()

        t = time.perf_counter()
        record["stages"][name] = "cached"
        model, _ = cache(name, stage_key(name, config, old_classes), missing)
        log(f"[seed {seed}] {name}: {record['stages'][name]} ({time.perf_counter() - t:.1f} s)")
        return model

    old_model = stage(
        "old_model",
        lambda: pipeline.train_old_model(dataset, old_classes, config, run),
    )
    side_model = stage(
        "side_info_model",
        lambda: pipeline.train_side_info(dataset, old_classes, config, run),
    )
    new_model = stage(
        "new_model",
        lambda: pipeline.train_new_model(dataset, config, run),
    )
    t = time.perf_counter()
    val = pipeline.validation_split(dataset, config)
    models = {"old": old_model, "side": side_model, "new": new_model}
    emb = {k: pipeline.embed(m, val.images, config) for k, m in models.items()}
    record["timings_s"]["embed_validation"] = round(time.perf_counter() - t, 2)
    features = None
    if any(v.precision == "fp32" for v in todo):
        t = time.perf_counter()
        features = pipeline.training_features(
            dataset, old_model, side_model, new_model, config, run
        )
        record["timings_s"]["features"] = round(time.perf_counter() - t, 2)
        log(f"[seed {seed}] features: {record['timings_s']['features']:.1f} s")
    unseen = [c for c in range(dataset.num_classes) if c not in set(old_classes)]
    trained: dict[str, Transformation] = {}
    for variant in todo:
        started = time.perf_counter()
        base = variant.trained
        entry: dict[str, Any] = asdict(variant) | {"name": variant.name}
        if variant.precision == "fp32":
            exp = replace(
                config,
                transformation__inner_width=variant.inner_width,
                transformation__inner_depth=variant.inner_depth,
                transformation__inner_rank=variant.inner_rank,
            )
            epochs = exp.transformation_train.epochs

            def on_epoch(r, name=variant.name, epochs=epochs):
                parts = " ".join(f"{k} {v:.4f}" for k, v in r.parts.items())
                log(f"[seed {seed} {name}] epoch {r.epoch}/{epochs} {parts} ({r.seconds:.1f} s)")

            h, history = pipeline.train_h(
                features,  # not None: computed above, as an fp32 variant is to train
                new_model,
                exp,
                run,
                side_info=True,
                uncertainty=True,
                on_epoch=on_epoch,
                desc=variant.name,
            )
            entry["train_s"] = round(time.perf_counter() - started, 2)
            entry["final_loss"] = history[-1].parts if history else None
            # Relative to the runs dir, so a resumed run finds it from any working directory.
            file = f"seed{seed}/{variant.name}.safetensors"
            info = save_checkpoint(
                runs_dir / file,
                h,
                name=f"h_frontier:{variant.name}",
                metadata={"seed": seed, "preset": setting["preset"], "variant": variant.name},
            )
            entry["checkpoint"] = {"file": file, "sha256": info.sha256}
            trained[variant.name] = h
        else:
            h = trained.get(base.name) or _load_h(
                runs_dir, record["variants"][base.name]["checkpoint"]
            )
            entry["train_s"] = 0.0  # no training: the default h's weights
            entry["checkpoint"] = record["variants"][base.name]["checkpoint"]
        entry["h_config"] = asdict(h.config)
        entry["macs"] = transformation_macs(h.config)
        # Counted on the fp32 h: int8 weights are packed buffers, not parameters.
        entry["params"] = sum(p.numel() for p in h.parameters())
        t = time.perf_counter()
        entry.update(
            measure_quality(
                inference_module(h, variant.precision),
                emb,
                val.labels,
                unseen,
                config,
                run.seed_of("backfill"),
            )
        )
        entry["eval_s"] = round(time.perf_counter() - t, 2)
        record["variants"][variant.name] = entry
        write_json(path, record)
        log(
            f"[seed {seed} {variant.name}] validation mAP {entry['mAP']:.2f}, backfill area"
            f" (sigma) mAP {entry['backfill_area_mAP']:.2f}; train {entry['train_s']:.1f} s,"
            f" eval {entry['eval_s']:.1f} s"
        )
    return record


def _load_h(runs_dir: Path, checkpoint: dict[str, str]) -> Transformation:
    """A trained h of this study, verified against the sha256 recorded when it was saved."""
    h, _ = load_checkpoint(runs_dir / checkpoint["file"], checkpoint["sha256"])
    return h


# ----------------------------------------------------------------------------- aggregation


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    if any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per variant (in `names`' order): its architecture, MACs and, for each of
    METRICS, the mean over the seeds' records and the sample std (`<metric>_std`, 0 for one
    seed). Every record must hold every variant."""
    rows = []
    for name in names:
        missing = [r["seed"] for r in records if name not in r["variants"]]
        if missing:
            raise ValueError(f"{name}: no result for seed(s) {missing}; run them first")
        per_seed = [r["variants"][name] for r in records]
        first = per_seed[0]
        row: dict[str, Any] = {
            "name": name,
            "inner_width": first["inner_width"],
            "inner_depth": first["inner_depth"],
            "inner_rank": first["inner_rank"],
            "precision": first["precision"],
            "macs": first["macs"],
            "params": first["params"],
        }
        for metric in METRICS:
            row[metric], row[f"{metric}_std"] = _mean_std([e.get(metric) for e in per_seed])
        rows.append(row)
    return rows


def choose_default(
    rows: list[dict[str, Any]], baseline: str, tolerance: float = 1.0
) -> dict[str, Any]:
    """Mark the knee: among the rows whose mean mAP and mean backfill area (mAP) are each at
    least baseline's minus `tolerance` points, the one with the fewest MACs; at equal MACs
    fp32 before bf16 before int8, then by name. Adds `delta_mAP`, `delta_backfill_area_mAP`,
    `within_tolerance` and `default` to every row; returns the summary."""
    base = next((r for r in rows if r["name"] == baseline), None)
    if base is None:
        raise ValueError(f"baseline: no row named {baseline!r}")
    for r in rows:
        r["delta_mAP"] = r["mAP"] - base["mAP"]
        r["delta_backfill_area_mAP"] = r["backfill_area_mAP"] - base["backfill_area_mAP"]
        r["within_tolerance"] = bool(
            r["delta_mAP"] >= -tolerance and r["delta_backfill_area_mAP"] >= -tolerance
        )
    knee = min(
        (r for r in rows if r["within_tolerance"]),  # the baseline always is
        key=lambda r: (r["macs"], PRECISION_ORDER.index(r["precision"]), r["name"]),
    )
    for r in rows:
        r["default"] = r is knee
    return {
        "baseline": baseline,
        "baseline_mAP": base["mAP"],
        "baseline_backfill_area_mAP": base["backfill_area_mAP"],
        "tolerance_points": tolerance,
        "default": knee["name"],
    }


# ----------------------------------------------------------------------------- cost


def _inputs(config: TransformationConfig, n: int, seed: int = 0):
    # Non-negative, as the stored ReLU embeddings are; values do not change a dense layer's speed.
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, config.old_dim, generator=g), torch.rand(
        n, config.side_info_dim, generator=g
    )


def _interleaved(
    calls: dict[str, Callable[[], Any]], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, round after round over all of them (warm-up rounds
    dropped), so that a change in the machine's load shifts every variant alike."""
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(warmup + rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            if r >= warmup:
                seconds[name].append(time.perf_counter() - t)
    return seconds


def items_per_s_in_memory(
    modules: dict[str, nn.Module], batch: int, rounds: int, warmup: int
) -> dict[str, float]:
    """h alone: one batch of `batch` stored vectors already in memory through each module
    (eval mode, no gradients, sigma included), median over the rounds."""
    calls = {}
    for name, module in modules.items():
        old, side = _inputs(module.config, batch)
        frozen = Frozen(module, method="forward_with_sigma")
        calls[name] = lambda frozen=frozen, old=old, side=side: frozen(old, side)
    return {
        name: batch / statistics.median(s)
        for name, s in _interleaved(calls, rounds, warmup).items()
    }


def items_per_s_end_to_end(
    modules: dict[str, nn.Module],
    new_model: nn.Module,
    items: int,
    rows_per_batch: int,
    rounds: int,
    warmup: int,
    preset_name: str,
) -> dict[str, float]:
    """The product's transform backfill (fct_assets.upgrade.backfill.backfill_version, nothing
    re-embedded: LanceDB read -> h -> one LanceDB commit) of a gallery_store of `items` random
    stored vectors, in a temporary LanceDB folder; median over the rounds."""
    import numpy as np
    import pyarrow as pa

    from fct_assets.lib import storage
    from fct_assets.lib.records import Checkpoint, GalleryStore
    from fct_assets.lib.resources import FctResource
    from fct_assets.upgrade.backfill import backfill_version

    config = next(iter(modules.values())).config
    old_space, side_space, new_space = "old_model@bench", "side_info@bench", "new_model:v2@bench"
    schema = storage.gallery_store_schema(
        config.old_dim, config.side_info_dim, old_space, side_space
    )
    old, side = _inputs(config, items, seed=1)

    def vectors(t: torch.Tensor) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(t.numpy().reshape(-1)), t.shape[1])

    def batches():
        for s in range(0, items, rows_per_batch):
            m = min(rows_per_batch, items - s)
            yield pa.record_batch(
                [
                    pa.array(np.arange(s, s + m, dtype=np.int64)),
                    pa.array(np.zeros(m, dtype=np.int32)),
                    pa.array([b""] * m, type=pa.binary()),  # no image: nothing is re-embedded
                    vectors(old[s : s + m]),
                    vectors(side[s : s + m]),
                    pa.array([old_space] * m),
                    pa.array([side_space] * m),
                ],
                schema=schema,
            )

    with tempfile.TemporaryDirectory(prefix="fct-h-frontier-") as tmp:
        fct = FctResource(lancedb_uri=tmp, preset=preset_name, device="cpu")
        db = fct.connect()
        info = storage.publish(db, storage.GALLERY_STORE, schema, batches())
        store = GalleryStore(
            table=storage.GALLERY_STORE,
            version=info["version"],
            rows=items,
            old_space_id=old_space,
            old_dim=config.old_dim,
            side_info_space_id=side_space,
            side_info_dim=config.side_info_dim,
            old_model_sha256="",
            side_info_model_sha256="",
            dataset_fingerprint="random",
        )
        checkpoint = Checkpoint(new_model, sha256="", space_id=new_space, recorded={})
        counter = iter(range(2, 1_000_000))

        def backfill(module: nn.Module) -> None:
            version = f"v{next(counter)}"
            out = backfill_version(
                fct, version, store, module, checkpoint, 0.0, rows_per_batch, log=lambda _: None
            )
            if out.rows != items:
                raise RuntimeError(f"backfill {version}: {out.rows} rows, expected {items}")
            db.drop_table(storage.version_table(version))  # keeps the folder small

        calls = {name: (lambda m=m: backfill(m)) for name, m in modules.items()}
        seconds = _interleaved(calls, rounds, warmup)
    return {name: items / statistics.median(s) for name, s in seconds.items()}


# ----------------------------------------------------------------------------- report


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    """The frontier as a markdown table (also printed)."""
    head = (
        "| variant | width | depth | rank | precision | MACs/item | items/s in memory |"
        " items/s end to end | h train s | mAP (val) | Δ mAP | backfill area mAP (σ) | Δ area |"
        " within 1 pt | default |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in result["variants"]:
        lines.append(
            f"| {r['name']} | {r['inner_width']} | {r['inner_depth']} | {r['inner_rank'] or '-'}"
            f" | {r['precision']} | {r['macs']:,} | {r['items_per_s']:,.0f} |"
            f" {r['items_per_s_end_to_end']:,.0f} | {_fmt(r['train_s'], 1)} |"
            f" {_fmt(r['mAP'])} ± {_fmt(r['mAP_std'])} | {r['delta_mAP']:+.2f} |"
            f" {_fmt(r['backfill_area_mAP'])} ± {_fmt(r['backfill_area_mAP_std'])} |"
            f" {r['delta_backfill_area_mAP']:+.2f} | {'yes' if r['within_tolerance'] else 'no'} |"
            f" {'**default**' if r['default'] else ''} |"
        )
    return "\n".join(lines)


def markdown(result: dict[str, Any], plot: str | None) -> str:
    s = result
    knee = next(r for r in result["variants"] if r["default"])
    base = next(r for r in result["variants"] if r["name"] == s["baseline"])
    speed = (
        f"{knee['items_per_s'] / base['items_per_s']:.2f}x today's items/s in memory"
        if knee["items_per_s"] and base["items_per_s"]
        else "speed not measured"
    )
    lines = [
        "# The quality-cost frontier of h",
        "",
        f"Produced by `{result['command']}` on {result['machine']}; {result['wall_s']:.0f} s.",
        "",
        f"Preset `{result['preset']}`, dataset `{result['dataset']}` (old classes"
        f" {result['old_classes']}), seeds {result['seeds']}. Every number is on the"
        " **validation** split (the test split is never read); mean ± sample std over seeds.",
        "Each h is trained as the product trains its h: FastFill with side-info"
        " (`pipeline.train_h(side_info=True, uncertainty=True)`, the preset's"
        " `transformation_train`, the `fastfill` stage seed); the old, side-info and new models"
        " come from the `fct reproduce` stage cache. bf16 (CPU autocast) and int8"
        " (`quantize_dynamic` on nn.Linear) run the trained default h, no retraining.",
        "",
        f"**Default (the knee): `{s['default']}`**: the fewest MACs"
        f" ({knee['macs']:,} per item, {knee['macs'] / base['macs']:.2f}x today's; {speed}) among"
        f" the variants whose mean validation mAP and backfill area (σ order, mAP) are each at"
        f" most {s['tolerance_points']:g} point below today's h (`{s['baseline']}`: mAP"
        f" {s['baseline_mAP']:.2f}, area {s['baseline_backfill_area_mAP']:.2f}). Its mAP"
        f" {knee['mAP']:.2f} ({knee['delta_mAP']:+.2f}), area {knee['backfill_area_mAP']:.2f}"
        f" ({knee['delta_backfill_area_mAP']:+.2f}). At equal MACs fp32 ranks before bf16 and"
        " int8 (a precision is an inference option of the same h), so a precision variant is the"
        " default only if nothing cheaper in MACs qualifies and its fp32 h does not.",
        "",
        table(result),
        "",
        "- MACs: multiply-accumulates per item of h's forward pass with the σ head, Linear layers"
        " only (`fct_ml.transformation.transformation_macs`); the same for a precision variant.",
        f"- items/s in memory: one batch of {result['timing']['batch']} stored vectors through h"
        f" (no gradients, σ included), median of {result['timing']['rounds']} rounds after"
        f" {result['timing']['warmup']} warm-up; end to end: the product's transform backfill"
        " (`fct_assets.upgrade.backfill.backfill_version`: LanceDB read -> h -> one commit, nothing"
        f" re-embedded) of {result['timing']['end_to_end_items']:,} random stored vectors,"
        f" {result['timing']['rows_per_batch']} rows per batch. Every variant measured in this"
        " run, rounds interleaved; torch threads"
        f" {result['timing']['threads']}; 1-minute load average"
        f" {result['timing']['load_average_1m']} when timing began. Weights: seed"
        f" {result['seeds'][0]}'s trained h.",
        "- h train s: wall time of training each h (mean over seeds), in whichever invocation ran"
        " that seed.",
    ]
    if plot:
        lines += ["", f"![validation mAP against MACs]({plot})"]
    else:
        lines += ["", "No plot: matplotlib is not installed in this environment."]
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """mAP against MACs (and against items/s in memory), the default marked; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["variants"]
    base = result
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in (
        (axes[0], "macs", "MACs per item (Linear layers)"),
        (axes[1], "items_per_s", "items/s, h alone in memory"),
    ):
        seen: dict[float, int] = {}
        # The default drawn last, on top; labels of points at one x (the precisions, in MACs)
        # stacked rather than printed over each other.
        for r in sorted(rows, key=lambda r: r["default"]):
            if r.get(key) is None:
                continue
            colour = "tab:red" if r["default"] else "tab:blue" if r["within_tolerance"] else "grey"
            ax.errorbar(r[key], r["mAP"], yerr=r["mAP_std"], fmt="o", color=colour, capsize=3)
            k = seen[r[key]] = seen.get(r[key], -1) + 1
            ax.annotate(
                r["name"],
                (r[key], r["mAP"]),
                fontsize=7,
                xytext=(4, 4 - 9 * k),
                textcoords="offset points",
            )
        ax.axhline(base["baseline_mAP"], color="black", lw=0.8, label="today's h")
        ax.axhline(
            base["baseline_mAP"] - base["tolerance_points"],
            color="black",
            lw=0.8,
            ls="--",
            label=f"today's - {base['tolerance_points']:g} pt",
        )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("new/h(old) mAP, validation (%)")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"h's quality-cost frontier: {result['dataset']}, preset {result['preset']}, seeds"
        f" {result['seeds']} (red: the default, blue: within {base['tolerance_points']:g} pt)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default=None, help="default cpu (tiny with --smoke)")
    p.add_argument("--dataset", default=None, help="default fashion-mnist (digits with --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0: smoke)")
    p.add_argument("--old-classes", default=None, help="default: the dataset's, as fct reproduce")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--variants", nargs="+", default=None, help="a subset, by name (default all)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="the stage cache of `fct reproduce --cache-dir` (default runs/stage-cache)",
    )
    p.add_argument(
        "--require-cached",
        action="store_true",
        help="refuse to train an old, side-info or new model the cache lacks",
    )
    p.add_argument("--runs-dir", default=None, help="default runs/h_frontier (smoke: ..._smoke)")
    p.add_argument(
        "--out-dir",
        default=None,
        help="default benchmarks/results for cpu on fashion-mnist, else the runs dir",
    )
    p.add_argument("--tolerance", type=float, default=1.0, help="points of mAP and area")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=4096, help="in-memory timing batch")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; smoke 1)")
    p.add_argument("--e2e-items", type=int, default=None, help="default 20000 (smoke 2000)")
    p.add_argument("--rows-per-batch", type=int, default=4096, help="the backfill's default")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny preset on digits, seed 0, short timings, nothing under benchmarks/results",
    )
    p.add_argument("--note", default="", help="a line for the markdown (machine load, ...)")
    return p


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    smoke = args.smoke
    args.preset = args.preset or ("tiny" if smoke else "cpu")
    args.dataset = args.dataset or ("digits" if smoke else "fashion-mnist")
    args.seeds = args.seeds if args.seeds is not None else ([0] if smoke else [0, 1, 2])
    args.runs_dir = Path(args.runs_dir or ("runs/h_frontier_smoke" if smoke else "runs/h_frontier"))
    args.cache_dir = Path(
        args.cache_dir or ("runs/h_frontier_smoke/stage-cache" if smoke else "runs/stage-cache")
    )
    args.rounds = args.rounds or (2 if smoke else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    args.e2e_items = args.e2e_items or (2000 if smoke else 20000)
    study = (args.preset, args.dataset) == ("cpu", "fashion-mnist") and not smoke
    args.out_dir = Path(args.out_dir) if args.out_dir else (RESULTS if study else args.runs_dir)
    if args.out_dir.resolve() == RESULTS.resolve() and not study:
        raise SystemExit(
            f"--out-dir: {RESULTS} holds the cpu / fashion-mnist frontier; pass another folder"
            f" for preset {args.preset} on {args.dataset}{' (smoke)' if smoke else ''}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = _defaults(_parser().parse_args(argv))
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    dataset = load_dataset(args.dataset, args.data_dir)
    split = args.old_classes or default_old_classes(args.dataset, dataset.num_classes)
    old_classes = pipeline.old_class_tuple(
        parse_class_list(split, dataset.num_classes, what="old_classes")
    )
    config = replace(preset(args.preset), transformation=baseline_h(args.preset))
    variants = select(variants_for(config.transformation), args.variants)
    setting = setting_of(dataset, old_classes, config, args.preset)
    records = [
        run_seed(
            seed,
            dataset,
            old_classes,
            config,
            variants,
            setting=setting,
            runs_dir=args.runs_dir,
            cache_dir=args.cache_dir,
            require_cached=args.require_cached,
        )
        for seed in args.seeds
    ]
    names = [v.name for v in variants]
    rows = aggregate(records, names)
    summary = choose_default(rows, variants[0].name, args.tolerance)

    # Cost: every variant now, in this process, on seed seeds[0]'s trained weights.
    first = records[0]["variants"]
    modules = {
        v.name: inference_module(_load_h(args.runs_dir, first[v.name]["checkpoint"]), v.precision)
        for v in variants
    }
    load = round(os.getloadavg()[0], 2)
    print(f"timing {len(modules)} variants, {args.threads} torch threads, load {load}", flush=True)
    in_memory = items_per_s_in_memory(modules, args.batch, args.rounds, args.warmup)
    e2e = items_per_s_end_to_end(
        modules,
        # The backfill's new model; never run, since nothing is re-embedded.
        EmbeddingModel(pipeline.new_model_config(dataset, config)).eval(),
        args.e2e_items,
        args.rows_per_batch,
        args.rounds,
        args.warmup,
        args.preset,
    )
    for r in rows:
        r["items_per_s"] = round(in_memory[r["name"]], 1)
        r["items_per_s_end_to_end"] = round(e2e[r["name"]], 1)

    result = {
        "issue": "the quality-cost frontier of h (the transformation)",
        "preset": args.preset,
        "dataset": dataset.name,
        "old_classes": list(old_classes),
        "seeds": list(args.seeds),
        "split": "validation",
        "trained_as": "FastFill with side-info, as the product trains h (pipeline.train_h)",
        "backfill_order": "sigma",
        **summary,
        "variants": rows,
        "timing": {
            "threads": args.threads,
            "batch": args.batch,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "end_to_end_items": args.e2e_items,
            "rows_per_batch": args.rows_per_batch,
            "load_average_1m": load,
        },
        "per_seed": {
            str(r["seed"]): {
                "stages": r["stages"],
                "timings_s": r["timings_s"],
                "variants": {
                    n: {k: e[k] for k in ("mAP", "backfill_area_mAP", "train_s") if k in e}
                    for n, e in r["variants"].items()
                    if n in names
                },
            }
            for r in records
        },
        "machine": machine(),
        "command": " ".join(
            ["python", "benchmarks/studies/h_frontier.py", *(argv or sys.argv[1:])]
        ),
        "wall_s": round(time.perf_counter() - started, 1),
        "notes": [args.note] if args.note else [],
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / "h_frontier.png"
    drawn = plot(result, png)
    md = markdown(result, png.name if drawn else None)
    # NaN/Inf as null: strict JSON readers refuse them
    write_results("h_frontier", result, md, args.out_dir, dumps=dumps)
    print(table(result))
    print(
        f"default (knee): {summary['default']}; baseline mAP {summary['baseline_mAP']:.2f};"
        f" wrote {args.out_dir / 'h_frontier.json'}, .md{', .png' if drawn else ''}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
