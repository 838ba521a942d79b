"""The gates promotion passes: what a version's upgrade decision must show to be served, each
verdict in one line, and re-stating the verdicts in a run that has nothing to do.

    nfr   NFR of P(0) against S at most `Gates.max_nfr` (% of queries)
    map   mAP of P(0) at least S's minus `Gates.map_tolerance` (points)

The eval report computes the verdicts (its headline says them); the blocking checks
(fct_assets/upgrade/checks.py) state them again from the report, and promotion reads the checks.
A no-op run of a current version materialises nothing, so its checks would be skipped and the
UI would show a failed gate as "Skipped": `restate_verdicts` logs the latest verdict of every
blocking check again in that run, so a failed gate stays failed until a run passes it.
"""

from __future__ import annotations

import dagster as dg

from fct_assets.lib.dagster_internals import latest_check_execution
from fct_assets.lib.event_log import latest_materialization
from fct_assets.lib.keys import EVAL_REPORT, GATE_CHECKS, PROMOTION_CHECKS
from fct_assets.lib.records import CheckResult, Deployment, Gates, GateVerdict, UpgradeDecision

# The NFR gate's default (max_nfr unset): the chance level, (1 - err_S) x err_P, the NFR S and P
# would have if their errors were independent (relative NFR 1). An upgrade whose regressions
# concentrate on what users get right today more than chance would is refused, whatever the
# preset's accuracy; a fixed number (launchpad max_nfr, % of queries) gates on NFR alone.
DEFAULT_MAX_NFR: float | None = None
# The mAP gate's default, in points: a paired bootstrap interval of the mAP delta on a
# 10,000-item gallery spans well under a point, so a drop of more than 1 point is a real
# regression, not noise.
DEFAULT_MAP_TOLERANCE = 1.0
# Per preset where the defaults do not fit. `tiny` trains each model for seconds on 1,257 digits
# (the test preset): a retrained version moves top-1 and mAP by chance (v2 of the test
# environment flips 15.9 % of its queries), so its gates are off; the tests that exercise the
# gates set thresholds in the launchpad config.
PRESET_GATES: dict[str, Gates] = {"tiny": Gates(max_nfr=100.0, map_tolerance=100.0)}


def launch_gates(max_nfr: float | None, map_tolerance: float | None, preset: str) -> Gates:
    """The gates of a run: the launchpad's values where set, else the preset's (PRESET_GATES),
    else the defaults (the chance level; 1 mAP point)."""
    preset_gates = PRESET_GATES.get(preset)
    return Gates(
        max_nfr=max_nfr if max_nfr is not None else preset_gates and preset_gates.max_nfr,
        map_tolerance=(
            map_tolerance
            if map_tolerance is not None
            else preset_gates.map_tolerance
            if preset_gates
            else DEFAULT_MAP_TOLERANCE
        ),
    )


# The gates' names, as GateVerdict.gate.
NFR, MAP = "nfr", "map"


def worst_classes(decision: UpgradeDecision, k: int = 3) -> str:
    """The (at most k) classes with the highest NFR, as "shirt 12.3 %, coat 8.0 %" ("none"
    when no query flipped)."""
    by_class = decision.flips.by_class
    names = decision.class_names
    worst = decision.flips.regressing_classes(k)
    if not worst:
        return "none"
    return ", ".join(
        f"{names[c] if 0 <= c < len(names) else c} {by_class[c].nfr:.1f} %" for c in worst
    )


def nfr_threshold(decision: UpgradeDecision, gates: Gates) -> float:
    """The NFR (%) the gate allows: `gates.max_nfr`, or unset the chance level 100 x (1 - err_S)
    x err_P from S's and P(0)'s top-1 over the same queries."""
    if gates.max_nfr is not None:
        return gates.max_nfr
    a = decision.flips.all
    return 100.0 * (a.top1_served / 100.0) * (1.0 - a.top1_proposed / 100.0)


def gate_verdicts(decision: UpgradeDecision, gates: Gates) -> tuple[GateVerdict, ...]:
    """The two gates' verdicts on `decision` under `gates`, each with its one line."""
    nfr = decision.flips.all.nfr
    threshold = nfr_threshold(decision, gates)
    # A hair of float slack: at the chance level NFR and threshold are the same counts.
    nfr_ok = nfr <= threshold + 1e-9
    chance = " (chance level: independent errors)" if gates.max_nfr is None else ""
    served, proposed = decision.served_metrics.mAP, decision.proposed_metrics.mAP
    delta = proposed - served
    map_ok = delta >= -gates.map_tolerance
    return (
        GateVerdict(
            gate=NFR,
            passed=nfr_ok,
            line=(
                f"NFR {nfr:.2f} % at f = 0 {'within' if nfr_ok else 'above'} the threshold"
                f" {threshold:.2f} %{chance}; worst classes: {worst_classes(decision)}"
            ),
        ),
        GateVerdict(
            gate=MAP,
            passed=map_ok,
            line=(
                f"mAP of P(0) {proposed:.2f} against S's {served:.2f} ({delta:+.2f} points,"
                f" tolerance {gates.map_tolerance:.2f})"
            ),
        ),
    )


def decision_line(decision: UpgradeDecision) -> str:
    """Whether promotion passes the gates, and why, in one line."""
    failed = [v for v in decision.verdicts if not v.passed]
    if not failed:
        return "Promotion passes the gates: " + "; ".join(v.line for v in decision.verdicts) + "."
    return "Promotion is refused: " + "; ".join(v.line for v in failed) + "."


def accept_regressions(results: dict[str, CheckResult], reason: str) -> dict[str, CheckResult]:
    """`results` (serving.deployment.check_results) with the failed *gates* accepted, for
    `fct promote --accept-regressions REASON`: each becomes passed, its why naming the reason.
    Every other check must have passed on its own: an override accepts measured regressions,
    never a broken table or report. Raises ValueError (one line) otherwise."""
    reason = reason.strip()
    if not reason:
        raise ValueError("--accept-regressions: give the reason, e.g. 'shirts regress, agreed'")
    gates = {f"{k.asset_key.to_user_string()}:{k.name}" for k in GATE_CHECKS}
    others = {k: r.why for k, r in results.items() if k not in gates and not r.passed}
    if others:
        raise ValueError(
            f"--accept-regressions accepts failed gates only; other blocking checks did not pass"
            f" ({others})"
        )
    return {
        k: (
            r.model_copy(update={"passed": True, "why": f"accepted regressions: {reason}"})
            if k in gates and not r.passed and r.why.startswith("failed")
            else r
        )
        for k, r in results.items()
    }


def restate_verdicts(context: dg.AssetExecutionContext) -> int:
    """In a run of the version `context.partition_key` that materialises nothing (a no-op), log
    again the latest verdict of each blocking check that judged the version's current
    materialisation, so the UI shows that verdict for the run instead of "Skipped". A verdict
    older than its asset's latest materialisation is not re-stated (it judged other data).
    Returns how many were re-stated."""
    version = context.partition_key
    stated = 0
    for key in PROMOTION_CHECKS:
        record = latest_check_execution(context.instance, key, version)
        evaluation = getattr(record, "evaluation", None)
        if not isinstance(evaluation, dg.AssetCheckEvaluation):
            continue
        latest = latest_materialization(context.instance, key.asset_key, version)
        if latest is None or record.event.timestamp < latest.timestamp:
            continue
        context.log_event(
            dg.AssetCheckEvaluation(
                asset_key=key.asset_key,
                check_name=key.name,
                passed=evaluation.passed,
                metadata={
                    **evaluation.metadata,
                    "restated_from_run": dg.MetadataValue.text(record.run_id),
                },
                target_materialization_data=evaluation.target_materialization_data,
                severity=evaluation.severity,
                description=evaluation.description,
                blocking=evaluation.blocking,
                partition=version,
            )
        )
        stated += 1
    return stated


def record_override(
    instance: dg.DagsterInstance,
    row: Deployment,
    reason: str,
    accepted: dict[str, CheckResult],
    before: dict[str, CheckResult],
) -> list[str]:
    """Record that `row` (a promotion) served its version over failed gates: an observation of
    eval_report[version] naming the reason, the deployment row and each gate's verdict, seen on
    the asset's page. Returns the gates it accepted (their keys)."""
    overridden = [k for k, r in before.items() if not r.passed and accepted[k].passed]
    instance.report_runless_asset_event(
        dg.AssetObservation(
            asset_key=EVAL_REPORT,
            partition=row.version,
            description=f"promoted over failed gates: {reason}",
            metadata={
                "accepted regressions": dg.MetadataValue.text(reason),
                "deployment seq": row.seq,
                "table_version": row.table_version,
                "gates accepted": dg.MetadataValue.json(
                    {k: before[k].why.removeprefix("failed: ") for k in overridden}
                ),
            },
        )
    )
    return overridden
