"""benchmarks/studies/h_select.py: the validation-only choice of the deployed h, its rule on
hand-made rows, and one smoke run at tiny size."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks.studies.h_select import (
    Candidate,
    candidates,
    choose,
    main,
    worst_margin,
)


def _row(name: str, macs: int, top1_low: float, map_low: float) -> dict:
    return {
        "name": name,
        "macs": macs,
        "top1_ci95": [top1_low, top1_low + 2],
        "mAP_ci95": [map_low, map_low + 2],
    }


def test_the_worst_margin_is_the_lower_of_the_two_intervals_clearance():
    # top-1 low 86 clears 85 by 1; mAP low 89.5 misses 90 by 0.5: worst -0.5.
    assert worst_margin(_row("a", 1, 86.0, 89.5)) == pytest.approx(-0.5)
    assert worst_margin({"name": "x", "top1_ci95": [None, None]}) == -math.inf


def test_the_cheapest_candidate_that_clears_both_targets_is_chosen():
    rows = [
        _row("wide", 1000, 88.0, 93.0),  # clears both by 3
        _row("narrow", 100, 85.5, 90.2),  # clears both, cheaper
        _row("cheapest", 10, 84.0, 95.0),  # misses top-1: a single metric is not enough
    ]
    chosen, qualifies = choose(rows)
    assert (chosen["name"], qualifies) == ("narrow", True)
    # A margin of 1 point: only "wide" clears both by that much.
    assert choose(rows, margin=1.0)[0]["name"] == "wide"


def test_with_none_qualifying_the_largest_worst_margin_is_chosen_and_flagged():
    rows = [_row("a", 10, 80.0, 95.0), _row("b", 20, 84.0, 89.0)]  # worst -5 and -1
    chosen, qualifies = choose(rows)
    assert (chosen["name"], qualifies) == ("b", False)
    with pytest.raises(ValueError, match=r"^choose: no candidate$"):
        choose([])


def test_the_grid_is_every_pair_and_bad_values_are_named():
    assert candidates([128, 256], [0.0, 1.0]) == [
        Candidate(128, 0.0),
        Candidate(128, 1.0),
        Candidate(256, 0.0),
        Candidate(256, 1.0),
    ]
    assert Candidate(128, 0.5).name == "w128-ce0.5"
    with pytest.raises(ValueError, match=r"^--widths: expected integers >= 1, got 0$"):
        candidates([0], [1.0])
    with pytest.raises(ValueError, match=r"^--ce-weights: expected numbers >= 0, got -1.0$"):
        candidates([8], [-1.0])


@pytest.mark.slow
def test_a_smoke_run_at_tiny_size_writes_its_choice(tmp_path):
    # Tiny preset on digits, seed 0, two candidates: trains the old, side-info and new models,
    # two FastFill h's, and measures them on the validation split only.
    out = tmp_path / "out"
    argv = ["--smoke", "--widths", "16", "--ce-weights", "0", "1"]
    assert main([*argv, "--runs-dir", str(tmp_path / "runs"), "--out-dir", str(out)]) == 0
    result = json.loads((out / "h_select.json").read_text())
    assert [r["name"] for r in result["rows"]] == ["w16-ce0", "w16-ce1"]
    for row in result["rows"]:
        for m in ("top1", "mAP"):
            low, high = row[f"{m}_ci95"]
            assert math.isfinite(row[m]) and low < high  # resampled queries: a real spread
    assert result["chosen"]["name"] in {"w16-ce0", "w16-ce1"}
    # The record holds validation measures only, and a resumed run reads it back.
    record = json.loads((tmp_path / "runs" / "seed0.json").read_text())
    assert set(record["candidates"]) == {"w16-ce0", "w16-ce1"}
    assert "Chosen: **" in (out / "h_select.md").read_text()
