"""The inbox sensor's cursor: a file is passed over only while the run it was submitted in can
still settle it. Files a run left in the inbox when it ended (failed) are submitted again in a
new batch, after a back-off, so no file waits for a hand. A real instance, the real ingest job
(its run fails: this instance has no dataset), the sensor evaluated on the instance's runs."""

from __future__ import annotations

import json

import dagster as dg
import numpy as np
import pytest

from fct_assets.definitions import build_defs
from fct_assets.ingest.assets import fct_inbox
from fct_assets.lib import storage
from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager
from fct_assets.lib.resources import FctResource


@pytest.fixture
def inbox(tmp_path, monkeypatch):
    folder = tmp_path / "inbox"
    for k in range(2):
        path = folder / "3" / f"item{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(storage.encode_png(np.full((1, 8, 8), 40 * k, np.uint8)))
    monkeypatch.setenv("FCT_INBOX", str(folder))
    monkeypatch.setenv("FCT_INBOX_RETRY_S", "0")
    # The files are whole when written: no settle wait (lib/inbox.py; its own tests cover it).
    monkeypatch.setenv("FCT_INBOX_SETTLE_S", "0")
    return folder


@pytest.fixture
def instance(instance):
    """conftest's instance, with gallery_store materialised: the sensor waits for the base
    assets, and only gallery_store's materialisation is asked."""
    instance.report_runless_asset_event(dg.AssetMaterialization("gallery_store"))
    return instance


def _tick(instance, cursor: str | None = None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor)
    return fct_inbox(context), context.cursor


def _failed_run(instance, tmp_path, request: dg.RunRequest) -> None:
    """The ingest job run for the request, as the daemon would launch it; it fails here (no
    dataset was materialised on this instance), leaving the batch's files in the inbox."""
    defs = build_defs(
        {
            "fct": FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu"),
            "checkpoint_io_manager": CheckpointIOManager(uri=str(tmp_path / "checkpoints")),
            "record_io_manager": RecordIOManager(uri=str(tmp_path / "records")),
        }
    )
    instance.add_dynamic_partitions("ingest_batch", [request.partition_key])
    result = defs.resolve_job_def("ingest").execute_in_process(
        instance=instance,
        partition_key=request.partition_key,
        run_config=request.run_config,
        raise_on_error=False,
    )
    assert not result.success


def _files(request: dg.RunRequest) -> list[str]:
    return request.run_config["ops"]["ingested_batch"]["config"]["files"]


@pytest.mark.slow  # runs the ingest job (it fails) in process
def test_files_a_failed_run_left_in_the_inbox_are_submitted_again(inbox, instance, tmp_path):
    first, cursor = _tick(instance)
    (request,) = first.run_requests
    assert _files(request) == ["3/item0.png", "3/item1.png"]
    # Submitted, no run yet: the files are passed over.
    waiting, cursor = _tick(instance, cursor)
    assert isinstance(waiting, dg.SkipReason)
    _failed_run(instance, tmp_path, request)
    assert sorted(p.name for p in (inbox / "3").iterdir()) == ["item0.png", "item1.png"]
    # Its run failed and left them in the inbox: they are submitted again, in a new batch.
    again, cursor = _tick(instance, cursor)
    (retry,) = again.run_requests
    assert _files(retry) == _files(request)
    assert retry.partition_key.endswith("-a1") and retry.partition_key != request.partition_key
    assert [r.partition_keys for r in again.dynamic_partitions_requests] == [[retry.partition_key]]
    # That batch has no run yet: nothing more is submitted.
    later, cursor = _tick(instance, cursor)
    assert isinstance(later, dg.SkipReason)
    assert {v[1] for v in json.loads(cursor).values()} == {retry.partition_key}


@pytest.mark.slow  # runs the ingest job (it fails) in process
def test_a_failed_run_about_to_be_retried_or_backing_off_holds_its_files(
    inbox, instance, tmp_path, monkeypatch
):
    first, cursor = _tick(instance)
    (request,) = first.run_requests
    _failed_run(instance, tmp_path, request)
    (run,) = instance.get_runs(dg.RunsFilter(tags={"dagster/partition": request.partition_key}))
    # The instance's run retries will launch it again (a worker that died): its retry settles.
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "true"})
    held, cursor = _tick(instance, cursor)
    assert held.skip_message == f"no new files in {inbox}"
    # No retry coming, but the back-off (FCT_INBOX_RETRY_S, doubled per attempt) not passed.
    instance.add_run_tags(run.run_id, {"dagster/will_retry": "false"})
    monkeypatch.setenv("FCT_INBOX_RETRY_S", "3600")
    held, cursor = _tick(instance, cursor)
    assert held.skip_message == (
        f"no new files in {inbox}; 2 files of ended runs wait to be submitted again"
    )
    monkeypatch.setenv("FCT_INBOX_RETRY_S", "0")
    again, _ = _tick(instance, cursor)
    assert _files(again.run_requests[0]) == _files(request)


def test_a_cursor_of_an_older_fct_is_read(inbox, instance):
    # Older cursors held {relpath: stamp}: those files count as submitted, and with no ingest run
    # in progress they are submitted again (their run ended).
    first, cursor = _tick(instance)
    old = {k: v[0] for k, v in json.loads(cursor).items()}
    again, _ = _tick(instance, json.dumps(old))
    (request,) = again.run_requests
    assert _files(request) == ["3/item0.png", "3/item1.png"]
