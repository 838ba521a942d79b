"""fct_assets/upgrade/backfill.py: each row's chain of spaces, worked out by hand; an h refused
when it was trained for other checkpoints; items with no vector in h's source space (ingested
after a later promotion) embedded from their stored images, so that a catch-up reaches them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_assets.lib import storage
from fct_assets.lib.io_managers import load_recorded_checkpoint, recorded_record
from fct_assets.lib.records import BackfilledTable, SourceTable, VersionTable
from fct_assets.serving.deployment import append
from fct_assets.upgrade.backfill import chains, transformed_again
from fct_ml.augment import to_float
from fct_ml.backfill import apply_transformation
from fct_ml.training import encode
from tests.support.small_world import DIM, OLD_SPACE, SIDE_SPACE, build_small_world

OLD, V2, V3 = "old_model@aaa", "new_model:v2@bbb", "new_model:v3@ccc"


def test_a_first_upgrade_chains_the_old_space_unless_the_row_was_re_embedded():
    store = SourceTable(
        table=storage.GALLERY_STORE, version=1, column="old_embedding", space_id=OLD
    )
    batch = pa.record_batch({"item_id": pa.array([1, 2, 3], pa.int64())})
    got = chains(batch, store, V2, np.array([False, True, False]))
    assert got.to_pylist() == [f"{OLD} > {V2}", V2, f"{OLD} > {V2}"]


def test_a_chained_upgrade_extends_each_rows_own_chain():
    # gallery_v2 as the source: a transformed row (old > v2), a row ingested after v2's promotion
    # (its chain is its space alone), a row with no chain recorded (null) or an empty one (its
    # own space_id starts the chain), and one re-embedded now (starts afresh).
    v2 = SourceTable(table="gallery_v2", version=4, column="embedding", space_id=V2)
    batch = pa.record_batch(
        {
            "item_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
            "space_id": pa.array([V2] * 5),
            "chain": pa.array([f"{OLD} > {V2}", V2, None, "", f"{OLD} > {V2}"]),
        }
    )
    got = chains(batch, v2, V3, np.array([False, False, False, False, True]))
    assert got.to_pylist() == [
        f"{OLD} > {V2} > {V3}",
        f"{V2} > {V3}",
        f"{V2} > {V3}",
        f"{V2} > {V3}",
        V3,
    ]
    assert got.type == pa.string()


# --------------------------------------------------------------------------- #
# Backfills of a small world (tests/support/small_world.py): random models, no training.
# --------------------------------------------------------------------------- #


def _table(world, name: str = "gallery_v2") -> pa.Table:
    return world.fct.connect().open_table(name).to_arrow().sort_by("item_id")


def _failure(result) -> str:
    failures = [e for e in result.all_events if e.is_step_failure]
    assert len(failures) == 1, [e.step_key for e in failures]
    error = failures[0].event_specific_data.error
    return (error.cause or error).message.strip()  # the step's own error, under Dagster's


def _by_hand(world, ids, old_rows=None, source=None):
    """(h's vectors of `ids` from their stored old embeddings (or `source`'s rows), the new
    model's vectors of `ids` from their stored images), as the backfill should compute them."""
    h = load_recorded_checkpoint(world.instance, "transformation", "v2").model
    new_model = load_recorded_checkpoint(world.instance, "new_model", "v2").model
    store = _table(world, storage.GALLERY_STORE)
    pos = np.searchsorted(store.column("item_id").to_numpy(), ids)
    rows = store.take(pa.array(pos))
    stored = source if source is not None else rows.column("old_embedding")
    side = torch.from_numpy(storage.vectors(rows.column("side_info")))
    mapped = None
    if stored.null_count == 0:
        mapped, _ = apply_transformation(h, torch.from_numpy(storage.vectors(stored)), side)
    images = torch.from_numpy(
        np.stack([storage.decode_png(b, 1) for b in rows["image"].to_pylist()])
    )
    embedded = encode(new_model, [images], transform=to_float).numpy()
    return mapped, embedded


def test_a_backfill_refuses_an_h_trained_for_a_new_model_since_retrained(tmp_path):
    # An upgrade that failed half-way: new_model[v2] retrained (another seed) after h was, and h
    # not retrained. h's output is in the space of the new model it was trained for; labelling it
    # with the retrained one's space_id would be a lie, so the backfill refuses, naming both.
    world = build_small_world(tmp_path)
    trained_for = world.upgrade_models(new_seed=0)
    assert world.backfill().success
    before = world.fct.connect().open_table("gallery_v2").version
    retrained = world.record("new_model", world.new_model(seed=1)).space_id
    assert retrained != trained_for

    for shards in (1, 3):  # one shard writes the table itself; several stage first
        result = world.backfill(shards=shards)
        assert not result.success
        assert _failure(result).endswith(
            f"BindingError: transformation[v2] was trained for {trained_for} (the space it maps"
            f" into), but {retrained} is there now; re-materialise transformation[v2] (an upgrade"
            " that failed after new_model[v2] was retrained leaves them apart)"
        )
        # Refused before anything was written: no shard ran, the table is as it was, every row
        # labelled with the space its values are in.
        assert not any("backfill_shard" in (e.step_key or "") for e in result.all_events)
        table = world.fct.connect().open_table("gallery_v2")
        assert table.version == before
        assert set(table.to_arrow().column("space_id").to_pylist()) == {trained_for}


def test_an_h_recorded_without_the_new_model_it_was_trained_for_is_refused(tmp_path):
    # An h whose checkpoint and materialisation name no new model cannot vouch for its output's
    # space: refused, not guessed.
    world = build_small_world(tmp_path)
    world.record("new_model", world.new_model(seed=0))
    world.record("transformation", world.h(), old_space_id=OLD_SPACE, side_info_space_id=SIDE_SPACE)
    result = world.backfill()
    assert not result.success
    assert _failure(result).endswith(
        "transformation[v2] records no new model it was trained for; re-materialise"
        " transformation[v2] (an upgrade that failed after new_model[v2] was retrained leaves"
        " them apart)"
    )


def test_items_with_no_old_embedding_are_embedded_from_their_images(tmp_path):
    # `fct catch-up v2` after a later promotion: items 3 and 7 were ingested while another version
    # was served, so gallery_store holds no old embedding of them, and h (mapping from the old
    # model) has nothing to map. The new model embeds them from their stored images instead.
    world = build_small_world(tmp_path, without_old=(3, 7))
    space = world.upgrade_models()
    for shards in (1, 2):
        assert world.backfill(shards=shards).success
        table = _table(world)
        rows = {r["item_id"]: r for r in table.to_pylist()}
        assert sorted(rows) == list(range(12))  # every stored item, once
        assert {i for i, r in rows.items() if r["source"] == "re-embedded"} == {3, 7}
        for i in (3, 7):
            assert rows[i]["chain"] == space and rows[i]["sigma"] == 0.0
            assert rows[i]["ingest_batch"] == "after" and rows[i]["space_id"] == space
        assert set(table.column("space_id").to_pylist()) == {space}
        got = storage.vectors(table.column("embedding"))
        kept = [i for i in range(12) if i not in (3, 7)]
        mapped, _ = _by_hand(world, kept)
        _, embedded = _by_hand(world, [3, 7])
        np.testing.assert_allclose(got[kept], mapped.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[[3, 7]], embedded, rtol=1e-4, atol=1e-4)


def test_a_re_embedding_budget_goes_to_items_h_can_map(tmp_path):
    # Items with no old embedding are embedded from their images whatever the budget: they do
    # not take the places of the most uncertain items h did map.
    world = build_small_world(tmp_path, without_old=(3,))
    world.upgrade_models()
    assert world.backfill(reembed_fraction=0.25).success  # round(0.25 * 12) = 3 places
    table = _table(world)
    reembedded = {r["item_id"] for r in table.to_pylist() if r["source"] == "re-embedded"}
    assert 3 in reembedded and len(reembedded) == 1 + 3


def _chained_world(tmp_path):
    """A small world whose v2 is chained: its h maps from the deployed v1's table, which holds
    items 0-9 (random vectors); items 10 and 11 were ingested while another version was served,
    so gallery_v1 never received them. Returns (world, v1's vectors of items 0-9, v2's space)."""
    world = build_small_world(tmp_path)
    db = world.fct.connect()
    v1_space = "new_model:v1@cccccccccccc"
    held = np.arange(10)
    rng = np.random.default_rng(2)
    v1_vectors = pa.FixedSizeListArray.from_arrays(
        pa.array(rng.random(len(held) * DIM).astype(np.float32)), DIM
    )
    schema = storage.backfilled_schema(DIM, v1_space, lineage=True)
    info = storage.publish(
        db,
        "gallery_v1",
        schema,
        [
            pa.record_batch(
                [
                    pa.array(held, pa.int64()),
                    pa.array((held % 10).astype(np.int32)),
                    v1_vectors,
                    pa.array(np.zeros(len(held), np.float32)),
                    pa.array(["transformed"] * len(held)),
                    pa.array([v1_space] * len(held)),
                    pa.array([f"{OLD_SPACE} > {v1_space}"] * len(held)),
                    pa.nulls(len(held), pa.string()),
                ],
                schema=schema,
            )
        ],
    )
    append(
        db,
        "promote",
        VersionTable(
            version="v1", table="gallery_v1", table_version=info["version"], space_id=v1_space
        ),
    )
    space = world.upgrade_models(source=v1_space, source_version="v1")
    return world, v1_vectors, space


def test_items_the_source_table_lacks_are_embedded_from_their_images(tmp_path):
    # A chained h (v2 maps from the deployed v1's table) and items 10 and 11 ingested while
    # another version was served: gallery_v1 never received them. The backfill adds them,
    # embedded by the new model from their stored images, once, in the last shard.
    world, v1_vectors, space = _chained_world(tmp_path)
    held = np.arange(10)
    v1_space = "new_model:v1@cccccccccccc"
    for shards in (1, 3):
        assert world.backfill(shards=shards).success
        table = _table(world)
        rows = {r["item_id"]: r for r in table.to_pylist()}
        assert sorted(rows) == list(range(12)) and table.num_rows == 12
        assert {i for i, r in rows.items() if r["source"] == "re-embedded"} == {10, 11}
        assert (
            rows[10]["chain"] == space and rows[0]["chain"] == f"{OLD_SPACE} > {v1_space} > {space}"
        )
        got = storage.vectors(table.column("embedding"))
        mapped, _ = _by_hand(world, held.tolist(), source=v1_vectors)
        _, embedded = _by_hand(world, [10, 11])
        np.testing.assert_allclose(got[:10], mapped.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[10:], embedded, rtol=1e-4, atol=1e-4)


def test_a_transformed_row_is_h_of_its_own_inputs_again(tmp_path):
    # What the demo says of an ingested item's row: h applied again to the item's own row of the
    # source table and its own side-info, looked up by id (asked in any order), gives the row
    # the published table holds. A re-embedded row is the new model's, not h's; an item the
    # source table never held has no inputs to apply h to, and is refused in one line.
    world, v1_vectors, _ = _chained_world(tmp_path)
    assert world.backfill(reembed_fraction=0.3).success  # round(0.3 * 10) of gallery_v1's rows
    record = recorded_record(world.instance, BackfilledTable, "backfilled_gallery", "v2")
    h = load_recorded_checkpoint(world.instance, "transformation", "v2").model
    rows = {r["item_id"]: r for r in _table(world).to_pylist()}
    transformed = [i for i in (7, 2, 5, 0, 9, 4, 1) if rows[i]["source"] == "transformed"]
    reembedded = [i for i in range(10) if rows[i]["source"] == "re-embedded"]
    assert len(transformed) >= 4 and len(reembedded) == 3

    got, again = transformed_again(world.fct.connect(), record, h, transformed)
    mapped, _ = _by_hand(world, transformed, source=v1_vectors.take(pa.array(transformed)))
    np.testing.assert_allclose(got, mapped.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(again, mapped.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, [rows[i]["embedding"] for i in transformed], rtol=1e-6)

    got, again = transformed_again(world.fct.connect(), record, h, reembedded)
    assert np.abs(got - again).max(axis=1).min() > 1e-3
    with pytest.raises(ValueError, match=r"^gallery_v1 \(version \d+\): no item 10$"):
        transformed_again(world.fct.connect(), record, h, [3, 10])


def test_a_backfill_value_out_of_range_is_refused_in_one_line_before_anything_is_read(tmp_path):
    # A run no run coordinator saw (execute_in_process, `fct catch-up`): the plan refuses its
    # config as it starts, naming the field, the bound and the value.
    world = build_small_world(tmp_path)
    world.upgrade_models()
    result = world.backfill(shards=0)
    assert not result.success
    assert _failure(result).endswith(
        "LaunchConfigError: backfilled_gallery.shards: 0 refused: expected shards >= 1"
    )
    assert "gallery_v2" not in world.fct.connect().list_tables().tables
