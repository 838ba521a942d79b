"""tests/support/dagster_internals.py, the Dagster private API only tests use: each function on
a tiny real Dagster instance, so a Dagster upgrade that moves one fails here. (tick_sensors is
exercised by tests/fct_assets/test_ingest.py, through tests/support/ingest_tick.py.)"""

import dagster as dg
import pytest

from tests.support.dagster_internals import (
    executor_config,
    instance_config,
    stale_status,
    validate_config,
)


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
