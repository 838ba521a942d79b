"""Inbox -> searchable latency while `make ui`'s stack runs.

    python benchmarks/perf/ingest_latency.py                      # 5 trials, tiny preset on digits
    python benchmarks/perf/ingest_latency.py --trials 8 --preset demo --dataset fashion-mnist

Materialises the base assets and model version v2 in-process under a temporary folder, promotes
v2, then starts `dagster dev` (webserver, daemon, code server; the same command as `make ui`, on
a free loopback port) over that DAGSTER_HOME with the repo's dagster.yaml, the inbox sensor at
its default interval (FCT_INBOX_INTERVAL_S unset: 10 s) and automatic upgrades on. Each trial
waits a random part of the sensor interval (so drops fall at any phase of its ticks), drops one
held-back image into the inbox (written under a dot-name, then renamed, as the README asks) and
polls `fct search` (the same function, in this process, by that image, every 0.5 s) until the
item is the top hit of the deployed table. Latency = drop -> found, which the ingest run's own
events split into: sensor (drop -> run queued by the sensor's tick), queue (-> launched by the
daemon), start-up (-> the run worker started), run (-> run ended) and poll (-> found).
`dagster dev` is stopped by its PID at the end, failed or not.

Writes benchmarks/results/ingest_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # tests.ui.server: the browser test's `dagster dev` wrapper
os.environ.setdefault("LANCE_LOG", "error")
sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the repository root: benchmarks.common
from benchmarks.common import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET_S = 60.0
POLL_S = 0.5


def _environment(root: Path, preset: str) -> dict[str, str]:
    from tests.ui.server import ui_environment

    # The repo's dagster.yaml (no telemetry, no pop-ups), the inbox under `root`.
    env = ui_environment(root)
    env.pop("FCT_AUTO_UPGRADE")  # `make ui` runs with automatic upgrades on
    env["FCT_PRESET"] = preset
    return env


def _deploy(dataset: str, old_classes: str) -> float:
    """Base assets and v2 materialised and v2 promoted, in this process; returns seconds."""
    import dagster as dg

    from fct_assets.definitions import build_defs
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import FctResource
    from fct_assets.serving.deployment import promote

    started = time.perf_counter()
    defs = build_defs()
    with dg.DagsterInstance.get() as instance:
        config = {"ops": {"dataset": {"config": {"dataset": dataset, "old_classes": old_classes}}}}
        assert (
            defs.resolve_job_def("base")
            .execute_in_process(instance=instance, run_config=config)
            .success
        )
        add_model_version(instance, "v2")
        assert (
            defs.resolve_job_def("upgrade")
            .execute_in_process(instance=instance, partition_key="v2")
            .success
        )
        promote(instance, FctResource().connect(), "v2")
    return time.perf_counter() - started


def _held_back(dataset: str, n: int):
    """n (C, H, W) uint8 images of the validation split: never trained on, not in the gallery."""
    from fct_assets.lib.resources import FctResource
    from fct_ml.pipeline import validation_split

    fct = FctResource()
    val = validation_split(fct.load_dataset(dataset), fct.experiment())
    return [val.images[i].numpy() for i in range(n)]


def _ingest_run(instance, name: str):
    """The ingest run whose batch holds the inbox file `name`, or None."""
    import dagster as dg

    for run in instance.get_runs(dg.RunsFilter(job_name="ingest")):
        files = run.run_config["ops"]["ingested_batch"]["config"]["files"]
        if name in files:
            return run
    return None


def _parts(stats, dropped: float, found: float) -> dict:
    """drop -> enqueued (the sensor's tick), -> launched (the daemon's queue), -> started (the
    run worker's start-up), -> ended (the run), -> found (the poll), in seconds."""
    marks = [
        ("sensor_s", stats.enqueued_time),
        ("queue_s", stats.launch_time),
        ("startup_s", stats.start_time),
        ("run_s", stats.end_time),
    ]
    out, last = {}, dropped
    for key, mark in marks:
        if mark is None:
            return out
        out[key], last = round(mark - last, 2), mark
    out["poll_s"] = round(found - last, 2)
    return out


def trial(instance, fct, inbox: Path, queries: Path, k: int, image, timeout: float) -> dict:
    """Drop one image, poll search until it is the top hit; the latency."""
    from fct_assets.ingest.ingest import content_id
    from fct_assets.lib import storage
    from fct_assets.serving.search import search_command

    item = content_id(image)
    query = queries / f"q{k}.png"
    query.write_bytes(storage.encode_png(image))
    partial = inbox / f".t{k}.png"
    partial.write_bytes(storage.encode_png(image))
    load = os.getloadavg()[0]
    dropped_wall, dropped = time.time(), time.monotonic()
    partial.rename(inbox / f"t{k}.png")
    polls = 0
    while time.monotonic() - dropped < timeout:
        hits = search_command(instance, fct, image=str(query), item_id=None, version=None, k=1)
        polls += 1
        if hits and hits[0].item_id == item:
            break
        time.sleep(POLL_S)
    else:
        return {"trial": k, "found": False, "timeout_s": timeout, "load_average_1m": load}
    seconds = time.monotonic() - dropped
    return {
        "trial": k,
        "found": True,
        "seconds": round(seconds, 2),
        "polls": polls,
        "load_average_1m": round(load, 2),
        "dropped_at": dropped_wall,
        "found_at": dropped_wall + seconds,
    }


def add_parts(instance, trials: list[dict], timeout: float = 120.0) -> None:
    """Each found trial's ingest run and its parts, once the run has ended (the item can be
    found before the run's last events are written)."""
    deadline = time.monotonic() + timeout
    for t in trials:
        if not t["found"]:
            continue
        run = _ingest_run(instance, f"t{t['trial']}.png")
        if run is None:
            continue
        stats = instance.get_run_stats(run.run_id)
        while stats.end_time is None and time.monotonic() < deadline:
            time.sleep(1)
            stats = instance.get_run_stats(run.run_id)
        t["run_id"] = run.run_id
        t["run_status"] = instance.get_run_by_id(run.run_id).status.value
        t.update(_parts(stats, t["dropped_at"], t["found_at"]))


def measure(args, root: Path) -> dict:
    import dagster as dg

    from fct_assets.lib.resources import FctResource
    from tests.ui.server import DagsterDev

    env = _environment(root, args.preset)
    os.environ.update(env)  # FctResource, the IO managers and the instance read it
    setup_s = _deploy(args.dataset, args.old_classes)
    images = _held_back(args.dataset, args.trials)
    inbox, queries = root / "inbox", root / "queries"
    inbox.mkdir()
    queries.mkdir()
    log = root / "dagster_dev.log"
    server = DagsterDev(env, log)
    trials = []
    try:
        started = time.monotonic()
        server.wait_ready()
        ready_s = time.monotonic() - started
        print(f"dagster dev ready on {server.url} after {ready_s:.1f} s", flush=True)
        rng = random.Random(0)
        interval = int(os.environ.get("FCT_INBOX_INTERVAL_S", "10"))
        fct = FctResource()
        with dg.DagsterInstance.get() as instance:
            for k, image in enumerate(images):
                time.sleep(rng.uniform(0, interval))  # a random phase of the sensor's ticks
                trials.append(trial(instance, fct, inbox, queries, k, image, args.timeout))
                print(json.dumps(trials[-1]), flush=True)
            add_parts(instance, trials)
            other = [
                r.job_name
                for r in instance.get_runs()
                if r.job_name not in ("ingest", "base", "upgrade")
            ]
            failed = [
                r.run_id
                for r in instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
            ]
    except BaseException:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        server.stop()
        assert not server.alive(), f"dagster dev (pid {server.pid}) still running after stop()"
    found = [t["seconds"] for t in trials if t["found"]]
    return {
        "trials": trials,
        "found": len(found),
        "median_s": round(statistics.median(found), 2) if found else None,
        "max_s": max(found) if found else None,
        "target_s": TARGET_S,
        "met": len(found) == len(trials) and max(found) <= TARGET_S,
        "sensor_interval_s": interval,
        "setup_s": round(setup_s, 1),
        "dagster_dev_ready_s": round(ready_s, 1),
        "other_runs_launched": other,
        "failed_runs": failed,
    }


def _median(trials: list[dict], key: str) -> str:
    values = [t[key] for t in trials if t.get(key) is not None]
    return f"{statistics.median(values):.1f}" if values else "-"


def _poll_every(trials: list[dict]) -> str:
    gaps = [t["seconds"] / t["polls"] for t in trials if t["found"]]
    return f"{statistics.median(gaps):.1f}" if gaps else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--old-classes", default="0-4")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per trial")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    start_load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fct-latency-") as tmp:
        result = measure(args, Path(tmp))
    end_load = os.getloadavg()
    result["command"] = (
        f"python benchmarks/perf/ingest_latency.py --trials {args.trials} --preset {args.preset}"
        f" --dataset {args.dataset}"
    )
    result["machine"] = machine(
        "load average (1, 5, 15 min)"
        f" {' '.join(f'{x:.1f}' for x in start_load)} at start,"
        f" {' '.join(f'{x:.1f}' for x in end_load)} at end"
    )
    trials = result["trials"]
    rows = [
        f"| {t['trial']} | {t['seconds'] if t['found'] else 'not found'} |"
        f" {t.get('sensor_s', '-')} | {t.get('queue_s', '-')} | {t.get('startup_s', '-')} |"
        f" {t.get('run_s', '-')} | {t.get('poll_s', '-')} | {t['load_average_1m']} |"
        for t in trials
    ]
    md = "\n".join(
        [
            "# Inbox -> searchable latency",
            "",
            f"`{result['command']}` on {result['machine']}.",
            "",
            f"`dagster dev` (webserver, daemon, code server) over a temporary instance, v2"
            f" deployed ({args.preset} preset, {args.dataset}), inbox sensor every"
            f" {result['sensor_interval_s']} s, automatic upgrades on. Each trial drops one"
            " held-back image at a random phase of the sensor's ticks and polls `fct search`"
            f" every {POLL_S} s until it is the top hit of the deployed table.",
            "",
            f"- found: {result['found']} of {len(trials)}",
            f"- median {result['median_s']} s, max {result['max_s']} s (target"
            f" {TARGET_S:.0f} s: {'met' if result['met'] else 'missed'})",
            f"- medians of the parts: sensor {_median(trials, 'sensor_s')} s, queue"
            f" {_median(trials, 'queue_s')} s, run start-up {_median(trials, 'startup_s')} s,"
            f" run {_median(trials, 'run_s')} s, poll {_median(trials, 'poll_s')} s",
            "- polls: each is a full `fct search` (checkpoint load, embedding, search), one"
            f" every {_poll_every(trials)} s (median of seconds / polls), so a trial's figure"
            " is late by up to that much",
            f"- other runs launched meanwhile: {result['other_runs_launched'] or 'none'};"
            f" failed runs: {result['failed_runs'] or 'none'}",
            "",
            "| trial | drop -> found (s) | sensor: drop -> run queued | queue: -> launched"
            " | start-up: -> run started | run: -> run ended | poll: -> found"
            " | load average (1 min) at drop |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    write_results("ingest_latency", result, md, args.out)
    print(md)
    return 0 if result["found"] == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
