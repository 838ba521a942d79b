"""Housekeeping on a real LanceDB folder and a real (ephemeral) Dagster instance."""

from __future__ import annotations

import datetime as _dt
import os
import time
import uuid
from pathlib import Path

import dagster as dg
import lancedb
import numpy as np
import pyarrow as pa
import pytest
from upath import UPath

from fct_assets.lib.records import VersionTable
from fct_assets.ops import housekeeping
from fct_assets.serving import deployment


def test_old_versions_go_and_the_deployed_ones_stay(tmp_path):
    db = lancedb.connect(str(tmp_path))
    schema = pa.schema([pa.field("item_id", pa.int64())])
    table = db.create_table("gallery_v2", data=pa.Table.from_pylist([{"item_id": 0}], schema))
    time.sleep(1.5)  # the cleanup keeps 1 s before the oldest deployed version as a margin
    for i in range(1, 5):  # versions 2..5
        table.add(pa.Table.from_pylist([{"item_id": i}], schema))
    served = VersionTable(version="v2", table="gallery_v2", table_version=2, space_id="s@0")
    deployment.append(db, "promote", served)
    time.sleep(0.05)  # every version older than the retention below
    left = housekeeping.clean_table_versions(db, _dt.timedelta(milliseconds=20))
    versions = {v["version"] for v in db.open_table("gallery_v2").list_versions()}
    assert {2, 3, 4, 5} <= versions  # deployed (tagged), and what came after it: kept
    assert 1 not in versions  # older than the retention and than every deployed version: gone
    assert db.open_table("gallery_v2").tags.list()["deployed-2"]["version"] == 2
    assert left["gallery_v2"] == len(versions)
    pinned = db.open_table("gallery_v2")
    pinned.checkout(2)
    assert pinned.count_rows() == 2


def test_records_of_finished_runs_go_and_a_live_runs_stay(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    records = UPath(tmp_path / "records")
    (records / "gallery_store.json").parent.mkdir(parents=True)
    (records / "gallery_store.json").write_text("{}")
    unknown = str(uuid.uuid4())
    live = instance.create_run_for_job(dg.GraphDefinition("g").to_job(), run_id=str(uuid.uuid4()))
    for run_id in (unknown, live.run_id):
        (records / run_id / "plan_backfill").mkdir(parents=True)
        (records / run_id / "plan_backfill" / "plan.json").write_text("{}")
    removed = housekeeping.clean_run_records(instance, records, _dt.timedelta(0))
    assert removed == [unknown]
    assert (records / live.run_id).exists() and (records / "gallery_store.json").exists()


def aged(path: Path, days: float, data: bytes = b"") -> Path:
    """`path` with its mtime `days` in the past: written with `data` first unless it exists
    (a folder made by the files in it)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    then = time.time() - days * 86400
    os.utime(path, (then, then))
    return path


def test_processed_inbox_files_go_after_their_age_and_the_rest_stays(tmp_path):
    inbox = tmp_path / "inbox"
    processed = inbox / ".processed"
    old = aged(processed / "b1" / "3" / "a.png", 2, b"x" * 1000)
    old_top = aged(processed / "b1" / "b.png", 1.5, b"y" * 24)
    recent = aged(processed / "b2" / "c.png", 0.5, b"z" * 10)
    waiting = aged(inbox / "d.png", 30, b"w")  # not landed yet: never housekeeping's
    quarantined = aged(inbox / ".quarantine" / "b1" / "e.png", 30, b"q")
    live_marker = aged(inbox / ".retry" / "d.png.json", 30, b"{}")
    orphan_marker = aged(inbox / ".retry" / "3" / "gone.png.json", 0, b"{}")
    for folder in (processed / "b1" / "3", processed / "b1", processed / "b2"):
        aged(folder, 2)  # made when their batch landed; b2's last file came later

    removed, freed = housekeeping.clean_inbox(inbox, _dt.timedelta(days=1))
    assert (removed, freed) == (2, 1024)
    assert not old.exists() and not old_top.exists()
    assert not (processed / "b1").exists()  # left empty, and old: gone
    assert recent.exists() and (processed / "b2").exists()
    assert waiting.exists() and quarantined.exists() and live_marker.exists()
    assert not orphan_marker.exists()  # its file is no longer in the inbox
    assert housekeeping.clean_inbox(tmp_path / "no_inbox", _dt.timedelta(days=1)) == (0, 0)


def test_the_housekeeping_job_runs_on_the_code_location(tmp_path, monkeypatch):
    from fct_assets.definitions import build_defs, resources
    from fct_assets.lib.resources import FctResource

    monkeypatch.setenv("FCT_STORAGE_URI", str(tmp_path / "storage"))
    monkeypatch.setenv("FCT_INBOX", str(tmp_path / "inbox"))
    leftover = tmp_path / "storage" / "records" / str(uuid.uuid4())
    leftover.mkdir(parents=True)
    landed = aged(tmp_path / "inbox" / ".processed" / "b1" / "a.png", 1.1, b"x")
    defs = build_defs(
        {**resources(), "fct": FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny")}
    )
    result = defs.resolve_job_def("housekeeping").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"clean_up": {"config": {"keep_days": 0.0}}}},
    )
    assert result.success and not leftover.exists()
    assert not landed.exists()  # processed_keep_days: 1 by default


def _files(table_dir) -> set:
    """The files a reader of the table's versions opens: data, indices, manifests (not the
    transaction log, nor the latest-version hint)."""
    return {
        p
        for p in table_dir.rglob("*")
        if p.is_file() and "_transactions" not in p.parts and p.name != "latest_version_hint.json"
    }


def test_the_served_and_the_rollback_versions_files_stay(tmp_path):
    from fct_assets.serving import contract
    from tests.support.served import ITEMS, Served

    served = Served(tmp_path)  # gallery_v2 and gallery_v3, version 1 each
    v2_dir, v3_dir = (Path(served.uri) / f"gallery_{v}.lance" for v in ("v2", "v3"))
    served.promote("v2")  # v2 @ 1: the rollback target once v3 is promoted
    v2_files = _files(v2_dir)
    # v2's table re-materialised twice (new data files each time, v2 @ 1's no longer used by
    # the latest version), never served.
    rng = np.random.default_rng(2)
    for _ in range(2):
        served.publish("v2", rng.random((ITEMS, 8), dtype=np.float32))
    v3_first = _files(v3_dir)
    time.sleep(1.5)  # the cleanup keeps 1 s before the oldest deployed version as a margin
    served.publish("v3", served.embed("v3", served.images))  # v3 @ 2, served; v3 @ 1 never was
    served.promote("v3")
    v3_files = _files(v3_dir) - v3_first
    time.sleep(0.05)  # every version older than the retention below

    housekeeping.clean_table_versions(served.db, _dt.timedelta(milliseconds=20))

    assert v2_files <= _files(v2_dir), sorted(map(str, v2_files - _files(v2_dir)))
    assert v3_files <= _files(v3_dir)
    assert not v3_first & _files(v3_dir)  # housekeeping does remove what nothing serves
    assert {v["version"] for v in served.db.open_table("gallery_v3").list_versions()} >= {2}
    # Both still answer through their serving contracts (checkpoints verified, tables pinned).
    searcher = contract.open_searcher(served.uri)
    assert searcher.search(searcher.stored_image(4), k=1)[0].item_id == 4
    assert deployment.rollback(served.db).version == "v2"
    searcher = contract.open_searcher(served.uri)
    assert searcher.contract.table_version == 1 and searcher.table.count_rows() == ITEMS
    assert searcher.search(searcher.stored_image(4), k=1)[0].distance == pytest.approx(0, abs=1e-6)
