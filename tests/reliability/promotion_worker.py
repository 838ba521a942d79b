"""Promotions from one process, for the promotion race test.

    python promotion_worker.py LANCEDB_URI WORKER_INDEX PROMOTIONS GO_FILE [no-file-lock]

Prints "ready" once imported and connected, waits until GO_FILE exists (the parent creates it
when every worker is ready, so all are released at the same instant), then records
PROMOTIONS deployment rows through the same commit `fct promote` ends with, each
serving `gallery_w<index>` at table version <k>, and prints one JSON line per row.
`no-file-lock`: without the folder's OS lock, as on an object store where it does not exist:
the conditional commit alone keeps the seqs apart.
"""

import json
import sys
import time
from pathlib import Path

import lancedb

from fct_assets.lib.records import VersionTable
from fct_assets.serving import deployment


def main() -> None:
    uri, index, promotions, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    file_lock = sys.argv[5:] != ["no-file-lock"]
    db = lancedb.connect(uri)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    for k in range(1, promotions + 1):
        table = VersionTable(
            version=f"w{index}", table=f"gallery_w{index}", table_version=k, space_id="s@0"
        )
        row = deployment.append(db, "promote", table, file_lock=file_lock)
        served = deployment.current(db)
        print(json.dumps({"seq": row.seq, "worker": index, "k": k, "served_seq": served.seq}))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
