"""`fct` command line: `reproduce` (fct_ml), and the serving commands over the Dagster instance
and LanceDB: `promote`, `rollback`, `search`, `lineage`, `add-version`, `estimate`, `catch-up`,
`ingest`, `diff`.

Every command that prints a result takes `--json` (the result as one JSON document on stdout).
Exit codes: 0 done; 1 the operation was refused or failed; 2 the command line is wrong. Either
error is one line on stderr, `fct: error: ...`. Run as a program, `fct` shows its own output
only: libraries' warnings are silenced (`-W` or PYTHONWARNINGS bring them back).

Deferred imports: each command imports what it runs, so `fct lineage` starts without loading
the asset graph, lancedb or torch, and `fct search` (the deployed version) without Dagster,
through the serving contract (fct_assets/serving/contract.py; benchmarks/perf/cli_startup.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

from fct_ml import __version__
from fct_ml.cli import CommandParser, add_reproduce_parser

REPO = Path(__file__).resolve().parent.parent


def _instance():
    import dagster as dg

    # The same instance `make ui` uses, unless DAGSTER_HOME says otherwise.
    os.environ.setdefault("DAGSTER_HOME", str(REPO / "dagster_home"))
    return dg.DagsterInstance.get()


def _fct():
    from fct_assets.lib.resources import FctResource

    return FctResource()


def _promote(args) -> int:
    from fct_assets.serving.deployment import check_results, promote

    instance = _instance()
    reason, results, before, accepted = args.accept_regressions, None, {}, []
    if reason is not None:
        from fct_assets.upgrade.gates import accept_regressions

        before = check_results(instance, args.version)
        results = accept_regressions(before, reason)
    # The deployments row records an override of failed gates, beside the observation on the
    # version's eval_report (upgrade/gates.py record_override) that lineage shows.
    overridden = [k for k, r in before.items() if not r.passed and results[k].passed]
    note = f"accepted regressions: {reason.strip()}" if overridden else None
    row = promote(instance, _fct().connect(), args.version, results=results, note=note)
    if reason is not None:
        from fct_assets.upgrade.gates import record_override

        accepted = record_override(instance, row, reason.strip(), results, before)
    if args.json:
        return _print_json(
            row.model_dump() | ({"accepted_regressions": reason.strip()} if accepted else {})
        )
    print(
        f"promoted {row.version}: serving {row.table} @ LanceDB version"
        f" {row.table_version} ({row.space_id})"
        + (f"; regressions accepted ({', '.join(accepted)}): {reason.strip()}" if accepted else "")
    )
    return 0


def _diff(args) -> int:
    from fct_assets.upgrade.report import diff, format_diff, recorded_report, write_flips_png

    instance = _instance()
    report, data = diff(instance, args.served, args.proposed)
    if args.png is not None:
        if not write_flips_png(recorded_report(instance, args.proposed), args.png):
            raise LookupError(f"eval_report[{args.proposed}]: no negative flip, no picture")
        data["flips_png"] = str(args.png)
    if args.json:
        return _print_json(data)
    print(format_diff(report, data))
    if args.png is not None:
        print(f"worst negative flips: {args.png}")
    return 0


def _rollback(args) -> int:
    from fct_assets.serving.rollback import rollback

    row = rollback(_instance(), _fct(), force=args.force, log=lambda line: None)
    if args.json:
        return _print_json(row)
    print(
        f"rolled back to {row.version}: serving {row.table} @ LanceDB version"
        f" {row.table_version} ({row.note})"
    )
    return 0


def _lineage(args) -> int:
    from fct_assets.lineage.trace import format_lineage, format_row_lineage, lineage, row_lineage

    if args.item_id is not None:
        info = row_lineage(_instance(), _fct().connect(), args.version, args.item_id)
        if args.json:
            return _print_json(info)
        print(format_row_lineage(info))
        return 0
    # The connection opened only if needed: importing lancedb costs ~2 s of CPU (cli_startup.py).
    info = lineage(_instance(), args.version, _fct().connect)
    if args.json:
        return _print_json(info)
    print(format_lineage(info))
    return 0


def _add_version(args) -> int:
    from fct_assets.lib.partitions import add_model_version

    add_model_version(_instance(), args.version)
    if args.json:
        return _print_json({"version": args.version, "added": True})
    print(
        f"added model version {args.version}; with `make ui` running, automation materialises its"
        " four assets"
    )
    return 0


def _estimate(args) -> int:
    from fct_assets.upgrade.estimate import estimate, format_estimate

    found = estimate(_instance(), args.version, args.items)
    if args.json:
        return _print_json(found.as_json())
    print(format_estimate(found))
    return 0


def _ingest(args) -> int:
    from fct_assets.definitions import build_defs
    from fct_assets.ingest.assets import ingest_paths

    instance = _instance()
    result = ingest_paths(instance, build_defs(), args.paths, label=args.label)
    if not result.success:
        failure = next(
            (e for e in result.all_events if e.is_step_failure),
            None,
        )
        error = failure.step_failure_data.error if failure else None
        while error is not None and error.cause is not None:  # the step's own exception
            error = error.cause
        why = error.message.strip().splitlines()[-1] if error else ""
        raise ValueError(f"ingest run {result.run_id[:8]} failed: {why}")
    from fct_assets.lib.keys import INGESTED_BATCH
    from fct_assets.lib.records import IngestBatch

    # The record itself, as the run returned it (its metadata leaves out the per-item ids).
    record: IngestBatch = result.asset_value(INGESTED_BATCH)
    if args.json:
        return _print_json(
            {
                "batch": record.batch,
                "files": record.files,
                "added_to_store": record.added_to_store,
                "added_to_table": record.added_to_table,
                "duplicates": record.duplicates,
                "table": record.table,
                "space_id": record.space_id,
                "deployed_version": record.deployed_version,
                "quarantined": [q.model_dump() for q in record.quarantined],
            }
        )
    print(
        f"ingested batch {record.batch}: {record.files} files, {record.added_to_store} new items"
        f" in gallery_store, {record.added_to_table} in {record.table} ({record.space_id}),"
        f" {record.duplicates} already stored, {len(record.quarantined)} quarantined"
    )
    for q in record.quarantined:
        print(f"  quarantined {q.file}: {q.reason}")
    return 0


def _catch_up(args) -> int:
    from fct_assets.definitions import build_defs
    from fct_assets.lib.console import failure_line
    from fct_assets.lib.partitions import require_registered

    instance = _instance()
    # Before the definitions run anything: an unknown version is one line, not a traceback.
    version = require_registered(instance, args.version)
    result = (
        build_defs()
        .resolve_job_def("catch_up")
        .execute_in_process(instance=instance, partition_key=version, raise_on_error=False)
    )
    if not result.success:
        raise ValueError(
            f"catch-up of {version} failed (run {result.run_id[:8]}): {failure_line(result)}"
        )
    from fct_assets.serving.deployment import recorded_table

    row = recorded_table(instance, version)
    if args.json:
        return _print_json(row)
    print(f"caught up {version}: {row.table} at LanceDB version {row.table_version}")
    return 0


def _search(args) -> int:
    if args.version is None:
        # Deferred, as every command's imports: the deployed version is searched through its
        # serving contract, which loads neither Dagster nor the asset graph (cold start:
        # benchmarks/perf/cli_startup.py); lancedb and torch load when the searcher opens.
        from fct_assets.serving.contract import open_searcher

        searcher = open_searcher()
        query = searcher.stored_image(args.item_id) if args.item_id is not None else args.image
        hits = searcher.search(query, k=args.k)
    else:
        # Deferred: another version than the deployed one is found through the Dagster
        # instance (its recorded table and checkpoint), which costs ~1 s more to import.
        from fct_assets.serving.search import search_command

        hits = search_command(
            _instance(),
            _fct(),
            image=args.image,
            item_id=args.item_id,
            version=args.version,
            k=args.k,
        )
    if args.json:
        return _print_json(hits)
    print(f"{'rank':>4} {'item_id':>8} {'label':>5} {'distance':>10}  source")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4} {h.item_id:>8} {h.label:>5} {h.distance:>10.4f}  {h.source}")
    return 0


class Parser(CommandParser):
    """argparse with a usage error as one line (argparse prints the usage block too), exit 2;
    `commands` and `options` list what it takes (fct_ml.cli.CommandParser)."""

    def error(self, message: str):
        self.exit(2, f"fct: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _versions() -> str:
    def of(package: str) -> str:
        try:
            return installed_version(package)
        except PackageNotFoundError:
            return "not installed"

    return f"fct {__version__} (dagster {of('dagster')}, torch {of('torch')})"


def build_parser() -> Parser:
    """The `fct` command line: every command, each a subparser (`build_parser().commands`)."""
    parser = Parser(prog="fct", description="Forward-compatible embedding upgrades.")
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="command", required=True)
    add_reproduce_parser(sub)
    p = sub.add_parser("promote", help="serve VERSION, if its blocking checks passed")
    p.add_argument("version")
    p.add_argument(
        "--accept-regressions",
        metavar="REASON",
        default=None,
        help="serve it although its gates (NFR, mAP against what is served) failed; recorded",
    )
    _json_flag(p)
    p.set_defaults(func=_promote)
    p = sub.add_parser(
        "diff", help="what changes per query if PROPOSED replaces SERVED: flips, NFR, gates"
    )
    p.add_argument("served", metavar="SERVED", help='a model version, or "old" for the old model')
    p.add_argument("proposed", metavar="PROPOSED", help="the model version whose report to read")
    p.add_argument(
        "--png", type=Path, default=None, help="write the worst negative flips' picture here"
    )
    _json_flag(p)
    p.set_defaults(func=_diff)
    p = sub.add_parser(
        "rollback",
        help="serve again the previously deployed version, first adding the items ingested since",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="serve it even if items ingested since cannot be added (they stop being searchable)",
    )
    _json_flag(p)
    p.set_defaults(func=_rollback)
    p = sub.add_parser(
        "lineage", help="checkpoints, tables, fingerprints, code and runs behind VERSION"
    )
    p.add_argument("version")
    p.add_argument(
        "--item-id", type=int, default=None, help="how one row got there: chain, source, batch"
    )
    _json_flag(p)
    p.set_defaults(func=_lineage)
    p = sub.add_parser("add-version", help="register a model version (a Dagster dynamic partition)")
    p.add_argument("version")
    _json_flag(p)
    p.set_defaults(func=_add_version)
    p = sub.add_parser(
        "estimate", help="time a full re-embedding would take against the transformation backfill"
    )
    p.add_argument("version")
    p.add_argument(
        "--items",
        type=int,
        default=None,
        help="gallery size to estimate for (default: this gallery's)",
    )
    _json_flag(p)
    p.set_defaults(func=_estimate)
    p = sub.add_parser(
        "catch-up", help="backfill VERSION again with the items ingested since, and re-check it"
    )
    p.add_argument("version")
    _json_flag(p)
    p.set_defaults(func=_catch_up)
    p = sub.add_parser(
        "ingest", help="add image files (or folders of them) to the gallery now, as one batch"
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument(
        "--label", default=None, help="class name or index of every file (default: its folder's)"
    )
    _json_flag(p)
    p.set_defaults(func=_ingest)
    p = sub.add_parser(
        "search", help="nearest gallery items, query embedded by the version's new model"
    )
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="an image file")
    query.add_argument("--item-id", type=int, help="a gallery item's stored image")
    p.add_argument(
        "--version",
        default=None,
        help="default: the deployed version, through its serving contract (no Dagster)",
    )
    p.add_argument("-k", type=int, default=10)
    _json_flag(p)
    p.set_defaults(func=_search)
    return parser


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _json_default(value):
    # A typed record (pydantic) as its fields: str() of one is not JSON (`fct promote --json`).
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else str(value)


def _print_json(value) -> int:
    print(json.dumps(value, indent=2, default=_json_default))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `fct` with `argv` (default: the program's arguments); returns the exit code."""
    if argv is None and not sys.warnoptions:
        # As a program: fct's own output only (e.g. no Dagster preview warning on `fct promote`).
        warnings.simplefilter("ignore")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version (0) or a usage error (2, one line printed)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, LookupError, OSError) as err:
        # Refused or failed: our errors are one line; show it, no traceback.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"fct: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
