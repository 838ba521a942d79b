"""Serving: which model version answers queries, promotion, rollback, and search.

The deployment record is an append-only LanceDB table (`deployments`): each row names a
version, its table and the *table version* it serves, so a query always reads one complete,
pinned snapshot, and history supports rollback. A version is promoted only when the latest
runs of its blocking checks passed after its latest materialisation.

A served table version is always one whose blocking checks passed on it, or such a version
plus appends (ingested items, a rollback's catch-up): the same publish (`storage.same_publish`).
An ingest never moves the deployment onto a table a backfill published since (`servable`).
A rollback never shrinks what is searchable silently: it serves a target that holds every item
of gallery_store, is caught up first (`catch_up`), or is forced; its row's `note` says which.
Every row names who or what wrote it (`by`) and is mirrored in the Dagster UI as an observation
of `served_version` (fct_assets/serving/served_version.py), which never decides anything.
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
from fct_assets.lib.io_managers import recorded_checkpoint_meta, recorded_record
from fct_assets.lib.keys import NEW_MODEL, PROMOTION_CHECKS
from fct_assets.lib.partitions import check_version
from fct_assets.lib.records import BackfilledTable, CheckResult, Deployment, Hit, VersionTable
from fct_assets.serving import contract, served_version

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
        # Added later (nullable): tables written before it read as note None, and gain the column
        # at their next write (`_add_new_columns`).
        pa.field("note", pa.string()),
        pa.field("by", pa.string()),  # who or what wrote the row; added later, as `note`
    ]
)


class PromotionError(ValueError):
    """A version cannot be promoted (or rolled back to); one line saying why."""


class DeploymentMovedError(PromotionError):
    """The deployment an ingest embedded for is no longer the one served (a promotion or a
    rollback came in between): embed again for the one served now."""


class NotServableError(PromotionError):
    """A table version that may not serve in place of the served one: not the same publish plus
    appends, and not a checked publish of the served version either."""


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
    rule deciding it: tests, benchmarks and repair scripts call it to set a deployment directly.
    The row is committed as `record` commits it (`options`: record's keyword options; without
    `instance`, outside a run, the UI's view gets the row at the next mirrored one)."""
    return record(db, action, lambda rows: table, **options)


def _add_new_columns(db) -> None:
    """A deployments table written before a column of DEPLOYMENT_SCHEMA existed gains it (null in
    its old rows), so the row about to be inserted fits; a concurrent writer may have added it."""
    if not storage.table_exists(db, storage.DEPLOYMENTS):
        return
    table = db.open_table(storage.DEPLOYMENTS)
    missing = [f for f in DEPLOYMENT_SCHEMA if f.name not in table.schema.names]
    if not missing:
        return
    try:
        table.add_columns(pa.schema(missing))
    except (RuntimeError, OSError, ValueError):
        names = db.open_table(storage.DEPLOYMENTS).schema.names
        if any(f.name not in names for f in missing):
            raise


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
    note: str | None = None,
    by: str | None = None,
    instance: dg.DagsterInstance | None = None,
) -> Deployment:
    """Append the row `choose(history)` names, with the seq after the last one, as a conditional
    commit: read the history, decide, insert the row unless its seq exists; on a lost race read
    again and decide again. Seqs are therefore distinct and gap-free, and the row with the highest
    seq is the latest commit, which is what `current` serves.

    After lost race i it calls `sleep(rng.uniform(0, min(0.5, 0.01 * 2**i)))` (seconds; `rng`
    defaults to the `random` module) and gives up with PromotionError after `attempts` lost
    races. `choose` raises PromotionError when nothing may be recorded. `note` goes into the row,
    and `by`, who or what writes it (default: served_version.caused_by(), the run or the user).

    Once committed, the row is mirrored in the UI (served_version.mirror: an event of the run this
    runs in, else a runless event of `instance`), still under the lock so that the view gets rows
    in seq order; a failure to write the event is logged and leaves the row standing.

    On a folder the OS lock of the table (guards.local_lock) also queues writers of this machine,
    so they rarely race at all; on an object store the conditional commit alone decides, as it
    does on a folder with `file_lock=False`."""
    uniform = (rng or random).uniform
    by = by or served_version.caused_by()
    lock = guards.local_lock(db, storage.DEPLOYMENTS) if file_lock else contextlib.nullcontext()
    with lock:
        _add_new_columns(db)
        for attempt in range(attempts):
            rows = history(db)
            table = choose(rows)  # raises PromotionError when nothing may be recorded
            row = Deployment(
                seq=(rows[-1].seq + 1) if rows else 1,
                action=action,
                at=_dt.datetime.now(_dt.UTC).isoformat(),
                note=note,
                by=by,
                **{field: getattr(table, field) for field in VersionTable.model_fields},
            )
            data = pa.Table.from_pylist([row.model_dump()], schema=DEPLOYMENT_SCHEMA)
            if guards.insert_if_absent(db, storage.DEPLOYMENTS, data, "seq"):
                served_version.mirror(instance, [*rows, row])
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
    note: str | None = None,
) -> Deployment:
    """Serve `version`, if its blocking checks passed on its latest materialisations; the row
    records the table version those checks ran on, or its latest version when that holds the
    checked rows plus appends only (items ingested into it while it served before a rollback).

    `results`: the `check_results` to decide on, read earlier by the caller (one that showed
    them to a user promotes on what was shown); by default they are read now. `note` goes into
    the row (an override: "accepted regressions: REASON"). Either way the
    table's record is read after them, and a re-materialisation since is refused. The table must
    hold every item of gallery_store, decided on the history the row is committed after, so an
    ingest that lands meanwhile is either in the table or sees the promotion and follows it."""
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
    head = db.open_table(row.table).version
    if head != row.table_version and storage.same_publish(db, row.table, row.table_version, head):
        row = row.model_copy(update={"table_version": head})

    def choose(rows: list[Deployment]) -> VersionTable:
        missing, store_version = missing_items(db, row.table, row.table_version)
        if missing:
            raise PromotionError(
                f"version {version} not promoted: {len(missing)} items of gallery_store (version"
                f" {store_version}) are not in {row.table} at version {row.table_version}"
                f" (ingested while it was backfilled); catch up first: `fct catch-up {version}` or"
                " the `catch_up` job"
            )
        return row

    deployed = record(db, "promote", choose, note=note, instance=instance)
    # The serving contract names the query model as its materialisation recorded it.
    contract.write(
        db, deployed, checkpoint=recorded_checkpoint_meta(instance, dg.AssetKey(NEW_MODEL), version)
    )
    return deployed


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


def servable(
    db, serving: VersionTable, table_version: int, *, instance=None, complete: bool = True
) -> str | None:
    """Why version `table_version` of the served table may not serve in place of `serving`, or
    None when it may: it holds the served rows plus appends (the same publish), or, with
    `instance`, it is a publish of the served version whose blocking checks all passed on it,
    plus appends, and (`complete`) lacks no item of gallery_store (`fct catch-up` of the served
    version). `complete=False`: the caller is about to append the items it lacks."""
    if storage.same_publish(db, serving.table, serving.table_version, table_version):
        return None
    why = (
        f"{serving.table} was published again after version {serving.table_version} (which serves)"
    )
    if instance is None:
        return why
    results = check_results(instance, serving.version)
    checked = {r.table_version for r in results.values()}
    if not results or not all(r.passed for r in results.values()) or len(checked) != 1:
        return f"{why}, and its blocking checks have not passed on the new publish"
    (at,) = checked
    if at is None or not storage.same_publish(db, serving.table, at, table_version):
        return f"{why}, and its blocking checks passed on version {at}, not on the new publish"
    missing, _ = missing_items(db, serving.table, table_version) if complete else ([], None)
    if missing:
        return f"{why}; its checked publish lacks {len(missing)} items of gallery_store"
    return None


def advance(db, version: str, table_version: int, *, instance=None) -> Deployment:
    """Serve `version` at a newer `table_version` of its own table: an ingest run appended items
    to the deployed table, and the deployment pins table versions.

    Refused with DeploymentMovedError if `version` is no longer the one deployed (promoted or
    rolled back meanwhile): the ingest embeds the items again for the deployment served then
    (ingestion is idempotent). Refused with NotServableError unless `servable` (with `instance`:
    also onto a checked publish of the version). Decided on the history the row is committed
    after (`record`), so a promotion in between is seen."""
    serving = current(db)
    if serving is not None and serving.version == version:
        if table_version == serving.table_version:
            return serving

    def choose(rows: list[Deployment]) -> VersionTable:
        serving = rows[-1] if rows else None
        if serving is None or serving.version != version:
            now = serving.version if serving else "nothing"
            raise DeploymentMovedError(
                f"ingest: {version} is no longer deployed ({now} is); the items are embedded"
                " again for the deployed version"
            )
        why = servable(db, serving, table_version, instance=instance)
        if why is not None:
            raise NotServableError(
                f"ingest: {serving.table} version {table_version} may not serve {version}: {why}"
            )
        row = serving.model_copy(update={"table_version": table_version})
        return VersionTable(**{f: getattr(row, f) for f in VersionTable.model_fields})

    row = record(db, "ingest", choose, instance=instance)
    contract.write(db, row)
    return row


# A catch-up: (the target at the table version to append to, the ids it lacks) -> the table
# version that holds them. Given by the caller (fct_assets/serving/rollback.py embeds them with the
# target's model from gallery_store's images), which also holds the tables' leases around it.
CatchUp = Callable[[VersionTable, list[int]], int]


def rollback_target(db) -> tuple[VersionTable, bool]:
    """(the deployment before the current one, at the latest version of its table when that holds
    its rows plus appends; whether that is so, i.e. whether items can be appended for it)."""
    target = _rollback_target(history(db))
    if not storage.table_exists(db, target.table):  # a hand-made record; nothing to append to
        return _version_table(target), False
    head = db.open_table(target.table).version
    if storage.same_publish(db, target.table, target.table_version, head):
        return _version_table(target).model_copy(update={"table_version": head}), True
    return _version_table(target), False


def _version_table(row: VersionTable) -> VersionTable:
    return VersionTable(**{f: getattr(row, f) for f in VersionTable.model_fields})


def rollback(
    db,
    *,
    force: bool = False,
    catch_up: CatchUp | None = None,
    to: str | None = None,
    instance: dg.DagsterInstance | None = None,
) -> Deployment:
    """Serve again the deployment before the current one (its table at the version it served
    then, plus what was appended to it since), never shrinking what is searchable silently.
    `to`: the version the caller means to serve again (the rollback job's partition); refused
    with one line when the deployment before the current one is another. `instance`: where the
    row is mirrored outside a run (`record`).

    Items of gallery_store its table lacks (ingested while another version served) are first
    added by `catch_up`; without one (or when the table was published again since, so nothing
    can be appended for it) the rollback is refused with one line giving the count, unless
    `force`. The row's note says which: "complete", "caught up: N items ..." or "forced: ..."."""
    target, appendable = rollback_target(db)
    if to is not None and target.version != to:
        raise PromotionError(
            f"rollback to {to} refused: the deployment before the current one"
            f" ({current(db).version}) is {target.version}; a rollback serves only that one"
            f" (`fct promote {to}` serves another version)"
        )
    missing, store_version = missing_items(db, target.table, target.table_version)
    note = "complete"
    if missing and catch_up is not None and appendable:
        caught = catch_up(target, missing)
        target = target.model_copy(update={"table_version": caught})
        note = (
            f"caught up: {len(missing)} items of gallery_store embedded by {target.version}'s model"
        )
        missing, store_version = missing_items(db, target.table, target.table_version)
    if missing:
        lacks = (
            f"{len(missing)} items of gallery_store (version {store_version}) are not in"
            f" {target.table} at version {target.table_version}"
        )
        if not force:
            how = (
                "nothing can be appended to it (published again since)"
                if not appendable
                else "no catch-up was given"
                if catch_up is None
                else "its catch-up left them out"
            )
            raise PromotionError(
                f"rollback to {target.version} refused: {lacks} and would stop being searchable;"
                f" {how}; `fct rollback --force` serves it without them"
            )
        note = f"forced: {lacks}"

    def choose(rows: list[Deployment]) -> VersionTable:
        now = _rollback_target(rows)
        if (now.version, now.table) != (target.version, target.table):
            raise PromotionError(
                f"rollback to {target.version} not recorded: the deployment changed meanwhile"
                f" (the one before the current is now {now.version}); run the rollback again"
            )
        return target

    row = record(db, "rollback", choose, note=note, instance=instance)
    contract.write(db, row)
    return row


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
