"""fct_assets/lib/dagster_internals.py, the product's Dagster private API in one place: each
function on a tiny real Dagster instance, so a Dagster upgrade that moves one fails here.
(report_run_worker_lost is tested with the run reaper, tests/fct_assets/test_run_reaper.py;
launch_refused also through GraphQL, tests/fct_assets/test_submission.py.)"""

import dagster as dg

from fct_assets.lib.dagster_internals import latest_check_execution, launch_refused
from tests.support.check_events import report_planned_check

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


def test_launch_refused_answers_as_a_config_error_naming_the_path():
    path = ("ops", "new_model", "config", "epochs")
    err = launch_refused("upgrade", [(path, -1, "new_model.epochs: -1 refused: expected >= 1")])
    assert str(err) == "new_model.epochs: -1 refused: expected >= 1"
    answer = err.error  # what dagster-graphql returns as the launch mutation's answer
    assert answer.pipeline_name == "upgrade"
    (error,) = answer.errors
    assert (error.message, error.reason, error.value_rep) == (
        "new_model.epochs: -1 refused: expected >= 1",
        "RUNTIME_TYPE_MISMATCH",
        "-1",
    )
    assert [entry.field_name for entry in error.stack._stack.entries] == list(path)
