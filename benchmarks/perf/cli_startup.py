"""Cold start of the `fct` serving commands: `search --item-id`, `lineage`, `promote`.

    python benchmarks/perf/cli_startup.py                    # this checkout, 5 runs each
    python benchmarks/perf/cli_startup.py --baseline b41e128 # and the code of that commit, same run
    python benchmarks/perf/cli_startup.py --commands search  # `fct search` only

Each run is a fresh `python -m fct_assets.cli ...` process (imports, instance, LanceDB, model
loading: everything a user's call pays) against a tiny instance built once in a temporary
folder: the base assets and model version v2 on the digits dataset (tiny preset), v2 promoted.
`fct search` (no --version) reads the serving contract the promotion wrote. Wall time is the
median of the runs; CPU time (user + system of the child) is reported beside it because wall
time on a shared 2-core machine moves with whatever else runs. With --baseline, the same
commands run with that commit's fct_ml/fct_assets first on PYTHONPATH, alternating with this
checkout's run by run (the baseline first, so the last `promote` is this checkout's and its
serving contract is current), so both see the same load.

What `fct search` spends its start on: one more run under `python -X importtime`, each module's
own import time summed by top-level package (importtime's figures run ~20% above a plain run's).

Writes benchmarks/results/cli_startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"

# (name in the JSON, arguments); the targets are issue 15's (lineage) and 29's (search).
COMMANDS = {
    "search": ["search", "--item-id", "3", "--json"],
    "lineage": ["lineage", "v2", "--json"],
    "promote": ["promote", "v2", "--json"],
}
TARGETS_S = {"search": 1.5, "lineage": 1.5}


def _build(root: Path) -> dict[str, str]:
    """Base assets + v2 (tiny preset, digits) under `root`, v2 promoted; the CLI's environment."""
    import dagster as dg

    from fct_assets.definitions import build_defs
    from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import FctResource
    from fct_assets.serving.deployment import promote

    home = root / "dagster_home"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\nnux:\n  enabled: false\n")
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="tiny", device="cpu", data_dir=None)
    defs = build_defs(
        {
            "fct": fct,
            "checkpoint_io_manager": CheckpointIOManager(uri=str(root / "checkpoints")),
            "record_io_manager": RecordIOManager(uri=str(root / "records")),
        }
    )
    instance = dg.DagsterInstance.from_config(str(home))
    config = {"ops": {"dataset": {"config": {"dataset": "digits", "old_classes": "0-4"}}}}
    if (
        not defs.resolve_job_def("base")
        .execute_in_process(run_config=config, instance=instance)
        .success
    ):
        raise RuntimeError("the base assets failed")
    add_model_version(instance, "v2")
    if (
        not defs.resolve_job_def("upgrade")
        .execute_in_process(instance=instance, partition_key="v2")
        .success
    ):
        raise RuntimeError("the upgrade v2 failed")
    promote(instance, fct.connect(), "v2")
    return {
        "DAGSTER_HOME": str(home),
        "FCT_LANCEDB_URI": fct.lancedb_uri,
        "FCT_STORAGE_URI": str(root),
        "FCT_PRESET": "tiny",
        "FCT_DEVICE": "cpu",
    }


def _export(ref: str, into: Path) -> str:
    """fct_ml/ and fct_assets/ of commit `ref` extracted under `into`; its short hash."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = into / "code.tar"
    with archive.open("wb") as out:
        subprocess.run(
            ["git", "archive", "--format=tar", ref, "fct_ml", "fct_assets"],
            cwd=REPO,
            stdout=out,
            check=True,
        )
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return sha


def _time(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one `fct ARGS` process; refuses a failed command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fct_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        # Not the checkout: `python -m` puts the working directory first on sys.path, ahead of
        # PYTHONPATH, and the baseline's code must win there.
        cwd=tempfile.gettempdir(),
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"fct {' '.join(args)} exited {done.returncode}: {done.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def import_breakdown(importtime: str, top: int = 8) -> dict[str, float]:
    """Seconds of import by top-level package (each module's own time, summed), the `top`
    largest and the rest, from `python -X importtime`'s stderr."""
    by_package: dict[str, float] = {}
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, _, name = line.removeprefix("import time:").split("|")
        if not self_us.strip().isdigit():
            continue  # the header line
        package = name.strip().split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(self_us) / 1e6
    ranked = sorted(by_package.items(), key=lambda kv: -kv[1])
    out = {name: round(seconds, 3) for name, seconds in ranked[:top]}
    out["(other)"] = round(sum(seconds for _, seconds in ranked[top:]), 3)
    out["(total)"] = round(sum(by_package.values()), 3)
    return out


def _imports(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Where one `fct ARGS` process spends its imports (import_breakdown)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fct_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"fct {' '.join(args)} exited {done.returncode}: {done.stderr[-500:]}")
    return import_breakdown(done.stderr)


def _summary(walls: list[float], cpus: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(walls), 3),
        "runs_s": [round(w, 3) for w in walls],
        "cpu_median_s": round(statistics.median(cpus), 3),
        "cpu_runs_s": [round(c, 3) for c in cpus],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (file cache)")
    parser.add_argument("--baseline", default=None, help="a git ref to time beside this checkout")
    parser.add_argument("--out", default=str(RESULTS / "cli_startup"), help="path without suffix")
    parser.add_argument(
        "--state", default=None, help="keep the tiny instance in this folder (reused when there)"
    )
    parser.add_argument(
        "--commands",
        nargs="+",
        choices=list(COMMANDS),
        default=list(COMMANDS),
        help="the commands to time (default: all)",
    )
    args = parser.parse_args(argv)
    commands = {name: COMMANDS[name] for name in args.commands}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fct-cli-") as tmp:
        root = Path(tmp)
        print("the tiny instance (base + v2) ...", file=sys.stderr, flush=True)
        state = Path(args.state) if args.state else root / "state"
        if (state / "env.json").exists():
            built = json.loads((state / "env.json").read_text())
        else:
            built = _build(state)
            (state / "env.json").write_text(json.dumps(built))
        env = {**os.environ, **built, "PYTHONWARNINGS": "ignore"}
        codes = {}
        baseline_sha = None
        if args.baseline:
            (root / "baseline").mkdir()
            baseline_sha = _export(args.baseline, root / "baseline")
            codes["baseline"] = {**env, "PYTHONPATH": str(root / "baseline")}
        codes["current"] = dict(env)  # last: its `promote` writes the serving contract
        timings: dict[str, dict[str, tuple[list[float], list[float]]]] = {
            code: {name: ([], []) for name in commands} for code in codes
        }
        for name, cli_args in commands.items():
            for _ in range(args.warmup):  # the OS's file cache
                for code_env in codes.values():
                    _time(cli_args, code_env)
            for _ in range(args.runs):
                for code, code_env in codes.items():
                    wall, cpu = _time(cli_args, code_env)
                    timings[code][name][0].append(wall)
                    timings[code][name][1].append(cpu)
                    print(f"{code:>8} {name:>8}: {wall:.2f} s ({cpu:.2f} s CPU)", file=sys.stderr)
        imports = _imports(COMMANDS["search"], codes["current"]) if "search" in commands else None
    result = {name: _summary(*timings["current"][name]) for name in commands}
    if imports is not None:
        result["search_imports_s"] = imports
    if baseline_sha:
        result["baseline"] = {
            "ref": baseline_sha,
            **{name: _summary(*timings["baseline"][name]) for name in commands},
        }
    result["machine"] = machine()
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_results(out.name, result, _markdown(result, args.runs, commands), out.parent)
    print(f"wrote {out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


def _markdown(result: dict, runs: int, commands: dict[str, list[str]]) -> str:
    base = result.get("baseline")
    lines = [
        "# `fct` cold start",
        "",
        f"Machine: {result['machine']}; load average at the end {result['load_average_1m']}."
        f" {runs} runs per command, each a fresh process; median wall time, CPU = user + system of"
        " the process. Tiny instance: digits, tiny preset, base assets + v2 promoted.",
        "",
    ]
    head = "| command | wall median (s) | CPU median (s) |"
    rule = "|---|---:|---:|"
    if base:
        head += f" before ({base['ref']}) wall (s) | before CPU (s) | wall after / before |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for name, cli_args in commands.items():
        row = f"| `fct {' '.join(cli_args)}` | {result[name]['median_s']} |"
        row += f" {result[name]['cpu_median_s']} |"
        if base:
            ratio = result[name]["median_s"] / base[name]["median_s"]
            row += f" {base[name]['median_s']} | {base[name]['cpu_median_s']} | {ratio:.2f} |"
        lines.append(row)
    lines += ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    for name, goal in TARGETS_S.items():
        if name not in commands:
            continue
        got = result[name]["median_s"]
        met = "yes" if got <= goal else "no"
        lines.append(f"| `fct {name}` wall, median of {runs} | <= {goal} s | {got} s | {met} |")
    imports = result.get("search_imports_s")
    if imports:
        lines += [
            "",
            "## What `fct search` imports",
            "",
            "One run under `python -X importtime`: each module's own import time, summed by"
            " top-level package (importtime runs ~20% slower than a plain run).",
            "",
            "| package | import (s) |",
            "|---|---:|",
            *(f"| {name} | {seconds} |" for name, seconds in imports.items()),
        ]
    lines += [
        "",
        "## Command",
        "",
        "```",
        "python benchmarks/perf/cli_startup.py" + (f" --baseline {base['ref']}" if base else ""),
        "```",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
