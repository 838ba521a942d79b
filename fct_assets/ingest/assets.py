"""Ingestion in Dagster: the asset `ingested_batch` (one partition per batch), its job and the
inbox sensor that launches one run per batch of new files (logic in fct_assets/ingest/ingest.py).

Every inbox file ends, with no one's hand, searchable once in the version served then or
quarantined with its reason:
- a batch whose deployment changes under it (a promotion or rollback between reading the
  deployed model and committing) is embedded again for the deployment served then, in the same
  step (`DeploymentMovedError`; ids are content-derived, so nothing lands twice);
- before each commit the step checks that its run is still running (a run marked failed while
  its orphaned step went on commits nothing) and that the deployed table may still serve;
- a file left in the inbox by a run that ended (failed, or a table that may not serve yet) is
  submitted again by the sensor, after a back-off that doubles per attempt.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from fct_assets.ingest import ingest
from fct_assets.ingest.ingest import Target
from fct_assets.lib import storage
from fct_assets.lib.asset_factory import CODE_VERSION, OWNERS, versioned
from fct_assets.lib.config import seconds_from_env
from fct_assets.lib.event_log import latest_materialization
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lib.keys import (
    GALLERY_STORE,
    INGEST_LANE,
    INGEST_POOL,
    INGESTED_BATCH,
    LANE_TAG,
    NEW_MODEL,
    OLD_MODEL,
    SIDE_INFO_MODEL,
)
from fct_assets.lib.partitions import ingest_batch
from fct_assets.lib.records import DatasetRecord, IngestBatch
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import (
    DeploymentMovedError,
    NotServableError,
    advance,
    current,
    servable,
)

INTERVAL_ENV = "FCT_INBOX_INTERVAL_S"
RETRY_ENV = "FCT_INBOX_RETRY_S"
MAX_FILES = 10_000  # files per batch; a bigger drop is split over several batches
# Times one step embeds a batch again because the deployment moved under it: each move is a
# promotion or rollback, seconds apart at the least, so more in one step is a bug, not load.
MOVE_ATTEMPTS = 5
# A submitted batch with no run after this long (the run deleted): its files are submitted again.
NO_RUN_AFTER_S = 3600.0
MAX_RETRY_WAIT_S = 3600.0


class RunEndedError(RuntimeError):
    """The step's run is no longer running (marked failed while this orphaned step went on): it
    commits nothing, so the run's failure stays true and its retry writes once."""


class IngestConfig(dg.Config):
    """The files of one batch (the sensor fills this in; `fct ingest PATH...` too)."""

    files: list[str] = Field(
        default_factory=list,
        description=(
            "Image files: paths relative to `inbox` when it is set, else absolute paths. A"
            " sub-folder of the inbox names the label (class name or index)."
        ),
    )
    inbox: str | None = Field(
        None,
        description=(
            "The inbox folder the files are in; they are moved to .processed/<batch>/ or"
            " .quarantine/<batch>/ once the batch landed. Unset: files are left where they are."
        ),
    )
    label: str | None = Field(
        None, description="Label of every file (class name or index). Unset: from the sub-folder."
    )


def deployed_target(instance: dg.DagsterInstance, db):
    """The deployed model and its table; the old model and gallery_store before any promotion."""

    serving = current(db)
    if serving is None:
        return Target(None, storage.GALLERY_STORE, load_recorded_checkpoint(instance, OLD_MODEL))
    model = load_recorded_checkpoint(instance, NEW_MODEL, serving.version)
    if model.space_id != serving.space_id:
        raise storage.SpaceMismatchError(
            f"{serving.table} serves space {serving.space_id}, but new_model[{serving.version}] is"
            f" now {model.space_id}; promote a version again"
        )
    return Target(serving.version, serving.table, model, serving.seq)


def commit_guard(instance: dg.DagsterInstance, db, target: Target, run_id: str):
    """What an ingest step checks right before each commit, under its leases: its run is still
    running (RunEndedError), the deployment it embedded for still serves (DeploymentMovedError),
    and the deployed table may still serve after an append (NotServableError: a backfill
    published it again and no check has passed on that publish)."""

    def check(table: str) -> None:
        run = instance.get_run_by_id(run_id) if run_id else None
        if run is not None and run.is_finished:
            raise RunEndedError(
                f"ingest: run {run_id} is {run.status.value} (marked while this step ran: its"
                f" worker died?); nothing committed to {table}"
            )
        serving = current(db)
        if (serving.version if serving else None) != target.version or (
            serving is not None and serving.table != target.table
        ):
            now = serving.version if serving else "nothing"
            raise DeploymentMovedError(
                f"ingest: {target.version or 'the old model'} is no longer deployed ({now} is);"
                " the items are embedded again for the deployed version"
            )
        if serving is not None:
            head = db.open_table(serving.table).version
            # Whether it holds every stored item is decided once the batch is in (advance).
            why = servable(db, serving, head, instance=instance, complete=False)
            if why is not None:
                raise NotServableError(
                    f"ingest: {serving.table} version {head} may not serve {serving.version}:"
                    f" {why}; the files stay in the inbox and are submitted again"
                )

    return check


@versioned(
    dg.asset,
    group_name="ingest",
    kinds={"lancedb"},
    partitions_def=ingest_batch,
    io_manager_key="record_io_manager",
    pool=INGEST_POOL,
    owners=OWNERS,
    tags={"fct/artifact": "table"},
    deps=[GALLERY_STORE],
)
def ingested_batch(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    fct: FctResource,
    dataset: DatasetRecord,
) -> dg.Output[IngestBatch]:
    """One batch of arriving items, embedded by the deployed model, appended to the store and table."""

    batch = context.partition_key
    db = fct.connect()
    target = deployed_target(context.instance, db)
    inbox = Path(config.inbox) if config.inbox else None
    fixed = None if config.label is None else ingest.label_of(config.label, dataset.class_names)

    def label(name: str) -> int:
        if fixed is not None:
            return fixed
        if inbox is not None:  # <inbox>/<label>/<file>
            return ingest.inbox_label(name, dataset.class_names)
        return ingest.label_of(Path(name).parent.name, dataset.class_names)  # <label>/<file>

    files = [(ingest.locate(inbox, name, batch), label(name)) for name in config.files]
    side_info_model = load_recorded_checkpoint(context.instance, SIDE_INFO_MODEL)
    for attempt in range(1, MOVE_ATTEMPTS + 1):
        context.log.info(
            f"ingest {batch}: {len(files)} files, embedded by"
            f" {target.version or 'the old model'} ({target.model.space_id})"
        )
        try:
            record = ingest.ingest_files(
                fct,
                files,
                batch=batch,
                dataset=dataset,
                target=target,
                side_info_model=side_info_model,
                advance_deployment=_advancer(context.instance, db, target),
                log=context.log.info,
                run_id=context.run.run_id,
                instance=context.instance,
                inbox=inbox,
                before_commit=commit_guard(context.instance, db, target, context.run.run_id),
            )
            break
        except DeploymentMovedError as moved:
            if attempt == MOVE_ATTEMPTS:
                raise
            context.log.warning(f"{moved} (attempt {attempt + 1} of {MOVE_ATTEMPTS})")
            target = deployed_target(context.instance, db)
    if inbox is not None:
        reasons = {q.file: q.reason for q in record.quarantined}
        for name, (path, _) in zip(config.files, files):
            ingest.settle(inbox, name, batch, reasons.get(path))
    return dg.Output(
        record,
        metadata={
            **record.model_dump(exclude={"ingested", "quarantined", "retrying"}),
            "quarantined": dg.MetadataValue.json([q.model_dump() for q in record.quarantined]),
            "retrying": dg.MetadataValue.json([q.model_dump() for q in record.retrying]),
            "quarantine_reasons": "\n".join(
                f"{ingest.shown(q.file)}: {q.reason}" for q in record.quarantined
            )
            or "none",
            "ingested_items": len(record.ingested),
            "dagster/row_count": len(record.ingested),
            "code_version": CODE_VERSION,
        },
    )


def _advancer(instance: dg.DagsterInstance, db, target: Target):
    """The deployments row that serves a new version of the target's table (none before any
    promotion: gallery_store is not pinned)."""
    if target.version is None:
        return None
    return lambda table_version: advance(db, target.version, table_version, instance=instance).seq


ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(ingested_batch),
    # Its own lane of the run queue (dagster_home/dagster.yaml): never behind upgrades.
    tags={LANE_TAG: INGEST_LANE},
    description=(
        "Ingest one batch of image files (the inbox sensor launches it; or `fct ingest PATH...`)."
    ),
)


def inbox_interval() -> int:
    return seconds_from_env(INTERVAL_ENV, 10)


def retry_wait_s() -> float:
    """FCT_INBOX_RETRY_S (default 30): seconds before the files a run left in the inbox are
    submitted again; doubled per further attempt, at most an hour."""
    value = os.environ.get(RETRY_ENV, "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"{RETRY_ENV}={value!r}: expected seconds >= 0")
    return seconds


@dataclass(frozen=True)
class Launched:
    """A file the sensor submitted: its stamp then, its batch, how many times it was submitted
    again, and when (seconds since the epoch). Cursors of older fct hold the stamp alone."""

    stamp: str
    batch: str | None = None
    attempt: int = 0
    at: float = 0.0

    @classmethod
    def parse(cls, value) -> "Launched":
        if isinstance(value, str):
            return cls(value)
        stamp, batch, attempt, at = value
        return cls(stamp, batch, int(attempt), float(at))

    def dump(self) -> list:
        return [self.stamp, self.batch, self.attempt, self.at]


def _batch_ended(instance: dg.DagsterInstance, launched: Launched, now: float) -> float | None:
    """When the run of a submitted batch ended for good (seconds since the epoch), or None while
    it is queued, running, or about to be retried by the instance's run retries. A batch with no
    run yet counts as pending until NO_RUN_AFTER_S after its submission."""
    if launched.batch is None:  # an older cursor: wait until no ingest run is in progress
        runs = instance.get_run_records(
            dg.RunsFilter(job_name="ingest", statuses=IN_PROGRESS), limit=1
        )
        return None if runs else 0.0
    records = instance.get_run_records(
        dg.RunsFilter(job_name="ingest", tags={"dagster/partition": launched.batch}), limit=1
    )
    if not records:
        return launched.at if now - launched.at > NO_RUN_AFTER_S else None
    run = records[0].dagster_run
    if not run.is_finished or run.tags.get("dagster/will_retry") == "true":
        return None
    ended = records[0].end_time or records[0].update_timestamp.timestamp()
    return float(ended)


IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=inbox_interval(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches the inbox (FCT_INBOX, default data/inbox): new files become one batch, a new"
        " ingest_batch partition, and one run. Files a finished run left in the inbox are"
        " submitted again (FCT_INBOX_RETRY_S, doubling)."
    ),
)
def fct_inbox(context: dg.SensorEvaluationContext):

    inbox = ingest.inbox_dir()
    now = time.time()
    # cursor: {relpath: Launched} of files submitted and still in the inbox (a settled file has
    # left it); a file dropped again with another stamp is new. A file whose batch's run ended
    # and left it here is submitted again once its back-off has passed.
    launched = {k: Launched.parse(v) for k, v in json.loads(context.cursor or "{}").items()}
    waiting = ingest.scan_inbox(inbox)
    fresh: list[tuple[ingest.InboxFile, int]] = []
    still: dict[str, Launched] = {}
    ended: dict[str | None, float | None] = {}
    backing_off = 0
    for f in waiting:
        seen = launched.get(f.relpath)
        if seen is None or seen.stamp != f.stamp:
            fresh.append((f, 0))
            continue
        if seen.batch not in ended:
            ended[seen.batch] = _batch_ended(context.instance, seen, now)
        at = ended[seen.batch]
        if at is None:
            still[f.relpath] = seen  # its run is queued or running: it settles the file
        elif now - at >= min(retry_wait_s() * 2**seen.attempt, MAX_RETRY_WAIT_S):
            fresh.append((f, seen.attempt + 1))
        else:
            still[f.relpath] = seen
            backing_off += 1

    def cursor() -> str:
        return json.dumps({k: v.dump() for k, v in still.items()}, sort_keys=True)

    if not fresh:
        context.update_cursor(cursor())
        waits = (
            f"; {backing_off} files of ended runs wait to be submitted again" if backing_off else ""
        )
        return dg.SkipReason(f"no new files in {inbox}{waits}")
    if latest_materialization(context.instance, dg.AssetKey(GALLERY_STORE), None) is None:
        return dg.SkipReason(
            f"{len(fresh)} files wait in {inbox}: materialise the base assets first"
        )
    again = sum(1 for _, attempt in fresh if attempt)
    if again:
        context.log.info(f"{again} files left in {inbox} by ended runs: submitted again")
    requests, keys = [], []
    for start in range(0, len(fresh), MAX_FILES):
        part = fresh[start : start + MAX_FILES]
        key = ingest.batch_key([f for f, _ in part], now)
        attempt = max(a for _, a in part)
        if attempt:  # a new partition and run key, never the ended batch's again
            key = f"{key}-a{attempt}"
        keys.append(key)
        requests.append(
            dg.RunRequest(
                run_key=key,
                partition_key=key,
                run_config={
                    "ops": {
                        INGESTED_BATCH: {
                            "config": {
                                "files": [f.relpath for f, _ in part],
                                "inbox": str(inbox),
                            }
                        }
                    }
                },
                tags={"fct/files": str(len(part))},
            )
        )
        still.update({f.relpath: Launched(f.stamp, key, attempt, now) for f, attempt in part})
    context.update_cursor(cursor())
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[ingest_batch.build_add_request(keys)],
    )


def ingest_paths(
    instance: dg.DagsterInstance, defs: dg.Definitions, paths: list[str], *, label: str | None
) -> dg.ExecuteInProcessResult:
    """`fct ingest PATH...`: the files (folders: every file below them) as one batch, run now."""

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise ValueError(f"{' '.join(paths)}: no files to ingest")
    stamps = [
        ingest.InboxFile(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files
    ]
    key = ingest.batch_key(stamps)
    instance.add_dynamic_partitions(ingest_batch.name, [key])
    # Without an explicit label, a file's parent folder names it, as an inbox sub-folder does.
    config = {"files": [s.relpath for s in stamps], "label": label}
    return defs.resolve_job_def("ingest").execute_in_process(
        instance=instance,
        partition_key=key,
        run_config={"ops": {INGESTED_BATCH: {"config": config}}},
        raise_on_error=False,
    )
