"""fct_assets/lib/dagster_internals.py, Dagster's private API in one place: each function on a tiny
real Dagster instance, so a Dagster upgrade that moves one fails here."""

import dagster as dg
import pytest

from fct_assets.lib.dagster_internals import (
    executor_config,
    instance_config,
    latest_check_execution,
    stale_status,
    validate_config,
)
from tests.fct_assets.check_events import report_planned_check

VERSIONS = dg.StaticPartitionsDefinition(["x", "y", "z"])


@dg.asset(partitions_def=VERSIONS)
def table(context: dg.AssetExecutionContext) -> str:
    return context.partition_key


@dg.asset_check(asset=table, partitions_def=VERSIONS, blocking=True)
def named_x(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=context.partition_key == "x")


def _table_checked_for_x():
    """A partitioned asset and a blocking check that passes on partition x only, and its key."""
    return table, named_x, dg.AssetCheckKey(dg.AssetKey("table"), "named_x")


def test_stale_status_follows_data_versions():
    @dg.asset
    def upstream(context: dg.AssetExecutionContext) -> dg.Output[int]:
        value = int(context.run.tags.get("value", "1"))
        return dg.Output(value, data_version=dg.DataVersion(str(value)))

    @dg.asset
    def downstream(upstream: int) -> int:
        return upstream + 1

    @dg.asset
    def never_built() -> int:
        return 0

    defs = dg.Definitions(assets=[upstream, downstream, never_built])
    with dg.instance_for_test() as instance:
        assert dg.materialize([upstream, downstream], instance=instance).success
        assert stale_status(instance, defs, dg.AssetKey("downstream")) == "FRESH"
        assert dg.materialize([upstream], instance=instance, tags={"value": "2"}).success
        assert stale_status(instance, defs, dg.AssetKey("upstream")) == "FRESH"
        assert stale_status(instance, defs, dg.AssetKey("downstream")) == "STALE"
        assert stale_status(instance, defs, dg.AssetKey("never_built")) == "MISSING"


def test_latest_check_execution_is_per_partition():
    table, named_x, key = _table_checked_for_x()
    with dg.instance_for_test() as instance:
        assert dg.materialize([table, named_x], instance=instance, partition_key="x").success
        # The blocking check fails on y (the run fails), after x's passed.
        dg.materialize([table, named_x], instance=instance, partition_key="y", raise_on_error=False)
        x, y = (latest_check_execution(instance, key, p) for p in ("x", "y"))
        assert x.evaluation.passed and not y.evaluation.passed
        assert latest_check_execution(instance, key, "z") is None


def test_latest_check_execution_skips_a_later_run_that_only_planned_the_check():
    # A second run planned the check on x and stopped before it ran (a backfill refused by
    # another's lease): its record must not hide the evaluation of the run before it.
    table, named_x, key = _table_checked_for_x()
    with dg.instance_for_test() as instance:
        result = dg.materialize([table, named_x], instance=instance, partition_key="x")
        planned_run = report_planned_check(instance, "table", "named_x", VERSIONS, "x", "catch_up")
        history = instance.event_log_storage.get_asset_check_execution_history(key, limit=5)
        assert history[0].run_id == planned_run  # the planned record is the latest one
        got = latest_check_execution(instance, key, "x")
        assert got.run_id == result.run_id and got.evaluation.passed


def test_executor_config_resolves_and_refuses_unknown_keys():
    @dg.asset
    def one() -> int:
        return 1

    configured = dg.Definitions(
        assets=[one],
        jobs=[dg.define_asset_job("all", selection=[one])],
        executor=dg.multiprocess_executor.configured({"max_concurrent": 3}),
    ).resolve_job_def("all")
    assert executor_config(configured)["max_concurrent"] == 3
    plain = dg.Definitions(
        assets=[one],
        jobs=[dg.define_asset_job("all", selection=[one])],
        executor=dg.multiprocess_executor,
    ).resolve_job_def("all")
    run_config = {"execution": {"config": {"max_concurrent": 5}}}
    assert executor_config(plain, run_config)["max_concurrent"] == 5
    bad = dg.Definitions(
        assets=[one],
        jobs=[dg.define_asset_job("all", selection=[one])],
        executor=dg.multiprocess_executor.configured({"max_concurrent": 3, "gpus": 1}),
    )
    with pytest.raises(dg.DagsterInvalidConfigError, match="gpus"):
        executor_config(bad.resolve_job_def("all"))


def test_instance_config_reads_and_checks_a_dagster_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("FCT_TEST_LIMIT", "4")
    (tmp_path / "dagster.yaml").write_text(
        "telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs:\n"
        "    env: FCT_TEST_LIMIT\n"
    )
    config = instance_config(str(tmp_path))
    assert config["telemetry"] == {"enabled": False}
    assert config["run_queue"]["max_concurrent_runs"] == {"env": "FCT_TEST_LIMIT"}
    (tmp_path / "dagster.yaml").write_text("telemetri:\n  enabled: false\n")
    with pytest.raises(dg.DagsterInvalidConfigError, match="telemetri"):
        instance_config(str(tmp_path))


def test_validate_config_fills_defaults_and_lists_errors():
    schema = {"host": dg.Field(str), "port": dg.Field(int, is_required=False, default_value=5432)}
    assert validate_config(schema, {"host": "db"}) == (True, {"host": "db", "port": 5432})
    ok, errors = validate_config(schema, {"host": "db", "port": "five"})
    assert not ok and any("port" in e.message for e in errors)
