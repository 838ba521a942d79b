"""Housekeeping on a real LanceDB folder and a real (ephemeral) Dagster instance."""

from __future__ import annotations

import datetime as _dt
import time
import uuid

import dagster as dg
import lancedb
import pyarrow as pa
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


def test_the_housekeeping_job_runs_on_the_code_location(tmp_path, monkeypatch):
    from fct_assets.definitions import build_defs, resources
    from fct_assets.lib.resources import FctResource

    monkeypatch.setenv("FCT_STORAGE_URI", str(tmp_path / "storage"))
    leftover = tmp_path / "storage" / "records" / str(uuid.uuid4())
    leftover.mkdir(parents=True)
    defs = build_defs(
        {**resources(), "fct": FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny")}
    )
    result = defs.resolve_job_def("housekeeping").execute_in_process(
        instance=dg.DagsterInstance.ephemeral(),
        run_config={"ops": {"clean_up": {"config": {"keep_days": 0.0}}}},
    )
    assert result.success and not leftover.exists()
