"""benchmarks/studies/h_frontier.py's bookkeeping on hand-made numbers: the variants it sweeps, the
mean and std over seeds, and the knee it marks as the default. No model is trained."""

from __future__ import annotations

import math

import pytest

from benchmarks.studies.h_frontier import (
    Variant,
    aggregate,
    baseline_h,
    choose_default,
    select,
    variants_for,
)
from fct_ml.presets import preset


def test_the_cpu_presets_frontier_is_the_issues_list():
    variants = variants_for(baseline_h("cpu"))
    assert [v.name for v in variants] == [
        "w1024-d2",  # today's h
        "w512-d2",
        "w256-d2",
        "w128-d2",
        "w1024-d1",
        "w256-d1",
        "w1024-d2-r64",
        "w1024-d2-bf16",
        "w1024-d2-int8",
    ]
    assert variants[6] == Variant(1024, inner_depth=2, inner_rank=64)
    # The precisions run today's trained h.
    assert variants[7].trained == variants[8].trained == variants[0]
    # The tiny preset's (inner 64) is the same sweep at its own width.
    tiny = [v.name for v in variants_for(baseline_h("tiny"))]
    assert tiny[:7] == ["w64-d2", "w32-d2", "w16-d2", "w8-d2", "w64-d1", "w16-d1", "w64-d2-r4"]


def test_a_subset_keeps_the_baseline_and_the_h_a_precision_runs():
    variants = variants_for(baseline_h("cpu"))
    chosen = select(variants, ["w256-d1", "w1024-d2-int8"])
    assert [v.name for v in chosen] == ["w1024-d2", "w256-d1", "w1024-d2-int8"]
    with pytest.raises(ValueError, match=r"^--variants: unknown 'w999-d2' \(known: w1024-d2, "):
        select(variants, ["w999-d2"])


def _entry(macs: int, mAP: float, area: float, precision: str = "fp32", **extra) -> dict:
    return {
        "inner_width": 8,
        "inner_depth": 2,
        "inner_rank": 0,
        "precision": precision,
        "macs": macs,
        "params": 1,
        "mAP": mAP,
        "top1": mAP,
        "mAP_unseen_classes": None,
        "backfill_area_mAP": area,
        "backfill_area_top1": area,
        "backfill_area_random_mAP": area - 0.5,
        "train_s": 10.0,
        **extra,
    }


def test_aggregate_is_the_mean_and_sample_std_over_seeds():
    records = [
        {"seed": 0, "variants": {"a": _entry(100, 82.0, 80.0), "b": _entry(50, 70.0, 60.0)}},
        {"seed": 1, "variants": {"a": _entry(100, 84.0, 81.0), "b": _entry(50, 70.0, 61.0)}},
    ]
    a, b = aggregate(records, ["a", "b"])
    # mean(82, 84) = 83; sample std = sqrt(((82-83)^2 + (84-83)^2) / (2-1)) = sqrt(2).
    assert a["name"] == "a" and a["mAP"] == 83.0 and a["mAP_std"] == pytest.approx(math.sqrt(2))
    # mean(80, 81) = 80.5; std sqrt((0.25 + 0.25) / 1) = sqrt(0.5).
    assert a["backfill_area_mAP"] == 80.5
    assert a["backfill_area_mAP_std"] == pytest.approx(math.sqrt(0.5))
    assert b["mAP"] == 70.0 and b["mAP_std"] == 0.0 and b["macs"] == 50
    # A metric one seed lacks (no unseen classes) stays None rather than a mean of part.
    assert a["mAP_unseen_classes"] is None and a["mAP_unseen_classes_std"] is None
    # One seed: std 0. A variant a seed lacks is refused, naming the variant and the seed.
    assert aggregate(records[:1], ["a"])[0]["mAP_std"] == 0.0
    del records[1]["variants"]["b"]
    with pytest.raises(ValueError, match=r"^b: no result for seed\(s\) \[1\]; run them first$"):
        aggregate(records, ["a", "b"])


def _rows(entries: dict[str, dict]) -> list[dict]:
    return aggregate([{"seed": 0, "variants": entries}], list(entries))


def test_the_default_is_the_cheapest_variant_within_a_point_on_both_metrics():
    # Baseline mAP 83.5, area 84.5: a row qualifies with mAP >= 82.5 and area >= 83.5.
    rows = _rows(
        {
            "base": _entry(1_900_000, 83.5, 84.5),
            "half": _entry(1_000_000, 83.0, 84.0),  # qualifies
            "quarter": _entry(600_000, 82.4, 84.4),  # mAP 1.1 below: out
            "eighth": _entry(400_000, 82.9, 83.4),  # area 1.1 below: out
            "shallow": _entry(700_000, 82.5, 83.5),  # exactly 1.0 below on both: in
            "int8": _entry(1_900_000, 83.4, 84.4, precision="int8"),
        }
    )
    summary = choose_default(rows, "base", 1.0)
    assert summary == {
        "baseline": "base",
        "baseline_mAP": 83.5,
        "baseline_backfill_area_mAP": 84.5,
        "tolerance_points": 1.0,
        "default": "shallow",  # 700k MACs: the fewest among base, half, shallow, int8
    }
    by = {r["name"]: r for r in rows}
    assert [n for n, r in by.items() if r["within_tolerance"]] == [
        "base",
        "half",
        "shallow",
        "int8",
    ]
    assert [n for n, r in by.items() if r["default"]] == ["shallow"]
    assert by["quarter"]["delta_mAP"] == pytest.approx(-1.1)
    assert by["eighth"]["delta_backfill_area_mAP"] == pytest.approx(-1.1)
    # A tighter tolerance leaves only what matches today's h within 0.2: base and int8, at the
    # same MACs; fp32 ranks first (a precision is an inference option of the same h).
    assert choose_default(rows, "base", 0.2)["default"] == "base"
    assert [r["name"] for r in rows if r["default"]] == ["base"]
    # An unknown baseline is refused in one line.
    with pytest.raises(ValueError, match=r"^baseline: no row named 'nope'$"):
        choose_default(rows, "nope")


def test_a_variant_better_than_the_baseline_by_more_than_a_point_still_qualifies():
    rows = _rows({"base": _entry(100, 80.0, 80.0), "small": _entry(10, 85.0, 82.0)})
    assert choose_default(rows, "base")["default"] == "small"


def test_the_cpu_presets_h_is_the_knee_of_the_committed_frontier():
    # The preset's h is the one the study chose on validation, not a width typed by hand; the
    # frontier stays built around the h it was chosen against (width 1024).
    import json
    from pathlib import Path

    study = json.loads(
        (Path(__file__).parent.parent / "benchmarks/results/h_frontier.json").read_text()
    )
    (knee,) = [v for v in study["variants"] if v["default"]]
    h = preset("cpu").transformation
    assert (h.inner_width, h.inner_depth, h.inner_rank) == (
        knee["inner_width"],
        knee["inner_depth"],
        knee["inner_rank"],
    )
    assert knee["precision"] == "fp32"
    assert study["baseline"] == "w1024-d2" and baseline_h("cpu").inner_width == 1024
