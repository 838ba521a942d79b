"""What is served, in the Dagster UI: the asset `served_version`, whose observations mirror the
deployments table, one per row (seq, action, version, table and LanceDB version, who or what
caused it, the row's note, the version's eval report). Its latest observation is what serves now.

The deployments table stays the truth; the observation is its mirror, written by
`deployment.record` right after it commits a row, still under the table's lock, so that rows
are mirrored in seq order on one machine. Inside a run (the promote, rollback and ingest jobs)
the observation is an event of that run; outside one (`fct promote`, `fct rollback`, the demo)
it is reported to the instance as a runless event.

If the event cannot be written (the event log is down or full), the deployment stands and one
log line says so: the row is committed and a searcher already serves it through the serving
contract, so failing the promotion would report as refused a version that serves, and serving
would depend on the orchestrator, which it never does (docs/design.md). The view heals at the
next row: each write mirrors every row after the latest one observed, including rows written
with no instance at hand (`deployment.append` in tests, benchmarks and repair scripts).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from fct_assets.lib.event_log import latest_materialization
from fct_assets.lib.keys import EVAL_REPORT, SERVED_VERSION
from fct_assets.lib.records import Deployment

KEY = dg.AssetKey(SERVED_VERSION)
DESCRIPTION = (
    "The model version that answers queries: one observation per row of the deployments table"
    " (promote, rollback, ingest); the latest observation is what is served now."
)
# Rows shown in each observation's history table, newest first (the Events tab holds them all).
HISTORY_ROWS = 20
# A row written before the deployments table recorded who wrote it.
UNKNOWN = "not recorded"

log = logging.getLogger(__name__)
# A subcommand as fct's are spelt (`promote`, `catch-up`): what `program` names beside the program.
_SUBCOMMAND = re.compile(r"[a-z][a-z-]{0,30}")
# A Dagster run id (a UUID), of which the history table shows the first 8 characters.
_RUN_ID = re.compile(r"\b([0-9a-f]{8})-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def spec() -> dg.AssetSpec:
    """The asset `served_version` (group serving): observed, never materialised by Dagster."""
    # Deferred: asset_factory reads the git commit at import (65 ms), which `fct promote`,
    # importing this module to mirror its row, does not need.
    from fct_assets.lib.asset_factory import ARTIFACT, OWNERS
    from fct_assets.lib.provenance import source_version

    return dg.AssetSpec(
        KEY,
        description=DESCRIPTION,
        group_name="serving",
        kinds={"lancedb"},
        owners=OWNERS,
        tags={"fct/artifact": ARTIFACT["lancedb"]},
        code_version=source_version(observation),
        metadata={
            "source of truth": "the deployments table beside the gallery tables (LanceDB)",
            "serving contract": "serving_contract.json beside it, rewritten at every row",
        },
    )


def _run_context() -> dg.OpExecutionContext | None:
    """The context of the step this code runs in, or None outside a run."""
    try:
        return dg.OpExecutionContext.get()
    except dg.DagsterInvariantViolationError:
        return None


# Run tags that say what launched a run (Dagster sets them), and how the view names it.
_LAUNCHERS = (
    ("dagster/sensor_name", "sensor"),
    ("dagster/schedule_name", "schedule"),
    ("dagster/backfill", "backfill"),
    ("user", "user"),
)


def caused_by() -> str:
    """Who or what writes a deployments row now, in words: inside a run, the run (its id, job,
    and the sensor, schedule, backfill or user that launched it); outside one, the user, the
    host and the command."""
    context = _run_context()
    if context is not None:
        run = context.run
        launched = [f"{what} {run.tags[tag]}" for tag, what in _LAUNCHERS if tag in run.tags]
        return f"run {run.run_id} (job {', '.join([run.job_name, *launched])})"
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry nor USER
        user = f"uid {os.getuid()}"
    return f"{user} on {socket.gethostname()} ({program(sys.argv)}, pid {os.getpid()})"


def program(argv: Sequence[str]) -> str:
    """The command a process runs, in words: its program and subcommand (`fct promote`,
    `demo.py`, `pytest`; `python -m PACKAGE` by the package's name, `python -c` as such)."""
    if not argv or argv[0] in ("", "-c", "-"):
        return "python -c"
    path = Path(argv[0])
    name = path.parent.name if path.name == "__main__.py" else path.name
    # A subcommand (`promote`), never a path or an option, which may be long or private.
    return f"{name} {argv[1]}" if len(argv) > 1 and _SUBCOMMAND.fullmatch(argv[1]) else name


def report_link(version: str) -> str:
    """The UI's page of the version's eval report (a path on the Dagster webserver)."""
    return f"/assets/{EVAL_REPORT}?partition={version}"


def _report_path(instance: dg.DagsterInstance, version: str) -> str | None:
    """The record file of the version's latest eval report, or None (never evaluated)."""
    latest = latest_materialization(instance, dg.AssetKey(EVAL_REPORT), version)
    if latest is None:
        return None
    path = latest.asset_materialization.metadata.get("path")
    return None if path is None else str(path.value)


def headline(row: Deployment) -> str:
    """One line: what serves after `row`, and how it came to."""
    return (
        f"{row.version} served: {row.table} @ LanceDB version {row.table_version}"
        f" ({row.action}, seq {row.seq}, by {row.by or UNKNOWN})"
    )


def history_markdown(rows: Sequence[Deployment]) -> str:
    """The latest HISTORY_ROWS rows of `rows` (oldest first) as a markdown table, newest first;
    run ids shortened to the 8 characters the UI shows, times to the second."""
    lines = [
        "| seq | action | version | table @ LanceDB version | note | by | at (UTC) |",
        "| ---: | --- | --- | --- | --- | --- | --- |",
    ]
    for row in reversed(rows[-HISTORY_ROWS:]):
        cells = (
            str(row.seq),
            row.action,
            f"[{row.version}]({report_link(row.version)})",
            f"{row.table} @ {row.table_version}",
            row.note or "",
            _RUN_ID.sub(lambda m: m.group(1), row.by or UNKNOWN),
            row.at[:19].replace("T", " "),
        )
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def observation(
    rows: Sequence[Deployment], *, report_path: str | None = None
) -> dg.AssetObservation:
    """The observation of the last of `rows` (the history up to it, oldest first): what serves
    after it, the row's fields, the version's eval report and the history before it."""
    row = rows[-1]
    metadata: dict[str, object] = {
        "served": row.version,
        "seq": row.seq,
        "action": row.action,
        "table": row.table,
        "table_version": row.table_version,
        "space_id": row.space_id,
        "by": row.by or UNKNOWN,
        "note": row.note or "",
        "at": row.at,
        "eval_report": dg.MetadataValue.url(report_link(row.version)),
    }
    if report_path is not None:
        metadata["eval_report record"] = dg.MetadataValue.path(report_path)
    metadata["history"] = dg.MetadataValue.md(history_markdown(rows))
    return dg.AssetObservation(asset_key=KEY, description=headline(row), metadata=metadata)


def mirrored_seq(instance: dg.DagsterInstance) -> int | None:
    """The seq of the latest row the view holds, or None (nothing mirrored yet)."""
    found = instance.fetch_observations(dg.AssetRecordsFilter(asset_key=KEY), limit=1).records
    if not found:
        return None
    seq = found[0].asset_observation.metadata.get("seq")
    return None if seq is None else int(seq.value)


def mirror(instance: dg.DagsterInstance | None, rows: Sequence[Deployment]) -> list[int]:
    """Mirror the deployments history `rows` (oldest first, ending with the row just committed)
    in the view: one observation per row after the latest one it holds. Inside a run, events of
    that run; else runless events of `instance` (None and no run: nothing, the next row heals).
    Never raises: a failure is one log line, and the deployment stands. The seqs mirrored."""
    context = _run_context()
    if context is not None:
        instance = context.instance
    if instance is None or not rows:
        return []
    row = rows[-1]
    try:
        after = mirrored_seq(instance)
        done = []
        for k, r in enumerate(rows):
            if after is not None and r.seq <= after:
                continue
            event = observation(rows[: k + 1], report_path=_report_path(instance, r.version))
            if context is not None:
                context.log_event(event)
            else:
                instance.report_runless_asset_event(event)
            done.append(r.seq)
        return done
    except Exception as err:  # noqa: BLE001 (whatever the event log raises: the row stands)
        line = (
            f"deployments row {row.seq} ({row.action} {row.version}) stands; the UI's"
            f" {SERVED_VERSION} view was not updated ({type(err).__name__}:"
            f" {' '.join(str(err).split())[:300]}); the next deployments row writes it"
        )
        if context is not None:
            context.log.warning(line)
        else:
            log.warning(line)
        return []
