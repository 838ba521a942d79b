"""What the asset checks of every LanceDB table share: a pandera schema of a vector table and
its validation against the table as it is now (the table version its asset recorded)."""

from typing import TYPE_CHECKING, Any

import dagster as dg
import numpy as np

from fct_assets.lib.resources import FctResource

if TYPE_CHECKING:
    pass


MAX_FAILING_CASES = 20


def vector_table_schema(expected_rows: int, dims: dict[str, int], spaces: dict[str, str]):
    """A pandera schema: unique ids, the gallery's row count, vector dims, all finite, one space_id.

    `dims` are the dims the producing asset recorded (its models' outputs), not read from the
    table: a table rewritten with vectors of another width fails."""
    # Deferred: pandera and pandas (~0.8 s) only in the step that runs a check.
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
    # Deferred: pandera only in the step that runs a check.
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
