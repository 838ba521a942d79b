"""`fct reproduce`'s numbers on digits with the tiny preset (the run of conftest.py): each case
recomputed by brute force from the vectors the run produced, and the invariants that hold by
construction or by a wide margin."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.reference import brute_force_retrieval


@pytest.fixture(scope="module")
def tiny(tiny_run) -> dict[str, Any]:
    assert tiny_run["code"] == 0, tiny_run["stderr"]
    assert tiny_run["calls"] == 2  # the test split, then the validation split
    return tiny_run


def test_every_case_is_query_over_gallery_as_named(tiny):
    # Recomputed with the query and gallery the case's name says: a swapped pair (h(old) as
    # the queries, the new model's vectors as the gallery) gives other numbers.
    v, cases = tiny["test_split"], tiny["result"]["cases"]
    vectors = {"new": v["new"], "old": v["old"], "bct": v["bct"]}
    vectors.update({name: gallery for name, (gallery, _) in v["h"].items()})
    pairs = {
        "old/old": ("old", "old"),
        "new/new": ("new", "new"),
        "new/h(old)": ("new", "h"),
        "new/h(old) no side-info": ("new", "h no side-info"),
        "new/h(old) fastfill": ("new", "fastfill"),
        "new/h(old) fastfill no side-info": ("new", "fastfill no side-info"),
        "new/old": ("new", "old"),
    }
    for case, (query, gallery) in pairs.items():
        expected = brute_force_retrieval(vectors[query], vectors[gallery], v["labels"])
        for metric, value in expected.items():
            assert cases[case][metric] == pytest.approx(value, abs=0.01), (case, metric)
    swapped = brute_force_retrieval(vectors["h"], vectors["new"], v["labels"])
    assert swapped["mAP"] != pytest.approx(cases["new/h(old)"]["mAP"], abs=0.01)


def test_bcts_table_scores_every_case_under_its_own_metric(tiny):
    # BCT's table is under cosine: the same as L2 on unit-normalised vectors. Its old/old and
    # new/h(old) are recomputed that way too, so bct/old is compared on one metric.
    v, bct = tiny["test_split"], tiny["result"]["bct_comparison"]
    assert bct["metric"] == "cosine"

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    vectors = {"new": v["new"], "old": v["old"], "bct": v["bct"], "h": v["h"]["h"][0]}
    pairs = {
        "old/old": ("old", "old"),
        "new/new": ("new", "new"),
        "new/h(old)": ("new", "h"),
        "bct/old": ("bct", "old"),
        "bct/bct": ("bct", "bct"),
    }
    assert set(bct["cases"]) == set(pairs)
    for case, (query, gallery) in pairs.items():
        expected = brute_force_retrieval(unit(vectors[query]), unit(vectors[gallery]), v["labels"])
        for metric, value in expected.items():
            assert bct["cases"][case][metric] == pytest.approx(value, abs=0.01), (case, metric)
    assert "bct/old" not in tiny["result"]["cases"]  # one metric per table


def test_the_curves_start_at_h_of_old_and_end_at_new_over_new(tiny):
    # At fraction 0 the gallery is h's (recomputed by brute force), at 1 it is new/new.
    result, v = tiny["result"], tiny["test_split"]
    for variant in ("fastfill", "fastfill no side-info"):
        start = brute_force_retrieval(v["new"], v["h"][variant][0], v["labels"])
        for order, curve in result["backfill_curves"][variant].items():
            for metric in ("top1", "mAP"):
                assert curve[metric][0] == pytest.approx(start[metric], abs=0.01), order
                assert curve[metric][-1] == pytest.approx(result["cases"]["new/new"][metric])


def test_the_papers_ordering_holds_by_a_wide_margin(tiny):
    cases = tiny["result"]["cases"]
    chance = 100 / 10
    assert abs(cases["new/old"]["top1"] - chance) < 5  # two independent models: near chance
    assert cases["new/old"]["mAP"] < cases["old/old"]["mAP"] - 15
    assert cases["old/old"]["mAP"] + 2 < cases["new/h(old)"]["mAP"]


def test_the_recorded_config_is_the_one_that_ran(tiny):
    # h's dims in the preset are placeholders; the record must carry the dims h was built
    # with: the old, side-info and new vectors the run evaluated.
    h = tiny["result"]["config"]["transformation"]
    v = tiny["test_split"]
    assert h["old_dim"] == tiny["result"]["config"]["old_model"]["embed_dim"]
    assert h["new_dim"] == tiny["result"]["config"]["new_model"]["embed_dim"]
    assert h["old_dim"] == v["old"].shape[1]
