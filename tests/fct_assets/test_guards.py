"""Single writer per table (fct_assets.lib.guards): the folder's OS lock, the conditional commit,
leases; real LanceDB folders, real processes where the point is another process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest

from fct_assets.lib import guards, storage
from fct_assets.lib.records import VersionTable
from fct_assets.serving import deployment

REPO = Path(__file__).resolve().parents[2]


def _table(version: str, table_version: int) -> VersionTable:
    return VersionTable(
        version=version, table=f"gallery_{version}", table_version=table_version, space_id="s@0"
    )


def test_a_deployments_table_written_before_seq_was_a_key_is_migrated(tmp_path):
    db = lancedb.connect(str(tmp_path))
    old_schema = pa.schema(
        [pa.field(f.name, f.type) for f in deployment.DEPLOYMENT_SCHEMA]  # nullable, no key
    )
    first = {"seq": 1, "action": "promote", "version": "v2", "table": "gallery_v2"}
    first |= {"table_version": 3, "space_id": "s@0", "at": "2026-01-01T00:00:00+00:00"}
    db.create_table(storage.DEPLOYMENTS, data=pa.Table.from_pylist([first], old_schema))
    row = deployment.append(db, "promote", _table("v3", 5))
    assert row.seq == 2
    assert guards.has_primary_key(db.open_table(storage.DEPLOYMENTS).schema, "seq")
    # The key refuses a second row with a seq that exists: nothing is inserted.
    again = pa.Table.from_pylist([row.model_dump()], schema=deployment.DEPLOYMENT_SCHEMA)
    assert not guards.insert_if_absent(db, storage.DEPLOYMENTS, again, "seq")
    assert [(r.seq, r.version) for r in deployment.history(db)] == [(1, "v2"), (2, "v3")]


def test_rollback_decides_on_the_history_it_commits_after(tmp_path):
    db = lancedb.connect(str(tmp_path))
    deployment.append(db, "promote", _table("v2", 1))
    deployment.append(db, "promote", _table("v3", 1))
    row = deployment.rollback(db)
    assert (row.seq, row.action, row.version) == (3, "rollback", "v2")
    with pytest.raises(deployment.PromotionError, match="nothing is deployed"):
        deployment.rollback(lancedb.connect(str(tmp_path / "empty")))


HOLD = """
import sys, time, lancedb
from fct_assets.lib import guards
with guards.local_lock(lancedb.connect(sys.argv[1]), "deployments"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_folder_lock_names_its_holder_when_a_writer_gives_up(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path), "60"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        db = lancedb.connect(str(tmp_path))
        with pytest.raises(guards.TableBusyError) as err:
            with guards.local_lock(db, "deployments", wait_s=0.2):
                pass
        message = str(err.value)
        assert "\n" not in message
        assert f"process {holder.pid} on" in message and "deployments" in message
        # Promotion waits on it too, and records nothing while it cannot take it.
        with pytest.raises(guards.TableBusyError):
            with guards.local_lock(db, storage.DEPLOYMENTS, wait_s=0.2):
                deployment.append(db, "promote", _table("v2", 1))
        assert deployment.history(db) == []
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the dead holder's lock: nothing to clean up.
    with guards.local_lock(lancedb.connect(str(tmp_path)), "deployments", wait_s=5):
        pass


def test_a_lease_refuses_a_second_writer_naming_the_run_and_is_taken_over_once_it_ended(tmp_path):
    db = lancedb.connect(str(tmp_path))
    first = guards.Writer.me(run_id="run-aaaa")
    second = guards.Writer.me(run_id="run-bbbb")
    live = {"run-aaaa"}

    def ended(writer: guards.Writer) -> bool:
        return writer.run_id not in live

    assert guards.claim(db, "gallery_v5", first, ended=ended) is None
    assert guards.claim(db, "gallery_v5", first, ended=ended) is None  # its own lease again
    with pytest.raises(guards.TableBusyError) as err:
        guards.claim(db, "gallery_v5", second, ended=ended)
    assert "gallery_v5: run run-aaaa" in str(err.value) and "\n" not in str(err.value)
    assert guards.holder(db, "gallery_v5") == first
    live.clear()  # the first run failed without releasing: the next run takes over
    assert guards.claim(db, "gallery_v5", second, ended=ended) == first
    assert guards.holder(db, "gallery_v5") == second
    guards.release(db, "gallery_v5", first)  # a stale release leaves the new lease alone
    assert guards.holder(db, "gallery_v5") == second
    guards.release(db, "gallery_v5", second)
    assert guards.holder(db, "gallery_v5") is None


def test_a_process_writer_has_ended_once_its_process_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    gone = guards.Writer.me().model_copy(update={"pid": child.pid})
    assert guards.process_ended(gone)
    assert not guards.process_ended(guards.Writer.me())
