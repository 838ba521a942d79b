"""The evaluation report of one version: the paper's cases on the stored gallery (query set =
gallery, leave-one-out), its backfilling curve, a markdown table and a plot."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fct_assets.lib import storage
from fct_assets.lib.records import (
    BackfilledTable,
    Checkpoint,
    DatasetRecord,
    EvalReport,
    GalleryStore,
)
from fct_ml.evaluation import BackfillCurve, Case


def _read(db, name: str, version: int, columns: list[str]):
    data = storage.open_pinned(db, name, version).search().select(columns).limit(None).to_arrow()
    return data.sort_by("item_id")


def _aligned(table, ids: np.ndarray, name: str):
    """The rows of `table` (sorted by item_id) for `ids` (sorted), in that order; every id must be
    there."""
    have = table.column("item_id").to_numpy()
    pos = np.searchsorted(have, ids)
    ok = (pos < len(have)) & (have[np.minimum(pos, len(have) - 1)] == ids)
    if not ok.all():
        raise ValueError(f"{name}: item {int(ids[~ok][0])} of the evaluated table is missing")
    return table.take(pa.array(pos))


def curve_plot_png(curves: Mapping[str, BackfillCurve], title: str) -> bytes:
    """mAP and top-1 against the fraction re-embedded, one line per order; PNG bytes."""
    # Deferred: matplotlib (~0.6 s) only in the step that draws the plot.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display backend on a server

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    for ax, metric in zip(axes, ("mAP", "top1")):
        for order, curve in curves.items():
            ax.plot(curve.fractions, getattr(curve, metric), marker="o", label=order)
        ax.set_xlabel("fraction of gallery re-embedded")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# Rows in the paper's order, whatever order a JSON round trip (Dagster metadata sorts keys) left:
# the baselines, h, then the version's served table (new/gallery_<v>), then the incompatible pair.
_CASE_RANK = {Case.OLD_OLD: 0, Case.NEW_NEW: 1, Case.NEW_H_OLD: 2, Case.NEW_OLD: 4}


def markdown_table(report: EvalReport, *, include_plot: bool = True) -> str:
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.backfill import ORDERS

    lines = [
        (
            f"### Evaluation of {report.version}: {report.table} at LanceDB version"
            f" {report.table_version} ({report.items} gallery items, leave-one-out)"
        ),
        "",
    ]
    if report.old_space:
        lines += [f'"old" is the stored space h maps from: {report.old_space}.', ""]
    lines += [
        "| case (query/gallery) | top-1 | top-5 | mAP | unseen-class mAP |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in sorted(report.cases, key=lambda c: _CASE_RANK.get(c, 3)):
        m = report.cases[case]
        unseen = report.cases_unseen_classes.get(case)
        u = f"{unseen.mAP:.1f}" if unseen else "–"
        lines.append(f"| {case} | {m.top1:.1f} | {m.top5:.1f} | {m.mAP:.1f} | {u} |")
    g = report.gap_closed
    lines += [
        "",
        f"Gap closed by {Case.NEW_H_OLD}: top-1 {g.top1:.1f} %, mAP {g.mAP:.1f} %.",
        "",
        "| backfill order | area top-1 | area mAP |",
        "| --- | --- | --- |",
    ]
    for order in sorted(
        report.backfill_auc, key=lambda o: ORDERS.index(o) if o in ORDERS else len(ORDERS)
    ):
        a = report.backfill_auc[order]
        lines.append(f"| {order} | {a.top1:.1f} | {a.mAP:.1f} |")
    if report.backfill_items_per_s:
        lines += [
            "",
            (
                "Cost on this run's device: backfill by transformation"
                f" {report.backfill_items_per_s:.0f} items/s (LanceDB read + h + write), full"
                f" re-embedding {report.reembed_items_per_s:.0f} items/s (decode + new model),"
                f" {report.backfill_items_per_s / report.reembed_items_per_s:.1f}x."
            ),
        ]
    if include_plot:
        lines += ["", f"![backfilling curve](data:image/png;base64,{report.plot_png_base64})"]
    return "\n".join(lines)


def evaluate_version(
    fct,
    dataset: DatasetRecord,
    gallery_store: GalleryStore,
    backfilled: BackfilledTable,
    h: Checkpoint,
    new_model: Checkpoint,
    table_version: int | None = None,
) -> EvalReport:
    """Metrics of one version in percent: cases, unseen-class split, backfilling curves.

    `table_version`: the LanceDB version of the version's table to evaluate (the deployed,
    pinned one); None: the one the latest backfilled_gallery materialisation published."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.augment import to_float
    from fct_ml.backfill import apply_transformation, backfill_summary
    from fct_ml.evaluation import evaluate_cases, gap_closed
    from fct_ml.training import encode

    db = fct.connect()
    device = fct.torch_device()
    exp = fct.experiment()
    pinned = backfilled.version if table_version is None else int(table_version)
    # A table version published by an earlier new model holds another space than today's
    # queries: refused rather than compared.
    declared = storage.table_space_ids(storage.open_pinned(db, backfilled.table, pinned))
    if declared.get("space_id") != new_model.space_id:
        raise storage.SpaceMismatchError(
            f"{backfilled.table} at LanceDB version {pinned}: holds space"
            f" {declared.get('space_id')}, the new model's queries are in {new_model.space_id}"
        )
    served = _read(db, backfilled.table, pinned, ["item_id", "label", "embedding", "source"])
    source = backfilled.source
    from_store = source is None or source.table == storage.GALLERY_STORE
    store_version = (
        gallery_store.version if source is None else db.open_table(storage.GALLERY_STORE).version
    )
    # The evaluation set: the items of the served table whose label is known (an ingested item
    # may come without one) and that have a vector in the space h maps from (an item ingested
    # after a later promotion has none: the backfill embedded it from its image, and the cases
    # of h cannot include it), with their images and side-info from the store of record.
    # (An item the store does not hold is still refused below, naming it.)
    served = served.filter(pc.greater_equal(served.column("label"), 0))
    stored_ids = _read(db, storage.GALLERY_STORE, store_version, ["item_id", "old_embedding"])
    if from_store:
        unmapped = stored_ids.filter(pc.is_null(stored_ids.column("old_embedding")))
        unmapped = unmapped.column("item_id").combine_chunks()
    else:
        held = _read(db, source.table, source.version, ["item_id"]).column("item_id")
        everyone = stored_ids.column("item_id")
        unmapped = everyone.filter(pc.invert(pc.is_in(everyone, held.combine_chunks())))
        unmapped = unmapped.combine_chunks()
    served = served.filter(pc.invert(pc.is_in(served.column("item_id"), value_set=unmapped)))
    ids = served.column("item_id").to_numpy()
    columns = ["item_id", "label", "image", "side_info"] + (["old_embedding"] if from_store else [])
    store = _aligned(
        _read(db, storage.GALLERY_STORE, store_version, columns), ids, storage.GALLERY_STORE
    )
    if from_store:
        stored = store.column(
            "old_embedding"
        )  # the space the items were stored in: the old model's
    else:
        # A chained upgrade: the items were stored in the deployed version's space, in its table.
        stored = _aligned(
            _read(db, source.table, source.version, ["item_id", "embedding"]), ids, source.table
        ).column("embedding")
    if stored.null_count:
        raise ValueError(
            f"{backfilled.table}: {stored.null_count} evaluated items have no vector in the space"
            " h maps from"
        )
    labels = torch.from_numpy(store.column("label").to_numpy().astype(np.int64))
    old = torch.from_numpy(storage.vectors(stored))
    side = torch.from_numpy(storage.vectors(store.column("side_info")))
    channels = new_model.model.config.in_channels
    # The evaluation re-embeds the whole gallery from its stored images anyway: timed, it is the
    # measured cost of the full re-embedding that the transformation avoids (`fct estimate`).
    started = time.perf_counter()
    images = torch.from_numpy(
        np.stack([storage.decode_png(b, channels) for b in store.column("image").to_pylist()])
    )
    new = encode(
        new_model.model.to(device), [images], transform=to_float
    )  # (N, new_dim): queries and the full re-embedding
    reembed_seconds = time.perf_counter() - started
    transformed, sigma = apply_transformation(h.model.to(device), old, side)
    if sigma is None:  # a plain h (an external new model without classifier): no sigma order
        sigma = torch.zeros(len(transformed))
    served_vectors = torch.from_numpy(storage.vectors(served.column("embedding")))
    unseen = ~torch.isin(labels, torch.tensor(dataset.old_classes, dtype=labels.dtype))
    cases = {
        Case.OLD_OLD: (old, old),
        Case.NEW_NEW: (new, new),
        Case.NEW_H_OLD: (new, transformed),
        f"new/{backfilled.table}": (new, served_vectors),  # the version's served table
        Case.NEW_OLD: (new, old),
    }
    result = evaluate_cases(
        cases, labels, unseen_mask=unseen, metric=exp.metric, chunk_size=exp.eval_chunk_size
    )
    backfill = backfill_summary(
        new,
        labels,
        transformed,
        sigma,
        exp.backfill_points,
        generator=torch.Generator().manual_seed(0),
        metric=exp.metric,
    )
    version = backfilled.table.removeprefix("gallery_")
    png = curve_plot_png(backfill.curves, f"backfilling curve, {version}")
    return EvalReport(
        version=version,
        items=len(labels),
        cases=result.cases,
        cases_unseen_classes=result.unseen_classes,
        cases_seen_classes=result.seen_classes,
        gap_closed=gap_closed(result.cases),
        backfill_curves=backfill.curves,
        backfill_auc=backfill.areas,
        reembedded=int(pc.sum(pc.equal(served.column("source"), "re-embedded")).as_py() or 0),
        table=backfilled.table,
        table_version=pinned,
        reembed_seconds=round(reembed_seconds, 6),
        reembed_items_per_s=round(len(labels) / reembed_seconds, 1),
        backfill_items_per_s=backfilled.backfill_items_per_s,
        space_id=declared["space_id"],
        plot_png_base64=base64.b64encode(png).decode(),
        old_space=(
            f"gallery_store at LanceDB version {store_version}, space {gallery_store.old_space_id}"
            " (the old model)"
            if from_store
            else f"{source.table} at LanceDB version {source.version}, space {source.space_id}"
            + (
                f" (model version {source.model_version}, deployed when the upgrade began)"
                if source.model_version
                else ""
            )
        ),
    )
