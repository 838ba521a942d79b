"""`fct reproduce` progress: stage lines with the run's position and an overall ETA."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest

from fct_ml.cli import main
from fct_ml.presets import preset
from fct_ml.progress import StageProgress, format_seconds, reproduce_stages


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_stage_list_and_measured_units():
    clock, lines = Clock(), []
    progress = StageProgress(
        [("a", 2), ("b", 0), ("c (x)", 2), ("c (y)", 2)], write=lines.append, clock=clock
    )

    def at(t: float, message: str) -> str:
        clock.now = t
        progress(message)
        return lines[-1]

    assert at(0, "[a] ...") == "[a] ...  (stage 1/4, 0% done, ETA ?)"
    # 1 of 7 units in 10 s: a's second epoch at a's rate, b and the four c units at 10 s each.
    assert at(10, "[a] epoch 1/2 loss 0.5 (10.0 s)").endswith(
        "(stage 1/4, 14% done, ETA 1 min 00 s)"
    )
    at(20, "[a] epoch 2/2 loss 0.4 (10.0 s)")
    at(20, "[a] done in 20.0 s")
    at(20, "[b] ...")
    # 3 units in 21 s: the four c units at 7 s each, c's kind not measured yet.
    assert at(21, "[b] done in 1.0 s").endswith("(stage 2/4, 43% done, ETA 28 s)")
    at(21, "[c (x)] ...")
    # c (x) took 4 s for 2 units: c (y), the same kind, is expected to take 4 s too.
    assert at(25, "[c (x)] done in 4.0 s").endswith("(stage 3/4, 71% done, ETA 4 s)")
    at(25, "[c (y)] ...")
    assert at(29, "[c (y)] done in 4.0 s").endswith("(stage 4/4, 100% done, ETA 0 s)")
    # Other lines pass through; a stage the list does not know is counted, not fatal.
    assert at(29, "note: something") == "note: something"
    assert "stage 5/5" in at(30, "[extra] ...")


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 61, 3599, 3660)] == [
        "0 s",
        "59 s",
        "1 min 01 s",
        "59 min 59 s",
        "1 h 01 min",
    ]


@pytest.mark.slow
def test_reproduce_logs_the_listed_stages_with_an_eta_and_prints_json():
    out, err = io.StringIO(), io.StringIO()
    argv = ["reproduce", "--dataset", "digits", "--preset", "tiny", "--seed", "0", "--json"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    result = json.loads(out.getvalue())  # stdout is the result JSON alone
    assert result["preset"] == "tiny" and "new/h(old)" in result["cases"]
    started = re.findall(r"^\[([^\]]+)\] \.\.\.  \(stage", err.getvalue(), flags=re.M)
    # If run_experiment's stages change, fct_ml.progress.reproduce_stages must follow.
    assert started == [stage for stage, _ in reproduce_stages(preset("tiny"))]
    done = [line for line in err.getvalue().splitlines() if " done in " in line]
    assert all(re.search(r"% done, ETA \d", line) for line in done), done
    assert done[-1].endswith("100% done, ETA 0 s)")
