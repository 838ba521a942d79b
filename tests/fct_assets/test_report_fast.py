"""evaluate_version, fast: a twelve-item gallery in a real LanceDB folder, untrained tiny models
(the numbers only have to be recomputed, not good), every case checked by brute force."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from fct_assets import storage
from fct_assets.records import (
    BackfilledTable,
    Checkpoint,
    DatasetRecord,
    EvalReport,
    GalleryStore,
)
from fct_assets.report import evaluate_version, markdown_table
from fct_assets.resources import FctResource
from fct_ml.augment import to_float
from fct_ml.backfill import apply_transformation
from fct_ml.models import ModelConfig, build_model
from fct_ml.training import encode
from fct_ml.transformation import Transformation, TransformationConfig
from tests.reference import brute_force_retrieval

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
    }


def _evaluate(g, table_version=None, **backfilled):
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
        Checkpoint(model=g["h"], sha256="1" * 64, space_id="h@1", recorded={}),
        Checkpoint(model=g["new_model"], sha256="2" * 64, space_id=g["space"], recorded={}),
        table_version=table_version,
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
    markdown = markdown_table(EvalReport.model_validate(report))
    heading = markdown.splitlines()[0]
    assert heading == (
        f"### Evaluation of vt: gallery_vt at LanceDB version {g['table']['version']}"
        f" ({N} gallery items, leave-one-out)"
    )
    assert report["plot_png_base64"] and "![backfilling curve]" in markdown


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
    pinned = _evaluate(g, table_version=first)
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
