"""What `make test-fast` leaves out: every test marked `slow`, explicitly or here.

A test that asks for one of the asset-graph environments (`env`, `living`, `stored`: base assets
and model versions materialised on the tiny preset) runs the graph end to end; it is marked slow
here, by its fixtures, so that a new graph test is left out of the inner loop without anyone
remembering to mark it. `make test` (CI) runs everything.
"""

import pytest

GRAPH_FIXTURES = {"env", "living", "stored"}

# Tests that start processes or load the whole code location, without a graph fixture: each
# takes 5-25 s (pytest --durations on this 2-core machine).
SLOW_BY_NAME = {
    "test_the_program_shows_its_own_output_not_library_warnings",  # two `fct` processes
    "test_dg_check_defs_and_dagster_load_from_pyproject",  # dg and dagster subprocesses
    "test_importing_the_definitions_builds_nothing",  # a fresh interpreter loads the defs
    "test_code_location_validates_with_the_deploy_environment",  # dagster definitions validate
    "test_run_job_runs_the_job_and_shows_each_step_on_a_quiet_terminal",  # a job in a subprocess
}


def pytest_collection_modifyitems(items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & GRAPH_FIXTURES or item.originalname in SLOW_BY_NAME:
            item.add_marker(pytest.mark.slow)
