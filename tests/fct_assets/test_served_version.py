"""The served-version view: every deployments row, whoever writes it, becomes an observation of
`served_version` in a real Dagster instance (an event of the run that wrote it, or a runless
one), the latest is what serves; a failed event write leaves the deployment standing and the
next row heals the view. Real LanceDB folder, real instance, no training."""

from __future__ import annotations

import getpass
import logging
import os
import socket
import sys
from pathlib import Path

import dagster as dg
import pytest

from fct_assets.lib.records import Deployment
from fct_assets.lib.resources import FctResource
from fct_assets.serving import deployment, jobs, served_version
from fct_assets.serving.deployment import current, promote, rollback
from tests.fct_assets.test_promotion_rules import SPACE, _append, _promotable


def _observed(instance) -> list[dg.EventLogRecord]:
    """Every observation of served_version, oldest first."""
    found = instance.fetch_observations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("served_version")), limit=1000
    ).records
    return sorted(found, key=lambda r: r.storage_id)


def _plain(record: dg.EventLogRecord) -> dict:
    return {k: getattr(v, "value", v) for k, v in record.asset_observation.metadata.items()}


THIS_PROCESS = (
    f"{getpass.getuser()} on {socket.gethostname()}"
    f" ({served_version.program(sys.argv)}, pid {os.getpid()})"
)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["/usr/local/bin/fct", "promote", "v3", "--json"], "fct promote"),
        (["/repo/fct_assets/cli.py", "rollback"], "cli.py rollback"),  # python -m fct_assets.cli
        (["/venv/lib/site-packages/pytest/__main__.py", "-q", "tests/x.py"], "pytest"),
        (["/repo/fct_assets/demo.py"], "demo.py"),
        (["-c", "/tmp/world"], "python -c"),
        (["fct", "/home/me/secret path"], "fct"),  # a path is not a subcommand
    ],
)
def test_the_command_that_wrote_a_row_is_named_by_program_and_subcommand(argv, said):
    assert served_version.program(argv) == said


def test_every_row_written_outside_a_run_is_observed_and_the_latest_is_served(instance, db):
    # As `fct promote`, the demo, `fct rollback` and an ingest's advance write them: promote v2,
    # promote v3, v3 advanced by an ingest, rollback to v2.
    v2 = _promotable(instance, db, "v2")
    promote(instance, db, "v2")
    v3 = _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    ingested = _append(db, "v3", [4, 5])
    deployment.advance(db, "v3", ingested, instance=instance)
    rollback(db, instance=instance)

    observed = _observed(instance)
    assert [_plain(r)["seq"] for r in observed] == [1, 2, 3, 4]
    assert all(r.run_id == "" for r in observed)  # runless: no run wrote them
    assert [(_plain(r)["action"], _plain(r)["served"]) for r in observed] == [
        ("promote", "v2"),
        ("promote", "v3"),
        ("ingest", "v3"),
        ("rollback", "v2"),
    ]
    latest = _plain(observed[-1])
    row = current(db)
    assert latest == {
        "served": "v2",
        "seq": 4,
        "action": "rollback",
        "table": "gallery_v2",
        "table_version": v2,
        "space_id": SPACE,
        "by": THIS_PROCESS,
        "note": "complete",
        "at": row.at,
        "eval_report": "/assets/eval_report?partition=v2",
        "history": latest["history"],
    }
    assert row.by == THIS_PROCESS  # the table says who, too: the view only mirrors it
    assert observed[-1].asset_observation.description == (
        f"v2 served: gallery_v2 @ LanceDB version {v2} (rollback, seq 4, by {THIS_PROCESS})"
    )
    # The history, newest first, each version linked to its eval report.
    lines = latest["history"].splitlines()
    assert lines[0] == (
        "| seq | action | version | table @ LanceDB version | note | by | at (UTC) |"
    )
    assert [line.split(" | ")[:4] for line in lines[2:]] == [
        ["| 4", "rollback", "[v2](/assets/eval_report?partition=v2)", f"gallery_v2 @ {v2}"],
        ["| 3", "ingest", "[v3](/assets/eval_report?partition=v3)", f"gallery_v3 @ {ingested}"],
        ["| 2", "promote", "[v3](/assets/eval_report?partition=v3)", f"gallery_v3 @ {v3}"],
        ["| 1", "promote", "[v2](/assets/eval_report?partition=v2)", f"gallery_v2 @ {v2}"],
    ]


def test_a_row_written_in_a_run_is_an_event_of_that_run_naming_what_launched_it(
    instance, db, tmp_path
):
    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    _promotable(instance, db, "v2")
    instance.add_dynamic_partitions("model_version", ["v2"])
    promoted = jobs.promote_job.execute_in_process(
        instance=instance, partition_key="v2", resources={"fct": fct}
    )
    (record,) = _observed(instance)
    assert record.run_id == promoted.run_id
    assert _plain(record)["by"] == f"run {promoted.run_id} (job promote)" == current(db).by

    # An ingest's advance runs inside an asset's step, launched by the inbox sensor.
    @dg.asset
    def ingested_here() -> int:
        return deployment.advance(db, "v2", _append(db, "v2", [7]), instance=None).seq

    result = dg.materialize(
        [ingested_here], instance=instance, tags={"dagster/sensor_name": "fct_inbox"}
    )
    first, second = _observed(instance)
    assert (second.run_id, _plain(second)["seq"], _plain(second)["action"]) == (
        result.run_id,
        2,
        "ingest",
    )
    job = result.dagster_run.job_name  # materialize's own job
    assert _plain(second)["by"] == f"run {result.run_id} (job {job}, sensor fct_inbox)"


def test_a_failed_event_write_leaves_the_deployment_standing_and_the_next_row_heals(
    instance, db, caplog
):
    _promotable(instance, db, "v2")
    _promotable(instance, db, "v3")
    # The event log cannot be written: the shard of runless events is moved aside and a folder
    # put in its place, so sqlite cannot open it (as on a full or unmounted disk: sqlite's own
    # error, from the real event log).
    shard = Path(instance.root_directory) / "history" / "runs" / ".db"
    aside = shard.rename(shard.with_name("aside.db"))
    shard.mkdir()
    with caplog.at_level(logging.WARNING, logger=served_version.__name__):
        row = promote(instance, db, "v2")
    assert current(db) == row and row.version == "v2"  # served all the same
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(
        "deployments row 1 (promote v2) stands; the UI's served_version view was not updated"
        " (OperationalError: "
    )
    assert line.endswith("; the next deployments row writes it") and "\n" not in line
    assert _observed(instance) == []

    shard.rmdir()
    aside.rename(shard)
    promote(instance, db, "v3")
    assert [(_plain(r)["seq"], _plain(r)["served"]) for r in _observed(instance)] == [
        (1, "v2"),
        (2, "v3"),
    ]


def test_rows_written_with_no_instance_are_mirrored_by_the_next_one(instance, db):
    # Tests, benchmarks and repair scripts set a deployment with `append`, no instance at hand.
    v2 = _promotable(instance, db, "v2")
    table = deployment.VersionTable(
        version="v2", table="gallery_v2", table_version=v2, space_id=SPACE
    )
    deployment.append(db, "promote", table)
    deployment.append(db, "promote", table, by="a repair script")
    assert _observed(instance) == []
    _promotable(instance, db, "v3")
    promote(instance, db, "v3")
    observed = [_plain(r) for r in _observed(instance)]
    assert [(o["seq"], o["served"], o["by"]) for o in observed] == [
        (1, "v2", THIS_PROCESS),
        (2, "v2", "a repair script"),
        (3, "v3", THIS_PROCESS),
    ]
    # Mirrored once: a later row adds its own observation only.
    deployment.advance(db, "v3", _append(db, "v3", [9]), instance=instance)
    assert [_plain(r)["seq"] for r in _observed(instance)] == [1, 2, 3, 4]


def test_a_row_from_before_the_by_column_reads_as_not_recorded():
    row = Deployment(
        seq=1,
        action="promote",
        version="v2",
        table="gallery_v2",
        table_version=3,
        space_id=SPACE,
        at="2026-01-01T00:00:00+00:00",
    )
    event = served_version.observation([row], report_path="/data/records/eval_report/v2.json")
    metadata = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
    assert metadata["by"] == "not recorded" and metadata["note"] == ""
    assert metadata["eval_report record"] == "/data/records/eval_report/v2.json"
    assert event.description == (
        "v2 served: gallery_v2 @ LanceDB version 3 (promote, seq 1, by not recorded)"
    )
    assert metadata["history"].splitlines()[2] == (
        "| 1 | promote | [v2](/assets/eval_report?partition=v2) | gallery_v2 @ 3 |  | not recorded"
        " | 2026-01-01 00:00:00 |"
    )
    # A run id shortened as the UI shows it; a note in its column.
    later = row.model_copy(
        update={
            "seq": 2,
            "action": "rollback",
            "note": "complete",
            "by": "run 67f8fb10-0905-44dd-b502-15befe8608db (job rollback)",
            "at": "2026-01-02T03:04:05.678901+00:00",
        }
    )
    assert served_version.history_markdown([row, later]).splitlines()[2] == (
        "| 2 | rollback | [v2](/assets/eval_report?partition=v2) | gallery_v2 @ 3 | complete"
        " | run 67f8fb10 (job rollback) | 2026-01-02 03:04:05 |"
    )


def test_the_asset_is_observed_never_materialised_and_says_so():
    spec = served_version.spec()
    assert spec.key == dg.AssetKey("served_version") and spec.group_name == "serving"
    assert "the latest observation is what is served now" in spec.description
    assert "\n" not in spec.description
    defs = dg.Definitions(assets=[spec])
    assert not defs.resolve_assets_def("served_version").is_executable
