"""fct_assets.ops.run_reaper: a started run whose worker process is gone is marked failed, once, with
a reason run retries accept; a live worker, a run executed in process and a reused pid are told
apart. Real instance, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dagster as dg
import pytest

from fct_assets.ops.run_reaper import (
    process_start_time,
    reap,
    reaper_interval,
    run_worker,
    worker_gone,
)
from tests.support.check_events import report_run_worker


@dg.op
def _noop() -> None:
    pass


@dg.job
def _job() -> None:
    _noop()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def instance(tmp_path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as inst:
        assert isinstance(inst.run_launcher, dg.DefaultRunLauncher)
        yield inst


def _started_run(instance, pid: int | None) -> dg.DagsterRun:
    run = instance.create_run_for_job(_job, status=dg.DagsterRunStatus.STARTED)
    if pid is not None:
        report_run_worker(instance, run, pid)
    return run


def test_process_start_time_is_when_the_process_started():
    before = time.time()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    after = time.time()
    try:
        started = process_start_time(proc.pid)
        # Clock ticks are 10 ms; boot time is whole seconds.
        assert before - 1.5 <= started <= after + 1.5
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None


def test_worker_gone_tells_dead_live_and_reused_pids_apart():
    dead = _dead_pid()
    assert worker_gone(dead, time.time()) == f"its worker process (pid {dead}) is gone"
    me = os.getpid()
    assert worker_gone(me, time.time()) is None  # alive, started before it reported
    # A process started 60 s after the worker reported is another process with the same pid.
    reason = worker_gone(me, process_start_time(me) - 60)
    assert (
        reason == f"its worker process (pid {me}) is gone (the pid now belongs to a later process)"
    )


def test_reap_fails_only_the_run_whose_worker_is_gone(instance):
    dead = _started_run(instance, _dead_pid())
    alive = _started_run(instance, os.getpid())
    in_process = _started_run(instance, None)  # execute_in_process: no worker to check
    finished = instance.create_run_for_job(_job, status=dg.DagsterRunStatus.SUCCESS)
    report_run_worker(instance, finished, _dead_pid())

    # The dead run's killed step still claims pool gpu's one slot; the live run's step waits.
    storage = instance.event_log_storage
    assert storage.supports_global_concurrency_limits
    storage.set_concurrency_slots("gpu", 1)
    assert storage.claim_concurrency_slot("gpu", dead.run_id, "transformation").is_claimed
    assert not storage.claim_concurrency_slot("gpu", alive.run_id, "new_model").is_claimed

    assert run_worker(instance, in_process.run_id) is None
    assert run_worker(instance, alive.run_id)[0] == os.getpid()
    reaped = reap(instance)
    assert [run_id for run_id, _ in reaped] == [dead.run_id]
    assert reaped[0][1].endswith("; 1 pool slot claim(s) of its steps freed")
    assert storage.claim_concurrency_slot("gpu", alive.run_id, "new_model").is_claimed
    status = {r.run_id: instance.get_run_by_id(r.run_id).status for r in (dead, alive, in_process)}
    assert status == {
        dead.run_id: dg.DagsterRunStatus.FAILURE,
        alive.run_id: dg.DagsterRunStatus.STARTED,
        in_process.run_id: dg.DagsterRunStatus.STARTED,
    }
    assert instance.get_run_by_id(finished.run_id).status == dg.DagsterRunStatus.SUCCESS
    failure = instance.all_logs(dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert len(failure) == 1
    message = failure[0].dagster_event.message
    assert message.startswith(f"run {dead.run_id} marked failed by run_reaper: its worker process")
    # The reason run retries read: not a step's own failure, so `retry_on_asset_or_op_failure:
    # false` still retries it.
    tags = instance.get_run_by_id(dead.run_id).tags
    assert tags.get("dagster/failure_reason") == "UNEXPECTED_TERMINATION"
    assert reap(instance) == []  # once


def test_reap_retries_under_the_local_instance_config(tmp_path):
    """With dagster_home/dagster.yaml's run_retries, a reaped run is marked to be retried."""
    import shutil
    from pathlib import Path

    home = tmp_path / "home"
    home.mkdir()
    repo = Path(__file__).resolve().parents[2]
    shutil.copy(repo / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as inst:
        assert inst.run_retries_enabled and inst.run_retries_max_retries == 1
        assert not inst.run_retries_retry_on_asset_or_op_failure
        run = _started_run(inst, _dead_pid())
        assert len(reap(inst)) == 1
        assert inst.get_run_by_id(run.run_id).tags.get("dagster/will_retry") == "true"


def test_reaper_interval_is_checked(monkeypatch):
    monkeypatch.setenv("FCT_REAPER_INTERVAL", "5")
    assert reaper_interval() == 5
    for bad in ("0", "x", "-3"):
        monkeypatch.setenv("FCT_REAPER_INTERVAL", bad)
        with pytest.raises(
            ValueError, match=f"FCT_REAPER_INTERVAL={bad!r}: expected whole seconds"
        ):
            reaper_interval()
