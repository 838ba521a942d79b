"""Asset checks that guard a version's publication: a pandera schema on its gallery table, a
great-expectations 1.x suite on its eval report, and the gates on its upgrade decision (NFR and
mAP of P(0) against what is served; fct_assets/upgrade/gates.py). All blocking: a failure stops
downstream assets in the run and keeps the version from being promoted. Failing cases go into
the check's metadata; a gate's verdict is its description, one line."""

import dataclasses
from typing import TYPE_CHECKING, Any

import dagster as dg

from fct_assets.lib.keys import EVAL_REPORT, MAP_GATE, NFR_GATE
from fct_assets.lib.partitions import model_version
from fct_assets.lib.records import BackfilledTable, EvalReport
from fct_assets.lib.resources import FctResource
from fct_assets.lib.table_checks import validate_table, vector_table_schema
from fct_assets.upgrade.assets import backfilled_gallery, eval_report
from fct_assets.upgrade.gates import MAP, NFR, gate_verdicts, nfr_threshold, worst_classes
from fct_ml.evaluation import Case, CaseMetrics

if TYPE_CHECKING:
    import pandas as pd


@dg.asset_check(
    asset=backfilled_gallery,
    blocking=True,
    partitions_def=model_version,
    description=(
        "pandera: ids unique, one row per stored item, dims, finite, the version's space_id only"
    ),
)
def backfilled_gallery_schema(
    fct: FctResource, backfilled_gallery: BackfilledTable
) -> dg.AssetCheckResult:
    table = backfilled_gallery
    schema = vector_table_schema(
        table.gallery_rows, {"embedding": table.dim}, {"space_id": table.space_id}
    )
    return validate_table(
        fct,
        table.table,
        table.version,
        schema,
        ["item_id", "label", "embedding", "space_id"],
    )


def report_frame(report: EvalReport) -> "pd.DataFrame":
    """One row per (case, metric) of the report, for the expectation suite."""
    import pandas as pd  # here, not at import: every step process loads this module (~0.2 s)

    rows = [
        {"case": c, "metric": m, "value": v}
        for c, ms in report.cases.items()
        for m, v in dataclasses.asdict(ms).items()  # every field, so an unknown one is caught
    ]
    return pd.DataFrame(rows)


# The metrics a case has: top1, top5, mAP.
METRICS = [f.name for f in dataclasses.fields(CaseMetrics)]
# The cases a report must hold.
REQUIRED_CASES = (Case.OLD_OLD, Case.NEW_NEW, Case.NEW_H_OLD)


def _map(cases: dict[str, CaseMetrics], case: str) -> float:
    """The case's mAP, NaN if the report lacks it."""
    found = cases.get(case)
    return float("nan") if found is None else float(found.mAP)


def run_report_suite(report: EvalReport) -> tuple[bool, list[dict[str, Any]]]:
    """great-expectations 1.x suite over the report; returns (success, failing expectations)."""
    import great_expectations as gx  # 2.8 s to import here: only when a check runs

    frame = report_frame(report)
    cases = report.cases
    # A derived column makes the cross-case rule an ordinary column expectation. The rule is on
    # mAP (the whole ranking); top-1 of a small gallery moves by several points between
    # equally good models, so it is reported, not gated.
    # A report without one of the two cases gets NaN here (ignored as null), and fails the
    # expectation that names the missing case rather than raising KeyError.
    frame["fct_minus_old_mAP"] = _map(cases, Case.NEW_H_OLD) - _map(cases, Case.OLD_OLD)
    # Deferred with great_expectations itself (above): only in the step that runs the suite.
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm bars in run logs
    batch = (
        context.data_sources.add_pandas("fct")
        .add_dataframe_asset(EVAL_REPORT)
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=EVAL_REPORT))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column="value"))
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(column="value", min_value=0, max_value=100)
    )
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeInSet(column="metric", value_set=METRICS)
    )
    for case in REQUIRED_CASES:
        suite.add_expectation(
            gx.expectations.ExpectColumnDistinctValuesToContainSet(
                column="case", value_set=[str(case)]
            )
        )
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(column="fct_minus_old_mAP", min_value=0)
    )
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=EVAL_REPORT, data=batch, suite=suite)
    )
    result = validation.run(batch_parameters={"dataframe": frame})
    failing = [
        {
            "expectation": r.expectation_config.type,
            "kwargs": {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
            "unexpected": (
                (r.result or {}).get(
                    "partial_unexpected_list", (r.result or {}).get("observed_value")
                )
            ),
        }
        for r in result.results
        if not r.success
    ]
    return bool(result.success), failing


@dg.asset_check(
    asset=eval_report,
    blocking=True,
    partitions_def=model_version,
    description=(
        "great-expectations: metrics in [0, 100], the paper's cases present, new/h(old) mAP not"
        " below old/old"
    ),
)
def eval_report_expectations(eval_report: EvalReport) -> dg.AssetCheckResult:
    passed, failing = run_report_suite(eval_report)
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "failing_expectations": dg.MetadataValue.json(failing),
            "num_failing": len(failing),
            # The table version the report evaluated: promotion records only a version whose
            # every check read it.
            "table_version": eval_report.table_version,
            f"{Case.NEW_H_OLD} mAP": _map(eval_report.cases, Case.NEW_H_OLD),
            f"{Case.OLD_OLD} mAP": _map(eval_report.cases, Case.OLD_OLD),
        },
    )


def gate_result(report: EvalReport, gate: str) -> dg.AssetCheckResult:
    """One gate's verdict on the report's decision, under the thresholds the report recorded
    (the launchpad's, eval_report's config): its one line as the description."""
    decision = report.decision
    if decision is None:
        return dg.AssetCheckResult(
            passed=False,
            description="the eval report holds no upgrade decision; re-materialise eval_report",
            metadata={"table_version": report.table_version},
        )
    verdict = next(v for v in gate_verdicts(decision, decision.gates) if v.gate == gate)
    a = decision.flips.all
    metadata: dict[str, Any] = {"table_version": report.table_version, "verdict": verdict.line}
    if gate == NFR:
        metadata |= {
            "NFR at f=0 (%)": round(a.nfr, 2),
            "threshold (%)": round(nfr_threshold(decision, decision.gates), 2),
            "relative NFR": None if a.relative_nfr is None else round(a.relative_nfr, 2),
            "worst classes": worst_classes(decision),
        }
    else:
        metadata |= {
            "mAP of P(0)": round(decision.proposed_metrics.mAP, 2),
            "mAP of S": round(decision.served_metrics.mAP, 2),
            "tolerance (points)": decision.gates.map_tolerance,
        }
    return dg.AssetCheckResult(
        passed=verdict.passed,
        description=verdict.line,
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


@dg.asset_check(
    asset=eval_report,
    name=NFR_GATE,
    blocking=True,
    partitions_def=model_version,
    description=(
        "Gate: NFR of P(0) (queries right under what is served, wrong under this version) at most"
        " eval_report's max_nfr (default: the chance level, relative NFR 1)"
    ),
)
def negative_flip_gate(eval_report: EvalReport) -> dg.AssetCheckResult:
    return gate_result(eval_report, NFR)


@dg.asset_check(
    asset=eval_report,
    name=MAP_GATE,
    blocking=True,
    partitions_def=model_version,
    description=(
        "Gate: mAP of P(0) not below what is served by more than eval_report's map_tolerance"
        " (default 1 point)"
    ),
)
def served_map_gate(eval_report: EvalReport) -> dg.AssetCheckResult:
    return gate_result(eval_report, MAP)


CHECKS = [backfilled_gallery_schema, eval_report_expectations, negative_flip_gate, served_map_gate]
