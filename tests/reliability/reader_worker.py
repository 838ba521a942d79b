"""A reader process for the concurrency harness: searches the deployed table until told to stop.

    python reader_worker.py LANCEDB_URI GO_FILE STOP_FILE OUT_JSON

Prints "ready" once imported and connected, waits for GO_FILE, then loops until STOP_FILE
exists: read the deployment serving now, take one stored vector of its pinned table version,
search that version for it (k=5) and check the item itself comes first at distance 0 (the answer
came from the version it was asked of). Writes {"queries", "failed", "errors" (first 5),
"seen": [[version, table_version], ...]} to OUT_JSON.
"""

import json
import random
import sys
import time
from pathlib import Path

import lancedb

from fct_assets.lib import storage
from fct_assets.serving.deployment import current, search


def main() -> None:
    uri, go, stop, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    db = lancedb.connect(uri)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    queries, failed, errors, seen = 0, 0, [], set()
    rng = random.Random()
    while not stop.exists():
        try:
            served = current(db)
            table = storage.open_pinned(db, served.table, served.table_version)
            rows = table.count_rows()
            row = table.search().select(["item_id", "embedding"]).offset(rng.randrange(rows))
            row = row.limit(1).to_list()[0]
            hits = search(db, row["embedding"], version=served, k=5)
            if len(hits) != min(5, rows) or hits[0].distance > 1e-6:
                raise AssertionError(f"asked for item {row['item_id']}, got {hits[:1]}")
            if hits[0].item_id != row["item_id"]:
                # Another item with the very same vector (a duplicate picture) is also right.
                if hits[0].distance != 0.0:
                    raise AssertionError(f"asked for item {row['item_id']}, got {hits[:1]}")
            seen.add((served.version, served.table_version))
            queries += 1
        except Exception as err:  # every failure is a finding
            failed += 1
            if len(errors) < 5:
                errors.append(f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    out.write_text(
        json.dumps(
            {"queries": queries, "failed": failed, "errors": errors, "seen": sorted(seen)},
        )
    )


if __name__ == "__main__":
    main()
