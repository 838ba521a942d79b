"""Serving: which model version answers queries, promotion, rollback, and search.

The deployment record is an append-only LanceDB table (`deployments`): each row names a
version, its table and the *table version* it serves, so a query always reads one complete,
pinned snapshot, and history supports rollback. A version is promoted only when the latest
runs of its blocking checks passed after its latest materialisation.
"""

import contextlib
import datetime as _dt
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fct_assets.lib import guards, storage
from fct_assets.lib.dagster_internals import latest_check_execution
from fct_assets.lib.event_log import latest_materialization
from fct_assets.lib.io_managers import recorded_record
from fct_assets.lib.keys import PROMOTION_CHECKS
from fct_assets.lib.partitions import check_version
from fct_assets.lib.records import BackfilledTable, CheckResult, Deployment, Hit, VersionTable

DEPLOYMENT_SCHEMA = pa.schema(
    [
        # The unenforced primary key: a second row with the same seq is refused at commit time.
        pa.field("seq", pa.int64(), nullable=False, metadata=guards.PRIMARY_KEY),
        pa.field("action", pa.string()),  # promote | rollback | ingest
        pa.field("version", pa.string()),
        pa.field("table", pa.string()),
        pa.field("table_version", pa.int64()),
        pa.field("space_id", pa.string()),
        pa.field("at", pa.string()),
    ]
)


class PromotionError(ValueError):
    """A version cannot be promoted (or rolled back to); one line saying why."""


def history(db) -> list[Deployment]:
    """Every deployment, oldest first."""
    if not storage.table_exists(db, storage.DEPLOYMENTS):
        return []
    rows = db.open_table(storage.DEPLOYMENTS).to_arrow().to_pylist()
    return sorted((Deployment(**r) for r in rows), key=lambda r: r.seq)


def current(db) -> Deployment | None:
    """The deployment serving queries now, or None."""
    rows = history(db)
    return rows[-1] if rows else None


def append(db, action: str, table: VersionTable, **options: Any) -> Deployment:
    """Record that `table` serves from now on (`action`: promote | rollback | ingest), with no
    rule deciding it: `promote` calls it once its checks passed; tests, benchmarks and repair
    scripts call it to set a deployment directly. The row is committed as `record` commits it
    (`options`: record's keyword options)."""
    return record(db, action, lambda rows: table, **options)


# Promotions are rare; a conditional commit that keeps losing races is a bug, not load.
RECORD_ATTEMPTS = 200


def record(
    db,
    action: str,
    choose: Callable[[list[Deployment]], VersionTable],
    *,
    attempts: int = RECORD_ATTEMPTS,
    sleep: Callable[[float], object] = time.sleep,
    rng: random.Random | None = None,
    file_lock: bool = True,
) -> Deployment:
    """Append the row `choose(history)` names, with the seq after the last one, as a conditional
    commit: read the history, decide, insert the row unless its seq exists; on a lost race read
    again and decide again. Seqs are therefore distinct and gap-free, and the row with the highest
    seq is the latest commit, which is what `current` serves.

    After lost race i it calls `sleep(rng.uniform(0, min(0.5, 0.01 * 2**i)))` (seconds; `rng`
    defaults to the `random` module) and gives up with PromotionError after `attempts` lost
    races. `choose` raises PromotionError when nothing may be recorded.

    On a folder the OS lock of the table (guards.local_lock) also queues writers of this machine,
    so they rarely race at all; on an object store the conditional commit alone decides, as it
    does on a folder with `file_lock=False`."""
    uniform = (rng or random).uniform
    lock = guards.local_lock(db, storage.DEPLOYMENTS) if file_lock else contextlib.nullcontext()
    with lock:
        for attempt in range(attempts):
            rows = history(db)
            table = choose(rows)  # raises PromotionError when nothing may be recorded
            row = Deployment(
                seq=(rows[-1].seq + 1) if rows else 1,
                action=action,
                at=_dt.datetime.now(_dt.UTC).isoformat(),
                **{field: getattr(table, field) for field in VersionTable.model_fields},
            )
            data = pa.Table.from_pylist([row.model_dump()], schema=DEPLOYMENT_SCHEMA)
            if guards.insert_if_absent(db, storage.DEPLOYMENTS, data, "seq"):
                return row
            sleep(uniform(0.0, min(0.5, 0.01 * 2**attempt)))
    raise PromotionError(
        f"{action} of {table.version} not recorded: seq {row.seq} was taken by a concurrent"
        f" writer {attempts} times in a row; retry"
    )


def check_results(
    instance: dg.DagsterInstance,
    version: str,
    *,
    checks: Sequence[dg.AssetCheckKey] = PROMOTION_CHECKS,
) -> dict[str, CheckResult]:
    """Latest result of every blocking check on the version's guarded assets (`checks`, default
    the ones promotion requires): whether it passed, why not ("never ran", "failed", "stale: ran
    before the latest materialisation", "status X"), whether it ran after that asset partition's
    latest materialisation, and the LanceDB table version it checked (None if its metadata names
    none)."""
    out: dict[str, CheckResult] = {}
    for check_key in checks:
        record = latest_check_execution(instance, check_key, version)
        latest = latest_materialization(instance, check_key.asset_key, version)
        name = f"{check_key.asset_key.to_user_string()}:{check_key.name}"
        if record is None:
            out[name] = CheckResult(passed=False, why="never ran")
            continue
        # A check planned and not (yet) evaluated (a run in progress, or one that stopped first):
        # Dagster's record then holds the planned event, which has no `passed`.
        evaluation = record.evaluation
        if not isinstance(evaluation, dg.AssetCheckEvaluation):
            evaluation = None
        # The evaluation's own event, not the record's creation (a check is planned at run start).
        fresh = (
            latest is not None
            and evaluation is not None
            and record.event.timestamp >= latest.timestamp
        )
        if evaluation is None:
            why = f"status {record.status.value}"
        elif not evaluation.passed:
            # A gate says why in one line (NFR, threshold, worst classes): the refusal names it.
            why = f"failed: {evaluation.description}" if evaluation.description else "failed"
        elif not fresh:
            why = "stale: ran before the latest materialisation"
        else:
            why = "passed"
        checked = evaluation.metadata.get("table_version") if evaluation else None
        out[name] = CheckResult(
            passed=why == "passed",
            why=why,
            ran_after_latest_materialization=fresh,
            table_version=None if checked is None else int(checked.value),
            run_id=record.run_id,
        )
    return out


def recorded_table(instance: dg.DagsterInstance, version: str) -> VersionTable:
    """The table a version's latest backfilled_gallery materialisation published."""
    table = recorded_record(instance, BackfilledTable, "backfilled_gallery", check_version(version))
    return VersionTable(
        version=version, table=table.table, table_version=table.version, space_id=table.space_id
    )


def promote(
    instance: dg.DagsterInstance,
    db,
    version: str,
    *,
    results: dict[str, dict[str, Any]] | None = None,
) -> Deployment:
    """Serve `version`, if its blocking checks passed on its latest materialisations; the row
    records the very table version those checks ran on.

    `results`: the `check_results` to decide on, read earlier by the caller (one that showed
    them to a user promotes on what was shown); by default they are read now. Either way the
    table's record is read after them, and a re-materialisation since is refused."""
    check_version(version)
    if results is None:
        results = check_results(instance, version)
    failed = {k: v.why for k, v in results.items() if not v.passed}
    if not results or failed:
        raise PromotionError(
            f"version {version} not promoted: blocking checks not passed"
            f" ({failed or 'no checks ran'})"
        )
    row = recorded_table(instance, version)
    # The checks were read before the table's record: a re-materialisation in between would
    # otherwise promote a table version no check ran on. Every check names the version it read.
    checked = {k: v.table_version for k, v in results.items()}
    if set(checked.values()) != {row.table_version}:
        raise PromotionError(
            f"version {version} not promoted: its checks ran on table versions {checked}, its"
            f" latest materialisation published {row.table} at version {row.table_version}"
        )
    missing, store_version = missing_items(db, row.table, row.table_version)
    if missing:
        raise PromotionError(
            f"version {version} not promoted: {len(missing)} items of gallery_store (version"
            f" {store_version}) are not in {row.table} at version {row.table_version} (ingested"
            f" while it was backfilled); catch up first: `fct catch-up {version}` or the"
            " `catch_up` job"
        )
    return append(db, "promote", row)


def missing_items(db, table: str, table_version: int) -> tuple[list[int], int | None]:
    """(ids of the store of record that `table` at `table_version` lacks, gallery_store's version
    read): a version is promoted only once it holds every stored item. No gallery_store: ([],
    None)."""

    if not storage.table_exists(db, storage.GALLERY_STORE):
        return [], None
    store = db.open_table(storage.GALLERY_STORE)
    stored = store.search().select(["item_id"]).limit(None).to_arrow().column("item_id")
    held = (
        storage.open_pinned(db, table, table_version)
        .search()
        .select(["item_id"])
        .limit(None)
        .to_arrow()
        .column("item_id")
    )
    missing = pc.filter(stored, pc.invert(pc.is_in(stored, value_set=held.combine_chunks())))
    return sorted(missing.to_pylist()), store.version


def advance(db, version: str, table_version: int) -> Deployment:
    """Serve `version` at a newer `table_version` of its own table: an ingest run appended items
    to the deployed table, and the deployment pins table versions. Refused if `version` is no
    longer the one deployed (promoted or rolled back meanwhile): the run fails, and its retry
    embeds the items with the model deployed then (ingestion is idempotent). Decided on the
    history the row is committed after (`record`), so a promotion in between is seen."""
    serving = current(db)
    if serving is not None and serving.version == version:
        if table_version == serving.table_version:
            return serving

    def choose(rows: list[Deployment]) -> VersionTable:
        serving = rows[-1] if rows else None
        if serving is None or serving.version != version:
            now = serving.version if serving else "nothing"
            raise PromotionError(
                f"ingest: {version} is no longer deployed ({now} is); retry the run to embed the"
                " items with the deployed model"
            )
        row = serving.model_copy(update={"table_version": table_version})
        return VersionTable(**{f: getattr(row, f) for f in VersionTable.model_fields})

    return record(db, "ingest", choose)


def rollback(db) -> Deployment:
    """Serve again the deployment before the current one (the table version it served then;
    for a version that ingest runs advanced, its latest table version)."""
    return record(db, "rollback", _rollback_target)


def _rollback_target(rows: list[Deployment]) -> VersionTable:
    """The deployment before the current one in `rows` (the history, oldest first)."""
    if not rows:
        raise PromotionError("nothing is deployed: no rollback possible")
    serving = rows[-1]
    # The current deployment: its promote (or rollback) row and the ingest rows that advanced it.
    start = len(rows) - 1
    while (
        start > 0 and rows[start].action == "ingest" and rows[start - 1].version == serving.version
    ):
        start -= 1
    base = rows[start]
    earlier = [
        r
        for r in rows[:start]
        if r.version != base.version or r.table_version != base.table_version
    ]
    if not earlier:
        raise PromotionError(
            f"version {serving.version} is the only one ever deployed: no rollback possible"
        )
    return earlier[-1]


def search(db, query, *, version: VersionTable, k: int = 10) -> list[Hit]:
    """The k nearest items (L2) to `query` (D,) in a version's pinned table."""

    table = storage.open_pinned(db, version.table, version.table_version)
    declared = storage.table_space_ids(table).get("space_id")
    if declared != version.space_id:
        raise storage.SpaceMismatchError(
            f"{version.table}: holds space {declared}, the deployment expects {version.space_id}"
        )
    search = table.search(
        np.asarray(query, dtype=np.float32), vector_column_name="embedding"
    ).distance_type("l2")
    if storage.ann_index_exists(table):
        # The IVF_PQ index answers approximately: probe the share of partitions and re-rank exactly
        # (refine) as measured in benchmarks/perf/backfill.py; without an index the search is exact.
        params = storage.ann_params(
            table.count_rows(), table.schema.field("embedding").type.list_size
        )
        search = search.nprobes(params["nprobes"]).refine_factor(params["refine_factor"])
    hits = search.select(["item_id", "label", "source", "_distance"]).limit(k).to_list()
    # LanceDB's rows, read here at the one place they come in, become typed hits.
    return [
        Hit(
            item_id=h["item_id"],
            label=h["label"],
            distance=float(h["_distance"]),
            source=h["source"],
        )
        for h in hits
    ]
