"""A backfill of one model version in its own process, for the crash tests.

    python backfill_worker.py ROOT VERSION BATCH_SIZE

ROOT holds the test's dagster_home, lancedb, checkpoints and records folders. Prints one line
per batch ("backfill VERSION: n/N items ...") and flushes, so the parent can kill it mid-way.
"""

import json
import sys
from pathlib import Path

import dagster as dg

from fct_assets.backfill import backfill_version
from fct_assets.io_managers import recorded_metadata
from fct_assets.resources import FctResource
from fct_ml.checkpoint import load_checkpoint


def main() -> None:
    root, version, batch_size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    instance = dg.DagsterInstance.from_config(str(root / "dagster_home"))
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="tiny", device="cpu")
    models = {}
    for name in ("new_model", "transformation"):
        meta = recorded_metadata(instance, dg.AssetKey(name), version)
        model, _ = load_checkpoint(meta["path"], meta["sha256"])
        model.space_id, model.checkpoint_sha256 = meta["space_id"], meta["sha256"]
        models[name] = model
    store = json.loads((root / "records" / "gallery_store.json").read_text())
    record = backfill_version(
        fct,
        version,
        store,
        models["transformation"],
        models["new_model"],
        0.25,
        batch_size,
        log=lambda line: print(line, flush=True),
    )
    print("DONE", json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
