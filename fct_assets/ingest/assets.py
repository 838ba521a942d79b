"""Ingestion in Dagster: the asset `ingested_batch` (one partition per batch), its job and the
inbox sensor that launches one run per batch of new files (logic in fct_assets/ingest/ingest.py)."""

import json
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
    INGEST_POOL,
    INGESTED_BATCH,
    NEW_MODEL,
    OLD_MODEL,
    SIDE_INFO_MODEL,
)
from fct_assets.lib.partitions import ingest_batch
from fct_assets.lib.records import DatasetRecord, IngestBatch
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import advance, current

INTERVAL_ENV = "FCT_INBOX_INTERVAL_S"
MAX_FILES = 10_000  # files per batch; a bigger drop is split over several batches


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
    context.log.info(
        f"ingest {batch}: {len(files)} files, embedded by"
        f" {target.version or 'the old model'} ({target.model.space_id})"
    )
    record = ingest.ingest_files(
        fct,
        files,
        batch=batch,
        dataset=dataset,
        target=target,
        side_info_model=load_recorded_checkpoint(context.instance, SIDE_INFO_MODEL),
        advance_deployment=(
            (lambda v: advance(db, target.version, v).seq) if target.version else None
        ),
        log=context.log.info,
        run_id=context.run.run_id,
        instance=context.instance,
        inbox=inbox,
    )
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


ingest_job = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(ingested_batch),
    tags={"fct/lane": "ingest"},
    description=(
        "Ingest one batch of image files (the inbox sensor launches it; or `fct ingest PATH...`)."
    ),
)


def inbox_interval() -> int:
    return seconds_from_env(INTERVAL_ENV, 10)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=inbox_interval(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Watches the inbox (FCT_INBOX, default data/inbox): new files become one batch, a new"
        " ingest_batch partition, and one run."
    ),
)
def fct_inbox(context: dg.SensorEvaluationContext):

    inbox = ingest.inbox_dir()
    # cursor: {relpath: stamp} of files already launched and still in the inbox (their run moves
    # them out); a file dropped again with another stamp is new.
    launched: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    waiting = ingest.scan_inbox(inbox)
    fresh = [f for f in waiting if launched.get(f.relpath) != f.stamp]
    still = {f.relpath: f.stamp for f in waiting if launched.get(f.relpath) == f.stamp}
    if not fresh:
        context.update_cursor(json.dumps(still, sort_keys=True))
        return dg.SkipReason(f"no new files in {inbox}")
    if latest_materialization(context.instance, dg.AssetKey(GALLERY_STORE), None) is None:
        return dg.SkipReason(
            f"{len(fresh)} files wait in {inbox}: materialise the base assets first"
        )
    requests, keys = [], []
    for start in range(0, len(fresh), MAX_FILES):
        part = fresh[start : start + MAX_FILES]
        key = ingest.batch_key(part)
        keys.append(key)
        requests.append(
            dg.RunRequest(
                run_key=key,
                partition_key=key,
                run_config={
                    "ops": {
                        INGESTED_BATCH: {
                            "config": {"files": [f.relpath for f in part], "inbox": str(inbox)}
                        }
                    }
                },
                tags={"fct/files": str(len(part))},
            )
        )
        still.update({f.relpath: f.stamp for f in part})
    context.update_cursor(json.dumps(still, sort_keys=True))
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
