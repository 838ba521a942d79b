"""The blocking checks' rules, fast: pandera over a real LanceDB table in a temp folder, and the
great-expectations suite over small reports written out by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from fct_assets.base.checks import gallery_store_schema
from fct_assets.lib import storage
from fct_assets.lib.records import BackfilledTable, DatasetRecord, EvalReport, GalleryStore
from fct_assets.lib.resources import FctResource
from fct_assets.lib.table_checks import validate_table, vector_table_schema
from fct_assets.upgrade.checks import (
    backfilled_gallery_schema,
    eval_report_expectations,
    report_frame,
    run_report_suite,
)
from fct_ml.evaluation import CaseMetrics

SPACE = "new_model:v2@0123456789ab"
COLUMNS = ["item_id", "label", "embedding", "space_id"]


@pytest.fixture
def fct(tmp_path):
    return FctResource(lancedb_uri=str(tmp_path / "lancedb"), preset="tiny", device="cpu")


def _publish(fct, vectors, *, ids=None, labels=None, space=SPACE) -> int:
    n, dim = vectors.shape
    schema = storage.backfilled_schema(dim, space)
    batch = pa.record_batch(
        [
            pa.array(np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, np.int64)),
            pa.array(np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
            pa.array(np.zeros(n, np.float32)),
            pa.array(["transformed"] * n),
            pa.array([space] * n),
        ],
        schema=schema,
    )
    return storage.publish(fct.connect(), "gallery_v2", schema, [batch])["version"]


def _validate(fct, version, rows=3, dim=2, space=SPACE):
    schema = vector_table_schema(rows, {"embedding": dim}, {"space_id": space})
    return validate_table(fct, "gallery_v2", version, schema, COLUMNS)


def test_a_well_formed_table_passes(fct):
    version = _publish(fct, np.ones((3, 2), np.float32))
    result = _validate(fct, version)
    assert result.passed
    assert result.metadata["rows"].value == 3
    assert (
        result.metadata["table_version"].value
        == version
        == result.metadata["recorded_version"].value
    )
    assert "failed_checks" not in result.metadata


@pytest.mark.parametrize(
    "change, failure",
    [
        ({"ids": [0, 1, 1]}, "item_id: field_uniqueness"),
        ({"labels": [0, -2, 0]}, "label: greater_than_or_equal_to(-1)"),
        ({"rows": 4}, "rows == 4"),
        ({"dim": 3}, "embedding: dim == 3"),
        ({"space": "new_model:v9@000000000000"}, "space_id: isin(['new_model:v9@000000000000'])"),
    ],
)
def test_each_rule_fails_the_check_and_names_itself(fct, change, failure):
    table_args = {k: change[k] for k in ("ids", "labels") if k in change}
    version = _publish(fct, np.ones((3, 2), np.float32), **table_args)
    check_args = {k: change[k] for k in ("rows", "dim", "space") if k in change}
    result = _validate(fct, version, **check_args)
    assert not result.passed
    assert failure in result.metadata["failed_checks"].value
    assert result.metadata["num_failing_cases"].value >= 1


def _frame(**changes):
    # The frame validate_table hands pandera: what LanceDB's to_pandas gives for a sound table.
    import pandas as pd

    columns = {
        "item_id": np.arange(3, dtype=np.int64),
        "label": np.zeros(3, np.int32),
        "embedding": [np.ones(2, np.float32) for _ in range(3)],
        "space_id": [SPACE] * 3,
    }
    return pd.DataFrame({**columns, **changes})


def test_a_nan_vector_fails_as_not_finite():
    # LanceDB refuses NaN vectors on add, a faulty streaming writer does not
    # (tests/fct_assets/test_graph.py plants one): the rule, on the frame pandera receives.
    import pandera.errors

    schema = vector_table_schema(3, {"embedding": 2}, {"space_id": SPACE})
    frame = _frame(embedding=[np.array([1.0, np.nan]), np.ones(2), np.ones(2)])
    with pytest.raises(pandera.errors.SchemaErrors) as err:
        schema.validate(frame, lazy=True)
    assert set(err.value.failure_cases["check"]) == {"all finite"}
    assert list(err.value.failure_cases["index"]) == [0]


@pytest.mark.parametrize(
    "column, check",
    [
        ("item_id", "dtype('int64')"),
        ("label", "dtype('int32')"),
        ("embedding", "dtype('object')"),
        # pandera's str: pandas 3's default string dtype.
        ("space_id", "dtype('string[pyarrow]')"),
    ],
)
def test_a_column_of_another_dtype_fails_on_its_dtype_alone(column, check):
    # The values pass every other rule: the dtype is the only thing wrong, and named.
    import pandas as pd
    import pandera.errors

    other = {
        "item_id": np.arange(3, dtype=np.int32),
        "label": np.zeros(3, np.int64),
        # A pyarrow list column (to_pandas(types_mapper=pd.ArrowDtype)): each vector has the
        # right length and is finite, the column is not numpy objects.
        "embedding": pd.arrays.ArrowExtensionArray(
            pa.array([[1.0, 1.0]] * 3, pa.list_(pa.float32()))
        ),
        "space_id": pd.Categorical([SPACE] * 3),
    }
    schema = vector_table_schema(3, {"embedding": 2}, {"space_id": SPACE})
    schema.validate(_frame(), lazy=True)  # the sound frame passes
    with pytest.raises(pandera.errors.SchemaErrors) as err:
        schema.validate(_frame(**{column: other[column]}), lazy=True)
    cases = err.value.failure_cases
    assert list(zip(cases["column"], cases["check"])) == [(column, check)]


def test_the_schema_allows_columns_it_does_not_name():
    # The tables also carry images, norms, a source; only the named columns are judged.
    schema = vector_table_schema(3, {"embedding": 2}, {"space_id": SPACE})
    frame = _frame(image=[b"png"] * 3, norm=np.ones(3, np.float32))
    assert list(schema.validate(frame, lazy=True).columns) == list(frame.columns)


def test_a_write_after_the_materialisation_fails_the_check(fct):
    version = _publish(fct, np.ones((3, 2), np.float32))
    later = _publish(fct, np.ones((3, 2), np.float32))
    result = _validate(fct, version)
    assert not result.passed
    assert result.metadata["failed_checks"].value == (
        f"table changed after materialisation (recorded version {version}, found {later})"
    )


def _report(**maps) -> EvalReport:
    cases = {
        "old/old": CaseMetrics(top1=60.0, top5=80.0, mAP=40.0),
        "new/new": CaseMetrics(top1=80.0, top5=90.0, mAP=60.0),
        "new/h(old)": CaseMetrics(top1=70.0, top5=85.0, mAP=50.0),
        "new/old": CaseMetrics(top1=10.0, top5=40.0, mAP=11.0),
    }
    for case, metrics in maps.items():
        if metrics is None:
            del cases[case]
        else:
            cases[case] = dataclasses.replace(cases[case], **metrics)
    # model_construct: the suite must judge values the record's own validation would refuse.
    return EvalReport.model_construct(cases=cases)


def test_the_report_suite_passes_a_sound_report():
    passed, failing = run_report_suite(_report())
    assert passed and failing == []


@pytest.mark.parametrize(
    "change, expectation, column",
    [
        # new/h(old) below old/old on mAP: the gate.
        ({"new/h(old)": {"mAP": 39.9}}, "expect_column_values_to_be_between", "fct_minus_old_mAP"),
        ({"new/new": {"top5": 100.5}}, "expect_column_values_to_be_between", "value"),
        ({"new/old": {"mAP": -0.1}}, "expect_column_values_to_be_between", "value"),
        ({"new/new": {"top1": None}}, "expect_column_values_to_not_be_null", "value"),
        ({"new/new": None}, "expect_column_distinct_values_to_contain_set", "case"),
    ],
)
def test_the_report_suite_fails_and_names_the_broken_expectation(change, expectation, column):
    passed, failing = run_report_suite(_report(**change))
    assert not passed
    assert [(f["expectation"], f["kwargs"]["column"]) for f in failing] == [(expectation, column)]


def test_the_gate_allows_equal_map():
    assert run_report_suite(_report(**{"new/h(old)": {"mAP": 40.0}}))[0]


def test_metrics_of_0_and_100_are_in_range():
    # Both ends are possible: a case retrieving nothing right, a case retrieving everything.
    report = _report(**{"new/old": {"top1": 0.0, "mAP": 0.0}, "new/new": {"top5": 100.0}})
    assert run_report_suite(report) == (True, [])


def test_the_report_suite_draws_no_progress_bars(capfd):
    # The check runs inside Dagster steps: GX's tqdm bars would fill the run's stderr log.
    assert run_report_suite(_report())[0]
    assert "Calculating Metrics" not in capfd.readouterr().err


def test_the_report_suite_ignores_a_gx_project_in_the_working_directory(tmp_path, monkeypatch):
    # The suite lives in an ephemeral context: a GX project where the check happens to run is
    # neither read nor written (with it, the second run would find the first's data source).
    import great_expectations as gx

    gx.get_context(mode="file", project_root_dir=tmp_path)
    monkeypatch.chdir(tmp_path)

    def files():
        return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = files()
    assert run_report_suite(_report()) == (True, [])
    assert run_report_suite(_report()) == (True, [])
    assert files() == before


def test_failing_cases_are_listed_up_to_twenty_and_counted_in_full(fct):
    # 25 rows with a label below -1: 25 failing cases, the first 20 kept in the metadata.
    version = _publish(fct, np.ones((25, 2), np.float32), labels=[-3] * 25)
    result = _validate(fct, version, rows=25)
    assert not result.passed
    assert result.metadata["num_failing_cases"].value == 25
    cases = result.metadata["failing_cases"].value
    assert len(cases) == 20
    assert {c["column"] for c in cases} == {"label"} and cases[0]["failure_case"] == "-3"
    assert result.metadata["failed_checks"].value == "label: greater_than_or_equal_to(-1)"
    assert result.metadata["rows"].value == 25


def test_two_broken_rules_are_both_named_sorted(fct):
    version = _publish(fct, np.ones((3, 2), np.float32), ids=[0, 0, 1])
    later = _publish(fct, np.ones((3, 2), np.float32), ids=[0, 0, 1])
    result = _validate(fct, version, dim=3)
    assert result.metadata["failed_checks"].value == (
        "embedding: dim == 3; item_id: field_uniqueness; table changed after materialisation"
        f" (recorded version {version}, found {later})"
    )
    assert result.metadata["table_version"].value == later


# ---------------------------------------------------------------- the asset checks, invoked


def _backfilled(version: int, **changes) -> BackfilledTable:
    # model_construct: only the fields the check reads matter here.
    fields = dict(table="gallery_v2", version=version, space_id=SPACE, dim=2, gallery_rows=3)
    return BackfilledTable.model_construct(**{**fields, **changes})


@pytest.mark.parametrize(
    "change, failure",
    [
        ({}, None),
        ({"dim": 4}, "embedding: dim == 4"),
        ({"gallery_rows": 2}, "rows == 2"),
        (
            {"space_id": "new_model:v3@0123456789ab"},
            "space_id: isin(['new_model:v3@0123456789ab'])",
        ),
    ],
)
def test_the_backfilled_gallery_check_reads_its_record(fct, change, failure):
    version = _publish(fct, np.ones((3, 2), np.float32))
    result = backfilled_gallery_schema(fct=fct, backfilled_gallery=_backfilled(version, **change))
    assert result.passed == (failure is None)
    assert result.metadata["table"].value == "gallery_v2"
    assert result.metadata["recorded_version"].value == version
    if failure:
        assert result.metadata["failed_checks"].value == failure


def _store(fct, rows: int = 3, *, old_dim: int = 2, side_dim: int = 3) -> int:
    schema = storage.gallery_store_schema(old_dim, side_dim, "old@1", "side@1")
    batch = pa.record_batch(
        [
            pa.array(np.arange(rows, dtype=np.int64)),
            pa.array(np.arange(rows, dtype=np.int32)),
            pa.array([b"png"] * rows),
            pa.FixedSizeListArray.from_arrays(
                pa.array(np.ones(rows * old_dim, np.float32)), old_dim
            ),
            pa.FixedSizeListArray.from_arrays(
                pa.array(np.ones(rows * side_dim, np.float32)), side_dim
            ),
            pa.array(["old@1"] * rows),
            pa.array(["side@1"] * rows),
        ],
        schema=schema,
    )
    return storage.publish(fct.connect(), storage.GALLERY_STORE, schema, [batch])["version"]


@pytest.mark.parametrize(
    "change, failure",
    [
        ({}, None),
        ({"old_dim": 3}, "old_embedding: dim == 3"),
        ({"side_info_dim": 2}, "side_info: dim == 2"),
        ({"old_space_id": "old@2"}, "old_space_id: isin(['old@2'])"),
        ({"side_info_space_id": "side@2"}, "side_info_space_id: isin(['side@2'])"),
        ({"gallery_items": 4}, "rows == 4"),
    ],
)
def test_the_gallery_store_check_reads_the_dataset_and_store_records(fct, change, failure):
    change = dict(change)  # a copy: popping from the parametrized dict would change a rerun
    version = _store(fct)
    store = dict(table=storage.GALLERY_STORE, version=version, rows=3, old_dim=2)
    store |= dict(side_info_dim=3, old_space_id="old@1", side_info_space_id="side@1")
    dataset = DatasetRecord.model_construct(gallery_items=change.pop("gallery_items", 3))
    result = gallery_store_schema(
        fct=fct,
        dataset=dataset,
        gallery_store=GalleryStore.model_construct(**{**store, **change}),
    )
    assert result.passed == (failure is None)
    assert result.metadata["table"].value == storage.GALLERY_STORE
    if failure:
        assert result.metadata["failed_checks"].value == failure


def test_the_report_check_names_the_table_version_it_judged():
    report = _report().model_copy(update={"table_version": 7})
    result = eval_report_expectations(report)
    assert result.passed
    meta = {k: v.value for k, v in result.metadata.items()}
    assert meta["table_version"] == 7 and meta["num_failing"] == 0
    assert meta["failing_expectations"] == []
    assert (meta["new/h(old) mAP"], meta["old/old mAP"]) == (50.0, 40.0)
    failed = eval_report_expectations(
        _report(**{"new/h(old)": {"mAP": 30.0}}).model_copy(update={"table_version": 7})
    )
    assert not failed.passed and failed.metadata["num_failing"].value == 1
    (failing,) = failed.metadata["failing_expectations"].value
    assert failing["kwargs"] == {"column": "fct_minus_old_mAP", "min_value": 0}
    assert failing["unexpected"] == [-10.0] * 12  # one row per (case, metric): 4 cases x 3


@pytest.mark.parametrize("case", ["old/old", "new/h(old)"])
def test_the_report_suite_needs_each_of_the_papers_cases(case):
    # Without it the gate's column is NaN: the suite names the missing case (no KeyError).
    passed, failing = run_report_suite(_report(**{case: None}))
    assert not passed
    assert [(f["expectation"], f["kwargs"]) for f in failing] == [
        ("expect_column_distinct_values_to_contain_set", {"column": "case", "value_set": [case]})
    ]


@dataclasses.dataclass(frozen=True)
class _MoreMetrics(CaseMetrics):
    """Metrics with one the suite does not know (as a later fct might write)."""

    top10: float = 95.0


def test_the_report_suite_refuses_an_unknown_metric():
    report = _report()
    new = report.cases["new/new"]
    report.cases["new/new"] = _MoreMetrics(top1=new.top1, top5=new.top5, mAP=new.mAP)
    passed, failing = run_report_suite(report)
    assert not passed
    assert [(f["expectation"], f["unexpected"]) for f in failing] == [
        ("expect_column_values_to_be_in_set", ["top10"])
    ]
    assert failing[0]["kwargs"] == {"column": "metric", "value_set": ["top1", "top5", "mAP"]}


def test_the_report_frame_has_one_row_per_case_and_metric():
    frame = report_frame(_report())
    assert list(frame.columns) == ["case", "metric", "value"]
    assert len(frame) == 12
    row = frame[(frame.case == "new/old") & (frame.metric == "mAP")]
    assert row["value"].tolist() == [11.0]
