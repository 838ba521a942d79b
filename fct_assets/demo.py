"""`make demo`: the life of a gallery, end to end on the local instance.

Materialises the base assets (dataset, old model, side-info model, gallery store) and model
version v2 on Fashion-MNIST (preset `demo` unless FCT_PRESET says otherwise) and promotes it;
drops a few hundred held-back images (the validation split, never trained on) into the inbox,
where one tick of the inbox sensor launches their ingest run; upgrades to v3, chained from v2's
space, and promotes it; searches with an ingested item's image (where its own row ranks); and
prints each version's upgrade decision (served against proposed, negative flips, the gates, the
path of the worst flips' picture) and evaluation table, the search and the lineage of v3 and of
one original and one ingested row.

By default the terminal shows the story only (one line per stage with its time, a progress bar
on a terminal, the evaluation tables, two lines for the search, one for the lineage); everything
else (Dagster's run log, the search hits, the full lineage) goes to the log file, runs/demo.log.
`--verbose` (or FCT_VERBOSE=1) prints it all instead.

Deferred imports: the demo installs its warning filters and sends output to the log before
it imports dagster and the graph, whose import-time warnings and logs would otherwise reach
the terminal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fct_assets.lib.console import (
    Terminal,
    format_stage,
    ignore_accepted_warnings,
    loud,
    quiet,
    run_job,
    verbose,
)

if TYPE_CHECKING:
    from fct_assets.lib.records import IngestBatch

REPO = Path(__file__).resolve().parent.parent
LOG = REPO / "runs" / "demo.log"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print everything (Dagster's run log, warnings) instead of the story; env FCT_VERBOSE",
    )
    parser.add_argument(
        "--log", type=Path, default=LOG, help=f"the full log, when not verbose (default {LOG})"
    )
    args = parser.parse_args(argv)
    ignore_accepted_warnings()
    with loud() if verbose(args.verbose) else quiet(args.log) as term:
        return _demo(args, term)


def _demo(args, term: Terminal) -> int:
    started = time.perf_counter()
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

    from fct_assets.definitions import build_defs, resources
    from fct_assets.lib.keys import DATASET
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import FctResource
    from fct_assets.lineage.trace import format_lineage, lineage
    from fct_assets.serving.deployment import PromotionError, promote

    instance = dg.DagsterInstance.get()
    # The demo executes its runs one after another in this process, so nothing runs beside a
    # model step: each may take every core (the thread budget of concurrent runs would halve
    # them). FCT_CONCURRENT_RUNS still wins where it is set.
    fct = FctResource(concurrent_runs=int(os.environ.get("FCT_CONCURRENT_RUNS", "1")))
    defs = build_defs({**resources(), "fct": fct})
    print(
        f"fct demo: preset {fct.preset}, {args.dataset}; DAGSTER_HOME={home},"
        f" LanceDB {fct.lancedb_uri}" + (f"; full log {term.log}" if term.log else ""),
        flush=True,
    )
    config = {
        "ops": {DATASET: {"config": {"dataset": args.dataset, "old_classes": args.old_classes}}}
    }
    base, seconds = run_job(
        term,
        instance,
        defs.resolve_job_def("base"),
        "base assets",
        run_config=config,
        raise_on_error=False,
    )
    if not base.success:
        term.fail("fct demo: the base assets failed")
        return 1
    print(format_stage("base assets (dataset, old and side-info models, gallery)", seconds))
    add_model_version(instance, args.version)
    upgrade, seconds = run_job(
        term,
        instance,
        defs.resolve_job_def("upgrade"),
        f"upgrade {args.version}",
        partition_key=args.version,
        raise_on_error=False,
    )
    if not upgrade.success:
        term.fail(f"fct demo: upgrade {args.version} failed")
        return 1
    print(format_stage(f"upgrade {args.version} (new model, h, backfill, evaluation)", seconds))
    try:
        row = promote(instance, fct.connect(), args.version)
        print(f"promoted {args.version}: serving {row.table} @ LanceDB version {row.table_version}")
    except PromotionError as err:
        print(f"not promoted: {err}")
    _print_report(term, instance, args.version)
    if args.ingest:
        batch = _ingest_through_inbox(instance, defs, fct, args.ingest)
        if batch is None:
            term.fail("fct demo: the ingest failed")
            return 1
        if not _chained_upgrade(term, instance, defs, fct, args.next_version):
            return 1
        _show_life(term, instance, fct, args.next_version, batch)
    else:
        _detail(term, format_lineage(lineage(instance, args.version, fct.connect())))
    print(f"\nfct demo: done in {time.perf_counter() - started:.0f} s")
    print(
        "Open the UI with `make ui` (http://127.0.0.1:3000): asset graph, launchpad, eval report,"
        " checks, the ingest run."
    )
    if term.log:
        print(f"Full log (Dagster's run log, search hits, lineage): {term.log}")
    return 0


def _print_report(term: Terminal, instance, version: str) -> None:
    """The version's upgrade decision in three lines (S against P(0), NFR, the gates) with the
    path of its worst negative flips' picture, then the paper's cases as markdown, without
    blank lines."""
    from fct_assets.upgrade.report import (
        decision_summary,
        markdown_table,
        recorded_report,
        write_flips_png,
    )

    report = recorded_report(instance, version)
    print()
    for line in decision_summary(report):
        print(line)
    # Beside the log (runs/ by default), where the rest of what the demo writes goes.
    folder = term.log.parent if term.log else REPO / "runs"
    picture = folder / f"demo_{version}_worst_negative_flips.png"
    if write_flips_png(report, picture):
        print(f"  worst negative flips: {picture} (`fct diff` for the full comparison)")
    # The paper's cases and the gap closed; the backfilling areas and costs stay in the report
    # (the UI, `fct diff`), so the terminal keeps its line budget.
    table = markdown_table(report, include_plot=False, include_decision=False).splitlines()
    end = next((i for i, line in enumerate(table) if line.startswith("Gap closed")), len(table))
    print("\n".join(line for line in table[: end + 1] if line))


def _detail(term: Terminal, text: str) -> None:
    """Text for the log (and the terminal when verbose): the search hits, the lineage."""
    if term.log is None:
        print(f"\n{text}")
    else:
        sys.stderr.write(f"\n{text}\n")
        sys.stderr.flush()


def _ingest_through_inbox(instance, defs, fct, n: int) -> IngestBatch | None:
    """Write n held-back images (the validation split) into the inbox, one sub-folder per class;
    one evaluation of the inbox sensor (`fct_inbox`, through Dagster's public
    `build_sensor_context`) decides their batch, and the ingest run it requests runs here.
    Returns the batch's record."""
    import dagster as dg

    from fct_assets.ingest.ingest import folder_name, inbox_dir, inbox_settle_s
    from fct_assets.lib import storage
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
    time.sleep(inbox_settle_s())  # the sensor takes a file once it is unchanged this long
    started = time.perf_counter()
    sensor = defs.resolve_sensor_def("fct_inbox")
    # No cursor: every file in the inbox is new to this evaluation. The run moves its files out
    # of the inbox, so the daemon (under `make ui`), with a cursor of its own, never sees them.
    result = sensor(dg.build_sensor_context(instance=instance, definitions=defs, cursor=None))
    requests = result.run_requests if isinstance(result, dg.SensorResult) else []
    if len(requests or []) != 1:
        reason = result.skip_message if isinstance(result, dg.SkipReason) else None
        print(
            f"fct demo: the inbox sensor requested {len(requests or [])} runs"
            + (f" ({reason})" if reason else ""),
            file=sys.stderr,
        )
        return None
    # What the daemon does with a tick's result, done here: add the batch partitions it
    # requests, then run the requested run (partition, config, tags) in this process rather
    # than queue it for a daemon that is not running.
    for add in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    request = requests[0]
    batch = request.partition_key
    run = defs.resolve_job_def(request.job_name or sensor.job_name).execute_in_process(
        instance=instance,
        partition_key=batch,
        run_config=request.run_config,
        tags=request.tags,
        raise_on_error=False,
    )
    if not run.success:
        print(f"fct demo: ingest batch {batch} failed", file=sys.stderr)
        return None
    # The record itself (its metadata leaves out the per-item ids, so it does not read back as an
    # IngestBatch from there).
    record: IngestBatch = run.asset_value(INGESTED_BATCH)
    print(
        f"ingest batch {batch}: {record.added_to_store} items in gallery_store,"
        f" {record.added_to_table} in {record.table} ({record.space_id}),"
        f" {len(record.quarantined)} quarantined; inbox to searchable in"
        f" {time.perf_counter() - started:.1f} s (sensor tick + run)"
    )
    return record


def _chained_upgrade(term: Terminal, instance, defs, fct, version: str) -> bool:
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
    upgrade, seconds = run_job(
        term,
        instance,
        defs.resolve_job_def("upgrade"),
        f"upgrade {version}",
        partition_key=version,
        run_config={"ops": {NEW_MODEL: {"config": {"seed": 1, "epochs": epochs}}}},
        raise_on_error=False,
    )
    if not upgrade.success:
        term.fail(f"fct demo: upgrade {version} failed")
        return False
    print(format_stage(f"upgrade {version}, chained from the deployed space", seconds))
    try:
        row = promote(instance, fct.connect(), version)
    except PromotionError as err:
        print(f"not promoted: {err}")
        if "catch up" not in str(err):
            return False
        _, seconds = run_job(
            term,
            instance,
            defs.resolve_job_def("catch_up"),
            f"catch up {version}",
            partition_key=version,
        )
        print(format_stage(f"catch up {version}", seconds))
        row = promote(instance, fct.connect(), version)
    print(f"promoted {version}: serving {row.table} @ LanceDB version {row.table_version}")
    return True


def _show_life(term: Terminal, instance, fct, version: str, batch: IngestBatch) -> None:
    """The evaluation of the chained version, a search for an ingested item, lineage: in full
    when verbose, else two lines for the search and one for the lineage (in full in the log).

    What the search shows is what holds whatever the draw of the training: the item's row is h
    applied to its own v2 vector and side-info (recomputed here), and where that row ranks when
    the item's image is the query. Whether it ranks first is how well h approximates the new
    model on this item, which a small preset's h often does not."""
    from fct_assets.lib.io_managers import load_recorded_checkpoint, recorded_record
    from fct_assets.lib.keys import BACKFILLED_GALLERY, TRANSFORMATION
    from fct_assets.lib.records import BackfilledTable
    from fct_assets.lineage.trace import format_lineage, format_row_lineage, lineage, row_lineage
    from fct_assets.serving.search import search_command
    from fct_assets.upgrade.backfill import transformed_again

    _print_report(term, instance, version)
    ingested = batch.ingested[0]
    started = time.perf_counter()
    hits = search_command(instance, fct, image=None, item_id=ingested, version=None, k=5)
    seconds = time.perf_counter() - started
    table = [
        f"fct search --item-id {ingested} (an item of batch {batch.batch}), deployed {version}:",
        f"{'rank':>4} {'item_id':>20} {'label':>5} {'distance':>10}  source",
        *(
            f"{rank:>4} {h.item_id:>20} {h.label:>5} {h.distance:>10.4f}  {h.source}"
            for rank, h in enumerate(hits, 1)
        ),
    ]
    _detail(term, "\n".join(table))
    db = fct.connect()
    rank, rows, own = _rank_of_itself(instance, fct, ingested)
    backfilled = recorded_record(instance, BackfilledTable, BACKFILLED_GALLERY, version)
    h = load_recorded_checkpoint(instance, TRANSFORMATION, version).model
    row, again = transformed_again(db, backfilled, h, [ingested])
    source = backfilled.source.model_version if backfilled.source else None
    original = (
        db.open_table(f"gallery_{version}")
        .search()
        .where("ingest_batch IS NULL")
        .select(["item_id"])
        .limit(1)
        .to_list()[0]["item_id"]
    )
    _detail(term, format_lineage(lineage(instance, version, db)))
    for item in (original, ingested):
        _detail(term, format_row_lineage(row_lineage(instance, db, version, item)))
    if term.log is not None:
        top = hits[0] if hits else None
        first = (
            "none"
            if top is None
            else "itself"
            if top.item_id == ingested
            else f"item {top.item_id} at {top.distance:.4f}"
        )
        print()
        print(
            format_stage(
                f"search {version}: ingested item {ingested} ranks {rank} of {rows} by its image",
                seconds,
            )
        )
        print(
            f"  its row is {version}'s h of its own {source or 'old'} vector and side-info"
            f" (recomputed: max difference {float(np.abs(row - again).max()):.1e});"
            f" squared L2 to it {own:.4f}, first hit {first}"
        )
        print(
            f"lineage of {version}, of original row {original} and of the ingested row: in the log"
            f" (`fct lineage {version} --item-id {ingested}`)"
        )


def _rank_of_itself(instance, fct, item_id: int) -> tuple[int, int, float]:
    """In the deployed version's pinned table, with the item's stored image embedded by that
    version's new model as the query: (the rank of the item's own row, ties ranked against it;
    the rows ranked; the squared L2 distance to its row), from every row, exactly (the search
    itself may answer through the ANN index)."""
    # Deferred as the module's other imports are (its docstring says why).
    import torch

    from fct_assets.lib import storage
    from fct_assets.lib.io_managers import load_recorded_checkpoint
    from fct_assets.lib.keys import NEW_MODEL
    from fct_assets.serving.deployment import current
    from fct_ml.augment import to_float
    from fct_ml.training import encode

    db = fct.connect()
    served = current(db)
    model = load_recorded_checkpoint(instance, NEW_MODEL, served.version).model
    stored = (
        db.open_table(storage.GALLERY_STORE)
        .search()
        .where(f"item_id = {int(item_id)}")
        .select(["image"])
        .limit(1)
        .to_list()
    )
    image = torch.tensor(storage.decode_png(stored[0]["image"], model.config.in_channels))
    query = encode(model, [image[None]], transform=to_float)[0].numpy()
    table = (
        storage.open_pinned(db, served.table, served.table_version)
        .search()
        .select(["item_id", "embedding"])
        .limit(None)
        .to_arrow()
    )
    ids = table.column("item_id").to_numpy()
    distance = ((storage.vectors(table.column("embedding")) - query) ** 2).sum(1)
    own = float(distance[ids == item_id][0])
    return 1 + int((distance[ids != item_id] <= own).sum()), len(ids), own


if __name__ == "__main__":
    sys.exit(main())
