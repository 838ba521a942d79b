"""An upgrade's cost, broken down by asset: wall time, CPU time and peak RSS.

    python benchmarks/perf/upgrade_cost.py                        # demo preset, Fashion-MNIST
    python benchmarks/perf/upgrade_cost.py --preset tiny          # what fits a loaded 2-core machine

Materialises the base assets, then ONE upgrade (v2) as `make demo` runs it (the `upgrade` job,
in process), on a fresh instance and storage in a temporary folder. What each asset cost is
read back from its materialisation's metadata (fct_assets.lib.cost: `cost/wall_s`, `cost/cpu_s`,
`cost/peak_rss_mb`, the numbers the Dagster UI plots across materialisations); the backfill's
are per op (plan, each shard, publish). Only the upgrade is reported: the base assets are paid
once per old model.

h's training time as a share of the new model's = transformation's wall (CPU) / new_model's.

Writes benchmarks/results/upgrade_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")
sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
UPGRADE = ("new_model", "transformation", "backfilled_gallery", "eval_report")


def _cost(meta: dict, prefix: str = "cost/") -> dict:
    return {k: meta.get(f"{prefix}{k}") for k in ("wall_s", "cpu_s", "peak_rss_mb")}


def run(preset: str, dataset: str, old_classes: str | None, root: Path) -> dict:
    """Base assets + upgrade v2 under `root`; the upgrade's per-asset and per-op costs."""
    import dagster as dg

    from fct_assets.definitions import build_defs
    from fct_assets.lib.event_log import recorded_metadata
    from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import FctResource

    home = root / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset=preset, device="cpu")
    defs = build_defs(
        {
            "fct": fct,
            "checkpoint_io_manager": CheckpointIOManager(uri=str(root / "checkpoints")),
            "record_io_manager": RecordIOManager(uri=str(root / "records")),
        }
    )
    instance = dg.DagsterInstance.from_config(str(home))
    config = {"ops": {"dataset": {"config": {"dataset": dataset, "old_classes": old_classes}}}}
    started = time.perf_counter()
    base = defs.resolve_job_def("base").execute_in_process(run_config=config, instance=instance)
    base_s = time.perf_counter() - started
    if not base.success:
        raise RuntimeError("the base assets failed")
    add_model_version(instance, "v2")
    started = time.perf_counter()
    upgrade = defs.resolve_job_def("upgrade").execute_in_process(
        instance=instance, partition_key="v2"
    )
    upgrade_s = time.perf_counter() - started
    if not upgrade.success:
        raise RuntimeError("the upgrade v2 failed")
    meta = {a: recorded_metadata(instance, dg.AssetKey(a), "v2") for a in UPGRADE}
    back = meta["backfilled_gallery"]
    # "cost/shard_<k>_wall_s" -> k
    shards = sorted({k.split("_")[1] for k in back if k.startswith("cost/shard_")}, key=int)
    ops = {"plan": _cost(back, "cost/plan_")}
    ops.update({f"shard_{k}": _cost(back, f"cost/shard_{k}_") for k in shards})
    ops["publish"] = _cost(back, "cost/publish_")
    assets = {a: _cost(meta[a]) for a in UPGRADE}
    h, new = assets["transformation"], assets["new_model"]
    epochs = {
        "new_model": meta["new_model"].get("epochs"),
        "transformation": meta["transformation"].get("epochs"),
    }
    return {
        "preset": preset,
        "dataset": dataset,
        "gallery_rows": back.get("rows"),
        "base_seconds": round(base_s, 1),
        "upgrade_seconds": round(upgrade_s, 1),
        "assets": assets,
        "backfill_ops": ops,
        "h_share_of_new_model": {
            "wall": round(h["wall_s"] / new["wall_s"], 3),
            "cpu": round(h["cpu_s"] / new["cpu_s"], 3),
            # the training loops alone (history's epoch seconds): no data loading, no features
            "train_seconds": round(
                meta["transformation"]["train_seconds"] / meta["new_model"]["train_seconds"], 3
            ),
        },
        "epochs": epochs,
        "eval_report": {
            k: meta["eval_report"].get(k) for k in ("new/h(old) mAP", "new/new mAP", "old/old mAP")
        },
    }


def _markdown(result: dict) -> str:
    lines = [
        "# An upgrade's cost, by asset",
        "",
        f"Machine: {result['machine']}; load average at the end {result['load_average_1m']}"
        " (the benchmark's own threads give about the number of torch threads; above that,"
        " other jobs shared the machine and wall times include waiting for a core; CPU times"
        " do not).",
        f"Preset `{result['preset']}`, {result['dataset']}, gallery of {result['gallery_rows']}"
        f" items; one upgrade (v2), the `upgrade` job in process as `make demo` runs it:"
        f" {result['upgrade_seconds']} s (base assets before it: {result['base_seconds']} s).",
        "",
        "| asset / op | wall (s) | CPU (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|",
    ]
    for name, c in result["assets"].items():
        lines.append(f"| {name} | {c['wall_s']} | {c['cpu_s']} | {c['peak_rss_mb']} |")
        if name == "backfilled_gallery":
            for op, o in result["backfill_ops"].items():
                lines.append(
                    f"| &nbsp;&nbsp;{op} | {o['wall_s']} | {o['cpu_s']} | {o['peak_rss_mb']} |"
                )
    share = result["h_share_of_new_model"]
    lines += [
        "",
        f"h's training as a share of the new model's: {share['wall']:.1%} of its wall time,"
        f" {share['cpu']:.1%} of its CPU time, {share['train_seconds']:.1%} of its training"
        " loop's time (the epochs alone, without h's feature extraction through the three"
        f" frozen models; epochs: new model"
        f" {result['epochs']['new_model']}, h {result['epochs']['transformation']}).",
        "",
        "backfilled_gallery's wall is the plan's start to the publish's end (the steps between"
        " included); its CPU is the ops' sum; its peak RSS the largest op's. Peak RSS is each"
        " step's own (the process's high-water mark is reset when the step starts), so it"
        " includes what the process held before the step (imports, the models loaded as"
        " inputs).",
        "",
        "## Command",
        "",
        "```",
        f"python benchmarks/perf/upgrade_cost.py --preset {result['preset']}",
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--old-classes", default=None, help="default: the dataset's split")
    parser.add_argument("--out", default=str(RESULTS / "upgrade_cost"), help="path without suffix")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="fct-upgrade-cost-") as tmp:
        result = run(args.preset, args.dataset, args.old_classes, Path(tmp))
    result["machine"] = machine(f"torch threads {torch.get_num_threads()}")
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    write_results(out.name, result, _markdown(result), out.parent)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
