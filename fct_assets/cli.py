"""`fct` command line: `reproduce` (fct_ml), and the serving commands over the Dagster instance
and LanceDB: `promote`, `rollback`, `search`, `lineage`, `add-version`, `estimate`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fct_ml.cli import add_reproduce_parser

REPO = Path(__file__).resolve().parent.parent


def _instance():
    import dagster as dg

    # The same instance `make ui` uses, unless DAGSTER_HOME says otherwise.
    os.environ.setdefault("DAGSTER_HOME", str(REPO / "dagster_home"))
    return dg.DagsterInstance.get()


def _fct():
    from fct_assets.resources import FctResource

    return FctResource()


def _promote(args) -> int:
    from fct_assets.deployment import promote

    row = promote(_instance(), _fct().connect(), args.version)
    print(
        f"promoted {row.version}: serving {row.table} @ LanceDB version"
        f" {row.table_version} ({row.space_id})"
    )
    return 0


def _rollback(args) -> int:
    from fct_assets.deployment import rollback

    row = rollback(_fct().connect())
    print(
        f"rolled back to {row.version}: serving {row.table} @ LanceDB version {row.table_version}"
    )
    return 0


def _lineage(args) -> int:
    from fct_assets.lineage import format_lineage, lineage

    info = lineage(_instance(), args.version)
    print(json.dumps(info, indent=2, default=str) if args.json else format_lineage(info))
    return 0


def _add_version(args) -> int:
    from fct_assets.partitions import add_model_version

    add_model_version(_instance(), args.version)
    print(
        f"added model version {args.version}; with `make ui` running, automation materialises its"
        " four assets"
    )
    return 0


def _estimate(args) -> int:
    from fct_assets.estimate import estimate, format_estimate

    info = estimate(_instance(), args.version, args.items)
    print(json.dumps(info, indent=2) if args.json else format_estimate(info))
    return 0


def _search(args) -> int:
    from fct_assets.search import search_command

    hits = search_command(
        _instance(), _fct(), image=args.image, item_id=args.item_id, version=args.version, k=args.k
    )
    print(f"{'rank':>4} {'item_id':>8} {'label':>5} {'distance':>10}  source")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4} {h['item_id']:>8} {h['label']:>5} {h['distance']:>10.4f}  {h['source']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fct", description="Forward-compatible embedding upgrades."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_reproduce_parser(sub)
    p = sub.add_parser("promote", help="serve VERSION, if its blocking checks passed")
    p.add_argument("version")
    p.set_defaults(func=_promote)
    p = sub.add_parser("rollback", help="serve again the previously deployed version")
    p.set_defaults(func=_rollback)
    p = sub.add_parser(
        "lineage", help="checkpoints, tables, fingerprints, code and runs behind VERSION"
    )
    p.add_argument("version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_lineage)
    p = sub.add_parser("add-version", help="register a model version (a Dagster dynamic partition)")
    p.add_argument("version")
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_estimate)
    p = sub.add_parser(
        "search", help="nearest gallery items, query embedded by the version's new model"
    )
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="an image file")
    query.add_argument("--item-id", type=int, help="a gallery item's stored image")
    p.add_argument("--version", default=None, help="default: the deployed version")
    p.add_argument("-k", type=int, default=10)
    p.set_defaults(func=_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, LookupError) as err:  # our errors are one line: show it, no traceback
        print(f"fct: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
