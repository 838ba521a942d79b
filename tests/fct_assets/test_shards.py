"""Sharded backfill: shards in separate processes (multiprocess executor), one publish, nothing
published when a shard fails; the IVF_PQ index above ann_min_rows."""

from __future__ import annotations

import json
import os

import dagster as dg
import numpy as np
import pytest
import torch

from fct_assets.definitions import build_defs
from fct_assets.lib import storage
from fct_assets.lib.event_log import recorded_metadata
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.upgrade.backfill import STAGING_PREFIX
from fct_ml.augment import to_float
from fct_ml.backfill import apply_transformation
from fct_ml.training import encode
from tests.support.small_world import build_small_world

BACKFILL = dg.AssetKey("backfilled_gallery")


def upgrade_job() -> dg.JobDefinition:
    """The upgrade job with resources and executor from the environment (FCT_LANCEDB_URI, ...,
    FCT_EXECUTOR): module-level, so `dg.reconstructable` can rebuild it in every step process."""
    return build_defs().resolve_job_def("upgrade")


def _staging_tables(db) -> list[str]:
    return [n for n in db.list_tables().tables if n.startswith(STAGING_PREFIX)]


def _point_env_at(monkeypatch, env) -> None:
    for key, value in {**env.environ(), "FCT_EXECUTOR": "multiprocess"}.items():
        monkeypatch.setenv(key, value)


def _model(env, name: str, version: str):
    return load_recorded_checkpoint(env.instance, name, version).model


@pytest.mark.slow
def test_sharded_backfill_in_separate_processes_publishes_every_item_once(env, monkeypatch):
    version, shards, fraction = "v7", 3, 0.25
    env.instance.add_dynamic_partitions("model_version", [version])
    models = [dg.AssetKey("new_model"), dg.AssetKey("transformation")]
    assert (
        env.defs.resolve_implicit_global_asset_job_def()
        .execute_in_process(
            instance=env.instance,
            partition_key=version,
            asset_selection=models,
            # h from the old model: the expected values below are computed from old embeddings.
            run_config={"ops": {"transformation": {"config": {"source": "old"}}}},
        )
        .success
    )
    _point_env_at(monkeypatch, env)
    config = {
        "reembed_fraction": fraction,
        "rows_per_batch": 64,
        "shards": shards,
        "ann_min_rows": 256,
    }
    # The `gpu` pool at one slot, as dagster_home/dagster.yaml sets it (this instance has no yaml).
    env.instance.event_log_storage.set_concurrency_slots("gpu", 1)
    try:
        with dg.execute_job(
            dg.reconstructable(upgrade_job),
            instance=env.instance,
            asset_selection=[BACKFILL],
            run_config={"ops": {"backfilled_gallery": {"config": config}}},
            tags={"dagster/partition": version},
        ) as result:
            assert result.success
            run_id = result.run_id
    finally:
        env.instance.event_log_storage.delete_concurrency_limit("gpu")

    # Each shard ran as its own step, in its own process, none in this (the orchestrating) one.
    def events(kind):
        return {
            r.event_log_entry.step_key: r.event_log_entry
            for r in env.instance.get_records_for_run(run_id, of_type=kind).records
        }

    starts, ends = events(dg.DagsterEventType.STEP_START), events(dg.DagsterEventType.STEP_SUCCESS)
    shard_keys = sorted(k for k in starts if ".backfill_shard[" in k)
    assert shard_keys == [f"backfilled_gallery.backfill_shard[shard_{k}]" for k in range(shards)]
    pids = {starts[k].dagster_event.pid for k in shard_keys}
    assert len(pids) == shards and os.getpid() not in pids
    # One gpu slot: the model steps (plan, shards) ran one at a time.
    spans = sorted(
        (starts[k].timestamp, ends[k].timestamp)
        for k in starts
        if "backfill_shard[" in k or "plan_backfill" in k
    )
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans

    db = env.fct.connect()
    store = db.open_table(storage.GALLERY_STORE).to_arrow().sort_by("item_id")
    table = db.open_table(f"gallery_{version}").to_arrow().sort_by("item_id")
    n = store.num_rows
    assert (
        table.num_rows == n
        and table.column("item_id").to_pylist() == store.column("item_id").to_pylist()
    )  # each once
    record = json.loads(
        (env.root / "records" / "backfilled_gallery" / f"{version}.json").read_text()
    )
    assert (
        record["rows"] == n
        and record["shards"] == shards
        and record["version"] == db.open_table(f"gallery_{version}").version
    )
    assert _staging_tables(db) == []
    # Each op's cost, numeric (the UI plots it), the shards' each from its own process; the whole's
    # CPU is the parts' sum and its peak RSS the largest part's.
    meta = recorded_metadata(env.instance, dg.AssetKey("backfilled_gallery"), version)
    parts = ["plan", "publish"] + [f"shard_{k}" for k in range(shards)]
    for part in parts:
        for what in ("wall_s", "cpu_s", "peak_rss_mb"):
            assert isinstance(meta[f"cost/{part}_{what}"], float), (part, what)
        assert meta[f"cost/{part}_peak_rss_mb"] > 0
    assert meta["cost/cpu_s"] == pytest.approx(
        sum(meta[f"cost/{p}_cpu_s"] for p in parts), abs=1e-3
    )
    assert meta["cost/peak_rss_mb"] == max(meta[f"cost/{p}_peak_rss_mb"] for p in parts)
    assert meta["rows_by_source"] == {
        "re-embedded/base": round(fraction * n),
        "transformed/base": n - round(fraction * n),
    }

    # Expected by hand: h over the stored vectors; the re-embedded items are the round(0.25 n)
    # highest sigma.
    h, new_model = _model(env, "transformation", version), _model(env, "new_model", version)
    old = torch.from_numpy(storage.vectors(store.column("old_embedding")))
    side = torch.from_numpy(storage.vectors(store.column("side_info")))
    expected, sigma = apply_transformation(h, old, side)
    ids = np.asarray(store.column("item_id").to_pylist())
    chosen = set(ids[np.argsort(-sigma.numpy(), kind="stable")[: round(fraction * n)]].tolist())
    source = np.asarray(table.column("source").to_pylist())
    assert set(ids[source == "re-embedded"].tolist()) == chosen and record["reembedded"] == len(
        chosen
    )
    got = storage.vectors(table.column("embedding"))
    transformed = source == "transformed"
    np.testing.assert_allclose(
        got[transformed], expected.numpy()[transformed], rtol=1e-5, atol=1e-5
    )
    picked = ~transformed
    images = torch.from_numpy(
        np.stack(
            [
                storage.decode_png(b, 1)
                for b in np.asarray(store.column("image").to_pylist(), dtype=object)[picked]
            ]
        )
    )
    np.testing.assert_allclose(
        got[picked], encode(new_model, [images], transform=to_float).numpy(), rtol=1e-4, atol=1e-4
    )

    # n >= ann_min_rows: an IVF_PQ index on the published table, recorded; search still finds a
    # re-embedded item's own image first, at distance ~0 (refine re-ranks exactly).
    # By hand from storage.ann_params' rule for 540 rows of dim 16: partitions max(1, min(256, 540
    # // 256)) = 2,
    # sub-vectors the largest divisor of 16 up to 16 // 4 = 4, nprobes ceil(2 / 8) = 1, refine 10.
    assert (n, got.shape[1]) == (540, 16)
    assert record["ann_index"] == "built"
    assert record["ann_params"] == {
        "index_type": "IVF_PQ",
        "metric": "l2",
        "num_partitions": 2,
        "num_sub_vectors": 4,
        "nprobes": 1,
        "refine_factor": 10,
    }
    assert storage.ann_index_exists(db.open_table(f"gallery_{version}"))
    from fct_assets.serving.search import search_command

    item = sorted(chosen)[0]
    hits = search_command(env.instance, env.fct, image=None, item_id=item, version=version, k=3)
    assert hits[0].item_id == item and hits[0].distance == pytest.approx(0.0, abs=1e-4)


def test_below_ann_min_rows_no_index(env):
    # v2 was backfilled with the default ann_min_rows (100,000) over a gallery of a few hundred
    # items.
    db = env.fct.connect()
    meta = recorded_metadata(env.instance, BACKFILL, "v2")
    assert meta["rows"] < 100_000 and meta["ann_index"] == "none"
    assert not storage.ann_index_exists(db.open_table("gallery_v2"))


# --------------------------------------------------------------------------- #
# A shard fails: a small world of random models (no training) and a gallery_store whose item 10,
# in the last of 3 shards, holds a corrupt image. In-process: the failure path is the same.
# --------------------------------------------------------------------------- #

N_ITEMS, CORRUPT_ITEM = 12, 10


def test_a_failed_shard_publishes_nothing(tmp_path):
    world = build_small_world(tmp_path, n_items=N_ITEMS, corrupt=CORRUPT_ITEM)
    world.upgrade_models()
    instance, db = world.instance, world.fct.connect()
    backfill = world.backfill

    first = backfill(shards=3)
    assert first.success
    published = db.open_table("gallery_v2")
    before = (published.version, published.to_arrow().sort_by("item_id"))
    assert before[1].column("item_id").to_pylist() == list(range(N_ITEMS))

    # Every item re-embedded: shard 3 (rows 8-11) meets item 10's corrupt image and fails.
    failed = backfill(shards=3, reembed_fraction=1.0)
    assert not failed.success
    failures = [e for e in failed.all_events if e.is_step_failure]
    assert [e.step_key for e in failures] == ["backfilled_gallery.backfill_shard[shard_2]"]
    assert f"gallery_store item {CORRUPT_ITEM}: stored image is not a readable PNG" in str(
        failures[0].event_specific_data.error
    )
    succeeded = {e.step_key for e in failed.all_events if e.is_step_success}
    assert {
        "backfilled_gallery.backfill_shard[shard_0]",
        "backfilled_gallery.backfill_shard[shard_1]",
    } <= succeeded
    assert "backfilled_gallery.publish_backfill" not in succeeded
    # Nothing published: the table is at its version, rows as they were; the record is the first
    # run's.
    table = db.open_table("gallery_v2")
    assert table.version == before[0] and table.to_arrow().sort_by("item_id").equals(before[1])
    assert recorded_metadata(instance, BACKFILL, "v2")["version"] == before[0]
    assert len(_staging_tables(db)) == 2  # shards 1 and 2 of the failed run: never read

    # The next run of the version drops the failed run's staging tables and publishes.
    again = backfill(shards=2)
    assert again.success and _staging_tables(db) == []
    assert db.open_table("gallery_v2").version > before[0]
