"""The run queue of the committed instance (dagster_home/dagster.yaml): upgrades, ingest batches
and serving operations run in lanes of their own (`fct/lane`), so an ingest never waits behind
upgrades and an upgrade never waits behind ingest batches.

Runs are submitted to a real instance's QueuedRunCoordinator, tagged as the code location's jobs
tag them, and dequeued by the daemon's own queue iteration; the launcher records the runs it is
given, so a dequeued upgrade stays in progress as a long one would
(tests/support/dagster_internals.py: queued_instance, run_queue)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fct_assets.lib.keys import LANE_TAG, LANES
from tests.support.dagster_internals import instance_config, queued_instance, run_queue

REPO = Path(__file__).resolve().parents[2]
IN_PROGRESS = {"STARTING", "STARTED"}


def _concurrency() -> dict:
    return instance_config(str(REPO / "dagster_home"))["concurrency"]


@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run_queue")
    with queued_instance(str(folder), _concurrency()) as instance:
        with run_queue(instance, "fct_assets.definitions") as q:
            yield q


@pytest.fixture
def empty(queue):
    """The queue with no run in it (queued or in progress) before and after the test."""
    for run in queue.instance.get_runs():
        queue.instance.delete_run(run.run_id)
    yield queue
    for run in queue.instance.get_runs():
        queue.instance.delete_run(run.run_id)


@pytest.mark.slow  # loads the code location (10-20 s)
def test_an_ingest_launched_while_two_upgrades_are_queued_starts_before_they_finish(empty):
    upgrades = [empty.submit("upgrade", {"dagster/partition": v}) for v in ("v2", "v3")]
    third = empty.submit("upgrade", {"dagster/partition": "v4"})
    batch = empty.submit("ingest", {"dagster/partition": "b20260101-000000-00000000"})
    assert {empty.status(r) for r in [*upgrades, third, batch]} == {"QUEUED"}
    iterations = 0
    while empty.status(batch) == "QUEUED" and iterations < 3:
        empty.dequeue()
        iterations += 1
    # The ingest was dequeued by the first iteration, while both upgrades are still in progress
    # (none finished); the third upgrade waits for an upgrade slot, not the ingest.
    assert iterations == 1
    assert empty.status(batch) in IN_PROGRESS
    assert {empty.status(r) for r in upgrades} <= IN_PROGRESS
    assert empty.status(third) == "QUEUED"


@pytest.mark.slow  # loads the code location (10-20 s)
def test_an_upgrade_never_waits_behind_ingest_batches(empty):
    batches = [
        empty.submit("ingest", {"dagster/partition": f"b20260101-00000{k}-0000000{k}"})
        for k in range(3)
    ]
    upgrade = empty.submit("upgrade", {"dagster/partition": "v2"})
    promotion = empty.submit("promote")
    empty.dequeue()
    assert empty.status(upgrade) in IN_PROGRESS
    assert empty.status(promotion) in IN_PROGRESS
    # One ingest batch at a time (each writes gallery_store); the others wait in their lane.
    assert [empty.status(r) for r in batches].count("QUEUED") == 2


def test_every_job_and_the_automation_sensor_run_in_a_lane_with_its_own_slots():
    from fct_assets.definitions import build_defs
    from fct_assets.upgrade.automation import automation_sensor

    defs = build_defs()
    lanes = {job.name: job.tags.get(LANE_TAG) for job in defs.resolve_all_job_defs()}
    lanes = {name: lane for name, lane in lanes.items() if not name.startswith("__")}
    assert set(lanes.values()) <= set(LANES), lanes
    assert lanes["ingest"] == "ingest" and lanes["upgrade"] == "upgrade"
    assert automation_sensor.run_tags[LANE_TAG] == "upgrade"
    runs = _concurrency()["runs"]
    limits = {
        rule["value"]: rule["limit"]
        for rule in runs["tag_concurrency_limits"]
        if rule["key"] == LANE_TAG
    }
    assert set(limits) == set(LANES)
    # Room for every lane at its limit at once: no lane's runs take another lane's slots.
    assert runs["max_concurrent_runs"] >= sum(limits.values())
