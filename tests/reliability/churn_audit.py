"""The churn harness's verdict (tests/reliability/test_churn.py): invariants 1-4 of a living
gallery, read from what the gallery left behind, never from what the harness saw happen.

Read: the `deployments` table, the served table at the version its row pins, `gallery_store`,
the inbox (files still waiting, `.processed/`, `.quarantine/` with its `.reason.txt` files), the
new model's checkpoint of the served version, and the blocking checks' evaluations in the event
log (invariant 2 names a check result, which Dagster keeps there).

1. Every file written ends in exactly one right place: an intact picture searchable exactly
   once in the served table version (matched by content id, as ingest derives it); a file that
   is not a picture quarantined with a one-line reason. Anything else is lost; an id found more
   than once is duplicated.
2. Every table version a deployment row served passed the blocking checks: from the tables (ids
   unique, vectors finite, every row in the row's space; the served one holds every stored
   item), and as recorded (an evaluation of each blocking check passed on that very version).
3. Every vector's space_id is the space its values are in: the served table's rows, its schema
   and the served version's new model agree, and ingested vectors re-embedded from the stored
   images with that model come out the same.
4. No rollback shrank what is searchable: each rollback row's table version holds every item
   the row before it served. The harness never forces a rollback, so any shrink is silent.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import torch

from fct_assets.ingest.ingest import PROCESSED, QUARANTINE, scan_inbox
from fct_assets.lib import storage
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lib.keys import NEW_MODEL, PROMOTION_CHECKS
from fct_assets.serving.deployment import history
from fct_ml.pipeline import embed

REEMBED_SAMPLE = 32  # ingested rows of the served table re-embedded for invariant 3
EXAMPLES = 3  # files named per cause of loss in the report


def quarantined(inbox: Path) -> dict[str, tuple[str, str]]:
    """{relpath: (batch, text of its reason file)} of every file under <inbox>/.quarantine/."""
    out = {}
    root = inbox / QUARANTINE
    for reason in sorted(root.glob("*/**/*.reason.txt")):
        batch = reason.relative_to(root).parts[0]
        relpath = reason.relative_to(root / batch).as_posix().removesuffix(".reason.txt")
        out[relpath] = (batch, reason.read_text())
    return out


def processed(inbox: Path) -> set[str]:
    """Relpaths of the files under <inbox>/.processed/<batch>/."""
    root = inbox / PROCESSED
    return {
        p.relative_to(root).as_posix().split("/", 1)[1] for p in root.glob("*/**/*") if p.is_file()
    }


def one_line(text: str) -> bool:
    """A reason file's text is one non-empty line (ending in a newline)."""
    return bool(text.strip()) and text.endswith("\n") and "\n" not in text[:-1]


def item_ids(db, table: str, version: int) -> np.ndarray:
    column = storage.open_pinned(db, table, version).to_arrow().column("item_id")
    return column.to_numpy()


def files_verdict(db, inbox: Path, manifest: list[dict]) -> dict:
    """Invariant 1: where each written file ended, against the served table version."""
    serving = history(db)[-1]
    served = Counter(item_ids(db, serving.table, serving.table_version).tolist())
    store = set(db.open_table(storage.GALLERY_STORE).to_arrow().column("item_id").to_pylist())
    reasons, moved = quarantined(inbox), processed(inbox)
    waiting = {f.relpath for f in scan_inbox(inbox)}
    out = Counter()
    lost: dict[str, list[str]] = {}
    for entry in manifest:
        relpath, item = entry["relpath"], entry["content_id"]
        if entry["kind"] == "bad":
            batch_reason = reasons.get(relpath)
            if batch_reason is not None and one_line(batch_reason[1]):
                out["quarantined"] += 1
                continue
            cause = "not an image, not quarantined with a one-line reason"
        elif served[item] == 1:
            out["searchable"] += 1
            continue
        elif served[item] > 1:
            out["duplicated"] += 1
            continue
        elif relpath in reasons:
            cause = f"an intact picture quarantined ({entry['kind']} write)"
        elif relpath in waiting:
            cause = "left in the inbox"
        elif item in store:
            cause = "landed in gallery_store, not in the served table version"
        elif relpath in moved:
            cause = "moved to .processed, in no table"
        else:
            cause = "nowhere"
        what = relpath
        if relpath in reasons:
            what += f": {reasons[relpath][1].strip()}"
        lost.setdefault(cause, []).append(what)
    return {
        "files": len(manifest),
        "searchable": out["searchable"],
        "quarantined": out["quarantined"],
        "lost": sum(len(v) for v in lost.values()),
        "duplicated": out["duplicated"],
        "left_in_inbox": len(waiting),
        "lost_by_cause": {k: len(v) for k, v in sorted(lost.items())},
        "lost_examples": {k: v[:EXAMPLES] for k, v in sorted(lost.items())},
    }


def check_evaluations(instance: dg.DagsterInstance) -> set[tuple[str, str, str, int]]:
    """(asset, check, partition, table_version) of every passed blocking-check evaluation that
    names the table version it read, over every run of the instance."""
    wanted = {(k.asset_key.to_user_string(), k.name) for k in PROMOTION_CHECKS}
    passed = set()
    for run in instance.get_runs():
        for entry in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ):
            evaluation = entry.dagster_event.event_specific_data
            key = (evaluation.asset_key.to_user_string(), evaluation.check_name)
            checked = evaluation.metadata.get("table_version")
            if not evaluation.passed or key not in wanted or checked is None:
                continue
            partition = evaluation.partition or run.tags.get("dagster/partition")
            passed.add((*key, partition, int(checked.value)))
    return passed


def served_checks_verdict(instance: dg.DagsterInstance, db) -> dict:
    """Invariant 2, over every table version a deployment row served."""
    rows = history(db)
    passed = check_evaluations(instance)
    store = db.open_table(storage.GALLERY_STORE).to_arrow().column("item_id")
    failing, unchecked, exact = [], [], 0
    for row in {(r.version, r.table, r.table_version, r.space_id): r for r in rows}.values():
        table = storage.open_pinned(db, row.table, row.table_version).to_arrow()
        ids = table.column("item_id")
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy()
        spaces = set(table.column("space_id").to_pylist())
        why = []
        if pc.count_distinct(ids).as_py() != len(ids):
            why.append(f"{len(ids) - pc.count_distinct(ids).as_py()} duplicated ids")
        if not np.isfinite(vectors).all():
            why.append("non-finite vectors")
        if spaces - {row.space_id}:
            why.append(f"rows of spaces {sorted(spaces - {row.space_id})}")
        if row is rows[-1]:
            missing = pc.sum(pc.invert(pc.is_in(store, value_set=ids.combine_chunks()))).as_py()
            if missing:
                why.append(f"lacks {missing} stored items")
        where = f"seq {row.seq} ({row.action}) {row.table}@{row.table_version}"
        if why:
            failing.append(f"{where}: {', '.join(why)}")
        # Invariant 2 as stated: every blocking check passed on this table version, or on an
        # earlier version of the same publish (this one holds that one's rows plus appends).
        names = [(k.asset_key.to_user_string(), k.name) for k in PROMOTION_CHECKS]
        checked_at = [
            {v for (a, c, part, v) in passed if (a, c) == n and part == row.version} for n in names
        ]
        if all(row.table_version in at for at in checked_at):
            exact += 1
        elif not all(
            any(storage.same_publish(db, row.table, v, row.table_version) for v in at)
            for at in checked_at
        ):
            unchecked.append(where)
    return {
        "served_table_versions": len({(r.table, r.table_version) for r in rows}),
        "served_failing_checks": len(failing),
        "served_failing_examples": failing[:EXAMPLES],
        "served_checked_exactly": exact,
        "served_without_a_passed_check": len(unchecked),
        "served_without_a_passed_check_examples": unchecked[:EXAMPLES],
    }


def space_verdict(instance: dg.DagsterInstance, db, experiment, channels: int) -> dict:
    """Invariant 3, on the table version served now (`channels`: the gallery images')."""
    serving = history(db)[-1]
    pinned = storage.open_pinned(db, serving.table, serving.table_version)
    table = pinned.to_arrow()
    model = load_recorded_checkpoint(instance, NEW_MODEL, serving.version)
    declared = storage.table_space_ids(pinned).get("space_id")
    wrong = pc.sum(pc.not_equal(table.column("space_id"), serving.space_id)).as_py() or 0
    labels = {
        "deployment row": serving.space_id,
        "table schema": declared,
        f"new_model[{serving.version}]": model.space_id,
    }
    ingested = table.filter(pc.equal(table.column("source"), "ingested"))
    sample = ingested.slice(0, REEMBED_SAMPLE)
    off = 0
    if len(sample):
        ids = sample.column("item_id").to_pylist()
        store = db.open_table(storage.GALLERY_STORE)
        where = f"item_id IN ({', '.join(map(str, ids))})"
        found = store.search().where(where).select(["item_id", "image"]).limit(len(ids))
        found = found.to_arrow().to_pydict()
        blobs = dict(zip(found["item_id"], found["image"]))
        images = np.stack([storage.decode_png(blobs[i], channels) for i in ids])
        dim = sample.column("embedding").type.list_size
        again = embed(model.model.to("cpu"), torch.from_numpy(images), experiment).numpy()
        held = sample.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        off = int((~np.isclose(again, held, rtol=1e-3, atol=1e-4).all(axis=1)).sum())
    return {
        "rows_of_another_space": int(wrong),
        "space_labels_agree": len(set(labels.values())) == 1,
        "space_labels": labels,
        "ingested_rows_reembedded": len(sample),
        "ingested_rows_not_in_their_space": off,
    }


def rollback_verdict(db) -> dict:
    """Invariant 4: each rollback row against the row before it."""
    rows = history(db)
    shrinks, dropped = [], 0
    for before, row in zip(rows, rows[1:]):
        if row.action != "rollback":
            continue
        kept = item_ids(db, row.table, row.table_version)
        gone = np.setdiff1d(item_ids(db, before.table, before.table_version), kept).size
        if gone:
            dropped += gone
            shrinks.append(
                f"seq {row.seq} rollback to {row.version}: {gone} items no longer searchable"
            )
    return {
        "rollbacks": sum(r.action == "rollback" for r in rows),
        "silent_shrinks": len(shrinks),
        "items_dropped_by_rollbacks": int(dropped),
        "shrink_examples": shrinks[:EXAMPLES],
    }


def audit(
    instance: dg.DagsterInstance,
    db,
    inbox: Path,
    manifest: list[dict],
    experiment,
    channels: int,
) -> dict:
    """Every invariant's figures (JSON-ready); `experiment`: the preset's ExperimentConfig (the
    encode batch size), `channels`: the gallery images'."""
    out = {
        **files_verdict(db, inbox, manifest),
        **served_checks_verdict(instance, db),
        **space_verdict(instance, db, experiment, channels),
        **rollback_verdict(db),
    }
    json.dumps(out)  # JSON-ready, or fail here rather than in the report
    return out
