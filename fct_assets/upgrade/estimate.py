"""`fct estimate`: what a full re-embedding would cost against the transformation backfill,
from costs measured on this version's own runs (no guess, no constant)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import dagster as dg

from fct_assets.lib.io_managers import recorded_record
from fct_assets.lib.keys import BACKFILLED_GALLERY, EVAL_REPORT
from fct_assets.lib.partitions import check_version
from fct_assets.lib.records import BackfilledTable, EvalReport


@dataclass(frozen=True)
class PricedPoint:
    """One point of the eval report's sigma backfilling curve, priced: re-embed `fraction` of the
    gallery (the rest by transformation), in `seconds`, for top-1 and mAP in percent."""

    fraction: float
    seconds: float
    top1: float
    mAP: float  # noqa: N815 (the metric's usual name, and the key of the JSON written)


@dataclass(frozen=True)
class Estimate:
    """What backfilling `items` would cost for one version, at the rates its own runs measured."""

    version: str
    items: int
    transform_items_per_s: float  # backfilled_gallery's run: read + h + write
    reembed_items_per_s: float  # eval_report's run: decode + new model
    measured_on_items: int  # the gallery the rates were measured on
    curve: tuple[PricedPoint, ...]  # empty when the report has no sigma curve

    @property
    def transform_seconds(self) -> float:
        return self.items / self.transform_items_per_s

    @property
    def reembed_seconds(self) -> float:
        return self.items / self.reembed_items_per_s

    @property
    def speedup(self) -> float:
        """How many times cheaper the transformation is than re-embedding."""
        return self.transform_items_per_s / self.reembed_items_per_s

    def as_json(self) -> dict[str, Any]:
        """The shape `fct estimate --json` prints."""
        return {
            "version": self.version,
            "items": self.items,
            "transform_items_per_s": self.transform_items_per_s,
            "reembed_items_per_s": self.reembed_items_per_s,
            "transform_seconds": self.transform_seconds,
            "reembed_seconds": self.reembed_seconds,
            "speedup": self.speedup,
            "measured_on_items": self.measured_on_items,
            "curve": [asdict(p) for p in self.curve],
        }


def estimate(instance: dg.DagsterInstance, version: str, items: int | None = None) -> Estimate:
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
    curve = report.backfill_curves.get("sigma")
    points = (
        ()
        if curve is None
        else tuple(
            PricedPoint(
                fraction=f,
                seconds=f * n / reembed_rate + (1 - f) * n / transform_rate,
                top1=top1,
                mAP=mAP,
            )
            for f, top1, mAP in zip(curve.fractions, curve.top1, curve.mAP, strict=True)
        )
    )
    return Estimate(
        version=version,
        items=n,
        transform_items_per_s=transform_rate,
        reembed_items_per_s=reembed_rate,
        measured_on_items=backfill.rows,
        curve=points,
    )


def format_estimate(e: Estimate) -> str:
    """The estimate as `fct estimate` prints it: both costs, and the priced curve."""

    def human(seconds: float) -> str:
        for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
            if seconds >= size:
                return f"{seconds / size:.1f} {unit}"
        return f"{seconds:.1f} s"

    rows = "".join(
        f"\n  {100 * p.fraction:5.1f} %  {human(p.seconds):>10}  {p.top1:5.1f}  {p.mAP:5.1f}"
        for p in e.curve
    )
    curve = (
        f"\n  re-embedded (sigma order)   time  top-1    mAP  ({len(e.curve)} points){rows}"
        if rows
        else ""
    )
    return (
        f"{e.version}: {e.items:,} items\n  backfill by transformation:"
        f" {human(e.transform_seconds)} ({e.transform_items_per_s:,.0f} items/s)\n  full"
        f" re-embedding:          {human(e.reembed_seconds)} ({e.reembed_items_per_s:,.0f}"
        f" items/s)\n  transformation is {e.speedup:.1f}x cheaper (rates measured on this"
        f" version's runs, {e.measured_on_items:,} items)"
        f"{curve}"
    )
