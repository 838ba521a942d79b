"""Asset checks that guard publication: pandera schemas on every LanceDB table and a
great-expectations 1.x suite on the eval report. All blocking: a failure stops downstream
assets in the run and keeps the version from being promoted. Failing cases go into the
check's metadata."""

from typing import TYPE_CHECKING, Any

import dagster as dg
import numpy as np

from fct_assets import storage
from fct_assets.assets import backfilled_gallery, eval_report, gallery_store
from fct_assets.partitions import model_version
from fct_assets.records import BackfilledTable, DatasetRecord, EvalReport, GalleryStore
from fct_assets.resources import FctResource

if TYPE_CHECKING:
    import pandas as pd

MAX_FAILING_CASES = 20


def vector_table_schema(expected_rows: int, dims: dict[str, int], spaces: dict[str, str]):
    """A pandera schema: unique ids, the gallery's row count, vector dims, all finite, one space_id.

    `dims` are the dims the producing asset recorded (its models' outputs), not read from the
    table: a table rewritten with vectors of another width fails."""
    import pandera.pandas as pa

    columns: dict[str, Any] = {
        "item_id": pa.Column(np.int64, unique=True),
        # -1: an ingested item whose label is unknown (retrieval never reads labels).
        "label": pa.Column(np.int32, pa.Check.ge(-1)),
    }
    for name, dim in dims.items():
        columns[name] = pa.Column(
            object,
            [
                pa.Check(lambda s, d=dim: s.map(len) == d, name=f"dim == {dim}"),
                pa.Check(lambda s: s.map(lambda v: bool(np.isfinite(v).all())), name="all finite"),
            ],
        )
    for name, space in spaces.items():
        # No name=: pandera reports a built-in check by its own text, isin([...]), never its name.
        columns[name] = pa.Column(str, pa.Check.isin([space]))
    return pa.DataFrameSchema(
        columns,
        checks=[pa.Check(lambda df: len(df) == expected_rows, name=f"rows == {expected_rows}")],
        strict=False,
    )


def validate_table(
    fct: FctResource, table: str, recorded_version: int, schema, columns: list[str]
) -> dg.AssetCheckResult:
    """Run `schema` over the table as it is now; failing cases go into the metadata.

    The table must also still be at the version its asset recorded: a write after the
    materialisation (another writer, a hand edit) fails the check, so the version cannot be
    promoted before it is re-materialised.
    """
    import pandera.errors

    t = fct.connect().open_table(table)
    version = t.version
    frame = t.search().select(columns).limit(None).to_arrow().to_pandas()
    meta: dict[str, Any] = {
        "table": table,
        "table_version": version,
        "recorded_version": recorded_version,
        "rows": len(frame),
    }
    failures: list[str] = []
    try:
        schema.validate(frame, lazy=True)
    except pandera.errors.SchemaErrors as err:
        cases = err.failure_cases.head(MAX_FAILING_CASES)
        # A frame-wide rule (the row count) has no column: named by itself, not as "None: ...".
        failures = sorted(
            {
                f"{c}: {k}" if c is not None else str(k)
                for c, k in zip(err.failure_cases["column"], err.failure_cases["check"])
            }
        )
        meta["failing_cases"] = dg.MetadataValue.json(cases.astype(str).to_dict(orient="records"))
        meta["num_failing_cases"] = len(err.failure_cases)
    if version != recorded_version:
        failures.append(
            f"table changed after materialisation (recorded version {recorded_version}, found"
            f" {version})"
        )
    if failures:
        meta["failed_checks"] = "; ".join(map(str, failures))
    return dg.AssetCheckResult(passed=not failures, metadata=meta)


@dg.asset_check(
    asset=gallery_store,
    blocking=True,
    additional_ins={"dataset": dg.AssetIn("dataset")},
    description=(
        "pandera: ids unique, one row per gallery item, dims, finite, one space_id per column"
    ),
)
def gallery_store_schema(
    fct: FctResource, dataset: DatasetRecord, gallery_store: GalleryStore
) -> dg.AssetCheckResult:
    dims = {"old_embedding": gallery_store.old_dim, "side_info": gallery_store.side_info_dim}
    spaces = {
        "old_space_id": gallery_store.old_space_id,
        "side_info_space_id": gallery_store.side_info_space_id,
    }
    return validate_table(
        fct,
        storage.GALLERY_STORE,
        gallery_store.version,
        vector_table_schema(dataset.gallery_items, dims, spaces),
        ["item_id", "label", "old_embedding", "side_info", "old_space_id", "side_info_space_id"],
    )


@dg.asset_check(
    asset=backfilled_gallery,
    blocking=True,
    partitions_def=model_version,
    description=(
        "pandera: ids unique, one row per stored item, dims, finite, the version's space_id only"
    ),
)
def backfilled_gallery_schema(
    fct: FctResource, backfilled_gallery: BackfilledTable
) -> dg.AssetCheckResult:
    table = backfilled_gallery
    schema = vector_table_schema(
        table.gallery_rows, {"embedding": table.dim}, {"space_id": table.space_id}
    )
    return validate_table(
        fct,
        table.table,
        table.version,
        schema,
        ["item_id", "label", "embedding", "space_id"],
    )


def report_frame(report: EvalReport) -> "pd.DataFrame":
    """One row per (case, metric) of the report, for the expectation suite."""
    import pandas as pd  # here, not at import: every step process loads this module (~0.2 s)

    rows = [
        {"case": c, "metric": m, "value": v}
        for c, ms in report.cases.items()
        for m, v in ms.items()
    ]
    return pd.DataFrame(rows)


def _map(cases: dict[str, dict[str, float]], case: str) -> float:
    """The case's mAP, NaN if the report lacks it."""
    return float(cases.get(case, {}).get("mAP", float("nan")))


def run_report_suite(report: EvalReport) -> tuple[bool, list[dict[str, Any]]]:
    """great-expectations 1.x suite over the report; returns (success, failing expectations)."""
    import great_expectations as gx  # 2.8 s to import here: only when a check runs

    frame = report_frame(report)
    cases = report.cases
    # A derived column makes the cross-case rule an ordinary column expectation. The rule is on
    # mAP (the whole ranking); top-1 of a small gallery moves by several points between
    # equally good models, so it is reported, not gated.
    # A report without one of the two cases gets NaN here (ignored as null), and fails the
    # expectation that names the missing case rather than raising KeyError.
    frame["fct_minus_old_mAP"] = _map(cases, "new/h(old)") - _map(cases, "old/old")
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # no tqdm bars in run logs
    batch = (
        context.data_sources.add_pandas("fct")
        .add_dataframe_asset("eval_report")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="eval_report"))
    suite.add_expectation(gx.expectations.ExpectColumnValuesToNotBeNull(column="value"))
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(column="value", min_value=0, max_value=100)
    )
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeInSet(
            column="metric", value_set=["top1", "top5", "mAP"]
        )
    )
    for case in ("old/old", "new/new", "new/h(old)"):
        suite.add_expectation(
            gx.expectations.ExpectColumnDistinctValuesToContainSet(column="case", value_set=[case])
        )
    suite.add_expectation(
        gx.expectations.ExpectColumnValuesToBeBetween(column="fct_minus_old_mAP", min_value=0)
    )
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="eval_report", data=batch, suite=suite)
    )
    result = validation.run(batch_parameters={"dataframe": frame})
    failing = [
        {
            "expectation": r.expectation_config.type,
            "kwargs": {k: v for k, v in r.expectation_config.kwargs.items() if k != "batch_id"},
            "unexpected": (
                (r.result or {}).get(
                    "partial_unexpected_list", (r.result or {}).get("observed_value")
                )
            ),
        }
        for r in result.results
        if not r.success
    ]
    return bool(result.success), failing


@dg.asset_check(
    asset=eval_report,
    blocking=True,
    partitions_def=model_version,
    description=(
        "great-expectations: metrics in [0, 100], the paper's cases present, new/h(old) mAP not"
        " below old/old"
    ),
)
def eval_report_expectations(eval_report: EvalReport) -> dg.AssetCheckResult:
    passed, failing = run_report_suite(eval_report)
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "failing_expectations": dg.MetadataValue.json(failing),
            "num_failing": len(failing),
            # The table version the report evaluated: promotion records only a version whose
            # every check read it.
            "table_version": eval_report.table_version,
            "new/h(old) mAP": _map(eval_report.cases, "new/h(old)"),
            "old/old mAP": _map(eval_report.cases, "old/old"),
        },
    )


ALL_CHECKS = [gallery_store_schema, backfilled_gallery_schema, eval_report_expectations]
