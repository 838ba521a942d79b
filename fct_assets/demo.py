"""`make demo`: the life of a gallery, end to end on the local instance.

Materialises the base assets (dataset, old model, side-info model, gallery store) and model
version v2 on Fashion-MNIST (preset `demo` unless FCT_PRESET says otherwise) and promotes it;
drops a few hundred held-back images (the validation split, never trained on) into the inbox,
where one tick of the inbox sensor launches their ingest run; upgrades to v3, chained from v2's
space, and promotes it; searches for an ingested item; and prints the evaluation table,
`fct lineage v3` and the lineage of one original and one ingested row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fct_assets.lib.records import IngestBatch

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start from an empty dagster_home and data/ (deletes them)",
    )
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--old-classes", default=None, help="default: the dataset's split")
    parser.add_argument("--version", default="v2")
    parser.add_argument("--next-version", default="v3", help="the chained upgrade after ingestion")
    parser.add_argument("--ingest", type=int, default=300, help="held-back images to ingest")
    args = parser.parse_args(argv)

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(REPO / "dagster_home")))
    if args.fresh:
        from fct_assets.lib.resources import DATA_ROOT

        for name in (
            "storage",
            "history",
            "schedules",
            "logs",
            ".logs_queue",
            ".nux",
            ".telemetry",
        ):
            shutil.rmtree(home / name, ignore_errors=True)
        shutil.rmtree(DATA_ROOT, ignore_errors=True)
    import dagster as dg

    from fct_assets.definitions import build_defs
    from fct_assets.lib.keys import DATASET, EVAL_REPORT
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import FctResource
    from fct_assets.lineage.trace import format_lineage, lineage
    from fct_assets.serving.deployment import PromotionError, promote
    from fct_assets.upgrade.report import markdown_table

    instance = dg.DagsterInstance.get()
    defs = build_defs()
    fct = FctResource()
    print(
        f"fct demo: DAGSTER_HOME={home}, LanceDB {fct.lancedb_uri}, preset {fct.preset}", flush=True
    )
    started = time.perf_counter()
    config = {
        "ops": {DATASET: {"config": {"dataset": args.dataset, "old_classes": args.old_classes}}}
    }
    base = defs.resolve_job_def("base").execute_in_process(
        instance=instance, run_config=config, raise_on_error=False
    )
    if not base.success:
        print("fct demo: the base assets failed; see the run log above", file=sys.stderr)
        return 1
    add_model_version(instance, args.version)
    upgrade = defs.resolve_job_def("upgrade").execute_in_process(
        instance=instance, partition_key=args.version, raise_on_error=False
    )
    if not upgrade.success:
        print(f"fct demo: upgrade {args.version} failed; see the run log above", file=sys.stderr)
        return 1
    print(
        f"\nfct demo: base + {args.version} materialised in {time.perf_counter() - started:.0f} s\n"
    )
    try:
        row = promote(instance, fct.connect(), args.version)
        print(
            f"promoted {args.version}: serving {row.table} @ LanceDB version {row.table_version}\n"
        )
    except PromotionError as err:
        print(f"not promoted: {err}\n")
    from fct_assets.lib.io_managers import recorded_record
    from fct_assets.lib.records import EvalReport

    report = recorded_record(instance, EvalReport, EVAL_REPORT, args.version, within="json")
    print(markdown_table(report, include_plot=False))
    if args.ingest:
        batch = _ingest_through_inbox(instance, defs, fct, args.ingest)
        if batch is None:
            return 1
        if not _chained_upgrade(instance, defs, fct, args.next_version):
            return 1
        _show_life(instance, fct, args.next_version, batch)
    else:
        print()
        print(format_lineage(lineage(instance, args.version, fct.connect())))
    print(f"\nfct demo: done in {time.perf_counter() - started:.0f} s")
    print(
        "\nOpen the UI with `make ui` (http://127.0.0.1:3000): asset graph, launchpad, eval report,"
        " checks, the ingest run."
    )
    return 0


def _ingest_through_inbox(instance, defs, fct, n: int) -> IngestBatch | None:
    """Write n held-back images (the validation split) into the inbox, one sub-folder per class;
    one tick of the inbox sensor (the real daemon iteration) requests their ingest run, which
    runs here. Returns the batch's record."""
    from fct_assets.ingest.ingest import folder_name, inbox_dir
    from fct_assets.lib import storage
    from fct_assets.lib.dagster_internals import tick_sensors
    from fct_assets.lib.io_managers import recorded_record
    from fct_assets.lib.keys import DATASET, INGESTED_BATCH
    from fct_assets.lib.records import DatasetRecord
    from fct_ml.pipeline import validation_split

    dataset = recorded_record(instance, DatasetRecord, DATASET)
    data = fct.load_dataset(dataset.spec, dataset.fingerprint)
    held = validation_split(data, fct.experiment())
    inbox = inbox_dir()
    for i in range(min(n, len(held))):
        folder = inbox / folder_name(data.class_names[int(held.labels[i])])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"held_{i:04d}.png").write_bytes(storage.encode_png(held.images[i].numpy()))
    print(f"\nfct demo: {min(n, len(held))} held-back images dropped into {inbox}", flush=True)
    before = {run.run_id for run in instance.get_runs()}
    started = time.perf_counter()
    tick_sensors(instance, "fct_assets.definitions")
    requested = [run for run in instance.get_runs() if run.run_id not in before]
    if len(requested) != 1:
        print(f"fct demo: the inbox sensor requested {len(requested)} runs", file=sys.stderr)
        return None
    run = requested[0]
    # The daemon queued the run; without a running daemon it would wait for `make ui`. It runs
    # here instead, exactly as requested (partition, config, tags).
    instance.delete_run(run.run_id)
    batch = run.tags["dagster/partition"]
    result = defs.resolve_job_def("ingest").execute_in_process(
        instance=instance,
        partition_key=batch,
        run_config=run.run_config,
        tags={k: v for k, v in run.tags.items() if not k.startswith("dagster/")},
        raise_on_error=False,
    )
    if not result.success:
        print(f"fct demo: ingest batch {batch} failed", file=sys.stderr)
        return None
    # The record itself (its metadata leaves out the per-item ids, so it does not read back as an
    # IngestBatch from there).
    record: IngestBatch = result.asset_value(INGESTED_BATCH)
    print(
        f"ingest batch {batch}: {record.added_to_store} items in gallery_store,"
        f" {record.added_to_table} in {record.table} ({record.space_id}),"
        f" {len(record.quarantined)} quarantined; inbox to searchable in"
        f" {time.perf_counter() - started:.1f} s (sensor tick + run)"
    )
    return record


def _chained_upgrade(instance, defs, fct, version: str) -> bool:
    """Register `version`, upgrade it (its h maps from the deployed version's space), promote it
    (catching up first if promotion says items are missing)."""
    from fct_assets.lib.keys import NEW_MODEL
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.serving.deployment import PromotionError, promote

    add_model_version(instance, version)
    # A better model than the first upgrade's, as a real next version is: twice the epochs and
    # its own seed. With v2's recipe and seed it would be v2 retrained bit for bit, and h would
    # map a space onto itself.
    epochs = 2 * fct.experiment().new_train.epochs
    upgrade = defs.resolve_job_def("upgrade").execute_in_process(
        instance=instance,
        partition_key=version,
        run_config={"ops": {NEW_MODEL: {"config": {"seed": 1, "epochs": epochs}}}},
        raise_on_error=False,
    )
    if not upgrade.success:
        print(f"fct demo: upgrade {version} failed; see the run log above", file=sys.stderr)
        return False
    try:
        row = promote(instance, fct.connect(), version)
    except PromotionError as err:
        print(f"not promoted: {err}")
        if "catch up" not in str(err):
            return False
        defs.resolve_job_def("catch_up").execute_in_process(
            instance=instance, partition_key=version
        )
        row = promote(instance, fct.connect(), version)
    print(f"\npromoted {version}: serving {row.table} @ LanceDB version {row.table_version}\n")
    return True


def _show_life(instance, fct, version: str, batch: IngestBatch) -> None:
    """The evaluation of the chained version, a search for an ingested item, lineage."""
    from fct_assets.lib.io_managers import recorded_record
    from fct_assets.lib.keys import EVAL_REPORT
    from fct_assets.lib.records import EvalReport
    from fct_assets.lineage.trace import format_lineage, format_row_lineage, lineage, row_lineage
    from fct_assets.serving.search import search_command
    from fct_assets.upgrade.report import markdown_table

    report = recorded_record(instance, EvalReport, EVAL_REPORT, version, within="json")
    print(markdown_table(report, include_plot=False))
    ingested = batch.ingested[0]
    hits = search_command(instance, fct, image=None, item_id=ingested, version=None, k=5)
    print(
        f"\nfct search --item-id {ingested} (an item of batch {batch.batch}), deployed {version}:"
    )
    print(f"{'rank':>4} {'item_id':>20} {'label':>5} {'distance':>10}  source")
    for rank, h in enumerate(hits, 1):
        print(f"{rank:>4} {h['item_id']:>20} {h['label']:>5} {h['distance']:>10.4f}  {h['source']}")
    print()
    print(format_lineage(lineage(instance, version, fct.connect())))
    db = fct.connect()
    original = (
        db.open_table(f"gallery_{version}")
        .search()
        .where("ingest_batch IS NULL")
        .select(["item_id"])
        .limit(1)
        .to_list()[0]["item_id"]
    )
    for item in (original, ingested):
        print()
        print(format_row_lineage(row_lineage(instance, db, version, item)))


if __name__ == "__main__":
    sys.exit(main())
