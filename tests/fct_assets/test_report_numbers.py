"""The eval report's numbers against an independent computation: brute-force numpy retrieval over
the vectors stored in LanceDB, and the invariants that hold by construction or by a wide margin
on the tiny preset (digits, old classes 0-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fct_assets.lib import storage
from tests.reference import brute_force_retrieval as brute_force

VERSION = "vnum"


@pytest.fixture(scope="module")
def stored(env):
    """Version `vnum`: its report (h only,
    reembed_fraction=0) and the vectors LanceDB holds: old embeddings, the h(old) table, and
    the same table fully re-embedded (the new model's vectors of every gallery image)."""
    env.ensure(VERSION)
    db = env.fct.connect()
    report = json.loads((env.root / "records" / "eval_report" / f"{VERSION}.json").read_text())
    assert env.materialise_table(VERSION, reembed_fraction=1.0).success

    def read(name, version, column):
        data = storage.open_pinned(db, name, version).to_arrow().sort_by("item_id")
        return data, storage.vectors(data.column(column))

    store, old = read(
        storage.GALLERY_STORE, db.open_table(storage.GALLERY_STORE).version, "old_embedding"
    )
    transformed_table, transformed = read(
        f"gallery_{VERSION}", report["table_version"], "embedding"
    )
    reembedded_table, new = read(
        f"gallery_{VERSION}", db.open_table(f"gallery_{VERSION}").version, "embedding"
    )
    assert set(reembedded_table.column("source").to_pylist()) == {"re-embedded"}
    assert set(transformed_table.column("source").to_pylist()) == {"transformed"}
    labels = store.column("label").to_numpy()
    sigma = transformed_table.column("sigma").to_numpy()
    return {
        "report": report,
        "labels": labels,
        "old": old,
        "h": transformed,
        "sigma": sigma,
        "new": new,
    }


def test_the_report_equals_brute_force_retrieval_over_the_stored_vectors(stored):
    cases, labels = stored["report"]["cases"], stored["labels"]
    old, h, new = stored["old"], stored["h"], stored["new"]
    expected = {
        "old/old": brute_force(old, old, labels),
        "new/new": brute_force(new, new, labels),
        "new/h(old)": brute_force(new, h, labels),
        f"new/gallery_{VERSION}": brute_force(new, h, labels),
        "new/old": brute_force(new, old, labels),
    }
    for case, metrics in expected.items():
        for name, value in metrics.items():
            assert cases[case][name] == pytest.approx(value, abs=0.01), (case, name)


def test_with_nothing_re_embedded_the_served_table_is_h_of_old(stored):
    cases = stored["report"]["cases"]
    assert stored["report"]["reembedded"] == 0
    assert cases[f"new/gallery_{VERSION}"] == cases["new/h(old)"]


def test_the_curves_start_at_h_of_old_and_end_at_new_over_new(stored):
    # At fraction 0 the gallery is the h(old) table (recomputed by brute force): new/h(old). At
    # 1 every item is re-embedded: new/new.
    report, labels = stored["report"], stored["labels"]
    start = brute_force(stored["new"], stored["h"], labels)
    for order, curve in report["backfill_curves"].items():
        assert curve["fractions"][0] == 0.0 and curve["fractions"][-1] == 1.0
        for metric in ("top1", "mAP"):
            assert curve[metric][0] == pytest.approx(start[metric], abs=0.01), order
            assert curve[metric][0] == pytest.approx(report["cases"]["new/h(old)"][metric])
            assert curve[metric][-1] == pytest.approx(report["cases"]["new/new"][metric]), order


def test_the_papers_ordering_holds_by_a_wide_margin(stored):
    cases = stored["report"]["cases"]
    chance = 100 / len(np.unique(stored["labels"]))
    # Vectors of two independently trained models compared: near chance (measured 9.8 % top-1,
    # chance 10 %).
    assert abs(cases["new/old"]["top1"] - chance) < 5
    assert cases["new/old"]["mAP"] < cases["old/old"]["mAP"] - 15
    # h(old) with side-info beats the old model alone on mAP (measured by 5.6-14.6 points over
    # new-model seeds 0, 1, 7). Top-1 of this 540-item gallery is not gated (it moves by
    # several points between equally good models; checks.py gates mAP for the same reason).
    assert cases["old/old"]["mAP"] + 2 < cases["new/h(old)"]["mAP"]
