"""The browser test's world: base assets materialised in-process, then `dagster dev` over the
same temporary instance, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ui.server import REPO, DagsterDev, ui_environment

CHROMIUM = os.environ.get("FCT_CHROMIUM", "/usr/bin/chromium")  # `make test` passes CHROMIUM
# As root with no display and a closed network: no sandbox, no GPU, no background requests.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Screenshots and the server log, kept after the run (git-ignored)."""
    path = Path(os.environ.get("FCT_UI_ARTIFACTS", REPO / "test-artifacts" / "ui"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def ui_root(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A temporary instance and LanceDB folder holding the base assets (digits, tiny preset)."""
    root = tmp_path_factory.mktemp("ui")
    env = ui_environment(root)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(
        env
    )  # FctResource and the IO managers read their folders from the environment
    try:
        import dagster as dg

        from fct_assets.definitions import build_defs

        instance = dg.DagsterInstance.get()
        from tests.support.env import DATASET_CONFIG

        assert (
            build_defs()
            .resolve_job_def("base")
            .execute_in_process(instance=instance, run_config=DATASET_CONFIG)
            .success
        )
        instance.dispose()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return root, env


@pytest.fixture(scope="session")
def dagster_dev(ui_root, artifacts):
    root, env = ui_root
    server = DagsterDev(env, artifacts / "dagster_dev.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        assert not server.alive(), f"dagster dev (pid {server.pid}) still running after stop()"


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} not found: `make test` installs Debian's chromium (or pass"
            " CHROMIUM=/path/to/chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, artifacts, request):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    try:
        yield page
    finally:
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            page.screenshot(path=str(artifacts / f"FAILED_{request.node.name}.png"))
        context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets the `page` fixture see whether the test failed (to keep a screenshot of where).
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
