"""Choose the deployed h on the validation split, with top-1 AND mAP in the criterion.

    python benchmarks/studies/h_select.py --cache-dir runs/stage-cache --require-cached
    python benchmarks/studies/h_select.py --smoke      # tiny preset on digits, seed 0: a quick check

The product deploys FastFill's h with side-info. Its target (the `cpu` setting, mean of 3 seeds,
on test): close >= 85 % of the old/old -> new/new top-1 gap AND >= 90 % of the mAP gap, an
interval over queries clearing both. The frontier study (h_frontier.py) chose h's width on mAP
and the backfill area only; this one puts both gaps in the criterion and also varies FastFill's
loss weight, the cross-entropy through the new classifier against the squared error
(`TransformationConfig.ce_weight`).

For each seed, the old, side-info and new models come from the stage cache `fct reproduce
--cache-dir` fills (fct_ml.reproduce.StageCache's keys), or are trained (not with
--require-cached); h's training features are fct_ml.pipeline's. Each candidate (inner width x
ce_weight) is trained as the product trains its h (`pipeline.train_h(side_info=True,
uncertainty=True)`, the preset's transformation_train, the "fastfill" stage seed), only those two
fields changed. Measured on the VALIDATION split only (the test split is never read): the gap
closed by new/h(old), top-1 and mAP, with the 95 % interval of the mean over seeds from a paired
bootstrap over queries (fct_ml.headline: old/old, new/new and new/h(old) resampled together,
the same resamples in every seed); the backfill areas in sigma and random order.

The choice: a candidate qualifies when, for top-1 and for mAP, the low end of its interval is
at least the target plus `--margin` (points of gap closed). Of those, the fewest MACs (h's cost
per item), then the largest worst margin; if none qualifies, the largest worst margin, where a
candidate's worst margin is min over the two metrics of (interval low - target). Resumable: one
JSON per seed under `--runs-dir`, written after each candidate. Writes h_select.json and
h_select.md to `--out-dir` (benchmarks/results for the cpu preset on Fashion-MNIST).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fct_ml import pipeline
from fct_ml.backfill import apply_transformation, backfill_summary
from fct_ml.config import replace
from fct_ml.data import Dataset, parse_class_list
from fct_ml.datasets import default_old_classes, load_dataset
from fct_ml.evaluation import Case, evaluate_cases, gap_closed
from fct_ml.headline import Headlines, interval_of_mean
from fct_ml.presets import ExperimentConfig, preset
from fct_ml.reproduce import StageCache, cache_fingerprint, dumps, stage_key
from fct_ml.transformation import transformation_macs

sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402
from benchmarks.studies.h_frontier import setting_of, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
CPU = torch.device("cpu")
# The targets on the gap closed by the deployed h (percent), as benchmarks/studies/reproduce.py's.
TARGETS = {"top1": 85.0, "mAP": 90.0}
METRICS = ("top1", "mAP")
# The grid for the cpu preset: h's inner width around the frontier's knee (128) up to the
# width that closed 87.8 % of the top-1 gap (1024), and FastFill's CE weight around its
# default (1): 0 (squared error alone), a half and double.
WIDTHS = (128, 256, 512, 1024)
CE_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
SMOKE_WIDTHS = (16, 64)
SMOKE_CE_WEIGHTS = (0.0, 1.0)


@dataclass(frozen=True)
class Candidate:
    """One h to try: FastFill's h with side-info at this inner width and CE weight."""

    inner_width: int
    ce_weight: float

    @property
    def name(self) -> str:
        return f"w{self.inner_width}-ce{self.ce_weight:g}"


def candidates(widths: Sequence[int], ce_weights: Sequence[float]) -> list[Candidate]:
    """Every (width, ce_weight) pair, widths outer; refuses an empty or invalid grid by name."""
    if not widths or not ce_weights:
        raise ValueError("candidates: expected at least one width and one ce_weight")
    for w in widths:
        if isinstance(w, bool) or w < 1:
            raise ValueError(f"--widths: expected integers >= 1, got {w!r}")
    for c in ce_weights:
        if not c >= 0:
            raise ValueError(f"--ce-weights: expected numbers >= 0, got {c!r}")
    return [Candidate(w, float(c)) for w in widths for c in ce_weights]


def measure(
    h: torch.nn.Module,
    emb: dict[str, torch.Tensor],
    labels: torch.Tensor,
    config: ExperimentConfig,
    backfill_seed: int,
) -> dict[str, Any]:
    """The gap closed by new/h(old) on one split (top-1, mAP, percent), with the resamples of
    its paired bootstrap over queries, and the backfill areas in sigma and random order."""
    gallery, sigma = apply_transformation(h, emb["old"], emb["side"])
    evaluated = evaluate_cases(
        {
            Case.OLD_OLD: (emb["old"], emb["old"]),
            Case.NEW_NEW: (emb["new"], emb["new"]),
            Case.NEW_H_OLD: (emb["new"], gallery),
        },
        labels,
        metric=config.metric,
        chunk_size=config.eval_chunk_size,
    )
    heads = Headlines(len(labels))
    for metric in METRICS:
        add = heads.top1 if metric == "top1" else heads.ap
        heads.gap(
            metric,
            add(evaluated.results[Case.NEW_H_OLD]),
            add(evaluated.results[Case.OLD_OLD]),
            add(evaluated.results[Case.NEW_NEW]),
        )
    intervals = heads.compute()
    gap = gap_closed(evaluated.cases).as_dict()
    areas = backfill_summary(
        emb["new"],
        labels,
        gallery,
        sigma,
        config.backfill_points,
        generator=torch.Generator().manual_seed(backfill_seed),
        metric=config.metric,
    ).areas_as_dicts()
    return {
        "gap_closed": gap,
        "cases": evaluated.as_json()["cases"],
        "bootstrap": intervals.replicates_as_json(),
        "backfill_auc": {o: areas[o] for o in ("random", "sigma")},
    }


def run_seed(
    seed: int,
    dataset: Dataset,
    old_classes: Sequence[int],
    config: ExperimentConfig,
    todo: list[Candidate],
    *,
    setting: dict[str, Any],
    runs_dir: Path,
    cache_dir: Path | None,
    require_cached: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and measure every candidate not yet in the seed's record; returns the record."""
    path = runs_dir / f"seed{seed}.json"
    record: dict[str, Any] = {"seed": seed, "setting": setting, "candidates": {}}
    if path.exists():
        record = json.loads(path.read_text())
        for key, value in setting.items():
            if record.get("setting", {}).get(key) != value:
                raise SystemExit(
                    f"{path}: made with another {key} ({record.get('setting', {}).get(key)!r},"
                    f" now {value!r}); remove it or pass another --runs-dir"
                )
    todo = [c for c in todo if c.name not in record["candidates"]]
    if not todo:
        log(f"[seed {seed}] every candidate already in {path}")
        return record
    run = pipeline.Run(seed=seed, device=CPU, progress=False)
    cache = StageCache(cache_dir, cache_fingerprint(dataset, config), seed, CPU)

    def stage(name: str, train: Callable[[], Any]):
        def missing():
            if require_cached:
                raise SystemExit(
                    f"{name}: not in the stage cache {cache_dir} for seed {seed};"
                    " run `fct reproduce --cache-dir` first or drop --require-cached"
                )
            return train()

        model, _ = cache(name, stage_key(name, config, old_classes), missing)
        return model

    old_model = stage(
        "old_model", lambda: pipeline.train_old_model(dataset, old_classes, config, run)
    )
    side_model = stage(
        "side_info_model", lambda: pipeline.train_side_info(dataset, old_classes, config, run)
    )
    new_model = stage("new_model", lambda: pipeline.train_new_model(dataset, config, run))
    val = pipeline.validation_split(dataset, config)
    models = {"old": old_model, "side": side_model, "new": new_model}
    emb = {k: pipeline.embed(m, val.images, config) for k, m in models.items()}
    features = pipeline.training_features(dataset, old_model, side_model, new_model, config, run)
    for candidate in todo:
        started = time.perf_counter()
        exp = replace(
            config,
            transformation__inner_width=candidate.inner_width,
            transformation__ce_weight=candidate.ce_weight,
        )
        h, _ = pipeline.train_h(
            features, new_model, exp, run, side_info=True, uncertainty=True, desc=candidate.name
        )
        train_s = time.perf_counter() - started
        entry = asdict(candidate) | {
            "name": candidate.name,
            "macs": transformation_macs(h.config),
            "train_s": round(train_s, 2),
        }
        entry.update(measure(h, emb, val.labels, exp, run.seed_of("backfill")))
        record["candidates"][candidate.name] = entry
        write_json(path, record)
        g = entry["gap_closed"]
        log(
            f"[seed {seed} {candidate.name}] validation gap closed top-1 {g['top1']:.1f} %,"
            f" mAP {g['mAP']:.1f} % ({time.perf_counter() - started:.0f} s)"
        )
    return record


def aggregate(records: Sequence[dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per candidate: its grid point, MACs, and for top-1 and mAP the mean over seeds of
    the gap closed, its sample std and the 95 % interval of the mean (paired bootstrap over
    queries, the seeds' resamples averaged); the backfill areas' means."""
    rows = []
    for name in names:
        missing = [r["seed"] for r in records if name not in r["candidates"]]
        if missing:
            raise ValueError(f"{name}: no result for seed(s) {missing}; run them first")
        per_seed = [r["candidates"][name] for r in records]
        row: dict[str, Any] = {
            k: per_seed[0][k] for k in ("name", "inner_width", "ce_weight", "macs")
        }
        for metric in METRICS:
            values = [e["gap_closed"][metric] for e in per_seed]
            interval = interval_of_mean(
                values, [e["bootstrap"]["values"][metric] for e in per_seed]
            )
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{metric}_ci95"] = [interval.low, interval.high]
        for order in ("sigma", "random"):
            for metric in METRICS:
                row[f"area_{order}_{metric}"] = statistics.fmean(
                    e["backfill_auc"][order][metric] for e in per_seed
                )
        rows.append(row)
    return rows


def worst_margin(row: dict[str, Any], targets: dict[str, float] = TARGETS) -> float:
    """min over top-1 and mAP of (the interval's low end - the target), in points of gap closed;
    -inf where an interval is missing."""
    lows = [row.get(f"{m}_ci95", [None])[0] for m in targets]
    if any(v is None or not math.isfinite(v) for v in lows):
        return -math.inf
    return min(low - targets[m] for low, m in zip(lows, targets, strict=True))


def choose(
    rows: Sequence[dict[str, Any]], margin: float = 0.0, targets: dict[str, float] = TARGETS
) -> tuple[dict[str, Any], bool]:
    """(the chosen row, whether it qualifies): among rows whose worst margin is >= `margin`,
    the fewest MACs, then the largest worst margin, then the first; if none qualifies, the row
    with the largest worst margin."""
    if not rows:
        raise ValueError("choose: no candidate")
    qualified = [r for r in rows if worst_margin(r, targets) >= margin]
    if qualified:
        return min(qualified, key=lambda r: (r["macs"], -worst_margin(r, targets))), True
    return max(rows, key=lambda r: worst_margin(r, targets)), False


def markdown(result: dict[str, Any]) -> str:
    chosen = result["chosen"]
    verdict = "qualifies" if result["qualifies"] else "**does not qualify** (the best worst margin)"
    lines = [
        f"# Choosing the deployed h on validation ({result['preset']}, {result['dataset']})",
        "",
        f"Produced by `{result['command']}` on {result['machine']}. Seeds {result['seeds']}."
        " FastFill h with side-info, trained as the product trains it; only the inner width and"
        " the CE weight change. Gap closed by new/h(old) on the validation split (%), mean ±"
        " sample std over seeds [95 % interval of the mean over queries]. Targets: top-1 ≥"
        f" {TARGETS['top1']:g}, mAP ≥ {TARGETS['mAP']:g}; a candidate qualifies when both"
        f" intervals' low ends clear them by {result['margin']:g} points.",
        "",
        "| candidate | width | CE weight | MACs | gap top-1 | gap mAP | worst margin |"
        " area σ mAP | area random mAP |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        cells = []
        for m in METRICS:
            lo, hi = r[f"{m}_ci95"]
            cells.append(f"{r[m]:.1f} ± {r[f'{m}_std']:.1f} [{lo:.1f}, {hi:.1f}]")
        mark = " ←" if r["name"] == chosen["name"] else ""
        lines.append(
            f"| {r['name']}{mark} | {r['inner_width']} | {r['ce_weight']:g} | {r['macs']:,} |"
            f" {cells[0]} | {cells[1]} | {worst_margin(r):+.2f} |"
            f" {r['area_sigma_mAP']:.2f} | {r['area_random_mAP']:.2f} |"
        )
    lines += [
        "",
        f"Chosen: **{chosen['name']}** (inner width {chosen['inner_width']}, CE weight"
        f" {chosen['ce_weight']:g}), {verdict}. To deploy it, set the `{result['preset']}`"
        " preset's TransformationConfig to these two values (fct_ml/presets.py) and re-run"
        " `make reproduce-benchmark`, which reports it on test.",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default=None, help="default cpu (tiny with --smoke)")
    p.add_argument("--dataset", default=None, help="default fashion-mnist (digits with --smoke)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (0: smoke)")
    p.add_argument("--old-classes", default=None, help="default: the dataset's, as fct reproduce")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--widths", type=int, nargs="+", default=None, help=f"default {WIDTHS}")
    p.add_argument(
        "--ce-weights", type=float, nargs="+", default=None, help=f"default {CE_WEIGHTS}"
    )
    p.add_argument("--margin", type=float, default=0.0, help="points of gap closed")
    p.add_argument("--cache-dir", default=None, help="the stage cache of `fct reproduce`")
    p.add_argument(
        "--require-cached", action="store_true", help="refuse to train the old/side/new models"
    )
    p.add_argument("--runs-dir", default=None, help="default runs/h_select (smoke: ..._smoke)")
    p.add_argument(
        "--out-dir", default=None, help="default benchmarks/results (smoke: the runs dir)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny preset, digits, seed 0, 2 x 2 grid")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    smoke = args.smoke
    preset_name = args.preset or ("tiny" if smoke else "cpu")
    dataset_name = args.dataset or ("digits" if smoke else "fashion-mnist")
    seeds = args.seeds or ([0] if smoke else [0, 1, 2])
    grid = candidates(
        args.widths or (SMOKE_WIDTHS if smoke else WIDTHS),
        args.ce_weights or (SMOKE_CE_WEIGHTS if smoke else CE_WEIGHTS),
    )
    runs_dir = Path(args.runs_dir or ("runs/h_select_smoke" if smoke else "runs/h_select"))
    out_dir = Path(args.out_dir) if args.out_dir else (runs_dir if smoke else RESULTS)
    dataset = load_dataset(dataset_name, args.data_dir)
    split = args.old_classes or default_old_classes(dataset_name, dataset.num_classes)
    old_classes = pipeline.old_class_tuple(
        parse_class_list(split, dataset.num_classes, what="old_classes")
    )
    config = preset(preset_name)
    setting = setting_of(dataset, old_classes, config, preset_name)
    records = [
        run_seed(
            seed,
            dataset,
            old_classes,
            config,
            grid,
            setting=setting,
            runs_dir=runs_dir,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            require_cached=args.require_cached,
        )
        for seed in seeds
    ]
    rows = aggregate(records, [c.name for c in grid])
    chosen, qualifies = choose(rows, args.margin)
    result = {
        "preset": preset_name,
        "dataset": dataset.name,
        "command": "python benchmarks/studies/h_select.py " + " ".join(argv),
        "machine": machine(),
        "seeds": seeds,
        "old_classes": list(old_classes),
        "targets": TARGETS,
        "margin": args.margin,
        "rows": rows,
        "chosen": chosen,
        "qualifies": qualifies,
    }
    md = markdown(result)
    write_results("h_select", result, md, out=out_dir, dumps=dumps)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
