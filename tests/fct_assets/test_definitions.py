"""The code location as Dagster's tools load it, and where its steps run."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

REPO = Path(__file__).resolve().parents[2]
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _run(argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_dg_check_defs_and_dagster_load_from_pyproject(tmp_path):
    # pyproject's [tool.dg] and [tool.dagster], from the repo root, without workspace.yaml.
    bin_dir = Path(sys.executable).parent
    checked = _run([str(bin_dir / "dg"), "check", "defs"], tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = _run([str(bin_dir / "dg"), "list", "defs", "--json"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert '"transformation"' in listed.stdout and '"eval_report"' in listed.stdout


def test_importing_the_definitions_builds_nothing():
    code = (
        "import sys, dagster as dg, fct_assets.definitions as d;"
        "assert 'fct_assets.base.assets' not in sys.modules, 'assets imported at import time';"
        "assert 'fct_assets.upgrade.assets' not in sys.modules, 'assets imported at import time';"
        "defs = d.defs();"
        "assert isinstance(defs, dg.Definitions);"
        "print(len(list(defs.resolve_all_asset_specs())))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # The base, the upgrade's four, ingested_batch, served_version.
    assert done.stdout.split()[-1] == "10"


def _ops_that_run_models(defs: dg.Definitions) -> dict[str, dg.OpDefinition]:
    """Every op of every job, and whether it runs a model: a model is what the checkpoint IO
    manager stores, and an op runs one when it produces it or takes it as an input."""
    models = {
        spec.key.path[-1]
        for asset in defs.assets
        if isinstance(asset, dg.AssetsDefinition)  # not served_version: observed, never stored
        for spec in asset.specs
        if asset.get_io_manager_key_for_asset_key(spec.key) == "checkpoint_io_manager"
    }
    ops = {}
    for job in defs.resolve_all_job_defs():
        for op in job.graph.iterate_op_defs():
            ops[op.name] = (op, op.name in models or bool(models & set(op.ins)))
    return ops


def test_every_step_that_runs_a_model_is_in_the_gpu_pool_and_gets_a_gpu_on_k8s():
    from fct_assets.definitions import build_defs

    ops = _ops_that_run_models(build_defs())
    running = {name for name, (_, runs) in ops.items() if runs}
    # The test's own rule finds the training, embedding, backfill and evaluation steps.
    assert {
        "old_model",
        "side_info_model",
        "gallery_store",
        "new_model",
        "transformation",
        "plan_backfill",
        "backfill_shard",
        "eval_report",
    } <= running
    assert "dataset" not in running and "publish_backfill" not in running

    steps = yaml.safe_load((REPO / "deploy/k8s_executor.yaml").read_text())["per_step_k8s_config"]
    for name, (op, runs) in sorted(ops.items()):
        gpus = (
            steps.get(name, {})
            .get("container_config", {})
            .get("resources", {})
            .get("limits", {})
            .get("nvidia.com/gpu", 0)
        )
        if runs:
            assert op.pool == "gpu", f"{name} runs a model but is in pool {op.pool!r}"
            assert gpus == 1, f"{name} runs a model but deploy/k8s_executor.yaml gives it no GPU"
            assert GPU_TAINT in steps[name]["pod_spec_config"]["tolerations"], name
        else:
            assert op.pool != "gpu" and gpus == 0, f"{name} runs no model but holds a GPU"
