"""Typed records: every record type round-trips through its JSON form; a stale, unknown or
foreign record is refused with one line naming the file."""

from __future__ import annotations

import json

import pydantic
import pytest

from fct_assets.lib import records
from fct_assets.lib.records import RecordError
from fct_ml.evaluation import BackfillCurve, Case, CaseMetrics, CurveArea, GapClosed
from fct_ml.flips import FlipCounts, Flips, Interval

SHARD = records.ShardRange(index=1, count=2, start=5, stop=10)
QUERY_MODEL = records.QueryModel(
    path="s3://fct-bucket/fct/checkpoints/new_model/v2.safetensors",
    sha256="c" * 64,
    space_id="new_model:v2@cccccccccccc",
)
GATES = records.Gates(max_nfr=10.0, map_tolerance=1.0)
VERDICT = records.GateVerdict(gate="nfr", passed=True, line="NFR 2.00 % at f = 0 within ...")
MAP_RESULT = records.MapResult(
    kind="linear", top1=80.0, top5=90.0, mAP=70.0, nfr=3.0, relative_nfr=None, train_seconds=1.5
)
WORST = records.WorstFlip(
    item_id=7,
    label="shirt",
    served_item_id=9,
    served_label="shirt",
    proposed_item_id=3,
    proposed_label="coat",
    ap_change=-0.5,
)
GAIN = records.OrderGain(
    fraction=0.25, planned=False, top1=0.5, mAP=0.25, nfr=-0.5, area_top1=0.2, area_mAP=0.1
)
_COUNTS = FlipCounts(
    queries=4,
    right_served=2,
    right_proposed=3,
    negative_flips=1,
    positive_flips=2,
    ap_drops=1,
    top1_served=50.0,
    top1_proposed=75.0,
    map_served=50.0,
    map_proposed=60.0,
    nfr=25.0,
    pfr=50.0,
    relative_nfr=2.0,
    ap_drop_share=25.0,
)
DECISION = records.UpgradeDecision(
    served="the old model",
    served_version=None,
    proposed="v2's new model",
    served_metrics=CaseMetrics(top1=50.0, top5=90.0, mAP=50.0),
    proposed_metrics=CaseMetrics(top1=75.0, top5=95.0, mAP=60.0),
    new_metrics=CaseMetrics(top1=80.0, top5=95.0, mAP=65.0),
    flips=Flips(all=_COUNTS, by_class={3: _COUNTS}, ci95={"NFR": Interval(25.0, 0.0, 50.0)}),
    nfr_curves={"sigma": (25.0, 0.0)},
    order_gain=GAIN,
    maps=(MAP_RESULT,),
    class_names=("shirt", "coat", "bag", "boot"),
    gates=GATES,
    verdicts=(VERDICT,),
    worst_flips=(WORST,),
)
EXAMPLES = [
    records.DatasetRecord(
        spec="digits",
        name="digits",
        fingerprint="f" * 64,
        old_classes=(0, 1, 2, 3, 4),
        class_names=tuple(str(c) for c in range(10)),
        num_classes=10,
        channels=1,
        image_size=(8, 8),
        train_items=1257,
        gallery_items=540,
    ),
    records.GalleryStore(
        table="gallery_store",
        version=3,
        rows=540,
        old_space_id="old_model@aaaaaaaaaaaa",
        old_dim=16,
        side_info_space_id="side_info_model@bbbbbbbbbbbb",
        side_info_dim=16,
        old_model_sha256="a" * 64,
        side_info_model_sha256="b" * 64,
        dataset_fingerprint="f" * 64,
    ),
    SHARD,
    records.BackfillPlan(
        version="v2",
        gallery_store_version=3,
        rows=10,
        run_id="r" * 36,
        reembed_fraction=0.2,
        reembed_ids=(7, 2),
        rows_per_batch=4,
        ann_min_rows=None,
        shards=(records.ShardRange(index=0, count=2, start=0, stop=5), SHARD),
        plan_seconds=0.5,
        started_at=1.0e9,
    ),
    records.ShardResult(
        table="_staging_gallery_v2_rrrrrrrr_1of2",
        version=1,
        rows=5,
        index=1,
        reembedded=1,
        staged=True,
        space_id="new_model:v2@cccccccccccc",
        dim=16,
        seconds=0.25,
        pid=123,
        transformation_sha256="d" * 64,
        new_model_sha256="c" * 64,
    ),
    records.BackfilledTable(
        table="gallery_v2",
        version=2,
        rows=10,
        space_id="new_model:v2@cccccccccccc",
        dim=16,
        reembedded=2,
        reembed_fraction=0.2,
        shards=2,
        backfill_seconds=1.5,
        backfill_items_per_s=6.7,
        gallery_store_version=3,
        gallery_rows=10,
        ann_index="built",
        ann_params={"index_type": "IVF_PQ", "num_partitions": 2},
    ),
    records.VersionTable(
        version="v2", table="gallery_v2", table_version=2, space_id="new_model:v2@cccccccccccc"
    ),
    records.Deployment(
        version="v2",
        table="gallery_v2",
        table_version=2,
        space_id="new_model:v2@cccccccccccc",
        seq=1,
        action="promote",
        at="2026-11-30T02:00:00+00:00",
    ),
    records.EvalReport(
        version="v2",
        items=10,
        cases={"old/old": {"top1": 50.0, "top5": 90.0, "mAP": 40.0}},
        cases_unseen_classes={"old/old": None},
        cases_seen_classes={"old/old": {"top1": 60.0, "top5": 95.0, "mAP": 45.0}},
        gap_closed={"top1": 75.0, "mAP": 70.0},
        backfill_curves={
            "sigma": {"fractions": [0.0, 1.0], "top1": [50.0, 60.0], "mAP": [40.0, 50.0]}
        },
        backfill_auc={"sigma": {"top1": 55.0, "mAP": 45.0}},
        reembedded=0,
        table="gallery_v2",
        table_version=2,
        reembed_seconds=0.1,
        reembed_items_per_s=100.0,
        backfill_items_per_s=None,
        space_id="new_model:v2@cccccccccccc",
        plot_png_base64="iVBORw0KGgo=",
    ),
    records.SourceTable(
        table="gallery_v2",
        version=4,
        column="embedding",
        space_id="new_model:v2@cccccccccccc",
        model_version="v2",
        rows=1000,
    ),
    records.Quarantined(file="inbox/noise.png", reason="unreadable image (not an image)"),
    records.IngestBatch(
        batch="b20260101-000000-0123abcd",
        files=3,
        ingested=(11, 12),
        added_to_store=2,
        added_to_table=2,
        duplicates=0,
        quarantined=(records.Quarantined(file="inbox/noise.png", reason="empty file"),),
        deployed_version="v2",
        table="gallery_v2",
        space_id="new_model:v2@cccccccccccc",
        side_info_space_id="side_info_model@bbbbbbbbbbbb",
        store_version=3,
        table_version=5,
        deployment_seq=2,
        seconds=0.5,
        items_per_s=6.0,
    ),
    records.CheckpointMeta(
        path="/data/checkpoints/transformation/v3.safetensors",
        sha256="d" * 64,
        space_id="transformation:v3@dddddddddddd",
        old_space_id="old_model@aaaaaaaaaaaa",
        side_info_space_id="side_info_model@bbbbbbbbbbbb",
        new_space_id="new_model:v3@eeeeeeeeeeee",
        source_version="v2",
        source_space_id="new_model:v2@cccccccccccc",
        source_model_sha256="c" * 64,
    ),
    records.CheckResult(
        passed=True,
        why="passed",
        ran_after_latest_materialization=True,
        table_version=2,
        run_id="r" * 36,
    ),
    records.Hit(item_id=7, label=3, distance=0.25, source="re-embedded"),
    QUERY_MODEL,
    records.ServingContract(
        seq=3,
        action="rollback",
        version="v2",
        table="gallery_v2",
        table_uri="s3://fct-bucket/lancedb/gallery_v2.lance",
        table_version=2,
        space_id="new_model:v2@cccccccccccc",
        metric="l2",
        nprobes=32,
        refine_factor=10,
        image_channels=1,
        image_height=28,
        image_width=28,
        model=QUERY_MODEL,
        models=(QUERY_MODEL,),
    ),
    GATES,
    VERDICT,
    MAP_RESULT,
    WORST,
    GAIN,
    DECISION,
]


def test_every_record_type_has_an_example():
    assert {type(r).__name__ for r in EXAMPLES} == set(records.RECORDS)


@pytest.mark.parametrize("record", EXAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip(record):
    text = records.dumps(record)
    data = json.loads(text)
    # Flat: the fields at the top level (a reader of the file sees them), plus the header.
    kind = type(record)
    assert data[records.TYPE_KEY] == kind.__name__ and data[records.SCHEMA_KEY] == kind.SCHEMA
    assert records.loads(text, "x.json") == record
    assert records.loads(text, "x.json", type(record)) == record


def test_records_are_frozen_and_closed():
    with pytest.raises(pydantic.ValidationError):
        SHARD.start = 0
    with pytest.raises(pydantic.ValidationError):
        records.ShardRange(index=0, count=1, start=0, stop=1, extra=2)


def _edited(record, **changes) -> str:
    data = json.loads(records.dumps(record))
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # A field renamed by a later fct: the old name is unknown, the new one missing.
        ({"rows": None, "row_count": 10}, "stale or invalid BackfilledTable record (rows: Field"),
        ({"dim": None}, "stale or invalid BackfilledTable record (dim: Field required)"),
        ({"dim": "wide"}, "stale or invalid BackfilledTable record (dim: Input should be"),
        ({records.SCHEMA_KEY: 0}, "stale BackfilledTable record (schema 0, this fct reads 1)"),
        ({records.TYPE_KEY: "GalleryV1"}, "unknown record type 'GalleryV1'"),
        ({records.TYPE_KEY: None}, "not an fct record"),
    ],
)
def test_stale_or_unknown_record_is_refused_with_one_line(changes, expected):
    text = _edited(EXAMPLES[5], **changes)
    with pytest.raises(RecordError) as err:
        records.loads(text, "records/backfilled_gallery/v2.json")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("records/backfilled_gallery/v2.json: ")
    assert expected in message


def test_record_of_another_type_is_refused():
    with pytest.raises(RecordError, match="x.json: holds a ShardRange, expected a BackfillPlan"):
        records.loads(records.dumps(SHARD), "x.json", records.BackfillPlan)
    with pytest.raises(RecordError, match="x.json: not JSON"):
        records.loads("{", "x.json")
    with pytest.raises(RecordError, match="expected an fct record, got a dict"):
        records.dumps({"rows": 1})


def test_from_metadata_takes_the_record_fields_and_ignores_the_rest():
    table = EXAMPLES[5]
    metadata = {**table.model_dump(), "dagster/row_count": 10, "code_version": "x"}
    assert records.from_metadata(records.BackfilledTable, metadata, "m") == table
    del metadata["space_id"]
    with pytest.raises(RecordError, match=r"^m: metadata is not a BackfilledTable \(space_id"):
        records.from_metadata(records.BackfilledTable, metadata, "m")


EVAL = EXAMPLES[8]


def _report(**changes) -> records.EvalReport:
    return EVAL.model_copy(update=changes)


def test_the_eval_report_is_typed_and_its_json_keeps_the_keys():
    report = records.loads(records.dumps(EVAL), "x.json", records.EvalReport)
    assert report.cases["old/old"] == CaseMetrics(top1=50.0, top5=90.0, mAP=40.0)
    assert report.cases_unseen_classes["old/old"] is None
    assert report.gap_closed == GapClosed(top1=75.0, mAP=70.0)
    assert report.backfill_curves["sigma"] == BackfillCurve(
        fractions=(0.0, 1.0), top1=(50.0, 60.0), mAP=(40.0, 50.0)
    )
    assert report.backfill_auc["sigma"] == CurveArea(top1=55.0, mAP=45.0)
    # The file (and the metadata "json" entry users and the UI read) has the same shape as the
    # dicts the report held before its metrics were typed; schema 2 added the decision, 3 the
    # query sample (queries, query_seed, sub_gallery, sub_gallery_cases, cases_ci95).
    data = json.loads(records.dumps(report))
    assert data[records.SCHEMA_KEY] == 3
    assert data["cases"] == {"old/old": {"top1": 50.0, "top5": 90.0, "mAP": 40.0}}
    assert data["cases_seen_classes"] == {"old/old": {"top1": 60.0, "top5": 95.0, "mAP": 45.0}}
    assert data["gap_closed"] == {"top1": 75.0, "mAP": 70.0}
    assert data["backfill_curves"] == {
        "sigma": {"fractions": [0.0, 1.0], "top1": [50.0, 60.0], "mAP": [40.0, 50.0]}
    }
    assert data["backfill_auc"] == {"sigma": {"top1": 55.0, "mAP": 45.0}}
    assert report.model_dump()["cases"] == data["cases"]


def test_an_eval_report_whose_curve_lacks_a_metric_is_refused():
    data = json.loads(records.dumps(EVAL))
    del data["backfill_curves"]["sigma"]["top1"]
    with pytest.raises(RecordError, match="stale or invalid EvalReport record"):
        records.loads(json.dumps(data), "x.json")


def test_an_eval_report_with_an_unknown_metric_is_refused():
    data = json.loads(records.dumps(EVAL))
    data["cases"]["old/old"]["top10"] = 99.0
    with pytest.raises(RecordError, match="stale or invalid EvalReport record"):
        records.loads(json.dumps(data), "x.json")


def test_headline_by_hand():
    report = _report(
        cases={
            Case.OLD_OLD: CaseMetrics(top1=50.0, top5=90.0, mAP=40.0),
            Case.NEW_NEW: CaseMetrics(top1=80.0, top5=95.0, mAP=70.0),
            Case.NEW_H_OLD: CaseMetrics(top1=71.0, top5=93.0, mAP=61.0),
        },
        gap_closed=GapClosed(top1=70.0, mAP=70.0),
        decision=DECISION,
    )
    assert records.headline(report) == {
        "new/h(old) top1": 71.0,
        "new/h(old) mAP": 61.0,
        "old/old mAP": 40.0,
        "new/new mAP": 70.0,
        "gap closed mAP (%)": 70.0,
        "NFR at f=0 (%)": 25.0,
        "relative NFR at f=0": 2.0,
    }
    assert tuple(records.headline(report)) == records.HEADLINE
    # No gap (new/new not above old/old): no share of it; no decision: no NFR. Rounded.
    worse = _report(
        cases={
            Case.OLD_OLD: CaseMetrics(top1=50.0, top5=90.0, mAP=79.1),
            Case.NEW_NEW: CaseMetrics(top1=80.0, top5=95.0, mAP=77.7),
            Case.NEW_H_OLD: CaseMetrics(top1=71.123456, top5=93.0, mAP=79.5),
        },
        gap_closed=GapClosed(top1=70.0, mAP=122.4),
    )
    assert records.headline(worse) == {
        "new/h(old) top1": 71.12,
        "new/h(old) mAP": 79.5,
        "old/old mAP": 79.1,
        "new/new mAP": 77.7,
    }


def test_checkpoint_meta_from_a_transformations_metadata():
    # What model_output and the checkpoint IO manager record, with keys the record leaves out.
    metadata = {
        "path": "/data/checkpoints/transformation/v3.safetensors",
        "sha256": "d" * 64,
        "space_id": "transformation:v3@dddddddddddd",
        "content_digest": "9" * 64,
        "code_version": "abc123",
        "run_id": "r" * 36,
        "epochs": 3,
        "final_loss": 0.25,
        "side_info": True,
        "source_version": "",
        "old_space_id": "old_model@aaaaaaaaaaaa",
    }
    meta = records.from_metadata(records.CheckpointMeta, metadata, "transformation[v3]")
    assert (meta.sha256, meta.code_version, meta.old_space_id) == (
        "d" * 64,
        "abc123",
        "old_model@aaaaaaaaaaaa",
    )
    # Not recorded: empty; a source_version of "" is the old model.
    assert meta.source_space_id == "" and meta.source_version == ""
    assert records.CheckpointMeta() == records.Checkpoint(None, "", "").recorded
