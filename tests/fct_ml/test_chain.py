"""The chain experiment end to end on the tiny preset (digits): every case is measured, and the
gap closed is computed from the cases as gap_closed says."""

import pytest

from fct_ml.chain import run_chain
from fct_ml.datasets import load_dataset
from fct_ml.evaluation import gap_closed
from fct_ml.presets import preset


@pytest.mark.slow
def test_the_chain_measures_every_case_on_validation_and_test():
    data = load_dataset("digits")
    result = run_chain(data, (0, 1, 2, 3, 4), (5, 6), preset("tiny"), 0, log=lambda m: None)
    assert result.v2_classes == (0, 1, 2, 3, 4, 5, 6)
    for cases, gaps in (
        (result.validation, result.gap_closed_validation),
        (result.test, result.gap_closed_test),
    ):
        assert set(cases) == {"old/old", "new/new", "chained", "chained_no_side_info", "direct"}
        assert all(0 <= v <= 100 for m in cases.values() for v in m.as_dict().values())
        assert gaps["gap_closed_chained"] == gap_closed(cases, "chained")
        assert gaps["gap_closed_direct"] == gap_closed(cases, "direct")
    assert set(result.timings_s) >= {"old model", "v2 model", "v3 model", "h3 v2->v3"}
