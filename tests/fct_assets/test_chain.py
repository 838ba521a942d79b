"""Chained upgrades on the real stack: v3 maps from the deployed v2's space, so items ingested
under v2 (which have no old embedding) reach gallery_v3; items ingested while a backfill runs
reach the new table before it is promoted; rows say how they got there."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from fct_assets.ingest.ingest import content_id
from fct_assets.lib import storage
from fct_assets.lib.event_log import plain_metadata
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lineage.trace import format_row_lineage, lineage, row_lineage
from fct_assets.serving.deployment import PromotionError, current, promote
from fct_assets.serving.search import search_command
from fct_ml.backfill import apply_transformation
from tests.fct_assets.test_ingest import REPO, deploy, held_back, run_ingest, write_png


def _table(env, name: str, version: int | None = None):
    db = env.fct.connect()
    table = db.open_table(name) if version is None else storage.open_pinned(db, name, version)
    return table.to_arrow().sort_by("item_id")


def _ingest(env, tmp_path, batch: str, n: int, start: int) -> list[int]:
    items = held_back(env, n, start=start)
    folder = tmp_path / batch
    files = [str(write_png(folder / f"i{k}.png", image)) for k, (image, _) in enumerate(items)]
    assert run_ingest(env, batch, {"files": files}).success
    return [content_id(image) for image, _ in items]


def _store_ids(env) -> list[int]:
    return sorted(_table(env, "gallery_store").column("item_id").to_pylist())


def test_a_chained_v3_reaches_items_ingested_under_v2(living, tmp_path):
    deploy(living, "v2")
    ingested = _ingest(living, tmp_path, "bunderv2", 6, start=30)
    v2_space = current(living.fct.connect()).space_id
    # Searchable at once: queried by its stored image, an item ingested under v2 finds itself
    # (the deployed table holds v2's own vector of it).
    hits = search_command(
        living.instance, living.fct, image=None, item_id=ingested[0], version=None, k=3
    )
    assert hits[0].item_id == ingested[0] and hits[0].source == "ingested"
    assert hits[0].distance < 1e-3

    assert living.upgrade("v3").success
    h_meta = plain_metadata(
        living.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("transformation"), asset_partitions=["v3"]),
            limit=1,
        ).records[0]
    )
    assert (h_meta["source_version"], h_meta["source_space_id"]) == ("v2", v2_space)

    v3 = _table(living, "gallery_v3")
    ids = v3.column("item_id").to_pylist()
    assert ids == _store_ids(living)  # every stored item, once
    rows = {r["item_id"]: r for r in v3.to_pylist()}
    v3_space = rows[ids[0]]["space_id"]
    old_space = storage.table_space_ids(living.fct.connect().open_table("gallery_store"))[
        "old_space_id"
    ]
    for i in ingested:  # ingested under v2: v2's vector, through h3
        assert rows[i]["source"] == "transformed" and rows[i]["ingest_batch"] == "bunderv2"
        assert rows[i]["chain"] == f"{v2_space} > {v3_space}"
    base = [i for i in ids if rows[i]["ingest_batch"] is None]
    assert rows[base[0]]["chain"] == f"{old_space} > {v2_space} > {v3_space}"

    # By hand: h3(the vector gallery_v2 serves, the stored side-info) for the ingested items.
    served = current(living.fct.connect())
    v2 = _table(living, "gallery_v2", served.table_version)
    store = _table(living, "gallery_store")
    pos2 = np.searchsorted(v2.column("item_id").to_numpy(), ingested)
    poss = np.searchsorted(store.column("item_id").to_numpy(), ingested)
    h3 = load_recorded_checkpoint(living.instance, "transformation", "v3").model
    expected, _ = apply_transformation(
        h3,
        torch.from_numpy(storage.vectors(v2.column("embedding").take(pos2))),
        torch.from_numpy(storage.vectors(store.column("side_info").take(poss))),
    )
    got = storage.vectors(v3.column("embedding").take(np.searchsorted(ids, ingested)))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)

    promote(living.instance, living.fct.connect(), "v3")
    # Lineage: the version's chain, and one row of each kind.
    info = lineage(living.instance, "v3", living.fct.connect())
    assert [hop.version for hop in info.upgrade_chain] == ["old_model", "v2", "v3"]
    assert info.rows_by_source["transformed/ingested"] >= 6
    row = row_lineage(living.instance, living.fct.connect(), "v3", ingested[0])
    assert row.ingest_batch == "bunderv2" and row.source == "transformed"
    assert [hop.model for hop in row.chain] == ["new_model[v2]", "new_model[v3]"]
    assert all(len(hop.sha256) == 64 for hop in row.chain)
    original = row_lineage(living.instance, living.fct.connect(), "v3", base[0])
    assert [hop.model for hop in original.chain] == [
        "old_model",
        "new_model[v2]",
        "new_model[v3]",
    ]
    text = format_row_lineage(row)
    assert "ingest batch bunderv2" in text and "transformed from the stored vector" in text


def _wait_for_log(instance, text: str, worker: subprocess.Popen, timeout: float = 1200) -> str:
    """The id of the v4 run whose event log holds `text`, once it does; fails at once if
    `worker` exits first, and after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in instance.get_runs(dg.RunsFilter(tags={"dagster/partition": "v4"})):
            if any(text in (e.user_message or "") for e in instance.all_logs(run.run_id)):
                return run.run_id
        if worker.poll() is not None:
            raise AssertionError(f"the backfill exited ({worker.returncode}) before {text!r}")
        time.sleep(0.2)
    raise AssertionError(f"no run logged {text!r} within {timeout:.0f} s")


def test_items_dropped_while_a_backfill_runs_are_promoted_once_each(living, tmp_path):
    deploy(living, "v3")
    serving = current(living.fct.connect()).version
    # v4's models first: the run below is the backfill (and evaluation) alone.
    models = dg.AssetSelection.assets("new_model", "transformation")
    living.instance.add_dynamic_partitions("model_version", ["v4"])
    job = dg.define_asset_job("v4_models", selection=models)
    defs = dg.Definitions(
        assets=living.defs.assets,
        asset_checks=living.defs.asset_checks,
        jobs=[job],
        resources=living.resources(),
    )
    assert (
        defs.resolve_job_def("v4_models")
        .execute_in_process(instance=living.instance, partition_key="v4")
        .success
    )
    before = _store_ids(living)

    # The backfill is a real run of the catch_up job in its own process, launched by Dagster's
    # CLI on this instance (two execute_in_process runs in threads of one process deadlock on
    # logging's locks). One row per batch keeps it reading while the files arrive.
    config = tmp_path / "backfill.yaml"
    config.write_text("ops:\n  backfilled_gallery:\n    config:\n      rows_per_batch: 1\n")
    log = tmp_path / "backfill.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "dagster", "job", "execute", "-m", "fct_assets.definitions"]
            + ["-j", "catch_up", "-c", str(config)]
            + ["--tags", json.dumps({"dagster/partition": "v4"})],
            cwd=REPO,
            env={**os.environ, **living.environ(), "FCT_EXECUTOR": "in_process"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Once the backfill has pinned the table it reads, N files arrive and are ingested.
        run_id = _wait_for_log(living.instance, "backfill v4: from", worker)
        n = 5
        dropped = _ingest(living, tmp_path, "bduring", n, start=40)
        code = worker.wait(timeout=1200)
    finally:
        if worker.poll() is None:  # a timeout or a failure above: never leave it running
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert code == 0, log.read_text()[-3000:]
    assert living.instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS
    v4 = _table(living, "gallery_v4")
    assert sorted(v4.column("item_id").to_pylist()) == before  # the pinned store, once each
    assert not set(dropped) & set(before)

    with pytest.raises(
        PromotionError, match=rf"not promoted: {n} items of gallery_store .* catch up"
    ):
        promote(living.instance, living.fct.connect(), "v4")
    assert current(living.fct.connect()).version == serving  # nothing changed
    assert (
        living.defs.resolve_job_def("catch_up")
        .execute_in_process(instance=living.instance, partition_key="v4")
        .success
    )
    row = promote(living.instance, living.fct.connect(), "v4")
    promoted = _table(living, "gallery_v4", row.table_version).column("item_id")
    # Exactly the gallery as it was plus the N dropped items, each once.
    assert sorted(promoted.to_pylist()) == sorted(before + dropped)
    assert pc.count_distinct(promoted).as_py() == len(promoted)
