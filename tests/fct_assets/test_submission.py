"""fct_assets/lib/submission.py: a launch whose values are out of range is refused at submission,
naming the field, and no step runs; through the GraphQL API the UI and the Python client use, the
refusal is Dagster's config-error answer (no stack trace)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest

from fct_assets.lib.submission import CheckedRunCoordinator

REPO = Path(__file__).resolve().parents[2]

LAUNCH = """
mutation($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on RunConfigValidationInvalid {
      errors { message stack { entries { ... on EvaluationStackPathEntry { fieldName } } } }
    }
    ... on PythonError { message }
    ... on LaunchRunSuccess { run { runId status } }
  }
}"""

VALID = """
query($selector: PipelineSelector!, $runConfigData: RunConfigData, $mode: String!) {
  isPipelineConfigValid(pipeline: $selector, runConfigData: $runConfigData, mode: $mode) {
    __typename
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""


def _instance(tmp_path) -> dg.DagsterInstance:
    """An instance configured as `make ui`'s (the repository's dagster_home/dagster.yaml)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return dg.DagsterInstance.from_config(str(home))


def _run(instance: dg.DagsterInstance, run_config: dict) -> dg.DagsterRun:
    """A run of `upgrade` as the webserver creates it before it submits it (not yet checked)."""
    return instance.add_run(
        dg.DagsterRun(job_name="upgrade", run_id=str(uuid.uuid4()), run_config=run_config)
    )


def test_the_instance_of_make_ui_checks_launches():
    assert "fct_assets.lib.submission" in (REPO / "dagster_home" / "dagster.yaml").read_text()


def test_a_run_out_of_range_is_refused_and_never_queued(tmp_path):
    instance = _instance(tmp_path)
    coordinator = instance.run_coordinator
    assert isinstance(coordinator, CheckedRunCoordinator)
    # Two steps' values out of range: one line each, naming the field, the bound and the value.
    bad = _run(
        instance,
        {
            "ops": {
                "new_model": {"config": {"epochs": -1}},
                "transformation": {"config": {"inner_width": 0}},
            }
        },
    )
    with pytest.raises(Exception) as err:
        coordinator.submit_run(dg.SubmitRunContext(bad, workspace=None))
    assert str(err.value) == (
        "new_model.epochs: -1 refused: expected epochs >= 1; transformation.inner_width: 0"
        " refused: expected inner_width >= 1"
    )
    answer = err.value.error  # what the GraphQL launch answers
    assert type(answer).__name__ == "GrapheneRunConfigValidationInvalid"
    assert [e.message for e in answer.errors] == str(err.value).split("; ")
    assert instance.get_run_by_id(bad.run_id).status == dg.DagsterRunStatus.NOT_STARTED
    # (A run in range is queued: the GraphQL test below launches one.)


@pytest.mark.slow  # a code server in its own process, as `dagster dev` runs it (about 15 s)
def test_graphql_refuses_out_of_range_values_naming_the_field(tmp_path, monkeypatch):
    from dagster_graphql.test.utils import (
        define_out_of_process_context,
        execute_dagster_graphql,
        infer_job_selector,
    )

    environ = {
        "DAGSTER_HOME": str(tmp_path / "dagster_home"),
        "FCT_LANCEDB_URI": str(tmp_path / "lancedb"),
        "FCT_STORAGE_URI": str(tmp_path),
        "FCT_PRESET": "tiny",
        "FCT_DEVICE": "cpu",
        "FCT_AUTO_UPGRADE": "off",
    }
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    instance = _instance(tmp_path)
    instance.add_dynamic_partitions("model_version", ["v9"])
    with define_out_of_process_context(str(REPO / "workspace.yaml"), None, instance) as context:
        selector = infer_job_selector(context, "upgrade")

        def launch(ops: dict) -> dict:
            params = {
                "selector": selector,
                "runConfigData": {"ops": ops},
                "executionMetadata": {"tags": [{"key": "dagster/partition", "value": "v9"}]},
            }
            data = execute_dagster_graphql(context, LAUNCH, {"executionParams": params}).data
            return data["launchPipelineExecution"]

        def launchpad_check(ops: dict) -> dict:
            data = execute_dagster_graphql(
                context,
                VALID,
                {"selector": selector, "runConfigData": {"ops": ops}, "mode": "default"},
            ).data
            return data["isPipelineConfigValid"]

        refused = []
        for step, field, value, bound in (
            ("new_model", "epochs", -1, ">= 1"),
            ("transformation", "inner_width", 0, ">= 1"),
            ("backfilled_gallery", "shards", 0, ">= 1"),
        ):
            answer = launch({step: {"config": {field: value}}})
            assert answer["__typename"] == "RunConfigValidationInvalid", answer
            assert answer["errors"] == [
                {
                    "message": f"{step}.{field}: {value} refused: expected {field} {bound}",
                    "stack": {
                        "entries": [
                            {"fieldName": "ops"},
                            {"fieldName": step},
                            {"fieldName": "config"},
                            {"fieldName": field},
                        ]
                    },
                }
            ]
            refused.append(f"{step}.{field}")
        # An enumerated value: Dagster's own types refuse it, and the launchpad's check (run as
        # the config is typed) marks it before any launch. A range it cannot mark (Dagster's
        # types carry no bounds): that one is refused when launched, above.
        arch = {"new_model": {"config": {"arch": "cnn-q"}}}
        assert launchpad_check(arch)["__typename"] == "RunConfigValidationInvalid"
        assert launch(arch)["__typename"] == "RunConfigValidationInvalid"
        epochs = {"new_model": {"config": {"epochs": -1}}}
        assert launchpad_check(epochs)["__typename"] == "PipelineConfigValidationValid"

        answer = launch({"new_model": {"config": {"epochs": 1}}})
        assert answer["__typename"] == "LaunchRunSuccess"
        assert answer["run"]["status"] == "QUEUED"

    runs = instance.get_runs()
    launched = [r for r in runs if r.status == dg.DagsterRunStatus.QUEUED]
    failed = [r for r in runs if r.status == dg.DagsterRunStatus.FAILURE]
    assert len(launched) == 1 and len(failed) == len(refused)
    for run in failed:  # the record of each refusal: its line, and no step ever started
        events = instance.all_logs(run.run_id)
        assert not [e for e in events if e.is_dagster_event and e.dagster_event.is_step_start]
        messages = " ".join(e.dagster_event.message or "" for e in events if e.is_dagster_event)
        assert any(f"{name}: " in messages and "refused: expected" in messages for name in refused)
