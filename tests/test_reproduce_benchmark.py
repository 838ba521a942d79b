"""benchmarks/studies/reproduce.py's wall-time bookkeeping on hand-made runs: a stage read from the
stage cache is charged the training time it took where it was trained."""

from __future__ import annotations

import pytest

from benchmarks.studies.reproduce import cached_stages, charge_cached_stages


def _run(setting, seed, timings, digests, wall):
    return {
        "setting": setting,
        "seed": seed,
        "timings_s": dict(timings),
        "model_digests": dict(digests),
        "wall_s": wall,
    }


DIGESTS = {"old_model": "o1", "side_info_model": "s1", "new_model": "n1", "bct_model": "b1"}


def test_a_cached_stage_is_charged_where_its_digest_was_trained():
    earlier = [
        _run(
            "cpu",
            0,
            {"old_model": 100.0, "side_info_model": 200.0, "new_model": 140.0, "bct_model": 180.0},
            DIGESTS,
            900.0,
        ),
        # cpu-hard reused side-info and new models: not a source for them
        _run(
            "cpu-hard",
            0,
            {"old_model": 370.0, "side_info_model": 0.03, "new_model": 0.02, "bct_model": 800.0},
            {**DIGESTS, "old_model": "o2", "bct_model": "b2"},
            1500.0,
        ),
    ]
    cached = {
        "old_model": 0.01,
        "side_info_model": 0.02,
        "new_model": 0.02,
        "bct_model": 0.01,
        "features": 60.0,
        "transformation (h)": 25.0,
    }
    hard = _run("cpu-hard", 0, cached, {**DIGESTS, "old_model": "o2", "bct_model": "b2"}, 100.0)
    assert cached_stages(hard) == ["old_model", "side_info_model", "new_model", "bct_model"]
    charge_cached_stages(hard, earlier)
    # By hand: 100 - (0.01 + 0.02 + 0.02 + 0.01) + 370 + 200 + 140 + 800 = 1609.94 -> 1609.9.
    assert hard["wall_s"] == pytest.approx(1609.9, abs=0.11)
    assert hard["timings_s"]["side_info_model"] == 200.0  # from cpu's run, same digest
    assert hard["charged_from"]["old_model"] == "cpu-hard_seed0: 370.0 s"
    assert cached_stages(hard) == []


def test_a_cached_stage_no_run_trained_is_refused_by_name():
    run = _run("cpu", 1, {"old_model": 0.01}, {"old_model": "zz"}, 10.0)
    with pytest.raises(SystemExit, match=r"no run trained old_model of cpu seed 1"):
        charge_cached_stages(run, [])
