"""The asset-graph tests share one environment (see tests/support/env.py): materialised once per session
(base assets + v2); each test that changes state works on its own model version."""

import dagster as dg
import lancedb
import pytest

from tests.support.env import Env, build_env


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> Env:
    return build_env(tmp_path_factory.mktemp("fct_assets"))


@pytest.fixture(scope="module")
def living(tmp_path_factory) -> Env:
    """An environment of its own for the living gallery (ingestion, chained upgrades): those tests
    add items to gallery_store and promote versions, which the shared `env` must not see. One per
    module: test_chain leaves v3 served over items ingested under v2, which test_ingest's
    promotion of v2 must not inherit."""
    return build_env(tmp_path_factory.mktemp("fct_living"), chained=True)


@pytest.fixture
def instance(tmp_path):
    """A Dagster instance of the test's own, on local storage under tmp_path (no telemetry)."""
    (tmp_path / "dagster_home").mkdir()
    with dg.DagsterInstance.local_temp(
        str(tmp_path / "dagster_home"), overrides={"telemetry": {"enabled": False}}
    ) as inst:
        yield inst


@pytest.fixture
def db(tmp_path):
    """An empty LanceDB folder of the test's own."""
    return lancedb.connect(str(tmp_path / "lancedb"))
