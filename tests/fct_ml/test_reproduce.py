"""`fct reproduce`'s numbers on digits with the tiny preset (the run of conftest.py): each case
recomputed by brute force from the vectors the run produced, and the invariants that hold by
construction or by a wide margin."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fct_ml.backfill import backfill_summary
from fct_ml.presets import preset
from fct_ml.reproduce import backfill_measures
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
        "new/h(old) linear": ("new", "linear"),
        "new/h(old) linear no side-info": ("new", "linear no side-info"),
        "new/h(old) procrustes no side-info": ("new", "procrustes no side-info"),
        "new/old": ("new", "old"),
    }
    assert list(cases) == list(pairs)
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
    # Each BCT model's own loss weights: the paper's has no alignment term.
    bct = tiny["result"]["bct_configs"]
    assert bct["BCT (paper)"]["alignment_weight"] == 0.0
    assert bct["BCT + alignment"] == tiny["result"]["config"]["bct"]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _top1_right(query: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool, leave-one-out, squared L2 in float64, ties against the query: is the nearest
    other item of the query's class?"""
    query, gallery = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    right = np.zeros(len(labels), dtype=bool)
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        distance = ((gallery[keep] - query[i]) ** 2).sum(1)
        match = labels[keep] == labels[i]
        right[i] = match[np.lexsort((match, distance))][0]
    return right


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks, written apart from the package: sort, then share ranks among ties."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_both_bct_variants_under_both_metrics_and_their_criterion(tiny):
    # Each BCT model under L2 and under cosine (L2 on unit vectors), every case of its table
    # recomputed; the criterion is bct/old - old/old on seen classes and on all queries.
    v, result = tiny["test_split"], tiny["result"]
    models = {"BCT + alignment": v["bct"], "BCT (paper)": v["bct (paper)"]}
    assert list(result["bct_variants"]) == list(models)
    assert not np.allclose(v["bct"], v["bct (paper)"])  # two models, not one
    seen = ~np.isin(v["labels"], [5, 6, 7, 8, 9])
    for name, bct in models.items():
        for metric, to in (("l2", np.asarray), ("cosine", _unit)):
            block = result["bct_variants"][name][metric]
            vectors = {"old": v["old"], "new": v["new"], "h": v["h"]["h"][0], "bct": bct}
            pairs = {
                "old/old": ("old", "old"),
                "new/new": ("new", "new"),
                "new/h(old)": ("new", "h"),
                "bct/old": ("bct", "old"),
                "bct/bct": ("bct", "bct"),
            }
            assert list(block["cases"]) == list(pairs)
            for case, (q, g) in pairs.items():
                expected = brute_force_retrieval(to(vectors[q]), to(vectors[g]), v["labels"])
                assert block["cases"][case]["mAP"] == pytest.approx(expected["mAP"], abs=0.01)
            for subset, cases in (
                ("all queries", block["cases"]),
                ("seen classes", block["cases_seen_classes"]),
            ):
                for m in ("top1", "mAP"):
                    margin = cases["bct/old"][m] - cases["old/old"][m]
                    assert block["criterion"][subset][m] == pytest.approx(margin)
                    number = result["ci95"][f"{name} ({metric}): bct/old - old/old, {subset}, {m}"]
                    assert number["estimate"] == pytest.approx(margin, abs=1e-4)
            # Seen classes by hand: top-1 of bct/old over the old model's classes.
            right = _top1_right(to(bct), to(v["old"]), v["labels"])
            assert block["cases_seen_classes"]["bct/old"]["top1"] == pytest.approx(
                100 * right[seen].mean(), abs=0.01
            )
    # Today's table is BCT + alignment under BCT's metric.
    today = result["bct_variants"]["BCT + alignment"]["cosine"]
    assert result["bct_comparison"]["cases"] == today["cases"]


def test_the_fct_h_in_random_order_is_fastfills_baseline(tiny):
    # The FCT h's curve starts at new/h(old) and ends at new/new; its area is the mean of its
    # points; the headline "sigma area - FCT h random area" compares it with FastFill's sigma
    # curve.
    result, v = tiny["result"], tiny["test_split"]
    for partner, variant in (("h", "fastfill"), ("h no side-info", "fastfill no side-info")):
        curve = result["backfill_curves"][partner]["random"]
        start = brute_force_retrieval(v["new"], v["h"][partner][0], v["labels"])
        for m in ("top1", "mAP"):
            assert curve[m][0] == pytest.approx(start[m], abs=0.01)
            assert curve[m][-1] == pytest.approx(result["cases"]["new/new"][m])
            assert result["backfill_auc_fct_random"][partner][m] == pytest.approx(np.mean(curve[m]))
            delta = result["ci95"][f"{variant}: sigma area - FCT h random area, {m}"]
            sigma_area = np.mean(result["backfill_curves"][variant]["sigma"][m])
            assert delta["estimate"] == pytest.approx(sigma_area - np.mean(curve[m]), abs=1e-4)
        # The alternative order is tried where orders are chosen, on validation only.
        assert list(result["backfill_curves"][variant]) == ["random", "sigma", "true_error"]
        assert list(result["validation"]["backfill_curves"][variant]) == [
            "random",
            "sigma",
            "true_error",
            "ensemble",
        ]


def test_each_curves_largest_fall_is_from_its_running_maximum(tiny):
    result = tiny["result"]
    for variant, orders in result["backfill_largest_fall"].items():
        for order, falls in orders.items():
            for m in ("top1", "mAP"):
                pts = result["backfill_curves"][variant][order][m]
                by_hand = max(max(pts[: j + 1]) - pts[j] for j in range(len(pts)))
                assert falls[m] == pytest.approx(by_hand)


def test_sigma_diagnostics_recomputed_from_the_vectors(tiny):
    v, result = tiny["test_split"], tiny["result"]
    for variant, partner in (("fastfill", "h"), ("fastfill no side-info", "h no side-info")):
        gallery, sigma = v["h"][variant]
        error = ((gallery.astype(np.float64) - v["new"]) ** 2).sum(1)
        disagreement = ((gallery.astype(np.float64) - v["h"][partner][0]) ** 2).sum(1)
        d = result["sigma_diagnostics"][variant]
        assert d["error"]["mean"] == pytest.approx(error.mean(), rel=1e-4)
        assert d["error"]["std"] == pytest.approx(error.std(ddof=1), rel=1e-4)
        for name, score in (("sigma", sigma), ("ensemble", disagreement)):
            rho = np.corrcoef(_ranks(np.asarray(score, np.float64)), _ranks(error))[0, 1]
            assert d["spearman_with_error"][name] == pytest.approx(rho, abs=1e-3)


def test_negative_flips_against_old_over_old_by_hand(tiny):
    v, result = tiny["test_split"], tiny["result"]
    labels = v["labels"]
    old_right = _top1_right(v["old"], v["old"], labels)
    systems = result["flips"]["systems"]
    for name, gallery in (
        ("new/h(old) fastfill", v["h"]["fastfill"][0]),
        ("new/h(old) linear", v["h"]["linear"][0]),
        ("new/new", v["new"]),
    ):
        right = _top1_right(v["new"], gallery, labels)
        nfr = 100 * (old_right & ~right).mean()
        assert systems[name]["nfr"] == pytest.approx(nfr, abs=1e-4)
        assert result["ci95"][f"NFR, {name}"]["estimate"] == pytest.approx(nfr, abs=1e-4)
        err_old, err_new = 1 - old_right.mean(), 1 - right.mean()
        assert systems[name]["relative_nfr"] == pytest.approx(
            nfr / 100 / ((1 - err_old) * err_new), rel=1e-6
        )
    bct = _top1_right(_unit(v["bct (paper)"]), _unit(v["old"]), labels)
    old_cos = _top1_right(_unit(v["old"]), _unit(v["old"]), labels)
    assert systems["BCT (paper) bct/old (cosine)"]["nfr"] == pytest.approx(
        100 * (old_cos & ~bct).mean(), abs=1e-4
    )
    # Along a curve: at 0 % re-embedded the FastFill h's NFR, at 100 % new/new's.
    for order, nfr in result["flips"]["backfill"]["fastfill"].items():
        assert nfr[0] == pytest.approx(systems["new/h(old) fastfill"]["nfr"]), order
        assert nfr[-1] == pytest.approx(systems["new/new"]["nfr"]), order


def test_every_headline_number_has_an_interval_and_its_resamples(tiny):
    result = tiny["result"]
    for split in (result, result["validation"]):
        names = list(split["ci95"])
        assert names == list(split["bootstrap"]["values"])
        assert split["bootstrap"]["resamples"] == 1000 and split["bootstrap"]["seed"] == 0
        for name in names:
            assert len(split["bootstrap"]["values"][name]) == 1000, name
    g = result["gap_closed_variants"]
    assert result["gap_closed"] == g["h"]
    for variant in ("h", "fastfill", "linear", "procrustes no side-info"):
        for m in ("top1", "mAP"):
            assert result["ci95"][f"gap closed, {variant}, {m}"]["estimate"] == pytest.approx(
                g[variant][m], abs=1e-4
            )
    areas = result["backfill_auc"]
    assert result["ci95"]["fastfill: sigma area - random area, mAP"]["estimate"] == pytest.approx(
        areas["sigma"]["mAP"] - areas["random"]["mAP"], abs=1e-4
    )


def test_the_fct_hs_random_order_is_fastfills_permutation(tiny):
    # Given the FCT h's own gallery as FastFill's, the two random-order curves coincide point
    # by point: one permutation, so the paper's comparison differs only by h and order.
    v = tiny["test_split"]
    gallery = torch.from_numpy(v["h"]["h"][0])
    sigma = torch.from_numpy(v["h"]["fastfill"][1])
    transformed = {
        "fastfill": (gallery, sigma),
        "h": (gallery, None),
        "fastfill no side-info": (gallery, sigma),
        "h no side-info": (gallery, None),
    }
    out = backfill_measures(
        torch.from_numpy(v["new"]),
        torch.from_numpy(v["labels"]),
        transformed,
        preset("tiny"),
        backfill_seed=10,
    )["json"]
    assert out["backfill_curves"]["fastfill"]["random"] == out["backfill_curves"]["h"]["random"]
    # FastFill's three curves are fct_ml.backfill's own (backfill_summary, the same seed).
    theirs = backfill_summary(
        torch.from_numpy(v["new"]),
        torch.from_numpy(v["labels"]),
        gallery,
        sigma,
        preset("tiny").backfill_points,
        generator=torch.Generator().manual_seed(10),
    ).curves_as_dicts()
    ours = out["backfill_curves"]["fastfill"]
    assert {o: ours[o] for o in theirs} == theirs
    # ... and the ensemble order has nothing to tell apart: every disagreement is 0, so it
    # keeps the items' own order (a stable sort), not the random one.
    assert out["sigma_diagnostics"]["fastfill"]["error"]["mean"] > 0
