"""One training epoch alone, and with an ingest running beside it: the runs' thread budget.

    python benchmarks/perf/thread_budget.py                      # demo preset, Fashion-MNIST, 2,000 items
    python benchmarks/perf/thread_budget.py --preset tiny --dataset digits --items 100   # a quick check

Each case starts fresh processes, as two concurrent runs are. `epoch` trains the preset's new
model on the dataset for one epoch (fct_ml.pipeline.train_new_model, as the new_model asset does)
with its device from FctResource, so torch takes the run's thread budget
(FctResource.thread_budget: cores // concurrent_runs, at least 1); the epoch's own time is
timed (its training loop, not the data loading). `ingest` ingests N held-back Fashion-MNIST images
(benchmarks/perf/ingest.py's setup: demo-preset models with random weights, a deployed table of
100 items; then fct_assets.ingest.ingest.ingest_files, the ingest step's logic), timed from its
start to its last commit. Both processes first prepare, then start together.

    alone                 the epoch by itself, with the budget
    alone, all cores      the epoch by itself, a thread per core (torch's default)
    beside                the epoch and the ingest together, each with the budget
    beside, all cores     the same, each taking a thread per core (as before the budget)
    beside an epoch       two epochs together (two runs that both train), each with the budget
    beside an epoch, all cores   the same, each taking a thread per core

The slowdown is the epoch's time beside the ingest over its time alone, both with the budget;
target: at most 2.5x, and the ingest finishes. Wall time on a shared machine moves
with whatever else runs: the load average is recorded at the start and the end.

Writes benchmarks/results/thread_budget.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # the repository root: benchmarks.common
from benchmarks.common import load_average, machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET_SLOWDOWN = 2.5
# (name, processes, environment of each): FCT_CONCURRENT_RUNS=2 is the run queue's concurrency
# (dagster_home/dagster.yaml); FCT_TORCH_THREADS=<cores> is torch's own default, one per core.
CASES = (
    ("alone", ("epoch",), "budget"),
    ("alone, all cores", ("epoch",), "all cores"),
    ("beside", ("epoch", "ingest"), "budget"),
    ("beside, all cores", ("epoch", "ingest"), "all cores"),
    # Two runs that both train (a new model beside `fct reproduce`, say): the case that thrashed.
    ("beside an epoch", ("epoch", "epoch2"), "budget"),
    ("beside an epoch, all cores", ("epoch", "epoch2"), "all cores"),
)


def _wait_for(path: Path) -> None:
    while not path.exists():
        time.sleep(0.05)


def _epoch(args, folder: Path) -> dict:
    """Prepare the dataset, say ready, wait for go; train one epoch of the new model."""
    from fct_assets.lib.resources import FctResource
    from fct_ml import pipeline

    fct = FctResource(
        lancedb_uri=str(folder / "lancedb"), preset=args.preset, device="cpu", data_dir=None
    )
    data = fct.load_dataset(args.dataset)
    exp = fct.experiment()
    exp = replace(exp, new_train=replace(exp.new_train, epochs=1))
    run = fct.run(seed=0)  # applies the budget: every model step asks for its device first
    import torch

    threads = torch.get_num_threads()
    (folder / f"{args.role}.ready").touch()
    _wait_for(folder / "go")
    epochs: list = []
    started = time.perf_counter()
    pipeline.train_new_model(data, exp, run, on_epoch=epochs.append)
    return {
        "epoch_s": round(epochs[0].seconds, 3),
        "wall_s": round(time.perf_counter() - started, 3),
        "torch_threads": threads,
        "train_items": len(pipeline.fit_split(data, exp)),
    }


def _ingest(args, folder: Path) -> dict:
    """Tables, models and files as benchmarks/perf/ingest.py sets them up; say ready, wait for
    go; ingest the files as one batch."""
    from benchmarks.perf.ingest import _setup
    from fct_assets.ingest.ingest import Target, ingest_files
    from fct_assets.serving.deployment import advance

    fct, deployed, side, files, record = _setup(folder / "ingest", args.items)
    db = fct.connect()
    fct.torch_device()  # the budget, as the ingest step applies it
    import torch

    threads = torch.get_num_threads()
    (folder / "ingest.ready").touch()
    _wait_for(folder / "go")
    started = time.perf_counter()
    result = ingest_files(
        fct,
        files,
        batch="bbudget",
        dataset=record,
        target=Target("v2", "gallery_v2", deployed),
        side_info_model=side,
        advance_deployment=lambda v: advance(db, "v2", v).seq,
        log=lambda m: None,
    )
    seconds = time.perf_counter() - started
    if result.added_to_store != args.items:
        raise RuntimeError(f"ingest added {result.added_to_store} of {args.items} items")
    return {
        "ingest_s": round(seconds, 3),
        "items": args.items,
        "items_per_s": round(args.items / seconds, 1),
        "torch_threads": threads,
    }


def _case(args, roles: tuple[str, ...], threads: str) -> dict:
    """Start the roles' processes, let them prepare, start them together; their results."""
    env = {k: v for k, v in os.environ.items() if k not in ("FCT_TORCH_THREADS",)}
    env["FCT_CONCURRENT_RUNS"] = "2"
    if threads == "all cores":
        env["FCT_TORCH_THREADS"] = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="fct-threads-") as tmp:
        folder = Path(tmp)
        children = {
            role: subprocess.Popen(
                [sys.executable, __file__, "--role", role, "--folder", str(folder), *args.passed],
                env=env,
                cwd=REPO,
            )
            for role in roles
        }
        for role in roles:
            while not (folder / f"{role}.ready").exists():
                if children[role].poll() is not None:
                    raise RuntimeError(f"{role} exited {children[role].returncode} before starting")
                time.sleep(0.1)
        (folder / "go").touch()
        for role, child in children.items():
            if child.wait() != 0:
                raise RuntimeError(f"{role} exited {child.returncode}")
        return {role: json.loads((folder / f"{role}.json").read_text()) for role in roles}


def summary(cases: dict[str, dict]) -> dict:
    """The slowdowns and the target from the cases' results (epoch seconds of each case)."""
    alone = cases["alone"]["epoch"]["epoch_s"]
    beside = cases["beside"]["epoch"]["epoch_s"]
    out = {
        "slowdown": round(beside / alone, 2),
        "slowdown_vs_all_cores_alone": round(
            beside / cases["alone, all cores"]["epoch"]["epoch_s"], 2
        ),
        "slowdown_all_cores": round(
            cases["beside, all cores"]["epoch"]["epoch_s"]
            / cases["alone, all cores"]["epoch"]["epoch_s"],
            2,
        ),
        "target_slowdown": TARGET_SLOWDOWN,
        "ingest_finished": "ingest" in cases["beside"],
    }
    out["met"] = out["slowdown"] <= TARGET_SLOWDOWN and out["ingest_finished"]
    if "beside an epoch" in cases:  # each epoch beside another, against the budget's epoch alone
        out["slowdown_beside_epoch"] = round(
            cases["beside an epoch"]["epoch"]["epoch_s"] / alone, 2
        )
        out["slowdown_beside_epoch_all_cores"] = round(
            cases["beside an epoch, all cores"]["epoch"]["epoch_s"]
            / cases["alone, all cores"]["epoch"]["epoch_s"],
            2,
        )
    return out


def _markdown(result: dict, command: str) -> str:
    s = result["summary"]
    lines = [
        "# Thread budget: an epoch beside an ingest",
        "",
        f"`{command}` on {result['machine']}; load average {result['load_average']['start']}"
        f" at the start, {result['load_average']['end']} at the end.",
        "",
        f"One epoch of the `{result['preset']}` preset's new model on {result['dataset']}"
        f" ({result['cases']['alone']['epoch']['train_items']} training items); an ingest of"
        f" {result['items']} images beside it, started together. Budget: cores // 2 concurrent"
        " runs; all cores: a thread per core in each process (torch's default).",
        "",
        "| case | torch threads (epoch) | epoch (s) | ingest (s) | ingest items/s |"
        " the other epoch (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, case in result["cases"].items():
        ingest, other = case.get("ingest"), case.get("epoch2")
        lines.append(
            f"| {name} | {case['epoch']['torch_threads']} | {case['epoch']['epoch_s']} |"
            f" {ingest['ingest_s'] if ingest else ''} | {ingest['items_per_s'] if ingest else ''} |"
            f" {other['epoch_s'] if other else ''} |"
        )
    lines += [
        "",
        f"Slowdown of the epoch beside the ingest, with the budget: {s['slowdown']}x (target <="
        f" {s['target_slowdown']}x, the ingest finishing: {'met' if s['met'] else 'missed'});"
        f" against the epoch alone on all cores: {s['slowdown_vs_all_cores_alone']}x. Without the"
        f" budget (a thread per core in each process): {s['slowdown_all_cores']}x.",
    ]
    if "slowdown_beside_epoch" in s:
        lines += [
            "",
            f"Two epochs at once (two runs that both train), each against its epoch alone: with the"
            f" budget {s['slowdown_beside_epoch']}x, with a thread per core in each process"
            f" {s['slowdown_beside_epoch_all_cores']}x.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--items", type=int, default=2000, help="images the ingest adds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--role", choices=("epoch", "epoch2", "ingest"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:  # a child: one side of a case
        result = (_ingest if args.role == "ingest" else _epoch)(args, args.folder)
        (args.folder / f"{args.role}.json").write_text(json.dumps(result))
        return 0
    args.passed = ["--preset", args.preset, "--dataset", args.dataset, "--items", str(args.items)]
    start = load_average()
    cases = {}
    for name, roles, threads in CASES:
        print(f"{name} ...", file=sys.stderr, flush=True)
        cases[name] = _case(args, roles, threads)
        print(f"{name}: {json.dumps(cases[name])}", file=sys.stderr, flush=True)
    result = {
        "preset": args.preset,
        "dataset": args.dataset,
        "items": args.items,
        "cases": cases,
        "summary": summary(cases),
        "load_average": {"start": start, "end": load_average()},
        "machine": machine(),
    }
    given = sys.argv[1:] if argv is None else argv
    md = _markdown(result, " ".join(["python benchmarks/perf/thread_budget.py", *given]))
    write_results("thread_budget", result, md, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
