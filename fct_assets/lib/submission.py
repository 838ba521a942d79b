"""The run coordinator that refuses, at submission, a run whose launchpad values are out of range.

Dagster's config types have no numeric bounds (Int, Float), so neither the launchpad nor the
GraphQL launch can refuse `epochs: -1` by themselves: the run would start, and a bad value for a
later step is seen only when that step starts, after the earlier ones trained and replaced their
checkpoints. Every run submitted to the instance (the launchpad, the GraphQL client, sensors and
schedules, `dagster job launch`) passes through its run coordinator before it is queued: this one
checks each step's config with its class (`fct_assets.lib.config.launch_refusals`) and refuses
the run with one line per step, naming the field, the bound and the value. Nothing is queued and
no step runs; the instance marks the refused run failed with the same line.

Named in dagster_home/dagster.yaml. It is Dagster's queued run coordinator otherwise (run
concurrency, tag limits and pools as the `concurrency` settings say)."""

from __future__ import annotations

import dagster as dg

from fct_assets.lib.config import launch_refusals
from fct_assets.lib.dagster_internals import launch_refused


class CheckedRunCoordinator(dg.QueuedRunCoordinator):
    """Dagster's queued run coordinator, refusing a run whose config a step's class refuses."""

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        found = launch_refusals(run.run_config)
        if found:
            raise launch_refused(run.job_name, [(r.path, r.value, r.line) for r in found])
        return super().submit_run(context)
