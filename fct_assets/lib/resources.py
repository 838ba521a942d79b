"""Resources: where fct keeps its state, which preset sizes the models, which device trains,
and how many threads each run's torch may take.

Object-store options and errors (the AWS environment) live in fct_assets/lib/object_store.py,
which a serving process imports without Dagster; they are re-exported here.
"""

from __future__ import annotations

import os
from functools import lru_cache

import dagster as dg
from pydantic import Field

from fct_assets.lib.object_store import (  # noqa: F401 (re-exported: the resources' API)
    DATA_ROOT,
    OBJECT_STORE_RETRIES,
    OBJECT_STORE_TIMEOUT_S,
    connect_lancedb,
    default_lancedb_uri,
    fsspec_storage_options,
    is_object_store,
    lancedb_storage_options,
    object_store_cause,
    object_store_error,
    s3_endpoint,
)


class FctResource(dg.ConfigurableResource):
    """Storage locations, the training preset, the device and the thread budget, for every fct
    asset."""

    lancedb_uri: str = Field(
        default_factory=default_lancedb_uri,
        description=(
            "LanceDB database: a folder, or an object-store URI such as s3://bucket/fct. Env"
            " FCT_LANCEDB_URI."
        ),
    )
    preset: str = Field(
        default_factory=lambda: os.environ.get("FCT_PRESET", "demo"),
        description=(
            # fct_ml.presets.PRESETS (tests/test_registries.py checks this list against it).
            "Sizes of models and training when an asset's config leaves them unset: tiny | demo |"
            " cpu | cpu-hard | paper. Env FCT_PRESET."
        ),
    )
    device: str = Field(
        default_factory=lambda: os.environ.get("FCT_DEVICE", "auto"),
        description="auto (cuda when present) | cpu | cuda | cuda:N. Env FCT_DEVICE.",
    )
    data_dir: str | None = Field(
        default_factory=lambda: os.environ.get("FCT_DATA_DIR"),
        description=(
            "Dataset folder (default: the Debian package's for Fashion-MNIST). Env FCT_DATA_DIR."
        ),
    )

    concurrent_runs: int = Field(
        default_factory=lambda: int(os.environ.get("FCT_CONCURRENT_RUNS", "2")),
        ge=1,
        description=(
            # 2: the runs that run models at once under dagster_home/dagster.yaml: one model step
            # of the `gpu` pool (every upgrade's model steps) plus one ingest run (its lane's
            # limit), which embeds outside the pool. Other lanes run no model.
            # tests/fct_assets/test_resources.py holds this equal to the yaml.
            "Runs that may execute at once (the run queue's max_concurrent_runs): each run's"
            " torch gets cores // this threads, so two runs share the cores instead of each"
            " taking a thread per core and thrashing. Env FCT_CONCURRENT_RUNS."
        ),
    )
    torch_threads: int = Field(
        default_factory=lambda: int(os.environ.get("FCT_TORCH_THREADS", "0")),
        ge=0,
        description=(
            "Threads of torch in each step that runs a model (intra-op and inter-op); 0: the"
            " run's share of the cores, cores // concurrent_runs and at least 1. Env"
            " FCT_TORCH_THREADS."
        ),
    )

    def connect(self):
        """The LanceDB connection (imported lazily: a code location should load fast)."""
        return connect_lancedb(self.lancedb_uri)

    def thread_budget(self) -> int:
        """The threads torch may take in one step of a run: `torch_threads`, or this process's
        cores divided among `concurrent_runs` (at least 1)."""
        return self.torch_threads or thread_budget(usable_cores(), self.concurrent_runs)

    def torch_device(self):
        """The device models run on. Every step that runs a model asks for it before anything
        else, so the run's thread budget is applied here (`apply_thread_budget`)."""
        apply_thread_budget(self.thread_budget())
        # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
        from fct_ml.training import resolve_device

        return resolve_device(self.device)

    def run(self, seed: int):
        """How fct_ml.pipeline's stages run here: the run's seed on this resource's device."""
        # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
        from fct_ml.pipeline import Run

        return Run(seed=seed, device=self.torch_device())

    def experiment(self):
        """The preset's ExperimentConfig: defaults for every asset config field left unset."""
        # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
        from fct_ml.presets import preset

        return preset(self.preset)

    def load_dataset(self, spec: str, fingerprint: str | None = None):
        """The dataset behind `spec`, refusing one whose content changed since `fingerprint`."""
        data = _load_dataset_cached(spec, self.data_dir)
        if fingerprint is not None and data.fingerprint() != fingerprint:
            from fct_ml.data import DataError  # deferred: fct_ml loads torch (~1.6 s)

            raise DataError(
                f"dataset {spec}: content fingerprint changed since it was materialised;"
                " re-materialise `dataset`"
            )
        return data


@lru_cache(maxsize=2)
def _load_dataset_cached(spec: str, data_dir: str | None):
    # Deferred: fct_ml loads torch (~1.6 s), which the code location and `fct` load without.
    from fct_ml.datasets import load_dataset

    return load_dataset(spec, data_dir)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share),
    else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def thread_budget(cores: int, concurrent_runs: int) -> int:
    """Threads for one run when `concurrent_runs` runs share `cores`: cores // concurrent_runs,
    at least 1."""
    return max(1, cores // max(1, concurrent_runs))


def apply_thread_budget(threads: int) -> int:
    """Let torch use `threads` threads in this process (intra-op, and inter-op where torch still
    allows it); returns the intra-op threads torch now reports."""
    # Deferred: torch costs ~1.6 s to import, which the code location and `fct` load without.
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        # Torch fixes its inter-op pool once it has run parallel work (or at the first call): a
        # later step of the same process keeps the size the first one set.
        pass
    return torch.get_num_threads()
