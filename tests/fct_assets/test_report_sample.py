"""evaluate_version with a query sample: the twelve-item gallery of test_report_fast, five
sampled items querying all twelve (each query's own item left out), every number checked by
brute force; what needs every item re-embedded on the sub-gallery of the five."""

from __future__ import annotations

import numpy as np
import pytest

from fct_assets.lib import records
from fct_assets.lib.config import EvalReportConfig
from fct_assets.lib.records import EvalReport
from fct_assets.upgrade.report import (
    QUERY_SAMPLE,
    QUERY_SEED,
    decision_summary,
    markdown_table,
    query_rows,
)
from tests.fct_assets.test_report_fast import N, _evaluate, gallery  # noqa: F401 (the fixture)
from tests.reference import brute_force_retrieval

SAMPLE = 5


def _sampled(query, gallery_vectors, labels, rows):
    """Queries query[j] (the item at gallery row rows[j]) against every gallery row but its own,
    squared L2 in float64, ties ranking a non-match first: (top-1, top-5, mAP in percent; top-1
    right (Q,), AP (Q,))."""
    query, gallery_vectors = np.asarray(query, np.float64), np.asarray(gallery_vectors, np.float64)
    right, top5, ap = [], [], []
    for j, own in enumerate(rows):
        keep = np.arange(len(labels)) != own
        distance = ((gallery_vectors[keep] - query[j]) ** 2).sum(1)
        match = labels[keep] == labels[own]
        ranked = match[np.lexsort((match, distance))]
        ranks = np.flatnonzero(ranked) + 1
        right.append(bool(ranked[0]))
        top5.append(bool(ranked[:5].any()))
        ap.append((np.arange(1, len(ranks) + 1) / ranks).mean())
    right, ap = np.array(right), np.array(ap)
    metrics = {"top1": 100 * right.mean(), "top5": 100 * np.mean(top5), "mAP": 100 * ap.mean()}
    return metrics, right, ap


def test_query_rows_all_up_to_the_sample_then_a_seeded_sample():
    assert query_rows(12, 12).tolist() == list(range(12))
    assert query_rows(12, None).tolist() == list(range(12))
    rows = query_rows(12, SAMPLE)
    assert len(rows) == len(set(rows.tolist())) == SAMPLE
    assert rows.tolist() == sorted(rows.tolist()) and 0 <= rows.min() and rows.max() < 12
    expected = np.sort(np.random.default_rng(QUERY_SEED).choice(12, size=SAMPLE, replace=False))
    assert rows.tolist() == expected.tolist()
    assert query_rows(12, SAMPLE).tolist() == rows.tolist()  # fixed: the same every time
    # The launchpad's default is the report's.
    assert EvalReportConfig().query_sample == QUERY_SAMPLE == 10_000


def test_sampled_queries_against_the_whole_gallery_by_brute_force(gallery):  # noqa: F811
    g = gallery
    report = _evaluate(g, query_sample=SAMPLE)
    labels, old, new, h = g["labels"], g["old"], g["new"], g["transformed"]
    rows = query_rows(N, SAMPLE)
    assert (report["items"], report["queries"], report["sub_gallery"]) == (N, SAMPLE, SAMPLE)
    assert report["query_seed"] == QUERY_SEED
    # S, P(0) and the table against all twelve items, the five sampled ones querying.
    whole = {
        "old/old": _sampled(old[rows], old, labels, rows),
        "new/h(old)": _sampled(new[rows], h, labels, rows),
        "new/gallery_vt": _sampled(new[rows], h, labels, rows),
    }
    for case, (metrics, _, _) in whole.items():
        for metric, value in metrics.items():
            assert report["cases"][case][metric] == pytest.approx(value, abs=1e-3), (case, metric)
        ci = report["cases_ci95"][case]
        assert ci["mAP"]["estimate"] == pytest.approx(metrics["mAP"], abs=1e-3)
        assert ci["mAP"]["low"] <= ci["mAP"]["estimate"] <= ci["mAP"]["high"]
        assert ci["top1"]["estimate"] == pytest.approx(metrics["top1"], abs=1e-3)
    assert set(report["cases_ci95"]) == set(whole)
    # What needs every item re-embedded: leave-one-out among the five sampled items.
    sub = labels[rows]
    sub_cases = {
        "old/old": brute_force_retrieval(old[rows], old[rows], sub),
        "new/new": brute_force_retrieval(new[rows], new[rows], sub),
        "new/h(old)": brute_force_retrieval(new[rows], h[rows], sub),
        "new/old": brute_force_retrieval(new[rows], old[rows], sub),
    }
    for case in ("new/new", "new/old"):
        for metric, value in sub_cases[case].items():
            assert report["cases"][case][metric] == pytest.approx(value, abs=1e-3), (case, metric)
    for case, metrics in sub_cases.items():
        assert report["sub_gallery_cases"][case]["mAP"] == pytest.approx(metrics["mAP"], abs=1e-3)
    assert report["sub_gallery_cases"]["S"]["mAP"] == pytest.approx(
        sub_cases["old/old"]["mAP"], abs=1e-3
    )
    lo, hi, got = (sub_cases[c]["mAP"] for c in ("old/old", "new/new", "new/h(old)"))
    assert report["gap_closed"]["mAP"] == pytest.approx(100 * (got - lo) / (hi - lo), abs=1e-2)
    # The backfilling curve runs on the sub-gallery: its last point is the sub-gallery's new/new.
    assert report["backfill_curves"]["sigma"]["mAP"][-1] == pytest.approx(
        sub_cases["new/new"]["mAP"], abs=1e-3
    )

    # The decision: S (the old model) against P(0) per sampled query, over the whole gallery.
    decision = report["decision"]
    (s_metrics, s_right, s_ap), (p_metrics, p_right, p_ap) = whole["old/old"], whole["new/h(old)"]
    assert decision["served_metrics"]["mAP"] == pytest.approx(s_metrics["mAP"], abs=1e-3)
    assert decision["proposed_metrics"]["top1"] == pytest.approx(p_metrics["top1"], abs=1e-3)
    assert decision["new_metrics"]["mAP"] == pytest.approx(sub_cases["new/new"]["mAP"], abs=1e-3)
    counts = decision["flips"]["all"]
    assert counts["queries"] == SAMPLE
    assert counts["negative_flips"] == int((s_right & ~p_right).sum())
    assert counts["ap_drops"] == int((p_ap - s_ap < -0.1).sum())
    ids = set(range(N))
    for w in decision["worst_flips"]:
        assert w["item_id"] in set(rows.tolist())  # a sampled query
        assert {w["served_item_id"], w["proposed_item_id"]} <= ids - {w["item_id"]}
        assert w["served_label"] == w["label"] != w["proposed_label"]

    loaded = records.loads(records.dumps(EvalReport.model_validate(report)), "r.json", EvalReport)
    assert loaded.cases_ci95["old/old"]["mAP"].low == report["cases_ci95"]["old/old"]["mAP"]["low"]
    text = markdown_table(loaded, include_plot=False)
    assert f"| {SAMPLE} sampled queries against all {N} items |" in text
    assert f"sub-gallery of the {SAMPLE} sampled items (seed {QUERY_SEED})" in text
    assert f"({N} gallery items; {SAMPLE} sampled queries (seed {QUERY_SEED})" in text
    assert "| new/new † |" in text and "| old/old |" in text
    assert f"Gap closed by new/h(old) (on the sub-gallery of {SAMPLE} items)" in text
    assert f"({SAMPLE} sampled queries, {N} items)" in decision_summary(loaded)[0]


def test_a_gallery_no_larger_than_the_sample_is_evaluated_whole(gallery):  # noqa: F811
    g = gallery
    whole = _evaluate(g, query_sample=N)
    default = _evaluate(g)
    for report in (whole, default):
        assert (report["queries"], report["sub_gallery"], report["query_seed"]) == (N, None, None)
        assert report["cases_ci95"] == {} and report["sub_gallery_cases"] == {}
    assert whole["cases"] == default["cases"]
    expected = brute_force_retrieval(g["old"], g["old"], g["labels"])
    assert whole["cases"]["old/old"]["mAP"] == pytest.approx(expected["mAP"], abs=1e-3)


def test_re_embedded_rows_are_mapped_by_h_for_p0_and_read_as_published_for_the_table(
    gallery,  # noqa: F811
):
    g = gallery
    # Every row of the table re-embedded: P(0) (new/h(old)) must still be h of the stored
    # vectors, and new/<table> the table as published (the new model's vectors).
    latest = g["republish"](g["new"], "re-embedded")["version"]
    report = _evaluate(g, version=latest, query_sample=SAMPLE)
    labels, new, h = g["labels"], g["new"], g["transformed"]
    rows = query_rows(N, SAMPLE)
    p0, _, _ = _sampled(new[rows], h, labels, rows)
    table, _, _ = _sampled(new[rows], new, labels, rows)
    assert report["cases"]["new/h(old)"]["mAP"] == pytest.approx(p0["mAP"], abs=1e-3)
    assert report["cases"]["new/gallery_vt"]["mAP"] == pytest.approx(table["mAP"], abs=1e-3)
    assert report["reembedded"] == N
