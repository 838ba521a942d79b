"""The fct code location: `defs`, loaded lazily by `dagster dev`, `dg check defs`, `dg dev` (from
pyproject's [tool.dagster] / [tool.dg]) and workspace.yaml.

Deferred imports: the domains' definitions are imported when `defs` is built, so importing
this module (the CLI does, for the executor) builds nothing; dagster-k8s only when chosen.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from fct_assets.lib.io_managers import CheckpointIOManager, RecordIOManager
from fct_assets.lib.resources import FctResource


def resources() -> dict[str, object]:
    """Resources from the environment.

    FCT_LANCEDB_URI, FCT_STORAGE_URI, FCT_PRESET, FCT_DEVICE."""
    return {
        "fct": FctResource(),
        "checkpoint_io_manager": CheckpointIOManager(),
        "record_io_manager": RecordIOManager(),
    }


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXECUTORS = ("multiprocess", "in_process", "k8s")


def executor_from_env() -> dg.ExecutorDefinition:
    """The executor named by FCT_EXECUTOR (default multiprocess).

    A deployment picks it without editing code.

    multiprocess: each step in its own process on this machine (shards in parallel, the `gpu` pool
    limiting the model steps). in_process: one process (debugging). k8s: each step in its own
    Kubernetes job (dagster-k8s, imported only then), configured from the YAML file FCT_EXECUTOR_CONFIG
    (default deploy/k8s_executor.yaml)."""
    name = os.environ.get("FCT_EXECUTOR", "multiprocess")
    if name == "multiprocess":
        return dg.multiprocess_executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "k8s":
        import yaml
        from dagster_k8s import k8s_job_executor

        path = Path(os.environ.get("FCT_EXECUTOR_CONFIG", DEPLOY / "k8s_executor.yaml"))
        try:
            config = yaml.safe_load(path.read_text())
        except OSError as err:
            raise ValueError(
                f"FCT_EXECUTOR_CONFIG {str(path)!r}: cannot read ({err.strerror}); expected a YAML"
                " file of k8s_job_executor config"
            ) from None
        return k8s_job_executor.configured(config or {}, name="k8s")
    raise ValueError(f"FCT_EXECUTOR={name!r}: expected one of {' | '.join(EXECUTORS)}")


def asset_graph() -> tuple[list, list]:
    """The eight assets of the graph (base, then upgrade) and their blocking checks."""
    from fct_assets.base import assets as base_assets
    from fct_assets.base import checks as base_checks
    from fct_assets.upgrade import assets as upgrade_assets
    from fct_assets.upgrade import checks as upgrade_checks

    return (
        [*base_assets.ASSETS, *upgrade_assets.ASSETS],
        [*base_checks.CHECKS, *upgrade_checks.CHECKS],
    )


def build_defs(
    resource_defs: dict[str, object] | None = None, executor: dg.ExecutorDefinition | None = None
) -> dg.Definitions:
    """The definitions with the given resources and executor (default: FCT_EXECUTOR).

    Tests pass temporary folders as resources."""
    # Imported here, not at module level: importing this module builds nothing.
    from fct_assets.base.jobs import base_job
    from fct_assets.ingest.assets import fct_inbox, ingest_job, ingested_batch
    from fct_assets.ops.housekeeping import daily_housekeeping, housekeeping_job
    from fct_assets.ops.run_reaper import run_reaper
    from fct_assets.serving import served_version
    from fct_assets.serving.jobs import promote_job, rollback_job
    from fct_assets.upgrade.automation import (
        automation_sensor,
        catch_up_job,
        daily_evaluation,
        scheduled_evaluation_job,
        upgrade_job,
        verify_job,
    )

    assets, checks = asset_graph()
    return dg.Definitions(
        assets=[*assets, ingested_batch, served_version.spec()],
        asset_checks=checks,
        jobs=[
            base_job,
            upgrade_job,
            verify_job,
            scheduled_evaluation_job,
            promote_job,
            rollback_job,
            ingest_job,
            catch_up_job,
            housekeeping_job,
        ],
        schedules=[daily_evaluation, daily_housekeeping],
        sensors=[automation_sensor, fct_inbox, run_reaper],
        resources=resource_defs or resources(),
        executor=executor or executor_from_env(),
    )


@dg.definitions
def defs() -> dg.Definitions:
    """The definitions with resources and executor from the environment, built when loaded."""
    return build_defs()
