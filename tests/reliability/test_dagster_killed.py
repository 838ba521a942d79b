"""The Dagster processes killed during an upgrade, under a real `dagster dev` (webserver, daemon,
code server; run workers spawned by the code server, as `make ui` runs them).

1. The webserver alone is killed: the run does not depend on it and goes on.
2. Everything is killed with SIGKILL (webserver, daemon, code server, the run worker and its step
   processes): the run is left "started" with no process behind it. The served version keeps
   answering. After a restart, `run_reaper` marks the run failed (its worker is gone) and the
   instance's run retries start it again from the failed step; the retry publishes the version's
   table once, each gallery item once. A further run of the version is a no-op that says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import dagster as dg
import pytest

from fct_assets.lib import storage
from fct_assets.lib.io_managers import recorded_record
from fct_assets.lib.keys import NO_OP_TAG
from fct_assets.lib.partitions import add_model_version
from fct_assets.lib.records import BackfilledTable
from fct_assets.serving.deployment import current, promote
from tests.support.env import build_env
from tests.ui.server import DagsterDev

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose parent is `pid`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if ppid == pid:
            out.append((int(proc.name), cmdline))
    return out


def _wait(what: str, check, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def _steps(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> list[str]:
    return [e.dagster_event.step_key for e in instance.all_logs(run_id, of_type=kind)]


def _submit(port: int, version: str) -> str:
    """An upgrade run of `version`, submitted as the UI's launchpad does (GraphQL)."""
    from dagster_graphql import DagsterGraphQLClient

    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    return client.submit_job_execution("upgrade", tags={"dagster/partition": version})


def test_dagster_killed_during_an_upgrade_is_failed_then_retried_once(tmp_path, reliability):
    env = build_env(tmp_path, chained=True)
    db = env.fct.connect()
    promote(env.instance, db, "v2")
    served = current(db)
    # The instance as `make ui` configures it (run retries, run monitoring, the pools).
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    add_model_version(env.instance, "v3")
    environ = {
        **env.environ(),
        "FCT_AUTO_UPGRADE": "off",
        "FCT_INBOX": str(tmp_path / "inbox"),
        "FCT_REAPER_INTERVAL": "2",
    }
    instance = env.instance
    dev = DagsterDev(environ, tmp_path / "dagster_dev_1.log")
    try:
        dev.wait_ready()
        run_id = _submit(dev.port, "v3")
        _wait(
            "new_model to start",
            lambda: "new_model" in _steps(instance, run_id, dg.DagsterEventType.STEP_START),
            timeout=300,
        )
        # 1. The webserver alone.
        webservers = [pid for pid, cmd in _children(dev.pid) if "webserver" in cmd]
        assert len(webservers) == 1, _children(dev.pid)
        os.kill(webservers[0], signal.SIGKILL)
        _wait(
            "new_model to finish after the webserver was killed",
            lambda: "new_model" in _steps(instance, run_id, dg.DagsterEventType.STEP_SUCCESS),
            timeout=300,
        )
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
        reliability(
            "fault",
            "webserver killed (SIGKILL) during an upgrade",
            "the run went on: new_model finished after the kill",
            '{"name": "webserver killed during an upgrade", "injected": "SIGKILL to'
            ' dagster-webserver while new_model ran", "survived": true}',
        )
        # 2. Everything, at the next step's start (mid-upgrade: the new model is stored, h and
        # the table are not).
        _wait(
            "a step after new_model to start",
            lambda: set(_steps(instance, run_id, dg.DagsterEventType.STEP_START)) - {"new_model"},
            timeout=300,
            every=0.05,
        )
        killed_at = sorted(
            set(_steps(instance, run_id, dg.DagsterEventType.STEP_START)) - {"new_model"}
        )
        os.killpg(dev.pid, signal.SIGKILL)
        dev.process.wait(timeout=30)
    finally:
        dev.stop()
    time.sleep(1)  # the kernel reaps the group's orphans
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED  # left behind
    assert current(db) == served  # the served version answers meanwhile, unchanged
    served_rows = db.open_table(served.table).count_rows()

    dev = DagsterDev(environ, tmp_path / "dagster_dev_2.log")
    try:
        dev.wait_ready()
        failed = _wait(
            "run_reaper to mark the run failed",
            lambda: instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE,
            timeout=180,
            every=1,
        )
        assert failed
        message = next(
            e.dagster_event.message
            for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        )
        assert "run_reaper" in message and "worker process (pid" in message, message
        assert "\n" not in message

        def retry() -> dg.DagsterRun | None:
            group = instance.get_run_group(run_id)
            runs = [r for r in (group[1] if group else []) if r.parent_run_id == run_id]
            return runs[0] if runs and runs[0].is_finished else None

        again = _wait("the retry to finish", retry, timeout=600, every=2)
        assert again.status == dg.DagsterRunStatus.SUCCESS, again.status
        assert again.tags.get("dagster/retry_number") == "1"
        # From the failed step: new_model was not trained again.
        assert "new_model" not in _steps(instance, again.run_id, dg.DagsterEventType.STEP_START)

        table = recorded_record(instance, BackfilledTable, "backfilled_gallery", "v3")
        rows = db.open_table(table.table)
        rows.checkout(table.version)
        ids = rows.to_arrow().column("item_id").to_pylist()
        store = db.open_table(storage.GALLERY_STORE).to_arrow().column("item_id").to_pylist()
        assert sorted(ids) == sorted(store)  # each gallery item once
        publishes = [
            r.run_id
            for r in instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey("backfilled_gallery"), asset_partitions=["v3"]
                ),
                limit=10,
            ).records
        ]
        assert publishes == [again.run_id]  # published once, by the retry
        assert current(db) == served  # nothing promoted by a retry
        assert db.open_table(served.table).count_rows() == served_rows

        # A run of v3 again: current, same config, so a no-op that says so.
        third = _submit(dev.port, "v3")
        done = _wait(
            "the third run to finish",
            lambda: (r := instance.get_run_by_id(third)) is not None and r.is_finished and r,
            timeout=300,
            every=1,
        )
        assert done.status == dg.DagsterRunStatus.SUCCESS
        assert done.tags.get(NO_OP_TAG, "").startswith("v3 is current:"), done.tags
        after = recorded_record(instance, BackfilledTable, "backfilled_gallery", "v3")
        assert (after.table, after.version) == (table.table, table.version)
    finally:
        dev.stop()
    reliability(
        "fault",
        f"dagster dev killed (SIGKILL: webserver, daemon, code server, run worker) at {killed_at}",
        f"run left started; after a restart run_reaper failed it ({message}); the retry"
        f" {again.run_id[:8]} ran from the failed step and published gallery v3 once"
        f" ({len(ids)} items, each once); the served version stayed {served.version}; a third"
        " run was a no-op",
        json.dumps(
            {
                "name": "Dagster daemon, webserver and run worker killed during an upgrade",
                "injected": f"SIGKILL to the dagster dev process group at step {killed_at}",
                "survived": True,
            }
        ),
    )
