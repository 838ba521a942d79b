"""A backfill of one model version in its own process, for the crash tests.

    python backfill_worker.py ROOT VERSION BATCH_SIZE

ROOT holds the test's dagster_home, lancedb, checkpoints and records folders. Prints one line
per batch ("backfill VERSION: n/N items ...") and flushes, so the parent can kill it mid-way.
"""

import sys
from pathlib import Path

import dagster as dg

from fct_assets.lib import records
from fct_assets.lib.io_managers import load_recorded_checkpoint
from fct_assets.lib.resources import FctResource
from fct_assets.upgrade.backfill import backfill_version


def main() -> None:
    root, version, batch_size = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    instance = dg.DagsterInstance.from_config(str(root / "dagster_home"))
    fct = FctResource(lancedb_uri=str(root / "lancedb"), preset="tiny", device="cpu")
    models = {
        name: load_recorded_checkpoint(instance, name, version)
        for name in ("new_model", "transformation")
    }
    path = root / "records" / "gallery_store.json"
    store = records.loads(path.read_text(), str(path), records.GalleryStore)
    record = backfill_version(
        fct,
        version,
        store,
        models["transformation"].model,
        models["new_model"],
        0.25,
        batch_size,
        log=lambda line: print(line, flush=True),
    )
    print("DONE", record.model_dump_json(), flush=True)


if __name__ == "__main__":
    main()
