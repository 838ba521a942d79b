"""Test-only: Dagster's private API (`dagster._core`, `dagster._config`, `dagster._daemon`)
that tests and benchmarks need and the product does not.

Each function does something the public API does not offer (as of dagster 1.13); the reason is
beside it. Each has a test (tests/support/test_dagster_internals.py), so a Dagster upgrade that
moves one fails there. The product's own private calls are in fct_assets/lib/dagster_internals.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._config import process_config
from dagster._core.definitions.data_version import CachingStaleStatusResolver
from dagster._core.instance.config import dagster_instance_config
from dagster._core.loader import LoadingContextForTest
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster._core.test_utils import create_run_for_test, create_test_daemon_workspace_context
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import (
    QueuedRunCoordinatorDaemon,
)
from dagster._daemon.sensor import execute_sensor_iteration

__all__ = [
    "RunQueue",
    "executor_config",
    "instance_config",
    "queued_instance",
    "run_queue",
    "stale_status",
    "tick_sensors",
    "validate_config",
]


def executor_config(job: dg.JobDefinition, run_config: dict | None = None) -> dict[str, Any]:
    """The executor config Dagster resolves for `job` at launch (defaults filled, validated).

    No public call resolves run config without launching a run; deploy/ is checked with it
    without a cluster. Raises dg.DagsterInvalidConfigError on a key the executor does not know."""
    return ResolvedRunConfig.build(job, run_config or {}).execution.execution_engine_config


def instance_config(folder: str, filename: str = "dagster.yaml") -> dict[str, Any]:
    """A dagster.yaml as Dagster's instance loader reads it (env vars resolved, schema checked).

    The public DagsterInstance would also connect to its storage; deploy/'s Postgres is not here.
    Raises dg.DagsterInvalidConfigError on a key the schema does not know."""
    config, _ = dagster_instance_config(folder, filename)
    return config


def validate_config(config_type: Any, value: Any) -> tuple[bool, Any]:
    """(True, value with defaults) if `value` fits `config_type`, else (False, the errors).

    Used on the config schemas of integration classes (K8sRunLauncher, Postgres storage) that
    have no public validator."""
    result = process_config(config_type, value)
    return (True, result.value) if result.success else (False, result.errors)


def stale_status(
    instance: dg.DagsterInstance,
    defs: dg.Definitions,
    asset_key: dg.AssetKey,
    partition: str | None = None,
) -> str:
    """ "FRESH", "STALE" or "MISSING": what the UI shows for (asset, partition).

    The public API exposes data versions but not the staleness Dagster derives from them."""
    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    return resolver.get_status(asset_key, partition).value


def tick_sensors(instance: dg.DagsterInstance, module_name: str, attribute: str = "defs") -> None:
    """One iteration of the sensor daemon (`dagster-daemon`'s SENSOR loop) over the code location
    `module_name:attribute`: every running sensor that is due is evaluated, its cursor and
    dynamic-partition requests are applied and its runs submitted, as in a deployment.

    The public API evaluates a sensor function alone (`build_sensor_context`), without the
    daemon's cursor storage, partition requests and run submission; tests and benchmarks tick the
    real thing."""
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name=module_name, attribute=attribute)
    )
    with create_test_daemon_workspace_context(
        InProcessWorkspaceLoadTarget(origin), instance
    ) as workspace:
        list(execute_sensor_iteration(workspace, logging.getLogger("fct.sensor"), None, None))


@contextlib.contextmanager
def queued_instance(folder: str, concurrency: Mapping[str, Any]) -> Iterator[dg.DagsterInstance]:
    """A real instance in `folder` whose run coordinator is the QueuedRunCoordinator under
    `concurrency` (a dagster.yaml's `concurrency` section) and whose run launcher records the runs
    it is given instead of starting a process for each (Dagster's MockedRunLauncher): a dequeued
    run stays STARTING, in progress, as a long upgrade would.

    What the run queue decides is the subject; starting worker processes for real would run the
    upgrade's training here, and no public launcher leaves runs in progress."""
    overrides = {
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
        },
        "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"},
        "concurrency": dict(concurrency),
        "telemetry": {"enabled": False},
    }
    with dg.DagsterInstance.local_temp(folder, overrides=overrides) as instance:
        yield instance


@dataclass
class RunQueue:
    """The run queue of an instance, over a loaded code location (see `run_queue`)."""

    instance: dg.DagsterInstance
    context: Any  # the daemon's workspace process context
    repository: Any  # the code location's remote repository

    def submit(self, job_name: str, tags: Mapping[str, str] | None = None) -> str:
        """Submit a run of `job_name`, tagged as a launch of it is (the job's own tags, then
        `tags`), to the instance's run coordinator, as the UI's Launch or a sensor does; its id."""
        job = self.repository.get_full_job(job_name)
        run = create_run_for_test(
            self.instance,
            job_name=job_name,
            tags={**job.tags, **(tags or {})},
            remote_job_origin=job.get_remote_origin(),
            job_code_origin=job.get_python_origin(),
        )
        self.instance.submit_run(run.run_id, self.context.create_request_context())
        return run.run_id

    def dequeue(self) -> None:
        """One iteration of `dagster-daemon`'s run queue loop: the queued runs its limits allow
        are launched."""
        daemon = QueuedRunCoordinatorDaemon(interval_seconds=1)
        list(daemon.run_iteration(self.context))

    def status(self, run_id: str) -> str:
        return self.instance.get_run_by_id(run_id).status.value


@contextlib.contextmanager
def run_queue(
    instance: dg.DagsterInstance, module_name: str, attribute: str = "defs"
) -> Iterator[RunQueue]:
    """The run queue of `instance` over the code location `module_name:attribute`, loaded as the
    daemon loads it. The public API submits runs only through a running webserver or daemon and
    has no call that runs one iteration of the queue."""
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name=module_name, attribute=attribute)
    )
    with create_test_daemon_workspace_context(
        InProcessWorkspaceLoadTarget(origin), instance
    ) as context:
        workspace = context.create_request_context()
        (name,) = workspace.get_code_location_entries()
        (repository,) = workspace.get_code_location(name).get_repositories().values()
        yield RunQueue(instance, context, repository)
