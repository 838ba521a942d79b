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
from fct_assets.lib.keys import GATE_CHECKS, PROMOTION_CHECKS
from fct_assets.lib.records import CheckResult, Gates, GateVerdict, UpgradeDecision

# The NFR gate's default: one query in ten that users get right today may turn wrong. Two
# models with this project's top-1 (about 77 % for S, 87 % for P on Fashion-MNIST, docs/results.md)
# would flip (1 - 0.23) x 0.13, about 10 %, of the queries if their errors were independent
# (relative NFR 1): an upgrade whose regressions are no more concentrated on today's right
# answers than chance passes; one that breaks more is refused.
DEFAULT_MAX_NFR = 10.0
# The mAP gate's default, in points: a paired bootstrap interval of the mAP delta on a
# 10,000-item gallery spans well under a point, so a drop of more than 1 point is a real
# regression, not noise.
DEFAULT_MAP_TOLERANCE = 1.0
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


def gate_verdicts(decision: UpgradeDecision, gates: Gates) -> tuple[GateVerdict, ...]:
    """The two gates' verdicts on `decision` under `gates`, each with its one line."""
    nfr = decision.flips.all.nfr
    nfr_ok = nfr <= gates.max_nfr
    served, proposed = decision.served_metrics.mAP, decision.proposed_metrics.mAP
    delta = proposed - served
    map_ok = delta >= -gates.map_tolerance
    return (
        GateVerdict(
            gate=NFR,
            passed=nfr_ok,
            line=(
                f"NFR {nfr:.2f} % at f = 0 {'within' if nfr_ok else 'above'} the threshold"
                f" {gates.max_nfr:.2f} %; worst classes: {worst_classes(decision)}"
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
