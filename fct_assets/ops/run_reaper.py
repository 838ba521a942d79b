"""Runs whose worker died: marked failed, so that run retries can start them again.

On the local instance (`make ui`: `DefaultRunLauncher`) a run's worker is a process spawned by the
code server. If it dies without reporting (killed with `dagster dev`, OOM-killed, the machine
restarted), the run stays "started" in the run storage forever. Dagster's run monitoring cannot
see it: `DefaultRunLauncher.supports_check_run_worker_health` is False, so monitoring only times
out runs stuck in "starting". A run that stays "started" holds its backfill lease
(fct_assets/lib/guards.py decides a lease's holder by its run's status) and its partition's slot in
the run queue (`tag_concurrency_limits` on `dagster/partition`), so every later run of that
version would wait or be refused for good.

The sensor `run_reaper` (every 30 s, running by default) closes that gap: a started run whose
worker process is gone is reported failed (reason UNEXPECTED_TERMINATION, message naming the pid),
and the pool slots its killed steps still claimed are freed (else the retry would queue behind
them: pool `gpu` has one slot).
The instance's `run_retries` (dagster_home/dagster.yaml: one retry, not on a step's own failure)
then launches it again from the failed step; the backfill's staging is per run and its publish is
one commit, so the retry publishes exactly once.

The worker is found by the engine event the run worker writes first ("Started process for run
(pid: N)"). A pid can be reused: a process whose start time is later than that event is not the
worker. This holds only where run workers run on the machine that evaluates the sensor, which is
what `DefaultRunLauncher` does; under any other launcher the reaper does nothing (Kubernetes: run
monitoring checks the run's pod, deploy/dagster.yaml).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import dagster as dg

from fct_assets.lib.config import seconds_from_env
from fct_assets.lib.dagster_internals import report_run_worker_lost

STARTED_PROCESS = "Started process for run (pid: "
# A process that started this long after the worker's event is another process with the same pid
# (the event is written by the worker itself, after it started; clocks are the same machine's).
PID_REUSE_SLACK_S = 2.0


def run_worker(instance: dg.DagsterInstance, run_id: str) -> tuple[int, float] | None:
    """(pid, time the worker reported itself) of a run's worker process, or None when no worker
    reported one (not started yet, or executed in process: `execute_in_process`)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = entry.dagster_event
        if event is None or not (event.message or "").startswith(STARTED_PROCESS):
            continue
        pid = event.engine_event_data.metadata.get("pid")
        if pid is not None:
            return int(pid.value), entry.timestamp
    return None


@functools.cache
def _boot_time() -> int:
    """When this machine booted (seconds since the epoch: /proc/stat's btime); fixed until the
    next boot, so read once per process, not once per run checked."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise RuntimeError("/proc/stat has no btime line")


def process_start_time(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if there is no such process.
    From /proc on Linux; elsewhere only whether it exists (start time 0: never taken as reused)."""
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22 of /proc/PID/stat (the 20th after the command name): start time in clock ticks
    # since boot.
    return _boot_time() + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def worker_gone(pid: int, reported_at: float) -> str | None:
    """Why the worker `pid` (which reported itself at `reported_at`) is gone, or None if alive."""
    started = process_start_time(pid)
    if started is None:
        return f"its worker process (pid {pid}) is gone"
    if started > reported_at + PID_REUSE_SLACK_S:
        return f"its worker process (pid {pid}) is gone (the pid now belongs to a later process)"
    return None


def reap(instance: dg.DagsterInstance) -> list[tuple[str, str]]:
    """Report every started run whose worker is gone as failed; returns (run_id, reason) of each.
    Does nothing unless the instance launches runs as local processes (`DefaultRunLauncher`)."""
    launcher = instance.run_launcher
    if not isinstance(launcher, dg.DefaultRunLauncher) or launcher.supports_check_run_worker_health:
        return []
    reaped = []
    runs = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    for run in runs:
        worker = run_worker(instance, run.run_id)
        if worker is None:
            continue
        reason = worker_gone(*worker)
        if reason is None:
            continue
        # Re-read: the run may have ended between the listing and now (its worker exits after
        # writing its end event).
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status != dg.DagsterRunStatus.STARTED:
            continue
        message = f"run {run.run_id} marked failed by run_reaper: {reason}"
        freed = report_run_worker_lost(instance, current, message)
        if freed:
            reason += f"; {freed} pool slot claim(s) of its steps freed"
        reaped.append((run.run_id, reason))
    return reaped


def reaper_interval() -> int:
    """Seconds between the reaper's ticks (FCT_REAPER_INTERVAL, default 30)."""
    return seconds_from_env("FCT_REAPER_INTERVAL", 30)


@dg.sensor(
    name="run_reaper",
    minimum_interval_seconds=reaper_interval(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Marks failed a started run whose worker process is gone (local run launcher only), so"
        " that run retries start it again and its leases are released."
    ),
)
def run_reaper(context: dg.SensorEvaluationContext):
    started = time.monotonic()
    reaped = reap(context.instance)
    if not reaped:
        return dg.SkipReason(f"no run lost its worker ({time.monotonic() - started:.2f} s)")
    return dg.SkipReason(
        "marked failed: " + "; ".join(f"{run_id} ({reason})" for run_id, reason in reaped)
    )
