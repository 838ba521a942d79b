"""Housekeeping: what runs leave behind, bounded.

- `records/<run_id>/`: the op outputs of a graph asset's run (backfill plan, shard results),
  needed only while the run lasts: removed once the run has finished and is older than the
  retention (a folder whose run the instance does not know is removed too).
- Old LanceDB versions of the published tables: every table version a deployment row names
  (what is served, and what a rollback may return to) is tagged `deployed-<version>` first;
  LanceDB's cleanup refuses to remove a tagged version (it raises), so the cleanup removes the
  versions older than both the retention and the oldest deployed version; `optimize` also
  compacts small fragments.
- `<inbox>/.processed/`: the files of landed batches, removed `processed_keep_days` after they
  landed (default 1: gallery_store holds every landed item's pixels, so the original is only
  for a look into a recent batch or a re-executed run of it; a busy afternoon left 81 MB in
  20,462 files). Retry markers whose file left the inbox go too. `.quarantine/` is kept: each
  file there waits for a person.

The job `housekeeping` runs all three; the schedule `daily_housekeeping` runs it at 05:00.
"""

import datetime as _dt
import os
import re
import time
from pathlib import Path

import dagster as dg
from pydantic import Field

from fct_assets.lib import storage
from fct_assets.lib.inbox import PROCESSED, RETRY, inbox_dir
from fct_assets.lib.io_managers import storage_uri, store_path
from fct_assets.lib.keys import LANE_TAG, OPS_LANE
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import history

_RUN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def clean_run_records(instance: dg.DagsterInstance, records, older_than: _dt.timedelta) -> list:
    """Remove `records/<run_id>/` of runs finished more than `older_than` ago (or unknown to the
    instance); returns the run ids removed. `records`: the records folder (a UPath)."""
    cutoff = _dt.datetime.now(_dt.UTC).timestamp() - older_than.total_seconds()
    removed = []
    if not records.exists():
        return removed
    for folder in records.iterdir():
        if not _RUN_ID.fullmatch(folder.name) or not folder.is_dir():
            continue
        record = instance.get_run_record_by_id(folder.name)
        if record is not None:
            ended = record.end_time
            if not record.dagster_run.is_finished or ended is None or ended > cutoff:
                continue
        folder.fs.rm(folder.path, recursive=True)
        removed.append(folder.name)
    return removed


def protect_deployed_versions(db) -> list[tuple[str, int]]:
    """Tag every (table, table version) a deployment row names; returns those tagged now."""

    tagged = []
    for table_name, version in sorted({(r.table, r.table_version) for r in history(db)}):
        if not storage.table_exists(db, table_name):
            continue
        table = db.open_table(table_name)
        tag = f"deployed-{version}"
        if tag not in table.tags.list():
            table.tags.create(tag, version)
            tagged.append((table_name, version))
    return tagged


def clean_table_versions(db, older_than: _dt.timedelta) -> dict[str, int]:
    """Compact every table and remove its untagged versions older than `older_than`, after
    tagging the deployed ones; returns each table's number of versions left."""
    protect_deployed_versions(db)
    left = {}
    for name in _table_names(db):
        if name.startswith("_"):
            continue  # staging tables belong to their run; _writers is tiny
        table = db.open_table(name)
        table.optimize(cleanup_older_than=_retention(table, older_than))
        left[name] = len(table.list_versions())
    return left


def _retention(table, older_than: _dt.timedelta) -> _dt.timedelta:
    """`older_than`, lengthened to keep the table's oldest tagged version (and all after it)."""
    tagged = {t["version"] for t in table.tags.list().values()}
    if not tagged:
        return older_than
    stamps = {v["version"]: v["timestamp"] for v in table.list_versions()}
    oldest = stamps.get(min(tagged))
    if oldest is None:
        return older_than
    if oldest.tzinfo is None:
        oldest = oldest.astimezone()
    age = _dt.datetime.now(oldest.tzinfo) - oldest + _dt.timedelta(seconds=1)
    return max(older_than, age)


def clean_inbox(inbox: Path, older_than: _dt.timedelta) -> tuple[int, int]:
    """Remove the files under `<inbox>/.processed/` that landed more than `older_than` ago (a
    file's mtime is set when it lands), then the old folders left empty, and the retry markers
    whose file is no longer in the inbox; returns (processed files removed, bytes freed)."""
    cutoff = time.time() - older_than.total_seconds()
    removed = freed = 0
    processed = inbox / PROCESSED
    if processed.is_dir():
        walked = list(os.walk(processed, topdown=False))  # deepest first
        # A folder's age is read before its files go (removing them touches it): an old one
        # left empty goes; one a landing batch has just made stays.
        old = {
            folder
            for root, dirs, _ in walked
            for folder in (Path(root) / d for d in dirs)
            if not folder.is_symlink() and folder.lstat().st_mtime < cutoff
        }
        for root, dirs, names in walked:
            for name in names:
                path = Path(root) / name
                info = path.lstat()
                if info.st_mtime < cutoff:
                    path.unlink()
                    removed, freed = removed + 1, freed + info.st_size
            for folder in (Path(root) / d for d in dirs):
                if folder in old and not any(folder.iterdir()):
                    folder.rmdir()
    markers = inbox / RETRY
    if markers.is_dir():
        for path in list(markers.rglob("*.json")):
            waiting = inbox / path.relative_to(markers).as_posix().removesuffix(".json")
            if not waiting.exists() and not waiting.is_symlink():
                path.unlink(missing_ok=True)
    return removed, freed


def _table_names(db) -> list[str]:
    names, token = [], None
    while True:
        page = db.list_tables(page_token=token)
        names += list(page.tables)
        token = page.page_token
        if not token:
            return names


class HousekeepingConfig(dg.Config):
    """How long finished runs' records, old table versions and landed inbox files are kept."""

    keep_days: float = Field(
        7.0,
        ge=0.0,
        le=3650.0,
        allow_inf_nan=False,
        description=(
            "Keep run records and table versions younger than this many days. Deployed table"
            " versions are kept whatever their age (tagged deployed-<version>)."
        ),
    )
    processed_keep_days: float = Field(
        1.0,
        ge=0.0,
        le=3650.0,
        allow_inf_nan=False,
        description=(
            "Keep the files of landed batches (<inbox>/.processed/) this many days after they"
            " landed. gallery_store holds each item's pixels; the originals serve a look into a"
            " recent batch or a re-executed run of it."
        ),
    )


@dg.op(
    description=(
        "Removes finished runs' records, untagged old table versions and the inbox's old"
        " processed files."
    )
)
def clean_up(context: dg.OpExecutionContext, config: HousekeepingConfig, fct: FctResource):

    older = _dt.timedelta(days=config.keep_days)
    runs = clean_run_records(context.instance, store_path(storage_uri("records")), older)
    left = clean_table_versions(fct.connect(), older)
    inbox = inbox_dir()
    files, freed = clean_inbox(inbox, _dt.timedelta(days=config.processed_keep_days))
    context.log.info(
        f"housekeeping: {len(runs)} run record folders removed; versions left {left};"
        f" {files} processed files ({freed:,} bytes) removed from {inbox / PROCESSED}"
    )
    return dg.Output(
        None,
        metadata={
            "run_records_removed": len(runs),
            "versions_left": left,
            "processed_files_removed": files,
            "processed_bytes_freed": freed,
        },
    )


@dg.job(
    name="housekeeping",
    description="Bound what runs leave behind (records, old versions, processed inbox files).",
    tags={LANE_TAG: OPS_LANE},
)
def housekeeping_job():
    clean_up()


daily_housekeeping = dg.ScheduleDefinition(
    name="daily_housekeeping",
    job=housekeeping_job,
    cron_schedule="0 5 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Daily: finished runs' records and untagged table versions older than 7 days, inbox"
        " files processed more than 1 day ago."
    ),
)
