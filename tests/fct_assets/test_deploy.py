"""deploy/: the same definitions on Kubernetes (k8s_job_executor, K8sRunLauncher, Postgres, LanceDB
on S3), loaded and validated here without a cluster or a database (nothing is connected to)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInvalidConfigError

from tests.support.dagster_internals import executor_config, instance_config, validate_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def _deploy_env() -> dict[str, str]:
    """The pods' environment: deploy/fct-env.yaml's ConfigMap, the executor config from this checkout
    (the image has it at /opt/fct/deploy) and a placeholder password where the secret would be."""
    data = yaml.safe_load((DEPLOY / "fct-env.yaml").read_text())["data"]
    return {
        **data,
        "FCT_EXECUTOR_CONFIG": str(DEPLOY / "k8s_executor.yaml"),
        "DAGSTER_PG_PASSWORD": "from-the-secret",
    }


def test_definitions_load_with_the_k8s_executor(tmp_path, monkeypatch):
    from fct_assets.definitions import build_defs, resources

    env = _deploy_env()
    assert env["FCT_EXECUTOR"] == "k8s" and env["FCT_LANCEDB_URI"].startswith("s3://")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    defs = build_defs()
    expected = yaml.safe_load((DEPLOY / "k8s_executor.yaml").read_text())
    jobs = list(defs.resolve_all_job_defs())
    assert {"base", "upgrade", "verify", "scheduled_evaluation", "promote", "rollback"} <= {
        j.name for j in jobs
    }
    for job in jobs:
        assert job.executor_def.name == "k8s", job.name
        # The run config Dagster resolves at launch: the deploy file's executor config, validated
        # against k8s_job_executor's schema.
        # Every job launches with no config (promote and rollback take their partition).
        execution = executor_config(job, {})
        assert (
            execution["max_concurrent"] == expected["max_concurrent"]
            and execution["job_namespace"] == "fct"
        )
        shard = execution["per_step_k8s_config"]["backfill_shard"]["container_config"]["resources"][
            "limits"
        ]
        assert shard["nvidia.com/gpu"] == 1
        # Every step that asks for a GPU tolerates the GPU nodes' taint (else its pod stays
        # Pending).
        for op in ("plan_backfill", "backfill_shard"):
            step = execution["per_step_k8s_config"][op]
            assert step["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in step[
                "pod_spec_config"
            ]["tolerations"]
    # The resources the code location builds: LanceDB, checkpoints and records on object storage.
    built = resources()
    assert built["fct"].lancedb_uri == env["FCT_LANCEDB_URI"]
    assert env["FCT_STORAGE_URI"].startswith("s3://")
    assert built["checkpoint_io_manager"].uri == f"{env['FCT_STORAGE_URI']}/checkpoints"
    assert built["record_io_manager"].uri == f"{env['FCT_STORAGE_URI']}/records"

    # Not vacuous: a key k8s_job_executor does not know is refused when the config is resolved.
    bad = {**expected, "gpus_per_shard": 1}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.setenv("FCT_EXECUTOR_CONFIG", str(tmp_path / "bad.yaml"))
    with pytest.raises(DagsterInvalidConfigError, match="gpus_per_shard"):
        executor_config(build_defs().resolve_job_def("upgrade"))
    monkeypatch.setenv("FCT_EXECUTOR", "spark")
    with pytest.raises(
        ValueError, match="FCT_EXECUTOR='spark': expected one of multiprocess | in_process | k8s"
    ):
        build_defs()


def test_code_location_validates_with_the_deploy_environment():
    # What the code-location pod runs at start (`dagster api grpc -m fct_assets.definitions`), in a
    # fresh process with the pods' environment.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "definitions",
            "validate",
            "-m",
            "fct_assets.definitions",
            "-a",
            "defs",
        ],
        cwd=REPO,
        env={**os.environ, **_deploy_env()},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_instance_yaml_has_postgres_storage_and_the_k8s_run_launcher(tmp_path, monkeypatch):
    from dagster_k8s import K8sRunLauncher
    from dagster_postgres.utils import pg_config

    for key, value in _deploy_env().items():
        monkeypatch.setenv(key, value)
    config = instance_config(str(DEPLOY))  # Dagster's instance schema
    ok, postgres = validate_config(pg_config(), config["storage"]["postgres"])
    assert ok, postgres
    db = postgres["postgres_db"]
    assert (db["hostname"], db["username"], db["db_name"], db["password"]) == (
        os.environ["DAGSTER_PG_HOST"],
        "dagster",
        "dagster",
        "from-the-secret",
    )  # from the environment, not the file
    assert (config["run_launcher"]["module"], config["run_launcher"]["class"]) == (
        "dagster_k8s",
        "K8sRunLauncher",
    )
    ok, launcher = validate_config(K8sRunLauncher.config_type(), config["run_launcher"]["config"])
    assert ok, launcher
    assert launcher["env_config_maps"] == ["fct-env"]
    assert config["concurrency"]["pools"]["granularity"] == "op"

    # Not vacuous: a misspelt storage key is refused by the same loader.
    bad = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    bad["storage"]["postgres"]["postgres_db"]["hostnme"] = bad["storage"]["postgres"][
        "postgres_db"
    ].pop("hostname")
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(DagsterInvalidConfigError):
        instance_config(str(tmp_path))


def test_the_image_stamps_the_commit_it_was_built_from(monkeypatch):
    # An image has no .git: deploy/Dockerfile passes the commit as FCT_CODE_VERSION, which wins.
    from fct_assets.lib.provenance import code_version

    assert "FCT_CODE_VERSION" in (DEPLOY / "Dockerfile").read_text()
    monkeypatch.setenv("FCT_CODE_VERSION", "0.1.0+gabcdef123456")
    assert code_version.__wrapped__() == "0.1.0+gabcdef123456"
    monkeypatch.delenv("FCT_CODE_VERSION")
    assert code_version.__wrapped__().startswith("0.1.0+g")  # this checkout's git commit
