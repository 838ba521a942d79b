"""fct_assets/upgrade/backfill.py's per-row columns, worked out by hand: each row's chain of spaces."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from fct_assets.lib import storage
from fct_assets.lib.records import SourceTable
from fct_assets.upgrade.backfill import chains

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
