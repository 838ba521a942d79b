"""`fct estimate`: what a full re-embedding would cost against the transformation backfill,
from costs measured on this version's own runs (no guess, no constant)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from fct_assets.lib.io_managers import recorded_record
from fct_assets.lib.keys import BACKFILLED_GALLERY, EVAL_REPORT
from fct_assets.lib.partitions import check_version
from fct_assets.lib.records import BackfilledTable, EvalReport


def estimate(
    instance: dg.DagsterInstance, version: str, items: int | None = None
) -> dict[str, Any]:
    """Seconds to backfill `items` (default: the gallery) by transformation and by re-embedding."""
    check_version(version)
    backfill = recorded_record(instance, BackfilledTable, BACKFILLED_GALLERY, version)
    report = recorded_record(instance, EvalReport, EVAL_REPORT, version, within="json")
    transform_rate, reembed_rate = backfill.backfill_items_per_s, report.reembed_items_per_s
    if not transform_rate or not reembed_rate:
        raise LookupError(
            f"version {version}: its runs recorded no costs; re-materialise backfilled_gallery and"
            " eval_report"
        )
    n = items if items is not None else backfill.rows
    # The eval report's backfilling curve (FastFill's grid, 22 points) priced with the same
    # rates: what re-embedding each fraction (sigma order, as the backfill picks) costs and
    # what it buys, so `reembed_fraction` is chosen on quality per second, not a guess.
    curve = report.backfill_curves.get("sigma", {})
    points = [
        {
            "fraction": f,
            "seconds": f * n / reembed_rate + (1 - f) * n / transform_rate,
            "top1": top1,
            "mAP": mAP,
        }
        for f, top1, mAP in zip(
            curve.get("fractions", []), curve.get("top1", []), curve.get("mAP", []), strict=True
        )
    ]
    return {
        "version": version,
        "items": n,
        "transform_items_per_s": transform_rate,
        "reembed_items_per_s": reembed_rate,
        "transform_seconds": n / transform_rate,
        "reembed_seconds": n / reembed_rate,
        "speedup": transform_rate / reembed_rate,
        "measured_on_items": backfill.rows,
        "curve": points,
    }


def format_estimate(e: dict[str, Any]) -> str:
    def human(seconds: float) -> str:
        for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"{seconds / size:.1f} {unit}"
        return f"{seconds:.1f} s"

    rows = "".join(
        f"\n  {100 * p['fraction']:5.1f} %  {human(p['seconds']):>10}  {p['top1']:5.1f}  {p['mAP']:5.1f}"
        for p in e.get("curve", [])
    )
    curve = (
        f"\n  re-embedded (sigma order)   time  top-1    mAP  ({len(e['curve'])} points){rows}"
        if rows
        else ""
    )
    return (
        f"{e['version']}: {e['items']:,} items\n  backfill by transformation:"
        f" {human(e['transform_seconds'])} ({e['transform_items_per_s']:,.0f} items/s)\n  full"
        f" re-embedding:          {human(e['reembed_seconds'])} ({e['reembed_items_per_s']:,.0f}"
        f" items/s)\n  transformation is {e['speedup']:.1f}x cheaper (rates measured on this"
        f" version's runs, {e['measured_on_items']:,} items)"
        f"{curve}"
    )
