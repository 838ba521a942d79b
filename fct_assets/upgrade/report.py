"""The evaluation report of one version: what changes for each query if it is promoted (the
upgrade decision: served S against proposed P(f), negative flips, the gates' verdicts), then the
paper's cases on the stored gallery (query set = gallery, leave-one-out), its backfilling curve,
markdown and pictures.

S is what users get now: the deployed version's query model against its pinned table; before
any promotion, the old model against gallery_store; for the deployed version itself, what its
upgrade started from. P(f) is this version's query model against its table with a fraction f of
the gallery re-embedded in sigma order: P(0) is h of the stored vectors, P(1) the full
re-embedding.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fct_assets.lib import storage
from fct_assets.lib.event_log import recorded_metadata
from fct_assets.lib.io_managers import load_recorded_checkpoint, recorded_record, store_path
from fct_assets.lib.keys import EVAL_REPORT, NEW_MODEL
from fct_assets.lib.partitions import check_version
from fct_assets.lib.records import (
    BackfilledTable,
    Checkpoint,
    DatasetRecord,
    EvalReport,
    GalleryStore,
    Gates,
    MapResult,
    OrderGain,
    UpgradeDecision,
    WorstFlip,
    headline,
    loads,
)
from fct_assets.serving.deployment import current
from fct_assets.upgrade.gates import (
    DEFAULT_MAP_TOLERANCE,
    DEFAULT_MAX_NFR,
    decision_line,
    gate_verdicts,
)
from fct_ml.evaluation import BackfillCurve, Case, CaseMetrics
from fct_ml.flips import Interval

if TYPE_CHECKING:
    from fct_ml.pipeline import Features

# How many of the worst negative flips the picture shows.
WORST_FLIPS = 6
# The re-embed fraction at which sigma is compared with random order when the version plans
# no partial backfill (reembed_fraction 0 or 1): a quarter of the gallery.
COMPARE_AT = 0.25
# The evaluation's queries (eval_report's `query_sample`): every evaluated item up to this many,
# leave-one-out (the paper's protocol); above it a seeded sample of this many items queries the
# whole gallery, so the cost is queries x gallery, linear in the gallery, never gallery squared.
# 10,000 keeps Fashion-MNIST's 10,000-item test gallery (`make demo`) whole; a sample's
# uncertainty is in the report (each whole-gallery case's bootstrap interval).
QUERY_SAMPLE = 10_000
QUERY_SEED = 0
# The key of S, on the sub-gallery, in a sampled report's `sub_gallery_cases`.
SERVED_CASE = "S"
# Rows per LanceDB page where the evaluation reads a column by item id: 64 Ki 128-d vectors are
# 32 MB, whatever the gallery's size.
PAGE_ROWS = 65_536


def _read(db, name: str, version: int, columns: list[str]):
    data = storage.open_pinned(db, name, version).search().select(columns).limit(None).to_arrow()
    return data.sort_by("item_id")


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


def _ci(interval) -> str:
    return f"{interval.estimate:+.2f} ({interval.low:+.2f}, {interval.high:+.2f})"


def _rel(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _queries(report: EvalReport) -> int:
    """How many items queried (reports written before sampling: every item)."""
    return report.queries if report.queries is not None else report.items


def _gap_line(decision: UpgradeDecision, report: EvalReport | None = None) -> str:
    """The share of S's gap to the new model (P(1)) that P(0) closes, per metric, only where the
    new model beats S; elsewhere it says there is no gap. In a sampled report all three on the
    sub-gallery, where P(1) was measured."""
    s, p, n = decision.served_metrics, decision.proposed_metrics, decision.new_metrics
    alike = report.sub_gallery_cases if report is not None else {}
    if SERVED_CASE in alike:
        s, p = alike[SERVED_CASE], alike[Case.NEW_H_OLD]
    parts = []
    for label, metric in (("top-1", "top1"), ("mAP", "mAP")):
        low, high, got = getattr(s, metric), getattr(n, metric), getattr(p, metric)
        if high > low:
            parts.append(f"{label} {100 * (got - low) / (high - low):.1f} %")
        else:
            parts.append(
                f"{label}: the new model is no better than S ({high:.1f} against {low:.1f}),"
                " no gap to close"
            )
    where = " (on the sub-gallery)" if SERVED_CASE in alike else ""
    return (
        f"Gap closed by P(0), of S's gap to the full re-embedding P(1){where}: "
        + "; ".join(parts)
        + "."
    )


def _paper_gap_line(report: EvalReport) -> str:
    """The paper's gap closed by new/h(old) (old/old -> new/new), per metric where new/new is
    above old/old; elsewhere it says there is no gap (a share of a negative gap means nothing)."""
    # Measured where new/new was: a sampled report's sub-gallery.
    alike = report.sub_gallery_cases or report.cases
    lo, hi = alike.get(Case.OLD_OLD), alike.get(Case.NEW_NEW)
    g = report.gap_closed
    parts = []
    for label, metric in (("top-1", "top1"), ("mAP", "mAP")):
        if lo is None or hi is None or getattr(hi, metric) > getattr(lo, metric):
            parts.append(f"{label} {getattr(g, metric):.1f} %")
        else:
            parts.append(
                f"{label}: new/new ({getattr(hi, metric):.1f}) is not above old/old"
                f" ({getattr(lo, metric):.1f}), no gap to close"
            )
    sep = "; " if any("no gap" in p for p in parts) else ", "
    where = f" (on the sub-gallery of {report.sub_gallery} items)" if report.sub_gallery else ""
    return f"Gap closed by {Case.NEW_H_OLD}{where}: " + sep.join(parts) + "."


def decision_markdown(report: EvalReport, *, include_images: bool = True) -> str:
    """The upgrade decision as markdown: the headline (gates, one line), S and P in words, the S
    against P(0) table, the regressing classes, NFR along the backfilling curve, sigma against
    random order, the closed-form maps beside h, and the worst negative flips."""
    d = report.decision
    if d is None:
        return ""
    f, a, ci = d.flips, d.flips.all, d.flips.ci95
    verdict = "passes the gates" if d.passed else "is refused by the gates"
    lines = [
        f"### Upgrade decision for {report.version}: promotion {verdict}",
        "",
        decision_line(d),
        "",
        f"- **S** (served now): {d.served}.",
        f"- **P(f)** (proposed): {d.proposed}.",
        "",
        (
            f"| {_queries(report)} sampled queries against all {report.items} items | S | P(0)"
            " | P(0) − S (95 % CI) | P(1) † |"
            if report.sub_gallery
            else f"| {report.items} queries, leave-one-out | S | P(0) | P(0) − S (95 % CI) | P(1) |"
        ),
        "| --- | --- | --- | --- | --- |",
    ]
    s, p, n = d.served_metrics, d.proposed_metrics, d.new_metrics
    lines += [
        f"| top-1 | {s.top1:.1f} | {p.top1:.1f} | {_ci(ci['top1']) if ci else '–'} |"
        f" {n.top1:.1f} |",
        f"| mAP | {s.mAP:.1f} | {p.mAP:.1f} | {_ci(ci['mAP']) if ci else '–'} | {n.mAP:.1f} |",
        f"| NFR: right under S, wrong under P (%) | | {a.nfr:.2f} |"
        f" {_ci(ci['NFR']) if ci else '–'} | {d.nfr_curves['sigma'][-1]:.2f} |",
        f"| relative NFR: NFR / ((1 − err S) × err P) | | {_rel(a.relative_nfr)} | | |",
        f"| positive flips (%) | | {a.pfr:.2f} | | |",
        f"| queries whose AP drops by more than {f.ap_drop:g} (%) | | {a.ap_drop_share:.2f} | | |",
        "",
    ]
    if report.sub_gallery:
        lines += [
            f"† P(1), the NFR along the curve and the closed-form maps need every item"
            f" re-embedded: they are measured on the sub-gallery of the {report.sub_gallery}"
            f" sampled items (seed {report.query_seed}), leave-one-out among them.",
            "",
        ]
    lines += [_gap_line(d, report), ""]
    worst = f.regressing_classes(5)
    if worst:
        lines += [
            "Classes that regress most (P(0) against S):",
            "",
            "| class | queries | NFR (%) | relative NFR | top-1 S → P(0) | mAP S → P(0) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for c in worst:
            k = f.by_class[c]
            name = d.class_names[c] if 0 <= c < len(d.class_names) else str(c)
            lines.append(
                f"| {name} | {k.queries} | {k.nfr:.1f} | {_rel(k.relative_nfr)} |"
                f" {k.top1_served:.1f} → {k.top1_proposed:.1f} |"
                f" {k.map_served:.1f} → {k.map_proposed:.1f} |"
            )
        lines.append("")
    sigma, rand = report.backfill_curves.get("sigma"), report.backfill_curves.get("random")
    if sigma is not None and rand is not None:
        points = len(sigma.fractions)
        show = sorted({0, points // 4, points // 2, (3 * points) // 4, points - 1})
        lines += [
            "NFR along the backfilling curve (fraction f re-embedded, against S):",
            "",
            "| f | top-1, σ order | mAP, σ order | NFR (%), σ order | NFR (%), random order |",
            "| --- | --- | --- | --- | --- |",
        ]
        for i in show:
            lines.append(
                f"| {sigma.fractions[i]:.2f} | {sigma.top1[i]:.1f} | {sigma.mAP[i]:.1f} |"
                f" {d.nfr_curves['sigma'][i]:.2f} | {d.nfr_curves['random'][i]:.2f} |"
            )
        g = d.order_gain
        where = (
            f"at the planned fraction f = {g.fraction:.2f}"
            if g.planned
            else f"no partial backfill is planned; at f = {g.fraction:.2f}"
        )
        lines += [
            "",
            (
                f"σ order against random ({where}): {g.top1:+.2f} top-1, {g.mAP:+.2f} mAP,"
                f" {g.nfr:+.2f} NFR points; over the whole curve {g.area_top1:+.2f} top-1,"
                f" {g.area_mAP:+.2f} mAP area."
            ),
            "",
        ]
    if len(d.maps) > 1:
        lines += [
            "h against closed-form maps, on the same training features (f = 0, against S):",
            "",
            "| h | top-1 | mAP | NFR (%) | relative NFR | training (s) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for i, m in enumerate(d.maps):
            seconds = (
                "–"
                if m.train_seconds is None
                else f"{m.train_seconds:.2f}"
                if m.train_seconds < 10
                else f"{m.train_seconds:.0f}"
            )
            kind = f"{m.kind} (this version's h)" if i == 0 else m.kind
            lines.append(
                f"| {kind} | {m.top1:.1f} | {m.mAP:.1f} | {m.nfr:.2f} | {_rel(m.relative_nfr)} |"
                f" {seconds} |"
            )
        lines.append("")
    if d.worst_flips:
        lines.append("Worst negative flips, largest AP drop first:")
        if include_images and report.flips_png_base64:
            lines += [
                "",
                f"![worst negative flips](data:image/png;base64,{report.flips_png_base64})",
            ]
        else:
            lines += [""] + [
                f"- item {w.item_id} ({w.label}): S finds {w.served_item_id} ({w.served_label}),"
                f" P(0) finds {w.proposed_item_id} ({w.proposed_label}), AP {w.ap_change:+.2f}"
                for w in d.worst_flips
            ]
        lines.append("")
    return "\n".join(lines)


def decision_summary(report: EvalReport) -> list[str]:
    """The upgrade decision in three lines (for `make demo`): S against P(0) with NFR and
    relative NFR, and the gates' verdict; [] for a report without one."""
    d = report.decision
    if d is None:
        return []
    s, p, a = d.served_metrics, d.proposed_metrics, d.flips.all
    against = f"{d.served_version} (served)" if d.served_version else "the old model (served)"
    return [
        f"{report.version} against {against}: top-1 {s.top1:.1f} -> {p.top1:.1f}, mAP"
        f" {s.mAP:.1f} -> {p.mAP:.1f} at f = 0 ("
        + (
            f"{_queries(report)} sampled queries, {report.items} items)"
            if report.sub_gallery
            else f"{report.items} queries)"
        ),
        f"  negative flips: NFR {a.nfr:.2f} % ({a.negative_flips} queries), relative NFR"
        f" {_rel(a.relative_nfr)}; positive flips {a.pfr:.2f} %",
        f"  {decision_line(d)}",
    ]


def markdown_table(
    report: EvalReport, *, include_plot: bool = True, include_decision: bool = True
) -> str:
    """The report as markdown: the upgrade decision (unless `include_decision` is False), then
    the paper's cases, the backfilling areas and the costs; pictures when `include_plot`."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.backfill import ORDERS

    decision = decision_markdown(report, include_images=include_plot) if include_decision else ""
    scope = (
        f"{report.items} gallery items; {_queries(report)} sampled queries (seed"
        f" {report.query_seed}) against all of them, each query's own item left out"
        if report.sub_gallery
        else f"{report.items} gallery items, leave-one-out"
    )
    lines = ([decision, ""] if decision else []) + [
        (
            f"### Evaluation of {report.version}: {report.table} at LanceDB version"
            f" {report.table_version} ({scope})"
        ),
        "",
    ]
    if report.old_space:
        lines += [f'"old" is the stored space h maps from: {report.old_space}.', ""]
    sampled = bool(report.sub_gallery)
    lines += [
        "| case (query/gallery) | top-1 | top-5 | mAP | unseen-class mAP |"
        + (" mAP 95 % CI |" if sampled else ""),
        "| --- | --- | --- | --- | --- |" + (" --- |" if sampled else ""),
    ]
    for case in sorted(report.cases, key=lambda c: _CASE_RANK.get(c, 3)):
        m = report.cases[case]
        unseen = report.cases_unseen_classes.get(case)
        u = f"{unseen.mAP:.1f}" if unseen else "–"
        ci = report.cases_ci95.get(case, {}).get("mAP")
        mark = " †" if sampled and ci is None else ""
        row = f"| {case}{mark} | {m.top1:.1f} | {m.top5:.1f} | {m.mAP:.1f} | {u} |"
        lines.append(
            row + (f" {ci.low:.1f} – {ci.high:.1f} |" if ci else " – |" if sampled else "")
        )
    if sampled:
        lines += [
            "",
            f"† Needs every item re-embedded: on the sub-gallery of the {report.sub_gallery}"
            " sampled items, leave-one-out among them, as are the gap closed and the"
            " backfilling curve.",
        ]
    lines += [
        "",
        _paper_gap_line(report),
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


@dataclass(frozen=True)
class Served:
    """S, what users get now: its model version (None: the old model), its gallery vectors (a
    table at a LanceDB version, one column), their space, its query model (None: the old model,
    whose query of an item is the item's stored old embedding) and S in words."""

    version: str | None
    table: str
    table_version: int
    column: str  # old_embedding | embedding
    space_id: str
    model: Checkpoint | None
    words: str


def served_system(
    instance: dg.DagsterInstance | None,
    db,
    version: str,
    backfilled: BackfilledTable,
    gallery_store: GalleryStore,
) -> Served:
    """S for the report of `version`: the deployment serving now, unless that is `version` itself
    or nothing is served; then what the version's upgrade started from (its backfill's source:
    the old model on gallery_store, or the version deployed then on its table). Loading a
    version's query model needs `instance`."""
    serving = current(db)
    source = backfilled.source
    if serving is not None and serving.version != version:
        chained = source is not None and source.model_version == serving.version
        return Served(
            version=serving.version,
            table=serving.table,
            table_version=serving.table_version,
            column="embedding",
            space_id=serving.space_id,
            model=_query_model(instance, serving.version, serving.space_id, serving.table),
            words=(
                f"{serving.version}, served now: its new model's queries against {serving.table}"
                f" at LanceDB version {serving.table_version}"
                + (" (the space this chained upgrade maps from)" if chained else "")
            ),
        )
    itself = (
        f"; {version} itself is served now, so S is what it was upgraded from" if serving else ""
    )
    if source is None or source.table == storage.GALLERY_STORE:
        store_version = gallery_store.version if source is None else source.version
        return Served(
            version=None,
            table=storage.GALLERY_STORE,
            table_version=store_version,
            column="old_embedding",
            space_id=gallery_store.old_space_id,
            model=None,
            words=(
                f"the old model: its queries against gallery_store at LanceDB version"
                f" {store_version}" + (itself or " (no version promoted yet)")
            ),
        )
    return Served(
        version=source.model_version,
        table=source.table,
        table_version=source.version,
        column=source.column,
        space_id=source.space_id,
        model=_query_model(instance, source.model_version, source.space_id, source.table),
        words=(
            f"{source.model_version}: its new model's queries against {source.table} at LanceDB"
            f" version {source.version}, deployed when this upgrade began{itself}"
        ),
    )


def _query_model(instance, version: str | None, space_id: str, table: str) -> Checkpoint:
    if instance is None or version is None:
        raise ValueError(
            f"the report's served system is {table}: its query model ({version}) is needed"
        )
    model = load_recorded_checkpoint(instance, NEW_MODEL, version)
    if model.space_id != space_id:
        raise storage.SpaceMismatchError(
            f"{table} serves space {space_id}, but new_model[{version}] is now {model.space_id};"
            " promote a version again"
        )
    return model


def h_training_features(
    instance: dg.DagsterInstance,
    fct,
    dataset: DatasetRecord,
    h: Checkpoint,
    old_model: Checkpoint,
    side_info_model: Checkpoint,
    new_model: Checkpoint,
) -> Features:
    """The features h was trained on, computed again (the same models, seed and preset), for
    fitting the closed-form maps beside it: the space h maps from is the old model's or, for a
    chained h, the version it recorded (whose checkpoint must be the one h was trained on)."""
    recorded = h.recorded
    source = old_model
    if recorded.source_version:
        source = load_recorded_checkpoint(instance, NEW_MODEL, recorded.source_version)
    for what, model, sha in (
        ("the space h maps from", source, recorded.source_model_sha256),
        ("side_info_model", side_info_model, recorded.side_info_model_sha256),
        ("new_model", new_model, recorded.new_model_sha256),
    ):
        if sha and model.sha256 != sha:
            raise ValueError(
                f"transformation: trained on another checkpoint of {what} ({sha[:12]}, now"
                f" {model.sha256[:12]}); re-materialise it before comparing closed-form maps"
            )
    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    return features_once(
        data,
        dataset.fingerprint,
        source,
        side_info_model,
        new_model,
        fct.experiment(),
        fct.run(recorded.seed or 0),
    )


# One entry: the features of the last (dataset, models, preset, seed, device) asked for.
_FEATURES: dict[tuple, Features] = {}


def features_once(
    data,
    fingerprint: str,
    source: Checkpoint,
    side_info_model: Checkpoint,
    new_model: Checkpoint,
    exp,
    run,
) -> Features:
    """`fct_ml.pipeline.training_features` of the three checkpoints, kept for the next caller in
    this process with the same inputs: the transformation step and the report's closed-form maps
    ask for the same features, and in one process (`make demo`, the tests) the second gets them
    without a second pass over the training images (about half of h's step on the demo preset)."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml import pipeline

    key = (
        fingerprint,
        source.sha256,
        side_info_model.sha256,
        new_model.sha256,
        exp.feature_views,
        exp.encode_batch_size,
        exp.validation_fraction,
        run.seed,
        str(run.device),
    )
    if key not in _FEATURES:
        _FEATURES.clear()  # before computing: never two sets of features in memory
        _FEATURES[key] = pipeline.training_features(
            data, source.model, side_info_model.model, new_model.model, exp, run
        )
    return _FEATURES[key]


def _metrics(result) -> CaseMetrics:
    s = result.summary()
    return CaseMetrics(top1=100 * s["top1"], top5=100 * s["top5"], mAP=100 * s["mAP"])


def _interval(result) -> dict[str, Interval]:
    """Bootstrap intervals of a case's top-1 and mAP over its queries (those with a match), in
    percent: how far a sample of queries may put them from the whole gallery's."""
    # Deferred with torch (see evaluate_version).
    from fct_ml.flips import bootstrap_means

    keep = result.has_match.numpy()
    k1 = result.topk.index(1)
    return bootstrap_means(
        {
            "top1": 100.0 * result.hits[:, k1].numpy()[keep].astype(np.float64),
            "mAP": 100.0 * result.average_precision.numpy()[keep].astype(np.float64),
        }
    )


def _top1_items(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    own: np.ndarray,
    metric,
) -> list[int]:
    """The top-1 gallery row of each query, its own row own[i] left out, with `retrieve`'s tie
    rule: among items at the smallest distance a non-match ranks first."""
    from fct_ml.retrieval import pairwise_distance  # deferred with torch (see evaluate_version)

    dist = pairwise_distance(queries.float(), gallery.float(), metric).clamp_(min=0.0).numpy()
    out = []
    for i, row in enumerate(own):
        d = dist[i].copy()
        d[row] = np.inf
        candidates = np.flatnonzero(d == d.min())
        other = candidates[gallery_labels[candidates] != query_labels[i]]
        out.append(int(other[0] if len(other) else candidates[0]))
    return out


def flips_plot_png(
    images: Mapping[int, np.ndarray] | np.ndarray,
    rows: list[tuple[int, int, int]],
    names: list[tuple[str, str, str]],
) -> bytes:
    """One row per negative flip: the query image, S's top-1 (right), P's top-1 (wrong), each
    titled with its class. `images[row]` (C, H, W) uint8 for each gallery row named in `rows`
    (an (N, C, H, W) array or a dict); PNG bytes."""
    # Deferred: matplotlib (~0.6 s) only in the step that draws the picture.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display backend on a server

    fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2.0 * len(rows)), dpi=80, squeeze=False)
    titles = ("query: {}", "S top-1: {}", "P(0) top-1: {}")
    for r, (items, labels) in enumerate(zip(rows, names)):
        for c, (item, label) in enumerate(zip(items, labels)):
            # Right or wrong by the labels shown, so the picture never says more than it shows.
            verdict = "" if c == 0 else " (right)" if label == labels[0] else " (wrong)"
            image = images[item]
            ax = axes[r][c]
            if image.shape[0] == 1:
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(np.transpose(image, (1, 2, 0)))
            ax.set_title(titles[c].format(label) + verdict, fontsize=8)
            ax.axis("off")
    fig.suptitle("worst negative flips: right under S, wrong under P(0)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


@dataclass
class _Columns:
    """Columns of some items, in the order of their ids: vectors (n, D) float32, other columns
    as numpy arrays or (binary) lists; `nulls[c]`: how many of the items have no value of c."""

    values: dict[str, Any]
    nulls: dict[str, int]


def _gather(db, name: str, version: int, ids: np.ndarray, columns: list[str]) -> _Columns:
    """`columns` of the items `ids` (sorted, unique) in table `name` at `version`, read a page at
    a time, so memory holds the result and one page, never the table (a million items' vectors
    are 512 MB, the table with its images several times that). Every id must be there."""
    table = storage.open_pinned(db, name, version)
    types = {c: table.schema.field(c).type for c in columns}
    values: dict[str, Any] = {}
    for c, kind in types.items():
        if pa.types.is_fixed_size_list(kind):
            values[c] = np.zeros((len(ids), kind.list_size), np.float32)
        elif pa.types.is_binary(kind) or pa.types.is_string(kind):
            values[c] = [None] * len(ids)
        else:
            values[c] = np.zeros(len(ids), kind.to_pandas_dtype())
    nulls = dict.fromkeys(columns, 0)
    found = np.zeros(len(ids), bool)
    if len(ids):
        for page in storage.pinned_pages(db, name, version, ["item_id", *columns], PAGE_ROWS):
            have = page.column("item_id").to_numpy()
            pos = np.minimum(np.searchsorted(ids, have), len(ids) - 1)
            hit = ids[pos] == have
            if not hit.any():
                continue
            at = pos[hit]
            found[at] = True
            mask = pa.array(hit)
            for c in columns:
                column = page.column(c).filter(mask)
                nulls[c] += column.null_count
                if isinstance(values[c], list):
                    for i, v in zip(at, column.to_pylist()):
                        values[c][i] = v
                elif column.null_count:  # a missing vector stays zeros; nulls[c] counts it
                    valid = column.is_valid().to_numpy(zero_copy_only=False)
                    values[c][at[valid]] = storage.vectors(column.filter(column.is_valid()))
                elif pa.types.is_fixed_size_list(column.type):
                    values[c][at] = storage.vectors(column)
                else:
                    values[c][at] = column.to_numpy(zero_copy_only=False)
    if not found.all():
        raise ValueError(f"{name}: item {int(ids[~found][0])} of the evaluated table is missing")
    return _Columns(values, nulls)


def _by_id(db, name: str, version: int, ids: list[int], columns: list[str]) -> dict:
    """{item_id: {column: value}} for a handful of items (a filter, not a scan of the table)."""
    table = storage.open_pinned(db, name, version)
    rows = (
        table.search()
        .where(f"item_id IN ({', '.join(str(int(i)) for i in ids)})")
        .select(["item_id", *columns])
        .limit(len(ids))
        .to_list()
        if ids
        else []
    )
    return {int(r["item_id"]): r for r in rows}


def _evaluated_items(db, backfilled: BackfilledTable, pinned: int, store_version: int):
    """(item ids sorted, their `source` in the version's table): the items of the version's table
    whose label is known (an ingested item may come without one) and that have a vector in the
    space h maps from (an item ingested after a later promotion has none: the backfill embedded
    it from its image, and the cases of h cannot include it)."""
    table = _read(db, backfilled.table, pinned, ["item_id", "label", "source"])
    table = table.filter(pc.greater_equal(table.column("label"), 0))
    source = backfilled.source
    if source is None or source.table == storage.GALLERY_STORE:
        unmapped = (
            storage.open_pinned(db, storage.GALLERY_STORE, store_version)
            .search()
            .where("old_embedding IS NULL")
            .select(["item_id"])
            .limit(None)
            .to_arrow()
            .column("item_id")
            .combine_chunks()
        )
    else:
        everyone = _read(db, storage.GALLERY_STORE, store_version, ["item_id"]).column("item_id")
        held = _read(db, source.table, source.version, ["item_id"]).column("item_id")
        unmapped = everyone.filter(pc.invert(pc.is_in(everyone, held.combine_chunks())))
        unmapped = unmapped.combine_chunks()
    table = table.filter(pc.invert(pc.is_in(table.column("item_id"), value_set=unmapped)))
    return (
        table.column("item_id").to_numpy(),
        table.column("source").to_numpy(zero_copy_only=False),
    )


def query_rows(items: int, query_sample: int | None) -> np.ndarray:
    """The evaluated items (positions 0..items-1 in item-id order) that query: all of them up to
    `query_sample` (None: no limit), above it a seeded sample of `query_sample`, sorted."""
    if query_sample is None or items <= query_sample:
        return np.arange(items)
    rng = np.random.default_rng(QUERY_SEED)
    return np.sort(rng.choice(items, size=query_sample, replace=False))


def evaluate_version(
    fct,
    dataset: DatasetRecord,
    gallery_store: GalleryStore,
    backfilled: BackfilledTable,
    h: Checkpoint,
    new_model: Checkpoint,
    table_version: int | None = None,
    *,
    instance: dg.DagsterInstance | None = None,
    served: Served | None = None,
    features: Features | None = None,
    gates: Gates | None = None,
    query_sample: int | None = QUERY_SAMPLE,
) -> EvalReport:
    """Metrics of one version in percent: cases, unseen-class split, backfilling curves, and the
    upgrade decision (S against P(f) per query, the gates' verdicts, the worst negative flips).

    `table_version`: the LanceDB version of the version's table to evaluate (the deployed,
    pinned one); None: the one the latest backfilled_gallery materialisation published.
    `served`: S; None: `served_system`'s (`instance` loads S's query model when S is a model
    version).
    `features`: h's training features (`h_training_features`), to fit the closed-form maps
    beside h; None: none fitted. `gates`: the thresholds (default: fct_assets.upgrade.gates').
    `query_sample`: the most items that query (`query_rows`; None: every item). A gallery of
    more items is evaluated by that many seeded queries against all of them, exactly: S, P(0)
    and the cases old/old, new/h(old) and the version's table. What needs every item
    re-embedded (new/new, P(1), new/old, the backfilling curves, the closed-form maps and the
    gap closed) runs on the sub-gallery of the sampled items, leave-one-out among them; the
    report says so and its size. Nothing is quadratic in the gallery: queries x gallery."""
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.augment import to_float
    from fct_ml.backfill import apply_transformation, backfill_study
    from fct_ml.evaluation import evaluate_cases, gap_closed
    from fct_ml.flips import flips, query_outcomes
    from fct_ml.retrieval import retrieve
    from fct_ml.training import encode

    gates = gates or Gates(max_nfr=DEFAULT_MAX_NFR, map_tolerance=DEFAULT_MAP_TOLERANCE)
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
    version = backfilled.table.removeprefix("gallery_")
    source = backfilled.source
    from_store = source is None or source.table == storage.GALLERY_STORE
    store_version = (
        gallery_store.version if source is None else db.open_table(storage.GALLERY_STORE).version
    )
    # The evaluation set, with their images and side-info from the store of record. (An item
    # the store does not hold is refused below, naming it.)
    ids, sources = _evaluated_items(db, backfilled, pinned, store_version)
    served = served or served_system(instance, db, version, backfilled, gallery_store)
    s_from_store = served.table == storage.GALLERY_STORE
    rows = query_rows(len(ids), query_sample)
    sampled = len(rows) < len(ids)

    # Every evaluated item's label and vectors (the whole gallery), in item-id order.
    store = _gather(
        db,
        storage.GALLERY_STORE,
        store_version,
        ids,
        ["label"] + (["old_embedding"] if from_store or s_from_store else []),
    )
    if from_store:
        # The space the items were stored in: the old model's.
        stored_all, stored_nulls = store.values["old_embedding"], store.nulls["old_embedding"]
    else:
        # A chained upgrade: the items were stored in the deployed version's space, in its table.
        found = _gather(db, source.table, source.version, ids, ["embedding"])
        stored_all, stored_nulls = found.values["embedding"], found.nulls["embedding"]
    if stored_nulls:
        raise ValueError(
            f"{backfilled.table}: {stored_nulls} evaluated items have no vector in the space"
            " h maps from"
        )
    labels_all = store.values["label"].astype(np.int64)
    table_all = _gather(db, backfilled.table, pinned, ids, ["embedding"]).values["embedding"]

    # The (sub-)gallery: every item, or the sampled queries' own items.
    sub = _gather(db, storage.GALLERY_STORE, store_version, ids[rows], ["image", "side_info"])
    labels = torch.from_numpy(labels_all[rows])
    old = torch.from_numpy(stored_all[rows])
    side = torch.from_numpy(sub.values["side_info"])
    channels = new_model.model.config.in_channels
    # The evaluation re-embeds its (sub-)gallery from the stored images anyway: timed, it is the
    # measured cost of the full re-embedding that the transformation avoids (`fct estimate`).
    started = time.perf_counter()
    images_np = np.stack([storage.decode_png(b, channels) for b in sub.values["image"]])
    images = torch.from_numpy(images_np)
    new = encode(
        new_model.model.to(device), [images], transform=to_float
    )  # (n, new_dim): queries and the full re-embedding
    reembed_seconds = time.perf_counter() - started
    transformed, sigma = apply_transformation(h.model.to(device), old, side)
    if sigma is None:  # a plain or closed-form h: no sigma order
        sigma = torch.zeros(len(transformed))
    table_vectors = torch.from_numpy(table_all[rows])
    unseen = ~torch.isin(labels, torch.tensor(dataset.old_classes, dtype=labels.dtype))
    table_case = f"new/{backfilled.table}"
    cases = {
        Case.OLD_OLD: (old, old),
        Case.NEW_NEW: (new, new),
        Case.NEW_H_OLD: (new, transformed),
        table_case: (new, table_vectors),  # the version's table as published
        Case.NEW_OLD: (new, old),
    }
    result = evaluate_cases(
        cases, labels, unseen_mask=unseen, metric=exp.metric, chunk_size=exp.eval_chunk_size
    )
    backfill, per_point = backfill_study(
        new,
        labels,
        transformed,
        sigma,
        exp.backfill_points,
        generator=torch.Generator().manual_seed(0),
        metric=exp.metric,
    )
    png = curve_plot_png(backfill.curves, f"backfilling curve, {version}")

    # S: its gallery vectors and its queries, over the same evaluated items.
    if s_from_store:
        if store.nulls["old_embedding"]:
            raise ValueError(
                f"gallery_store: {store.nulls['old_embedding']} evaluated items have no old"
                " embedding, so the old model cannot be what serves them"
            )
        s_all = store.values["old_embedding"]
    elif not from_store and (served.table, served.table_version) == (source.table, source.version):
        s_all = stored_all
    else:
        s_all = _gather(db, served.table, served.table_version, ids, [served.column]).values[
            served.column
        ]
    s_gallery = torch.from_numpy(s_all[rows])
    s_query = (
        s_gallery
        if served.model is None
        else encode(served.model.model.to(device), [images], transform=to_float)
    )
    search = {"leave_one_out": True, "metric": exp.metric, "chunk_size": exp.eval_chunk_size}
    s_result = retrieve(s_query, labels, s_gallery, labels, **search)
    p0_result = per_point["sigma"][0]  # f = 0: every order's gallery is h of the stored vectors
    labels_np = labels.numpy()
    outcomes = query_outcomes(s_result, p0_result, labels_np)
    nfr_curves = {
        order: tuple(
            flips(query_outcomes(s_result, r, labels_np), resamples=0).all.nfr
            for r in per_point[order]
        )
        for order in ("random", "sigma")
    }
    sub_counts = flips(outcomes, resamples=0).all if sampled else None
    h_kind = h.recorded.kind or "mlp"
    if features is not None:
        closed_form = _closed_form_maps(
            features, old, side, new, labels, s_result, bool(h.model.config.side_info), search
        )
    else:
        closed_form = []
    case_metrics = dict(result.cases)
    unseen_metrics = dict(result.unseen_classes)
    seen_metrics = dict(result.seen_classes)
    intervals: dict[str, dict[str, Interval]] = {}
    position = {int(r): i for i, r in enumerate(rows)}

    def image_of(wanted: list[int]) -> dict[int, np.ndarray]:
        """{gallery row: its image}: the (sub-)gallery's decoded ones, the store's for others."""
        out = {r: images_np[position[r]] for r in wanted if r in position}
        rest = [int(ids[r]) for r in wanted if r not in position]
        found = _by_id(db, storage.GALLERY_STORE, store_version, rest, ["image"])
        for r in wanted:
            if r not in out:
                out[r] = storage.decode_png(found[int(ids[r])]["image"], channels)
        return out

    if not sampled:
        s_served, p0, at_zero = s_result, p0_result, flips(outcomes)
        worst, flips_png = _worst_flips(
            outcomes,
            s_query,
            s_gallery,
            new,
            transformed,
            labels_np,
            labels_np,
            rows,
            image_of,
            ids,
            dataset,
            exp.metric,
        )
    else:
        # The sampled queries against the whole gallery, each query's own item left out.
        whole = {
            "exclude": torch.from_numpy(rows),
            "metric": exp.metric,
            "chunk_size": exp.eval_chunk_size,
        }
        labels_t = torch.from_numpy(labels_all)
        s_gallery_all = torch.from_numpy(s_all)
        s_served = retrieve(s_query, labels, s_gallery_all, labels_t, **whole)
        # P(0)'s gallery: the table's rows where they are h of the stored vectors (what the
        # backfill published: no second pass of h over the gallery), h where the table holds
        # something else (re-embedded or ingested rows).
        other = np.flatnonzero(sources != "transformed")
        p0_all = table_all
        if len(other):
            side_other = _gather(
                db, storage.GALLERY_STORE, store_version, ids[other], ["side_info"]
            )
            mapped, _ = apply_transformation(
                h.model.to(device),
                torch.from_numpy(stored_all[other]),
                torch.from_numpy(side_other.values["side_info"]),
            )
            p0_all = table_all.copy()
            p0_all[other] = mapped.numpy()
        p0_gallery_all = torch.from_numpy(p0_all)
        p0 = retrieve(new, labels, p0_gallery_all, labels_t, **whole)
        table_result = (
            p0
            if p0_all is table_all
            else retrieve(new, labels, torch.from_numpy(table_all), labels_t, **whole)
        )
        # old/old: S itself before any promotion (the stored old vectors as queries and gallery).
        old_result = (
            s_served
            if served.model is None and s_all is stored_all
            else retrieve(old, labels, torch.from_numpy(stored_all), labels_t, **whole)
        )
        for case, found in (
            (Case.OLD_OLD, old_result),
            (Case.NEW_H_OLD, p0),
            (table_case, table_result),
        ):
            case_metrics[case] = _metrics(found)
            intervals[case] = _interval(found)
            if bool(unseen.any()):
                unseen_metrics[case] = _percent(found.summary(unseen))
                seen_metrics[case] = _percent(found.summary(~unseen))
        whole_outcomes = query_outcomes(s_served, p0, labels_np)
        at_zero = flips(whole_outcomes)
        worst, flips_png = _worst_flips(
            whole_outcomes,
            s_query,
            s_gallery_all,
            new,
            p0_gallery_all,
            labels_np,
            labels_all,
            rows,
            image_of,
            ids,
            dataset,
            exp.metric,
        )
    maps = [
        MapResult(
            kind=h_kind,
            **_metrics(p0_result).as_dict(),
            nfr=(sub_counts or at_zero.all).nfr,
            relative_nfr=(sub_counts or at_zero.all).relative_nfr,
            train_seconds=h.recorded.train_seconds,
        ),
        *closed_form,
    ]
    decision = UpgradeDecision(
        served=served.words,
        served_version=served.version,
        proposed=(
            f"{version}'s new model against {backfilled.table}, a fraction f of the gallery"
            f" re-embedded in sigma order; P(0) is h ({h_kind}) of the stored vectors"
        ),
        served_metrics=_metrics(s_served),
        proposed_metrics=_metrics(p0),
        new_metrics=result.cases[Case.NEW_NEW],
        flips=at_zero,
        nfr_curves=nfr_curves,
        order_gain=_order_gain(backfill, nfr_curves, backfilled.reembed_fraction),
        maps=tuple(maps),
        class_names=tuple(dataset.class_names),
        gates=gates,
        verdicts=(),
        worst_flips=worst,
    )
    decision = decision.model_copy(update={"verdicts": gate_verdicts(decision, gates)})
    sub_cases = {**result.cases, SERVED_CASE: _metrics(s_result)} if sampled else {}
    return EvalReport(
        version=version,
        items=len(ids),
        cases=case_metrics,
        cases_unseen_classes=unseen_metrics,
        cases_seen_classes=seen_metrics,
        # Like with like: where new/new ran on the sub-gallery, so do old/old and new/h(old).
        gap_closed=gap_closed(result.cases),
        backfill_curves=backfill.curves,
        backfill_auc=backfill.areas,
        reembedded=int(np.count_nonzero(sources == "re-embedded")),
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
        decision=decision,
        flips_png_base64=base64.b64encode(flips_png).decode() if flips_png else "",
        queries=len(rows),
        query_seed=QUERY_SEED if sampled else None,
        sub_gallery=len(rows) if sampled else None,
        sub_gallery_cases=sub_cases,
        cases_ci95=intervals,
    )


def _percent(summary: dict[str, float]) -> CaseMetrics:
    return CaseMetrics(
        top1=100 * summary["top1"], top5=100 * summary["top5"], mAP=100 * summary["mAP"]
    )


def _closed_form_maps(
    features: Features,
    old: torch.Tensor,
    side: torch.Tensor,
    new: torch.Tensor,
    labels: torch.Tensor,
    s_result,
    side_info: bool,
    search: dict[str, Any],
) -> list[MapResult]:
    """Each closed-form map fitted on h's training features (timed), applied to the stored
    vectors, scored at f = 0 against S."""
    # Deferred with torch (see evaluate_version).
    from fct_ml.backfill import apply_transformation
    from fct_ml.closed_form import KINDS, fit_closed_form
    from fct_ml.flips import flips, query_outcomes
    from fct_ml.retrieval import retrieve

    out = []
    for kind in KINDS:
        started = time.perf_counter()
        h = fit_closed_form(
            kind, features.old, features.side_info, features.new, side_info_used=side_info
        )
        seconds = time.perf_counter() - started
        mapped, _ = apply_transformation(h, old, side)
        r = retrieve(new, labels, mapped, labels, **search)
        counts = flips(query_outcomes(s_result, r, labels.numpy()), resamples=0).all
        out.append(
            MapResult(
                kind=kind,
                **_metrics(r).as_dict(),
                nfr=counts.nfr,
                relative_nfr=counts.relative_nfr,
                train_seconds=seconds,
            )
        )
    return out


def _worst_flips(
    outcomes,
    s_query: torch.Tensor,
    s_gallery: torch.Tensor,
    new: torch.Tensor,
    transformed: torch.Tensor,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    own: np.ndarray,
    image_of,
    ids: np.ndarray,
    dataset: DatasetRecord,
    metric,
) -> tuple[tuple[WorstFlip, ...], bytes]:
    """The worst negative flips of P(0) against S (largest AP drop first), with each side's
    top-1 item, and their picture (b"" when no query flipped). Queries are rows of `s_query`
    and `new` whose own gallery rows are `own`; gallery rows are positions in `ids` (item ids);
    `image_of(rows)` -> {gallery row: (C, H, W) uint8}."""
    from fct_ml.flips import worst_negative_flips  # deferred with torch (see evaluate_version)

    queries = outcomes.query[worst_negative_flips(outcomes, WORST_FLIPS)]
    if len(queries) == 0:
        return (), b""
    q_labels = query_labels[queries]
    mine = own[queries]
    s_top = _top1_items(s_query[queries], s_gallery, q_labels, gallery_labels, mine, metric)
    p_top = _top1_items(new[queries], transformed, q_labels, gallery_labels, mine, metric)
    change = dict(zip(outcomes.query.tolist(), outcomes.ap_change.tolist()))

    def name(row: int) -> str:
        label = int(gallery_labels[row])
        return dataset.class_names[label] if 0 <= label < len(dataset.class_names) else str(label)

    triples = [(int(m), s, p) for m, s, p in zip(mine, s_top, p_top)]
    worst = tuple(
        WorstFlip(
            item_id=int(ids[m]),
            label=name(m),
            served_item_id=int(ids[s]),
            served_label=name(s),
            proposed_item_id=int(ids[p]),
            proposed_label=name(p),
            ap_change=float(change[q]),
        )
        for q, (m, s, p) in zip(queries.tolist(), triples)
    )
    png = flips_plot_png(
        image_of(sorted({r for t in triples for r in t})),
        triples,
        [(w.label, w.served_label, w.proposed_label) for w in worst],
    )
    return worst, png


def _order_gain(backfill, nfr_curves: dict[str, tuple[float, ...]], planned: float) -> OrderGain:
    """sigma minus random at the planned re-embed fraction (at COMPARE_AT when none is planned),
    each curve read by linear interpolation between its points, and over the whole curve."""
    sigma, rand = backfill.curves["sigma"], backfill.curves["random"]
    partial = 0.0 < planned < 1.0
    f = planned if partial else COMPARE_AT

    def at(values) -> float:
        return float(np.interp(f, sigma.fractions, values))

    return OrderGain(
        fraction=f,
        planned=partial,
        top1=at(sigma.top1) - at(rand.top1),
        mAP=at(sigma.mAP) - at(rand.mAP),
        nfr=at(nfr_curves["sigma"]) - at(nfr_curves["random"]),
        area_top1=backfill.areas["sigma"].top1 - backfill.areas["random"].top1,
        area_mAP=backfill.areas["sigma"].mAP - backfill.areas["random"].mAP,
    )


def rounded(value: Any) -> Any:
    """`value` (JSON-like) with every float rounded to what it means: two decimals, or three
    significant digits below 1 (fractions, seconds, relative NFR), so metadata shows 77.21,
    0.0476 and 1.13, not 14 digits."""
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return value
        if abs(value) >= 1:
            return round(value, 2)
        return round(value, 2 - int(math.floor(math.log10(abs(value)))))
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def write_flips_png(report: EvalReport, path) -> bool:
    """Write the report's picture of the worst negative flips to `path` (a local file); False
    when it has none (no query flipped)."""
    if not report.flips_png_base64:
        return False
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(base64.b64decode(report.flips_png_base64))
    return True


def report_metadata(report: EvalReport, code_version: str) -> dict[str, Any]:
    """The eval report's materialisation metadata: the markdown (decision first, with both
    pictures), the record as JSON without the pictures and rounded, the headline numbers and
    the gates' verdict in one line."""
    meta: dict[str, Any] = {
        "report": dg.MetadataValue.md(markdown_table(report)),
        "json": dg.MetadataValue.json(
            rounded(report.model_dump(exclude={"plot_png_base64", "flips_png_base64"}))
        ),
        **headline(report),
    }
    if report.decision is not None:
        meta["decision"] = dg.MetadataValue.text(decision_line(report.decision))
        meta["gates passed"] = report.decision.passed
    meta["code_version"] = code_version
    return meta


def recorded_report(instance: dg.DagsterInstance, version: str) -> EvalReport:
    """The latest eval report of `version` in full, pictures included: the record file its
    materialisation names (metadata "path"), read back as an EvalReport."""
    meta = recorded_metadata(instance, dg.AssetKey(EVAL_REPORT), check_version(version))
    path = meta.get("path")
    if not path:
        raise LookupError(f"eval_report[{version}]: its materialisation names no record file")
    return loads(store_path(str(path)).read_text(), str(path), EvalReport)


# `fct diff`'s name for the old model as SERVED.
OLD = "old"


def served_name(decision: UpgradeDecision) -> str:
    """S's model version, or "old" for the old model (what `fct diff` takes as SERVED)."""
    return decision.served_version or OLD


def diff(instance: dg.DagsterInstance, served: str, proposed: str) -> tuple[EvalReport, dict]:
    """`fct diff SERVED PROPOSED`: the upgrade decision of PROPOSED's latest eval report, whose S
    must be SERVED (a model version, or "old" for the old model); (the report as its metadata
    holds it, the decision as JSON: the metadata's numbers, rounded the same way). Refused with
    one line when the report compared against another S, or holds no decision."""
    report = recorded_record(
        instance, EvalReport, EVAL_REPORT, check_version(proposed), within="json"
    )
    if report.decision is None:
        raise LookupError(
            f"eval_report[{proposed}] holds no upgrade decision (written by an older fct);"
            " re-materialise it"
        )
    against = served_name(report.decision)
    if against != served:
        raise LookupError(
            f"eval_report[{proposed}] compares against {against} (served when it was evaluated),"
            f" not {served}: run `fct diff {against} {proposed}`, or re-materialise"
            f" eval_report[{proposed}] while {served} is served"
        )
    data = {
        "served": served,
        "proposed": proposed,
        "table": report.table,
        "table_version": report.table_version,
        "gates_passed": report.decision.passed,
        "verdict": decision_line(report.decision),
        "decision": rounded(report.decision.model_dump()),
    }
    return report, data


def format_diff(report: EvalReport, data: dict) -> str:
    """`fct diff`'s text: S and P in words, S against P(0), the verdicts, the regressing classes,
    the closed-form maps and the worst negative flips (the report's decision, without pictures)."""
    d = report.decision
    a, ci = d.flips.all, d.flips.ci95
    lines = [
        f"fct diff {data['served']} {data['proposed']}: "
        + (
            f"{_queries(report)} sampled queries against {report.items} items of"
            if report.sub_gallery
            else f"{report.items} queries of"
        )
        + f" {report.table} at LanceDB version {report.table_version}"
        + ("" if report.sub_gallery else ", leave-one-out"),
        f"  S     {d.served}",
        f"  P(f)  {d.proposed}",
        "",
        f"{'':<36}{'S':>8}{'P(0)':>8}   P(0) - S (95 % CI)",
        f"{'top-1 (%)':<36}{d.served_metrics.top1:>8.2f}{d.proposed_metrics.top1:>8.2f}"
        f"   {_ci(ci['top1']) if ci else '-'}",
        f"{'mAP (%)':<36}{d.served_metrics.mAP:>8.2f}{d.proposed_metrics.mAP:>8.2f}"
        f"   {_ci(ci['mAP']) if ci else '-'}",
        f"{'NFR (%)':<36}{'':>8}{a.nfr:>8.2f}   {_ci(ci['NFR']) if ci else '-'}",
        f"{'relative NFR':<36}{'':>8}{_rel(a.relative_nfr):>8}",
        f"{'positive flips (%)':<36}{'':>8}{a.pfr:>8.2f}",
        f"{f'AP drops by more than {d.flips.ap_drop:g} (%)':<36}{'':>8}{a.ap_drop_share:>8.2f}",
        "",
        data["verdict"],
    ]
    if len(d.maps) > 1:
        lines += ["", "h against closed-form maps (f = 0): top-1, mAP, NFR, training seconds"]
        lines += [
            f"  {m.kind:<12}{m.top1:>7.2f}{m.mAP:>7.2f}{m.nfr:>7.2f}"
            + ("" if m.train_seconds is None else f"{m.train_seconds:>9.2f}")
            for m in d.maps
        ]
    if d.worst_flips:
        lines += ["", "worst negative flips (query: S's top-1 -> P(0)'s top-1):"]
        lines += [
            f"  item {w.item_id} ({w.label}): {w.served_item_id} ({w.served_label}) ->"
            f" {w.proposed_item_id} ({w.proposed_label}), AP {w.ap_change:+.2f}"
            for w in d.worst_flips
        ]
    return "\n".join(lines)
