"""evaluate_version, fast: a twelve-item gallery in a real LanceDB folder, untrained tiny models
(the numbers only have to be recomputed, not good), every case checked by brute force."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_assets.lib import storage
from fct_assets.lib.records import (
    BackfilledTable,
    Checkpoint,
    DatasetRecord,
    EvalReport,
    GalleryStore,
)
from fct_assets.lib.resources import FctResource
from fct_assets.upgrade.report import Served, evaluate_version, markdown_table
from fct_ml.augment import to_float
from fct_ml.backfill import apply_transformation
from fct_ml.evaluation import BackfillCurve
from fct_ml.models import ModelConfig, build_model
from fct_ml.training import encode
from fct_ml.transformation import Transformation, TransformationConfig
from tests.reference import brute_force_per_query, brute_force_retrieval

SPACE = "new_model:vt@0123456789ab"
N = 12


@pytest.fixture
def gallery(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    fct = FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")
    db = fct.connect()
    images = rng.integers(0, 256, (N, 1, 16, 16), dtype=np.uint8)
    labels = np.arange(N) % 3
    old = rng.normal(size=(N, 4)).astype(np.float32)
    side = rng.normal(size=(N, 4)).astype(np.float32)
    schema = storage.gallery_store_schema(4, 4, "old@1", "side@1")
    store = storage.publish(
        db,
        storage.GALLERY_STORE,
        schema,
        [
            pa.record_batch(
                [
                    pa.array(np.arange(N, dtype=np.int64)),
                    pa.array(labels.astype(np.int32)),
                    pa.array([storage.encode_png(i) for i in images], pa.binary()),
                    pa.FixedSizeListArray.from_arrays(pa.array(old.reshape(-1)), 4),
                    pa.FixedSizeListArray.from_arrays(pa.array(side.reshape(-1)), 4),
                    pa.array(["old@1"] * N),
                    pa.array(["side@1"] * N),
                ],
                schema=schema,
            )
        ],
    )
    new_model = build_model(ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3))
    new_model.eval()
    with torch.no_grad():  # weights drawn wide: at init, all items embed within float32 rounding
        for p in new_model.parameters():
            p.normal_(0.0, 0.3)
    h = Transformation(
        TransformationConfig(
            old_dim=4, side_info_dim=4, new_dim=4, branch_width=8, inner_width=8, uncertainty=True
        )
    ).eval()
    transformed, sigma = apply_transformation(h, torch.from_numpy(old), torch.from_numpy(side))
    # The queries as the report embeds them (the decoded PNGs through the new model).
    new = encode(new_model, [torch.from_numpy(images)], transform=to_float).numpy()

    def publish_table(vectors, source):
        batch = pa.record_batch(
            [
                pa.array(np.arange(N, dtype=np.int64)),
                pa.array(labels.astype(np.int32)),
                pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), 4),
                pa.array(sigma.numpy().astype(np.float32)),
                pa.array([source] * N),
                pa.array([SPACE] * N),
            ],
            schema=storage.backfilled_schema(4, SPACE),
        )
        return storage.publish(db, "gallery_vt", storage.backfilled_schema(4, SPACE), [batch])

    table = publish_table(transformed.numpy(), "transformed")
    return {
        "fct": fct,
        "store": store,
        "table": table,
        "republish": publish_table,
        "h": h,
        "new_model": new_model,
        "space": SPACE,
        "labels": labels,
        "old": old,
        "new": new,
        "transformed": transformed.numpy(),
        "images": images,
    }


def _evaluate(g, table_version=None, served=None, query_sample=10_000, **backfilled):
    record = BackfilledTable(
        table="gallery_vt",
        version=g["table"]["version"],
        rows=N,
        space_id=SPACE,
        dim=4,
        reembedded=0,
        reembed_fraction=0.0,
        shards=1,
        backfill_seconds=0.012,
        backfill_items_per_s=1000.0,
        gallery_store_version=g["store"]["version"],
        gallery_rows=N,
        ann_index="none",
    ).model_copy(update=backfilled)
    dataset = DatasetRecord(
        spec="synthetic",
        name="synthetic",
        fingerprint="0" * 64,
        old_classes=(0, 1),
        class_names=("a", "b", "c"),
        num_classes=3,
        channels=1,
        image_size=(16, 16),
        train_items=0,
        gallery_items=N,
    )
    store = GalleryStore(
        table=storage.GALLERY_STORE,
        version=g["store"]["version"],
        rows=N,
        old_space_id="old@1",
        old_dim=4,
        side_info_space_id="side@1",
        side_info_dim=4,
        old_model_sha256="0" * 64,
        side_info_model_sha256="0" * 64,
        dataset_fingerprint="0" * 64,
    )
    return evaluate_version(
        g["fct"],
        dataset,
        store,
        record,
        Checkpoint(model=g["h"], sha256="1" * 64, space_id="h@1"),
        Checkpoint(model=g["new_model"], sha256="2" * 64, space_id=g["space"]),
        table_version=table_version,
        served=served,
        query_sample=query_sample,
    ).model_dump()


def test_every_case_by_brute_force(gallery):
    g = gallery
    report = _evaluate(g)
    labels, old, new, h = g["labels"], g["old"], g["new"], g["transformed"]
    expected = {
        "old/old": brute_force_retrieval(old, old, labels),
        "new/new": brute_force_retrieval(new, new, labels),
        "new/h(old)": brute_force_retrieval(new, h, labels),
        "new/gallery_vt": brute_force_retrieval(new, h, labels),
        "new/old": brute_force_retrieval(new, old, labels),
    }
    assert set(report["cases"]) == set(expected)
    for case, metrics in expected.items():
        for metric, value in metrics.items():
            assert report["cases"][case][metric] == pytest.approx(value, abs=1e-3), (case, metric)
    # Unseen classes (label 2): the same rankings, queries of items 2, 5, 8, 11 only.
    unseen = labels == 2
    assert report["cases_unseen_classes"]["new/h(old)"]["mAP"] == pytest.approx(
        _map_of(new, h, labels, unseen), abs=1e-3
    )
    assert report["cases_seen_classes"]["new/h(old)"]["mAP"] == pytest.approx(
        _map_of(new, h, labels, ~unseen), abs=1e-3
    )
    cases = report["cases"]
    lo, hi = cases["old/old"]["mAP"], cases["new/new"]["mAP"]
    assert hi != lo
    assert report["gap_closed"]["mAP"] == pytest.approx(
        100 * (cases["new/h(old)"]["mAP"] - lo) / (hi - lo)
    )
    assert (report["version"], report["items"], report["reembedded"]) == ("vt", N, 0)
    assert (report["table"], report["table_version"], report["space_id"]) == (
        "gallery_vt",
        g["table"]["version"],
        SPACE,
    )
    assert report["backfill_items_per_s"] == 1000.0
    assert report["reembed_items_per_s"] == pytest.approx(N / report["reembed_seconds"], rel=0.05)
    curves = report["backfill_curves"]
    assert set(curves) == set(report["backfill_auc"]) == {"random", "sigma", "true_error"}
    for order, curve in curves.items():
        assert len(curve["fractions"]) == g["fct"].experiment().backfill_points
        assert curve["top1"][-1] == pytest.approx(cases["new/new"]["top1"]), order
        assert report["backfill_auc"][order]["mAP"] == pytest.approx(np.mean(curve["mAP"]))
    # Before any promotion "old" is the old model's space, in the pinned store.
    assert report["old_space"] == (
        f"gallery_store at LanceDB version {g['store']['version']}, space old@1 (the old model)"
    )
    markdown = markdown_table(EvalReport.model_validate(report))
    # The upgrade decision comes first; the paper's cases follow under their own heading.
    assert markdown.splitlines()[0].startswith("### Upgrade decision for vt: promotion ")
    heading = next(line for line in markdown.splitlines() if line.startswith("### Evaluation"))
    assert heading == (
        f"### Evaluation of vt: gallery_vt at LanceDB version {g['table']['version']}"
        f" ({N} gallery items, leave-one-out)"
    )
    assert report["plot_png_base64"] and "![backfilling curve]" in markdown


def test_the_decision_before_any_promotion_is_old_old_against_new_h_old(gallery):
    g = gallery
    report = _evaluate(g)
    labels, old, new, h = g["labels"], g["old"], g["new"], g["transformed"]
    decision = report["decision"]
    # Nothing promoted: S is the old model on gallery_store, P(0) the version's h of it.
    assert decision["served_version"] is None
    assert decision["served"].startswith("the old model: its queries against gallery_store")
    assert decision["served_metrics"] == pytest.approx(report["cases"]["old/old"], abs=1e-3)
    assert decision["proposed_metrics"] == pytest.approx(report["cases"]["new/h(old)"], abs=1e-3)
    s_right, s_ap = brute_force_per_query(old, old, labels)
    p_right, p_ap = brute_force_per_query(new, h, labels)
    counts = decision["flips"]["all"]
    negative = s_right & ~p_right
    assert counts["negative_flips"] == int(negative.sum())
    assert counts["nfr"] == pytest.approx(100 * negative.mean())
    assert counts["ap_drops"] == int((p_ap - s_ap < -0.1).sum())
    for c in range(3):
        in_class = labels == c
        assert decision["flips"]["by_class"][c]["negative_flips"] == int(negative[in_class].sum())
    # f = 0 on the curve is P(0) itself; the last point is the full re-embedding P(1).
    assert decision["nfr_curves"]["sigma"][0] == pytest.approx(counts["nfr"])
    s_new_right, _ = brute_force_per_query(new, new, labels)
    assert decision["nfr_curves"]["sigma"][-1] == pytest.approx(
        100 * (s_right & ~s_new_right).mean()
    )
    # Each of the worst flips: S's top-1 has the query's class, P(0)'s another.
    for w in decision["worst_flips"]:
        assert w["served_label"] == w["label"] != w["proposed_label"]
        assert w["ap_change"] <= 0
    assert len(decision["worst_flips"]) == min(6, int(negative.sum()))
    # The gates under the default thresholds, and the headline says the same.
    nfr_ok = counts["nfr"] <= 10.0
    map_ok = decision["proposed_metrics"]["mAP"] >= decision["served_metrics"]["mAP"] - 1.0
    assert [v["passed"] for v in decision["verdicts"]] == [nfr_ok, map_ok]
    markdown = markdown_table(EvalReport.model_validate(report), include_plot=False)
    verdict = "passes the gates" if nfr_ok and map_ok else "is refused by the gates"
    assert markdown.splitlines()[0] == f"### Upgrade decision for vt: promotion {verdict}"
    assert markdown.splitlines()[2].startswith(
        "Promotion passes the gates:" if nfr_ok and map_ok else "Promotion is refused:"
    )


def _map_of(query, gallery, labels, mask) -> float:
    aps = []
    for i in np.flatnonzero(mask):
        keep = np.arange(len(labels)) != i
        d = ((gallery[keep].astype(np.float64) - query[i]) ** 2).sum(1)
        match = labels[keep] == labels[i]
        ranked = match[np.lexsort((match, d))]
        ranks = np.flatnonzero(ranked) + 1
        aps.append((np.arange(1, len(ranks) + 1) / ranks).mean())
    return 100 * float(np.mean(aps))


def test_the_pinned_table_version_is_read_not_the_latest(gallery):
    g = gallery
    first = g["table"]["version"]
    latest = g["republish"](g["new"], "re-embedded")["version"]
    # The record names the latest version; the deployment pins the first.
    pinned = _evaluate(g, table_version=first, version=latest)
    assert (pinned["table_version"], pinned["reembedded"]) == (first, 0)
    newest = _evaluate(g, version=latest)
    assert (newest["table_version"], newest["reembedded"]) == (latest, N)
    assert newest["cases"]["new/gallery_vt"] == pytest.approx(newest["cases"]["new/new"])


def test_a_table_of_another_space_or_other_items_is_refused(gallery):
    g = gallery
    g["space"] = "new_model:vt@ffffffffffff"
    with pytest.raises(
        storage.SpaceMismatchError,
        match=rf"^gallery_vt at LanceDB version {g['table']['version']}: holds space {SPACE},",
    ):
        _evaluate(g)


def _backfilled_table(db, name, ids, labels, vectors, space, sources):
    schema = storage.backfilled_schema(vectors.shape[1], space)
    n = len(ids)
    batch = pa.record_batch(
        [
            pa.array(np.asarray(ids, np.int64)),
            pa.array(np.asarray(labels, np.int32)),
            pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]
            ),
            pa.array(np.zeros(n, np.float32)),
            pa.array(sources),
            pa.array([space] * n),
        ],
        schema=schema,
    )
    return storage.publish(db, name, schema, [batch])["version"]


def _v1_served(source) -> Served:
    """S when v1 serves: an untrained v1 model (seeded, wide weights) as its query model, its
    table at the source's version as its gallery."""
    model = build_model(ModelConfig(arch="cnn-xs", embed_dim=4, in_channels=1, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(9))
    return Served(
        version="v1",
        table="gallery_v1",
        table_version=source.version,
        column="embedding",
        space_id="new_model:v1@1",
        model=Checkpoint(model=model.eval(), sha256="3" * 64, space_id="new_model:v1@1"),
        words="v1, served now",
    )


def _deployed_v1(g, **source):
    """v1 deployed: the items stored in its space (table gallery_v1), with the SourceTable that
    names that table's version (and `source`'s other fields); (db, stored vectors, SourceTable)."""
    from fct_assets.lib.records import SourceTable

    db = g["fct"].connect()
    stored = np.random.default_rng(5).normal(size=(N, 4)).astype(np.float32)
    version = _backfilled_table(
        db, "gallery_v1", np.arange(N), g["labels"], stored, "new_model:v1@1", ["transformed"] * N
    )
    return (
        db,
        stored,
        SourceTable(
            table="gallery_v1",
            version=version,
            column="embedding",
            space_id="new_model:v1@1",
            **source,
        ),
    )


def test_a_chained_upgrade_is_evaluated_from_the_deployed_versions_vectors(gallery):
    # v1 was deployed: the items are stored in its space (its table), and h maps from there.
    g = gallery
    _, stored, source = _deployed_v1(g)
    # Since the first upgrade the living store got a new version (here: other side-info): a
    # chained upgrade reads its latest, not the version the gallery_store record named then.
    _republish_store(g, side_info=np.random.default_rng(6).normal(size=(N, 4)))
    # S is v1, served: v1's own query model against its table (not the old model's vectors).
    served = _v1_served(source)
    v1_model = served.model.model
    report = _evaluate(g, source=source, served=served)
    h_stored, _ = apply_transformation(g["h"], torch.from_numpy(stored), torch.from_numpy(_side(g)))
    labels, new = g["labels"], g["new"]
    expected = {
        "old/old": brute_force_retrieval(stored, stored, labels),
        "new/h(old)": brute_force_retrieval(new, h_stored.numpy(), labels),
        "new/old": brute_force_retrieval(new, stored, labels),
    }
    for case, metrics in expected.items():
        for metric, value in metrics.items():
            assert report["cases"][case][metric] == pytest.approx(value, abs=1e-3), (case, metric)
    # The report says what "old" stands for: the deployed version's table, pinned.
    assert report["old_space"] == (
        f"gallery_v1 at LanceDB version {source.version}, space new_model:v1@1"
    )
    markdown = markdown_table(EvalReport.model_validate(report), include_plot=False)
    assert f'"old" is the stored space h maps from: {report["old_space"]}.' in markdown.splitlines()
    # The served table is still the version's own (h of the *old* embeddings, as published).
    assert report["cases"]["new/gallery_vt"] == pytest.approx(
        brute_force_retrieval(new, g["transformed"], labels), abs=1e-3
    )
    # S is v1's queries against v1's stored vectors, and P(0) new against h of them; taking S
    # from the old model (old/old: the stored vectors as their own queries) would differ.
    v1_queries = encode(v1_model, [torch.from_numpy(g["images"])], transform=to_float).numpy()
    decision = report["decision"]
    assert decision["served_version"] == "v1"
    expected_s = brute_force_retrieval(v1_queries, stored, labels)
    for metric, value in expected_s.items():
        assert decision["served_metrics"][metric] == pytest.approx(value, abs=1e-3), metric
    assert decision["served_metrics"] != pytest.approx(report["cases"]["old/old"], abs=1e-3)
    s_right, _ = brute_force_per_query(v1_queries, stored, labels)
    p_right, _ = brute_force_per_query(new, h_stored.numpy(), labels)
    assert decision["flips"]["all"]["negative_flips"] == int((s_right & ~p_right).sum())
    assert decision["flips"]["all"]["positive_flips"] == int((~s_right & p_right).sum())


def test_items_without_a_label_are_left_out_and_missing_ones_refused(gallery):
    g = gallery
    db = g["fct"].connect()
    labels = g["labels"].copy()
    labels[[0, 4]] = -1  # two ingested items whose label is unknown
    version = _backfilled_table(
        db, "gallery_vt", np.arange(N), labels, g["transformed"], SPACE, ["transformed"] * N
    )
    report = _evaluate(g, version=version)
    keep = labels >= 0
    assert report["items"] == N - 2
    assert report["cases"]["new/new"] == pytest.approx(
        brute_force_retrieval(g["new"][keep], g["new"][keep], g["labels"][keep]), abs=1e-3
    )
    # A served item the store does not hold: refused, naming it.
    version = _backfilled_table(
        db,
        "gallery_vt",
        [*range(N - 1), 99],
        g["labels"],
        g["transformed"],
        SPACE,
        ["transformed"] * N,
    )
    with pytest.raises(ValueError, match=r"^gallery_store: item 99 of the evaluated table"):
        _evaluate(g, version=version)
    # One the store lacks within its range of ids (a gap, not past its last id): refused too.
    g["store"] = _republish_store(g, keep=np.arange(N) != 5)
    version = _backfilled_table(
        db, "gallery_vt", np.arange(N), g["labels"], g["transformed"], SPACE, ["transformed"] * N
    )
    with pytest.raises(ValueError, match=r"^gallery_store: item 5 of the evaluated table"):
        _evaluate(g, version=version)


def test_re_embedded_rows_are_counted(gallery):
    g = gallery
    db = g["fct"].connect()
    sources = ["re-embedded"] * 5 + ["transformed"] * (N - 5)
    mixed = np.concatenate([g["new"][:5], g["transformed"][5:]])
    version = _backfilled_table(db, "gallery_vt", np.arange(N), g["labels"], mixed, SPACE, sources)
    report = _evaluate(g, version=version)
    assert report["reembedded"] == 5
    assert report["cases"]["new/gallery_vt"] == pytest.approx(
        brute_force_retrieval(g["new"], mixed, g["labels"]), abs=1e-3
    )


def test_a_plain_h_has_no_sigma_order_to_follow(gallery):
    # An h without the sigma head: sigma counts as 0 for every item, so the sigma order is the
    # storage order (a stable sort of equal keys).
    g = gallery
    g["h"] = Transformation(
        TransformationConfig(old_dim=4, side_info_dim=4, new_dim=4, branch_width=8, inner_width=8)
    ).eval()
    report = _evaluate(g)
    from fct_ml.backfill import backfill_summary

    transformed, _ = apply_transformation(
        g["h"], torch.from_numpy(g["old"]), torch.from_numpy(_side(g))
    )
    curves = backfill_summary(
        torch.from_numpy(g["new"]),
        torch.from_numpy(g["labels"]),
        transformed,
        torch.zeros(N),
        g["fct"].experiment().backfill_points,
        generator=torch.Generator().manual_seed(0),
    ).curves
    for order in ("sigma", "random"):
        for metric in ("fractions", "top1", "mAP"):
            got = report["backfill_curves"][order][metric]
            assert got == pytest.approx(getattr(curves[order], metric)), (order, metric)


def _side(g) -> np.ndarray:
    db = g["fct"].connect()
    side = db.open_table(storage.GALLERY_STORE).to_arrow().sort_by("item_id").column("side_info")
    return storage.vectors(side)


def _report(**changes) -> EvalReport:
    fields = dict(
        version="v2",
        table="gallery_v2",
        table_version=3,
        items=10,
        cases={
            "old/old": {"top1": 50.0, "top5": 60.0, "mAP": 40.0},
            "new/h(old)": {"top1": 55.25, "top5": 70.0, "mAP": 45.04},
        },
        cases_unseen_classes={"new/h(old)": {"top1": 1.0, "top5": 2.0, "mAP": 33.36}},
        cases_seen_classes={},
        gap_closed={"top1": 12.34, "mAP": 56.78},
        backfill_curves={},
        backfill_auc={"sigma": {"top1": 61.23, "mAP": 47.89}, "other": {"top1": 1.0, "mAP": 2.0}},
        reembedded=0,
        reembed_seconds=1.0,
        reembed_items_per_s=40.0,
        backfill_items_per_s=1000.0,
        space_id="new_model:v2@cccccccccccc",
        plot_png_base64="UE5H",
    )
    return EvalReport(**{**fields, **changes})


def test_the_markdown_table_by_hand():
    assert markdown_table(_report()).splitlines() == [
        "### Evaluation of v2: gallery_v2 at LanceDB version 3 (10 gallery items, leave-one-out)",
        "",
        "| case (query/gallery) | top-1 | top-5 | mAP | unseen-class mAP |",
        "| --- | --- | --- | --- | --- |",
        "| old/old | 50.0 | 60.0 | 40.0 | – |",
        "| new/h(old) | 55.2 | 70.0 | 45.0 | 33.4 |",
        "",
        "Gap closed by new/h(old): top-1 12.3 %, mAP 56.8 %.",
        "",
        "| backfill order | area top-1 | area mAP |",
        "| --- | --- | --- |",
        "| sigma | 61.2 | 47.9 |",
        "| other | 1.0 | 2.0 |",
        "",
        "Cost on this run's device: backfill by transformation 1000 items/s (LanceDB read + h +"
        " write), full re-embedding 40 items/s (decode + new model), 25.0x.",
        "",
        "![backfilling curve](data:image/png;base64,UE5H)",
    ]
    # No backfill speed recorded: no cost line; no plot asked for: none.
    lines = markdown_table(_report(backfill_items_per_s=None), include_plot=False).splitlines()
    assert lines[-1] == "| other | 1.0 | 2.0 |"
    # What "old" stands for, when known: a paragraph of its own between heading and table.
    space = "gallery_v1 at LanceDB version 4, space s1"
    assert markdown_table(_report(old_space=space)).splitlines()[:5] == [
        "### Evaluation of v2: gallery_v2 at LanceDB version 3 (10 gallery items, leave-one-out)",
        "",
        f'"old" is the stored space h maps from: {space}.',
        "",
        "| case (query/gallery) | top-1 | top-5 | mAP | unseen-class mAP |",
    ]


def test_the_plot_is_a_png_of_the_figure_size():
    import io

    import matplotlib
    from PIL import Image

    from fct_assets.upgrade.report import curve_plot_png

    curves = {
        "sigma": BackfillCurve(fractions=(0.0, 0.5, 1.0), mAP=(1.0, 2.0, 3.0), top1=(1, 2, 3))
    }
    # A PNG whatever format a matplotlibrc makes the default: the markdown embeds image/png.
    with matplotlib.rc_context({"savefig.format": "svg"}):
        png = curve_plot_png(curves, "backfilling curve, v2")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (640, 256)  # 8 x 3.2 inches at 80 dpi


# Figures pyplot made while `_drawn_figures` is on: matplotlib's figure.hooks rcParam calls each
# hook named there ("module:function") on every new pyplot figure.
_FIGURES: list = []
_HOOK = {"figure.hooks": [f"{__name__}:_keep_figure"]}


def _keep_figure(fig) -> None:
    _FIGURES.append(fig)


def _drawn_figures():
    import matplotlib

    _FIGURES.clear()
    return matplotlib.rc_context(_HOOK)


def _plotted(fig) -> dict:
    """What a reader of the plot sees: title, panels left to right, their axis labels, lines
    (label, x, y) and legend entries."""
    return {
        "title": fig.get_suptitle(),
        "panels": [
            {
                "x": ax.get_xlabel(),
                "y": ax.get_ylabel(),
                "lines": [
                    (line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
                    for line in ax.get_lines()
                ],
                "legend": [t.get_text() for t in ax.get_legend().get_texts()]
                if ax.get_legend()
                else None,
            }
            for ax in sorted(fig.axes, key=lambda a: a.get_position().x0)
        ],
        # Side by side: one row of panels.
        "rows": len({round(ax.get_position().y0, 6) for ax in fig.axes}),
    }


def test_the_plot_draws_each_order_on_a_map_and_a_top1_panel():
    from fct_assets.upgrade.report import curve_plot_png

    curves = {
        "sigma": BackfillCurve(fractions=(0.0, 0.5, 1.0), mAP=(10.0, 20.0, 30.0), top1=(1, 2, 3)),
        "random": BackfillCurve(fractions=(0.0, 0.5, 1.0), mAP=(10.0, 15.0, 30.0), top1=(1, 4, 3)),
    }
    with _drawn_figures():
        curve_plot_png(curves, "backfilling curve, v2")
    (fig,) = _FIGURES
    x = "fraction of gallery re-embedded"
    assert _plotted(fig) == {
        "title": "backfilling curve, v2",
        "panels": [
            {
                "x": x,
                "y": "mAP (%)",
                "lines": [
                    ("sigma", [0.0, 0.5, 1.0], [10.0, 20.0, 30.0]),
                    ("random", [0.0, 0.5, 1.0], [10.0, 15.0, 30.0]),
                ],
                "legend": ["sigma", "random"],
            },
            {
                "x": x,
                "y": "top1 (%)",
                "lines": [
                    ("sigma", [0.0, 0.5, 1.0], [1, 2, 3]),
                    ("random", [0.0, 0.5, 1.0], [1, 4, 3]),
                ],
                "legend": None,
            },
        ],
        "rows": 1,
    }


def test_a_served_item_without_a_stored_vector_is_left_out(gallery):
    # A living store: an item ingested after a promotion has no old embedding; h cannot map it,
    # so the cases of h leave it out (its backfill embedded it from its image).
    g = gallery
    db = g["fct"].connect()
    store = db.open_table(storage.GALLERY_STORE).to_arrow().sort_by("item_id")
    schema = storage.gallery_store_schema(4, 4, "old@1", "side@1", living=True)
    old = store.column("old_embedding").to_pylist()
    old[3] = None
    rows = store.set_column(
        store.schema.get_field_index("old_embedding"),
        schema.field("old_embedding"),
        pa.array(old, schema.field("old_embedding").type),
    ).append_column(schema.field("ingest_batch"), pa.array([None] * N, pa.string()))
    g["store"] = storage.publish(db, storage.GALLERY_STORE, schema, rows.cast(schema).to_batches())
    assert _evaluate(g)["items"] == N - 1


def _republish_store(g, keep=None, **columns) -> dict:
    """A new version of gallery_store: its rows (those where `keep` is True) with the vector
    `columns` given replaced. The gallery_store record (g["store"]) still names the old one."""
    db = g["fct"].connect()
    schema = storage.gallery_store_schema(4, 4, "old@1", "side@1")
    rows = db.open_table(storage.GALLERY_STORE).to_arrow().sort_by("item_id").cast(schema)
    for name, values in columns.items():
        flat = pa.array(np.asarray(values, np.float32).reshape(-1))
        vectors = pa.FixedSizeListArray.from_arrays(flat, 4)
        rows = rows.set_column(schema.get_field_index(name), schema.field(name), vectors)
    if keep is not None:
        rows = rows.filter(pa.array(keep))
    return storage.publish(db, storage.GALLERY_STORE, schema, rows.to_batches())


def test_the_store_is_read_at_the_version_its_record_pins(gallery):
    # Before any promotion "old" is the old model's space in the gallery_store version that the
    # record names; a later version of the store (here: other old embeddings) is not read.
    g = gallery
    first = g["store"]["version"]
    other = np.random.default_rng(7).normal(size=(N, 4))
    assert _republish_store(g, old_embedding=other)["version"] != first
    report = _evaluate(g)
    old, labels = g["old"], g["labels"]
    assert report["cases"]["old/old"] == pytest.approx(
        brute_force_retrieval(old, old, labels), abs=1e-3
    )
    assert brute_force_retrieval(other, other, labels) != pytest.approx(
        brute_force_retrieval(old, old, labels), abs=1e-3
    )
    assert report["old_space"] == (
        f"gallery_store at LanceDB version {first}, space old@1 (the old model)"
    )


def test_a_chained_upgrade_names_the_deployed_model_version_and_leaves_out_missing_vectors(
    gallery,
):
    g = gallery
    db, stored, source = _deployed_v1(g, model_version="v1")
    report = _evaluate(g, source=source, served=_v1_served(source))
    assert report["old_space"] == (
        f"gallery_v1 at LanceDB version {source.version}, space new_model:v1@1 (model version v1,"
        " deployed when the upgrade began)"
    )
    # The deployed version's table lacks an item the store holds (ingested while another
    # version was served): h had nothing to map, the backfill embedded it from its image, and
    # the cases of h leave it out.
    short = _backfilled_table(
        db,
        "gallery_v1",
        np.arange(N - 1),
        g["labels"][:-1],
        stored[:-1],
        "new_model:v1@1",
        ["transformed"] * (N - 1),
    )
    moved = source.model_copy(update={"version": short})
    assert _evaluate(g, source=moved, served=_v1_served(moved))["items"] == N - 1


def _cosine(query, gallery, labels) -> dict[str, float]:
    """brute_force_retrieval by cosine distance: squared L2 between unit vectors, 2 - 2 cos,
    ranks the items as 1 - cos does."""

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return brute_force_retrieval(unit(query), unit(gallery), labels)


def test_the_experiments_metric_ranks_the_cases_and_the_curves(gallery, monkeypatch):
    import dataclasses

    from fct_assets.lib.resources import FctResource
    from fct_ml import presets

    # A preset like tiny but ranking by cosine distance (every built-in preset uses l2, the
    # default of evaluate_cases and backfill_summary).
    monkeypatch.setitem(
        presets.PRESETS,
        "tiny-cosine",
        lambda: dataclasses.replace(presets.preset("tiny"), metric="cosine"),
    )
    g = gallery
    g["fct"] = FctResource(lancedb_uri=g["fct"].lancedb_uri, preset="tiny-cosine", device="cpu")
    report = _evaluate(g)
    labels, old, new, h = g["labels"], g["old"], g["new"], g["transformed"]
    expected = {
        "old/old": _cosine(old, old, labels),
        "new/new": _cosine(new, new, labels),
        "new/h(old)": _cosine(new, h, labels),
        "new/old": _cosine(new, old, labels),
    }
    for case, metrics in expected.items():
        assert report["cases"][case] == pytest.approx(metrics, abs=1e-3), case
    # The curves start at new/h(old) and end at new/new, by cosine distance too.
    for order, curve in report["backfill_curves"].items():
        assert curve["mAP"][0] == pytest.approx(expected["new/h(old)"]["mAP"], abs=1e-3), order
        assert curve["mAP"][-1] == pytest.approx(expected["new/new"]["mAP"], abs=1e-3), order
    # By L2 these vectors rank otherwise: the metric is what makes these numbers.
    assert brute_force_retrieval(old, old, labels)["mAP"] != pytest.approx(
        expected["old/old"]["mAP"], abs=1e-3
    )
    assert brute_force_retrieval(new, h, labels)["mAP"] != pytest.approx(
        expected["new/h(old)"]["mAP"], abs=1e-3
    )


def test_the_report_plots_its_own_curves(gallery):
    g = gallery
    with _drawn_figures():
        report = _evaluate(g)
    (fig,) = _FIGURES
    plotted = _plotted(fig)
    assert plotted["title"] == "backfilling curve, vt"
    curves = report["backfill_curves"]
    for panel, metric in zip(plotted["panels"], ("mAP", "top1")):
        assert panel["lines"] == [
            (order, list(curve["fractions"]), pytest.approx(curve[metric]))
            for order, curve in curves.items()
        ]


def test_the_re_embedding_time_and_speed_are_rounded(gallery):
    # Seconds to the microsecond, items/s to a tenth. The speed's tenths digit is the clock's:
    # 0 in about one report of ten, so reports are drawn until one shows a nonzero tenth (after
    # at least three, each checked): ten zeros in a row would be a one-in-ten-billion draw.
    g = gallery
    tenths = False
    for drawn in range(1, 11):
        report = _evaluate(g)
        seconds, speed = report["reembed_seconds"], report["reembed_items_per_s"]
        assert seconds == round(seconds, 6) and speed == round(speed, 1), (seconds, speed)
        tenths = tenths or speed != round(speed)
        if tenths and drawn >= 3:
            break
    assert tenths, "ten re-embedding speeds, all whole numbers"
