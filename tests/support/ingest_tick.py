"""Ticks of the real inbox sensor, as the Dagster sensor daemon runs them, in a fresh process
(the code location loaded from `fct_assets.definitions`, FCT_INBOX read from the environment).

    python -m tests.support.ingest_tick TICKS

Ticks TICKS times, waiting out the sensor's minimum interval between ticks, and prints as JSON
what each tick submitted: [[{"partition", "run_config", "tags"}, ...], ...]. Runs are queued
(the instance's default run coordinator, with no daemon dequeuing) and deleted afterwards, so
nothing executes here; the test executes what was requested.
"""

from __future__ import annotations

import json
import sys
import time

import dagster as dg

from fct_assets.ingest.assets import inbox_interval
from tests.support.dagster_internals import tick_sensors


def main(ticks: int) -> None:
    instance = dg.DagsterInstance.get()
    out = []
    for n in range(ticks):
        if n:
            time.sleep(inbox_interval() + 1)
        before = {run.run_id for run in instance.get_runs()}
        tick_sensors(instance, "fct_assets.definitions")
        submitted = []
        for run in instance.get_runs():
            if run.run_id in before:
                continue
            submitted.append(
                {
                    "partition": run.tags.get("dagster/partition"),
                    "run_config": run.run_config,
                    "job": run.job_name,
                }
            )
            instance.delete_run(run.run_id)
        out.append(submitted)
    print(json.dumps(out))


if __name__ == "__main__":
    main(int(sys.argv[1]))
