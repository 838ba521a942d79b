"""The fct resource's thread budget: computed from the cores and the run queue's concurrency, and
applied to torch (read back from torch itself, in a fresh interpreter: torch fixes its inter-op
pool once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from fct_assets.lib.resources import FctResource, thread_budget, usable_cores

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("cores", "runs", "threads"),
    [(2, 2, 1), (16, 2, 8), (3, 2, 1), (8, 3, 2), (1, 4, 1), (4, 1, 4)],
)
def test_each_run_gets_its_share_of_the_cores_and_at_least_one(cores, runs, threads):
    assert thread_budget(cores, runs) == threads


def test_the_default_concurrency_is_the_run_queues(monkeypatch):
    monkeypatch.delenv("FCT_CONCURRENT_RUNS", raising=False)
    monkeypatch.delenv("FCT_TORCH_THREADS", raising=False)
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    fct = FctResource()
    # The runs that run models at once: the `gpu` pool's slots (every model step of an
    # upgrade) plus the ingest lane's (an ingest embeds outside the pool, so it never waits
    # behind a backfill). Other runs (promote, housekeeping, the rest of an upgrade) run no model.
    lanes = {
        limit["value"]: limit["limit"]
        for limit in config["concurrency"]["runs"]["tag_concurrency_limits"]
        if limit["key"] == "fct/lane"
    }
    gpu = config["concurrency"]["pools"]["default_limit"]
    assert fct.concurrent_runs == gpu + lanes["ingest"] == 2
    assert fct.torch_threads == 0
    assert (
        fct.thread_budget()
        == max(1, len(os.sched_getaffinity(0)) // 2)
        == thread_budget(usable_cores(), 2)
    )


def test_the_budget_comes_from_the_environment_or_the_config(monkeypatch):
    monkeypatch.setenv("FCT_TORCH_THREADS", "3")
    monkeypatch.setenv("FCT_CONCURRENT_RUNS", "4")
    assert (FctResource().torch_threads, FctResource().concurrent_runs) == (3, 4)
    assert FctResource().thread_budget() == 3  # an explicit count wins
    assert FctResource(torch_threads=0, concurrent_runs=64).thread_budget() == 1
    with pytest.raises(pydantic.ValidationError, match="concurrent_runs"):
        FctResource(concurrent_runs=0)
    with pytest.raises(pydantic.ValidationError, match="torch_threads"):
        FctResource(torch_threads=-1)


def _threads_after_torch_device(tmp_path, **environ) -> dict:
    """torch's thread counts in a fresh interpreter after FctResource.torch_device(), as a step
    that runs a model starts."""
    code = (
        "import json, torch\n"
        "from fct_assets.lib.resources import FctResource\n"
        f"FctResource(lancedb_uri={str(tmp_path)!r}, device='cpu').torch_device()\n"
        "print(json.dumps({'intra': torch.get_num_threads(),"
        " 'inter': torch.get_num_interop_threads()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FCT_", "OMP_", "MKL_"))}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "PYTHONPATH": str(REPO), **environ},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_model_step_applies_the_budget_to_torch(tmp_path):
    cores = len(os.sched_getaffinity(0))
    seen = _threads_after_torch_device(tmp_path, FCT_CONCURRENT_RUNS="2")
    assert seen["intra"] == seen["inter"] == max(1, cores // 2)
    # An explicit count, above the cores too (a pod that knows its CPU quota better).
    seen = _threads_after_torch_device(tmp_path, FCT_TORCH_THREADS=str(cores + 1))
    assert seen["intra"] == seen["inter"] == cores + 1
