"""A writer process for the concurrency harness, released at an instant the parent chooses.

    python writer_worker.py GO_FILE catch_up VERSION [ROWS_PER_BATCH]   # the catch_up job,
                                                                          # in this process
    python writer_worker.py GO_FILE promote VERSION     # `fct promote VERSION`

DAGSTER_HOME, FCT_LANCEDB_URI, FCT_STORAGE_URI, FCT_PRESET and FCT_DEVICE point it at the test's
instance and storage. Prints "ready" once imported, waits for GO_FILE, then does its one write
and prints one JSON line: {"what", "ok", "run_id", "line"} (line: the refusal or failure, one line).
"""

import json
import sys
import time
from pathlib import Path

import dagster as dg

from fct_assets.definitions import build_defs
from fct_assets.lib.resources import FctResource
from fct_assets.serving.deployment import promote


def _failure_line(result: dg.ExecuteInProcessResult) -> str:
    failure = next((e for e in result.all_events if e.is_step_failure), None)
    error = failure.step_failure_data.error if failure else None
    while error is not None and error.cause is not None:
        error = error.cause
    return error.message.strip().splitlines()[-1] if error else "failed without a step failure"


def main() -> None:
    go, what, version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    instance = dg.DagsterInstance.get()
    defs = build_defs()
    fct = FctResource()  # from the environment, as `fct` itself
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    out = {"what": f"{what} {version}", "ok": False, "run_id": "", "line": ""}
    if what == "catch_up":
        config = {}
        if len(sys.argv) > 4:  # smaller pages: a longer backfill, for a race to meet it
            rows = int(sys.argv[4])
            config = {"ops": {"backfilled_gallery": {"config": {"rows_per_batch": rows}}}}
        result = defs.resolve_job_def("catch_up").execute_in_process(
            instance=instance, partition_key=version, run_config=config, raise_on_error=False
        )
        out.update(ok=result.success, run_id=result.run_id)
        if not result.success:
            out["line"] = _failure_line(result)
    else:
        db = fct.connect()
        try:
            row = promote(instance, db, version)
            out.update(ok=True, line=f"seq {row.seq}")
        except ValueError as err:
            out["line"] = str(err)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
