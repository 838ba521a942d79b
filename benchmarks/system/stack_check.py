"""`make stack-check`: deploy/'s production storage run for real on this machine.

    python benchmarks/system/stack_check.py [--preset tiny] [--dataset digits]

Starts a private Postgres cluster and moto's S3 server on free loopback ports
(deploy/local_stack.py), points Dagster's run, event and schedule storage at that Postgres
(DAGSTER_HOME/dagster.yaml from deploy/dagster.yaml) and FCT_LANCEDB_URI / FCT_STORAGE_URI at
s3://fct-bucket/..., then does what a user of deploy/README.md does: the base assets, upgrade v2
with 2 shards in the multiprocess executor (plan and shards in the `gpu` pool), `fct promote`,
`fct search`, `fct lineage` and one tick of the daily evaluation schedule; then restarts Postgres
in the middle of an upgrade v3 and re-runs it if the run failed. It checks what the user would
check (the s3:// table read back through a fresh LanceDB connection, the checkpoints' sha256
read back from S3, lineage, search), stops both servers by PID whatever happened, and writes
benchmarks/results/stack_check.{json,md}. Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version as installed_version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script: deploy/ and fct_assets from this checkout
    sys.path.insert(0, str(REPO))

from benchmarks.common import machine  # noqa: E402
from benchmarks.common import write_results as write_files  # noqa: E402
from deploy.local_stack import LocalStack, StackError, postgres_bindir  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARDS = 2


# Module-level, so that `dg.reconstructable` rebuilds them in every step process of the
# multiprocess executor (resources and executor from the environment the stack sets).
def base_job():
    from fct_assets.definitions import build_defs

    return build_defs().resolve_job_def("base")


def upgrade_job():
    from fct_assets.definitions import build_defs

    return build_defs().resolve_job_def("upgrade")


def scheduled_evaluation_job():
    from fct_assets.definitions import build_defs

    return build_defs().resolve_job_def("scheduled_evaluation")


JOBS = {"base": base_job, "upgrade": upgrade_job, "scheduled_evaluation": scheduled_evaluation_job}


def execute(job: str, run_config: dict, tags: dict[str, str]) -> dict:
    """One run of `job` on the instance of DAGSTER_HOME, multiprocess; {"run_id", "success"}."""
    import dagster as dg

    with dg.execute_job(
        dg.reconstructable(JOBS[job]),
        instance=dg.DagsterInstance.get(),
        run_config=run_config,
        tags=tags,
        raise_on_error=False,
    ) as result:
        return {"run_id": result.run_id, "success": result.success}


def fct_cli(*args: str) -> tuple[int, object, str]:
    """`fct ARGS --json` in its own process (the user's command): (exit code, JSON, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "fct_assets.cli", *args, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    try:
        out = json.loads(done.stdout) if done.stdout.strip() else None
    except json.JSONDecodeError:
        out = done.stdout[-500:]
    return done.returncode, out, " ".join(done.stderr.split())[-500:]


class Steps:
    """Wall time of each step, in order; a failed step is recorded and re-raised."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.failed: dict[str, str] = {}

    def run(self, name: str, fn, *args, **kwargs):
        started = time.perf_counter()
        print(f"stack-check: {name} ...", flush=True)
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            self.failed[name] = " ".join(str(err).split())[:300] or type(err).__name__
            raise
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 1)
            print(f"stack-check: {name} {self.seconds[name]} s", flush=True)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in (
        "dagster",
        "dagster-postgres",
        "psycopg2-binary",
        "SQLAlchemy",
        "lancedb",
        "s3fs",
        "universal-pathlib",
        "moto",
        "torch",
    ):
        try:
            out[package] = installed_version(package)
        except Exception:
            out[package] = "not installed"
    bindir = postgres_bindir()
    if bindir is not None:
        done = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True
        )
        # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        words = done.stdout.split()
        out["postgres"] = words[2] if len(words) > 2 else done.stdout.strip()
    return out


def _step_pids(instance, run_id: str) -> dict[str, int]:
    import dagster as dg

    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
    return {r.event_log_entry.step_key: r.event_log_entry.dagster_event.pid for r in records}


def check_stack(stack: LocalStack, steps: Steps, checks: dict[str, bool], notes: dict) -> None:
    import dagster as dg
    import lancedb

    from fct_assets.lib.event_log import recorded_metadata
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import lancedb_storage_options

    instance = dg.DagsterInstance.get()
    checks["dagster_storage_is_postgres"] = all(
        type(s).__module__.startswith("dagster_postgres")
        for s in (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
    )
    dataset = {"ops": {"dataset": {"config": {"dataset": notes["dataset"], "old_classes": None}}}}
    if notes["dataset"] == "digits":
        dataset["ops"]["dataset"]["config"]["old_classes"] = "0-4"
    base = steps.run("base", execute, "base", dataset, {})
    checks["base_run_succeeded"] = base["success"]

    add_model_version(instance, "v2")
    shards = {"ops": {"backfilled_gallery": {"config": {"shards": SHARDS}}}}
    upgrade = steps.run("upgrade_v2", execute, "upgrade", shards, {"dagster/partition": "v2"})
    checks["upgrade_v2_succeeded"] = upgrade["success"]
    pids = _step_pids(instance, upgrade["run_id"])
    shard_pids = {pid for key, pid in pids.items() if ".backfill_shard[" in key}
    checks["shards_ran_in_separate_processes"] = len(shard_pids) == SHARDS and os.getpid() not in (
        shard_pids
    )
    pool = instance.event_log_storage.get_concurrency_info("gpu")
    notes["gpu_pool_slots"] = pool.slot_count
    checks["gpu_pool_on_postgres"] = pool.slot_count > 0

    # What a user checks: the table, read back through a fresh connection to the bucket.
    uri = stack.lancedb_uri
    db = lancedb.connect(uri, storage_options=lancedb_storage_options(uri))
    store = db.open_table("gallery_store").to_arrow().sort_by("item_id")
    table = db.open_table("gallery_v2").to_arrow().sort_by("item_id")
    notes["rows"] = table.num_rows
    checks["s3_table_rows_and_ids_read_back"] = (
        table.num_rows == store.num_rows > 0
        and table.column("item_id").to_pylist() == store.column("item_id").to_pylist()
    )

    # Each checkpoint's bytes, read from S3 with boto3 (not fct's code), hash to the recorded sha256.
    s3 = stack.s3.client()
    hashed = {}
    for asset, partition in (
        ("old_model", None),
        ("side_info_model", None),
        ("new_model", "v2"),
        ("transformation", "v2"),
    ):
        meta = recorded_metadata(instance, dg.AssetKey(asset), partition)
        bucket, _, key = str(meta["path"]).removeprefix("s3://").partition("/")
        blob = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        hashed[asset] = hashlib.sha256(blob).hexdigest() == meta["sha256"]
    notes["checkpoints_read_back"] = sorted(hashed)
    checks["checkpoint_sha256_read_back_from_s3"] = all(hashed.values()) and len(hashed) == 4

    code, promoted, err = steps.run("promote", fct_cli, "promote", "v2")
    checks["promote_serves_v2"] = code == 0 and promoted.get("version") == "v2"
    notes["promote"] = promoted if code == 0 else err

    item = store.column("item_id")[0].as_py()
    code, hits, err = steps.run("search", fct_cli, "search", "--item-id", str(item), "-k", "5")
    ids = set(store.column("item_id").to_pylist())
    checks["search_finds_an_item"] = (
        code == 0 and bool(hits) and all(h["item_id"] in ids for h in hits)
    )
    notes["search_top_hit"] = hits[0] if code == 0 and hits else err

    code, info, err = steps.run("lineage", fct_cli, "lineage", "v2")
    checks["lineage_complete"] = (
        code == 0
        and all(info["checkpoints"].values())
        and info["table"] == "gallery_v2"
        and upgrade["run_id"] in info["run_ids"]
        and base["run_id"] in info["run_ids"]
    )
    notes["lineage_run_ids"] = info["run_ids"] if code == 0 else err

    # One tick of the daily schedule, evaluated as the daemon would, and the run it asks for.
    def scheduled() -> dict:
        from fct_assets.lib.resources import FctResource
        from fct_assets.upgrade.automation import daily_evaluation

        context = dg.build_schedule_context(instance=instance, resources={"fct": FctResource()})
        request = daily_evaluation(context)
        if not isinstance(request, dg.RunRequest):
            return {"success": False, "skipped": str(request)}
        tags = {**request.tags, "dagster/partition": request.partition_key}
        return {**execute("scheduled_evaluation", request.run_config, tags), "tags": tags}

    tick = steps.run("scheduled_evaluation", scheduled)
    checks["scheduled_evaluation_ran"] = tick["success"] and tick["tags"].get("fct/scheduled") == (
        "daily"
    )

    postgres_restart(stack, steps, checks, notes)


def postgres_restart(stack: LocalStack, steps: Steps, checks: dict[str, bool], notes: dict) -> None:
    """Upgrade v3 in its own process; Postgres restarted once its first model step runs; the run
    must end (failed or succeeded), and a re-run (if it failed) must complete the version."""
    import dagster as dg
    import lancedb

    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import lancedb_storage_options

    instance = dg.DagsterInstance.get()
    add_model_version(instance, "v3")
    config = json.dumps({"ops": {"backfilled_gallery": {"config": {"shards": SHARDS}}}})
    # The child's result goes to a file: its run log (stderr) is shown as it runs.
    out_path = stack.root / "v3_first_run.json"
    child = subprocess.Popen(
        [sys.executable, __file__, "--run", "upgrade", "v3", config, "--out", str(out_path)],
        cwd=REPO,
    )

    def restart_when_started() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and child.poll() is None:
            runs = instance.get_run_records(
                dg.RunsFilter(
                    tags={"dagster/partition": "v3"}, statuses=[dg.DagsterRunStatus.STARTED]
                )
            )
            if runs:
                starts = instance.get_records_for_run(
                    runs[0].dagster_run.run_id, of_type=dg.DagsterEventType.STEP_START
                ).records
                if starts:
                    stack.postgres.restart(down_s=2.0)
                    notes["postgres_restarted_after_step"] = starts[-1].event_log_entry.step_key
                    return
            time.sleep(0.5)

    try:
        steps.run("postgres_restart_during_upgrade_v3", restart_when_started)
        steps.run("upgrade_v3_ends", child.wait, timeout=900)
    finally:
        if child.poll() is None:  # never leave it running
            child.kill()
            child.wait()
    first = json.loads(out_path.read_text()) if out_path.exists() else {"success": False}
    runs = instance.get_run_records(dg.RunsFilter(tags={"dagster/partition": "v3"}))
    status = {r.dagster_run.run_id: r.dagster_run.status.value for r in runs}
    notes["v3_first_run"] = {"success": first.get("success"), "status": status}
    # Failed cleanly: the run ended with a final status (no run left STARTED), or it retried and
    # succeeded.
    checks["postgres_restart_run_ended_cleanly"] = bool(status) and all(
        s in ("SUCCESS", "FAILURE") for s in status.values()
    )
    if not first.get("success"):
        rerun = steps.run(
            "rerun_upgrade_v3",
            execute,
            "upgrade",
            json.loads(config),
            {"dagster/partition": "v3"},
        )
        notes["v3_rerun_success"] = rerun["success"]
        done = rerun["success"]
    else:
        done = True
    uri = stack.lancedb_uri
    db = lancedb.connect(uri, storage_options=lancedb_storage_options(uri))
    rows = db.open_table("gallery_v3").count_rows() if done else -1
    checks["upgrade_v3_completes_after_postgres_restart"] = done and rows == notes["rows"]


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (stopped but not yet reaped) is not running.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "State:\tZ" not in status.read_text()


def write_results(result: dict) -> None:
    lines = [
        "# Stack check: Dagster on Postgres, LanceDB and checkpoints on S3, one machine",
        "",
        f"Produced by `make stack-check` (benchmarks/system/stack_check.py) on {result['date']}:"
        f" preset {result['preset']}, dataset {result['dataset']}, {SHARDS} shards, multiprocess"
        " executor. Postgres: a private cluster on a loopback port; S3: moto's server.",
        "",
        f"- Dagster storage: `{result['storage']['dagster']}`",
        f"- LanceDB: `{result['storage']['lancedb']}`; checkpoints and records:"
        f" `{result['storage']['fct']}`; endpoint `{result['storage']['s3_endpoint']}`",
        "",
        "| check | passed |",
        "| --- | --- |",
        *(f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in result["checks"].items()),
        "",
        "| step | wall time (s) |",
        "| --- | --- |",
        *(f"| {name} | {s} |" for name, s in result["steps_s"].items()),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
    ]
    if result["failed"]:
        lines += [
            "",
            "Failed steps: " + "; ".join(f"{k}: {v}" for k, v in result["failed"].items()),
        ]
    write_files("stack_check", result, "\n".join(lines), RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dataset", default="digits")
    # A child of postgres_restart: one run on the stack its environment names.
    parser.add_argument(
        "--run", nargs=3, metavar=("JOB", "PARTITION", "CONFIG"), help=argparse.SUPPRESS
    )
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        job, partition, config = args.run
        result = execute(job, json.loads(config), {"dagster/partition": partition})
        args.out.write_text(json.dumps(result))
        return 0

    # A `kill PID` of this script still runs the finally below (the servers stopped by PID).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    steps, checks, notes = Steps(), {}, {"dataset": args.dataset}
    root = Path(tempfile.mkdtemp(prefix="fct-stack-"))
    try:
        stack = LocalStack(root, preset=args.preset)
    except StackError as err:  # Postgres not installed: say so, in one line
        print(f"stack-check: {err}", file=sys.stderr)
        return 1
    saved = dict(os.environ)
    try:
        steps.run("start_servers", stack.__enter__)
        os.environ.update(stack.environ())
        print(f"stack-check: Postgres {stack.postgres.url()}, S3 {stack.s3.endpoint}", flush=True)
        check_stack(stack, steps, checks, notes)
        checks["all_steps_ran"] = True
    except Exception as err:
        checks.setdefault("all_steps_ran", False)
        notes["error"] = " ".join(str(err).split())[:500]
        print(f"stack-check: failed: {notes['error']}", file=sys.stderr)
    finally:
        steps.run("stop_servers", stack.stop)
        os.environ.clear()
        os.environ.update(saved)
    # Every server this run started (whether or not it came up) is gone.
    started = [p.pid for p in (stack.postgres.proc, stack.s3.proc) if p is not None]
    checks["servers_stopped_by_pid"] = not any(_alive(pid) for pid in started)
    notes["server_pids"] = started
    shutil.rmtree(root, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "preset": args.preset,
        "dataset": args.dataset,
        "versions": _versions(),
        "storage": {
            "dagster": stack.postgres.url(),
            "lancedb": stack.lancedb_uri,
            "fct": stack.storage_uri,
            "s3_endpoint": stack.s3.endpoint,
        },
        "steps_s": steps.seconds,
        "checks": checks,
        "failed": steps.failed,
        "notes": notes,
        "machine": machine(),
    }
    write_results(result)
    print((RESULTS / "stack_check.md").read_text())
    return 0 if checks and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
