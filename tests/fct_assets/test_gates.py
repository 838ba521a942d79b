"""The gates on an upgrade decision, fast: verdicts and their one line on a hand-made decision
(the six queries of tests/fct_ml/test_flips.py), the check results, the override, rounding."""

import dagster as dg
import pytest

from fct_assets.lib.config import EvalReportConfig
from fct_assets.lib.records import (
    CheckResult,
    EvalReport,
    Gates,
    OrderGain,
    UpgradeDecision,
    dumps,
    loads,
)
from fct_assets.upgrade.checks import gate_result
from fct_assets.upgrade.gates import (
    DEFAULT_MAP_TOLERANCE,
    DEFAULT_MAX_NFR,
    accept_regressions,
    decision_line,
    gate_verdicts,
    launch_gates,
    worst_classes,
)
from fct_assets.upgrade.report import decision_markdown, rounded
from fct_ml.evaluation import CaseMetrics
from fct_ml.flips import flips
from tests.fct_ml.test_flips import six

DEFAULTS = Gates(max_nfr=DEFAULT_MAX_NFR, map_tolerance=DEFAULT_MAP_TOLERANCE)


def decision(gates: Gates = DEFAULTS) -> UpgradeDecision:
    """Six queries: S top-1 4/6, mAP 75.83; P(0) top-1 2/6, mAP 70.0; NFR 50 % (class 1
    66.7 %, class 0 33.3 %)."""
    f = flips(six(), resamples=0)
    made = UpgradeDecision(
        served="the old model",
        served_version=None,
        proposed="v9's new model",
        served_metrics=CaseMetrics(top1=f.all.top1_served, top5=100.0, mAP=f.all.map_served),
        proposed_metrics=CaseMetrics(top1=f.all.top1_proposed, top5=100.0, mAP=f.all.map_proposed),
        new_metrics=CaseMetrics(top1=90.0, top5=100.0, mAP=80.0),
        flips=f,
        nfr_curves={"sigma": (50.0, 0.0), "random": (50.0, 0.0)},
        order_gain=OrderGain(
            fraction=0.25, planned=False, top1=0, mAP=0, nfr=0, area_top1=0, area_mAP=0
        ),
        maps=(),
        class_names=("shirt", "coat"),
        gates=gates,
        verdicts=(),
        worst_flips=(),
    )
    return made.model_copy(update={"verdicts": gate_verdicts(made, gates)})


def test_the_launchpad_leaves_the_gates_to_the_defaults_and_the_preset():
    config = EvalReportConfig()
    assert (config.max_nfr, config.map_tolerance) == (None, None)
    # Unset: the chance level and 1 point; tiny (the test preset, models trained for seconds):
    # off; a value given wins over both.
    assert launch_gates(None, None, "demo") == Gates(max_nfr=None, map_tolerance=1.0)
    assert DEFAULT_MAX_NFR is None and DEFAULT_MAP_TOLERANCE == 1.0
    assert launch_gates(None, None, "tiny") == Gates(max_nfr=100.0, map_tolerance=100.0)
    assert launch_gates(5.0, 0.5, "tiny") == Gates(max_nfr=5.0, map_tolerance=0.5)
    assert launch_gates(5.0, None, "cpu") == Gates(max_nfr=5.0, map_tolerance=1.0)


def test_an_nfr_above_the_chance_level_is_refused_in_one_line_naming_it():
    # Unset, the threshold is the chance level: S right on 4/6, P wrong on 4/6, so independent
    # errors would flip (4/6)(4/6) = 44.44 % of the queries; P flips 50 % (relative NFR 9/8).
    d = decision()
    nfr, mAP = d.verdicts
    assert not nfr.passed
    assert nfr.line == (
        "NFR 50.00 % at f = 0 above the threshold 44.44 % (chance level: independent errors);"
        " worst classes: coat 66.7 %, shirt 33.3 %"
    )
    # mAP 70.00 against 75.83: -5.83 points, beyond the tolerance of 1.
    assert not mAP.passed
    assert mAP.line == "mAP of P(0) 70.00 against S's 75.83 (-5.83 points, tolerance 1.00)"
    assert decision_line(d) == f"Promotion is refused: {nfr.line}; {mAP.line}."
    assert not d.passed


def test_a_fixed_threshold_is_the_number_given():
    d = decision(Gates(max_nfr=10.0, map_tolerance=1.0))
    assert d.verdicts[0].line.startswith("NFR 50.00 % at f = 0 above the threshold 10.00 %;")


def test_thresholds_that_allow_it_pass_and_say_so():
    d = decision(Gates(max_nfr=50.0, map_tolerance=6.0))
    assert [v.passed for v in d.verdicts] == [True, True]
    assert d.verdicts[0].line.startswith("NFR 50.00 % at f = 0 within the threshold 50.00 %")
    assert decision_line(d).startswith("Promotion passes the gates: NFR 50.00 %")


def test_worst_classes_leave_out_classes_without_a_flip():
    assert worst_classes(decision(), k=1) == "coat 66.7 %"


def report_with(d: UpgradeDecision | None) -> EvalReport:
    metrics = {"top1": 50.0, "top5": 60.0, "mAP": 40.0}
    return EvalReport(
        version="v9",
        items=6,
        cases={"old/old": metrics, "new/new": metrics, "new/h(old)": metrics},
        cases_unseen_classes={},
        cases_seen_classes={},
        gap_closed={"top1": 0.0, "mAP": 0.0},
        backfill_curves={},
        backfill_auc={},
        reembedded=0,
        table="gallery_v9",
        table_version=4,
        reembed_seconds=1.0,
        reembed_items_per_s=6.0,
        backfill_items_per_s=None,
        space_id="new_model:v9@1",
        decision=d,
    )


def test_the_gate_checks_state_the_verdict_and_the_table_version():
    result = gate_result(report_with(decision()), "nfr")
    assert not result.passed
    assert result.description == decision().verdicts[0].line
    assert result.metadata["table_version"] == dg.IntMetadataValue(4)
    assert result.metadata["NFR at f=0 (%)"] == dg.FloatMetadataValue(50.0)
    assert result.metadata["worst classes"] == dg.TextMetadataValue("coat 66.7 %, shirt 33.3 %")
    assert not gate_result(report_with(decision()), "map").passed
    # A report without a decision cannot pass a gate.
    missing = gate_result(report_with(None), "nfr")
    assert not missing.passed and "holds no upgrade decision" in missing.description


def test_the_report_with_its_decision_round_trips_as_a_record():
    report = report_with(decision())
    again = loads(dumps(report), "x.json", EvalReport)
    assert again.decision.flips.by_class[1].negative_flips == 2
    assert again.decision == report.decision
    markdown = decision_markdown(again)
    assert (
        markdown.splitlines()[0] == "### Upgrade decision for v9: promotion is refused by the gates"
    )
    assert "| coat | 3 | 66.7 | 1.00 | 66.7 → 0.0 | 68.3 → 56.7 |" in markdown


def failed_gate_results() -> dict[str, CheckResult]:
    ok = CheckResult(passed=True, why="passed", table_version=4)
    bad = CheckResult(passed=False, why="failed: NFR 50.00 % ...", table_version=4)
    return {
        "backfilled_gallery:backfilled_gallery_schema": ok,
        "eval_report:eval_report_expectations": ok,
        "eval_report:negative_flip_gate": bad,
        "eval_report:served_map_gate": ok,
    }


def test_accepting_regressions_passes_failed_gates_only_naming_the_reason():
    got = accept_regressions(failed_gate_results(), "shirts regress, agreed with search team")
    gate = got["eval_report:negative_flip_gate"]
    assert (
        gate.passed and gate.why == "accepted regressions: shirts regress, agreed with search team"
    )
    assert got["eval_report:served_map_gate"].why == "passed"
    broken = failed_gate_results() | {
        "eval_report:eval_report_expectations": CheckResult(passed=False, why="failed")
    }
    with pytest.raises(ValueError, match="accepts failed gates only"):
        accept_regressions(broken, "why not")
    with pytest.raises(ValueError, match="give the reason"):
        accept_regressions(failed_gate_results(), "  ")


def test_metadata_is_rounded_to_what_it_means():
    assert rounded({"a": 77.21345, "b": [0.0476190476, 1.12999], "c": 3, "d": None}) == {
        "a": 77.21,
        "b": [0.0476, 1.13],
        "c": 3,
        "d": None,
    }
    assert rounded(0.0) == 0.0 and rounded(-0.123456) == -0.123
