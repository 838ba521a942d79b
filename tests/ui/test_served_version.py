"""What is served, in the real Dagster UI (Debian's Chromium, Playwright), after promotions as
the demo makes them: v2 upgraded and promoted (by a command, outside any run), then v3
upgraded from v2's space and promoted from the `promote` job's launchpad, picking v3 among the
registered versions. The asset `served_version` then shows v3 served, with its history: the
v2 promotion and the v3 promotion. A world of its own (tiny preset, digits), so that the
control-room tests' v3 and ingested items do not change what is served here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.ui.server import REPO, DagsterDev, ui_environment

RUN_TIMEOUT_S = 600


@contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # FctResource and the IO managers read their folders from it
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def build_world(root: Path) -> dict[str, str]:
    """Under `root`: the base assets, v2 upgraded and promoted as `fct promote v2` does, v3
    upgraded from v2's space (the demo's chain), registered, not promoted. The environment."""
    import dagster as dg

    from fct_assets.definitions import build_defs
    from fct_assets.lib.partitions import add_model_version
    from fct_assets.lib.resources import FctResource
    from fct_assets.serving.deployment import promote
    from tests.support.env import DATASET_CONFIG

    env = ui_environment(root)
    with _environ(env):
        instance = dg.DagsterInstance.get()
        defs = build_defs()
        assert (
            defs.resolve_job_def("base")
            .execute_in_process(instance=instance, run_config=DATASET_CONFIG)
            .success
        )
        upgrade = defs.resolve_job_def("upgrade")
        # v3 as test_ingest's `deploy` builds a next version: its own seed and twice the
        # epochs, a better model than v2's, which passes the blocking checks on this gallery.
        epochs = 2 * FctResource().experiment().new_train.epochs
        v3 = {"ops": {"new_model": {"config": {"seed": 1, "epochs": epochs}}}}
        for version, config in (("v2", {}), ("v3", v3)):
            add_model_version(instance, version)
            result = upgrade.execute_in_process(
                instance=instance, partition_key=version, run_config=config
            )
            assert result.success, f"upgrade of {version} failed"
            if version == "v2":
                promote(instance, FctResource().connect(), "v2")
        instance.dispose()
    return env


@pytest.fixture(scope="module")
def served_ui(tmp_path_factory, artifacts):
    root = tmp_path_factory.mktemp("served")
    # Built in a process of its own: the session's browser runs Playwright's event loop in this
    # one, and an in-process Dagster run inside a running loop cannot close its own loop.
    code = (
        "import sys, pathlib, tests.ui.test_served_version as t;"
        " t.build_world(pathlib.Path(sys.argv[1]))"
    )
    with open(artifacts / "served_world.log", "wb") as log:
        done = subprocess.run(
            [sys.executable, "-c", code, str(root)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=1800,
        )
    assert done.returncode == 0, f"building the world failed; log: {artifacts / 'served_world.log'}"
    server = DagsterDev(ui_environment(root), artifacts / "dagster_dev_served.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        assert not server.alive(), f"dagster dev (pid {server.pid}) still running after stop()"


@pytest.mark.slow
def test_v3_promoted_from_the_launchpad_is_shown_served_with_its_history(
    served_ui, page: Page, artifacts
):
    promote_and_read_the_view(page, served_ui.url, artifacts)


def promote_and_read_the_view(page: Page, base: str, artifacts: Path) -> None:
    """Promote v3 from the `promote` launchpad, then read served_version's page."""
    # 1. The promote job's launchpad: the version is picked among the registered ones.
    page.goto(f"{base}/locations/fct/jobs/promote/playground")
    partition = page.get_by_placeholder("Partition")
    partition.click()
    for registered in ("v2", "v3"):  # the picker offers both
        expect(page.get_by_text(registered, exact=True).last).to_be_visible()
    partition.fill("v3")
    page.keyboard.press("Enter")
    expect(page.get_by_text("partition: v3")).to_be_visible()
    expect(page.get_by_text("No errors")).to_be_visible()
    page.screenshot(path=str(artifacts / "promote_launchpad.png"))
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url("**/runs/**")
    run_id = page.url.rstrip("/").split("/")[-1]
    status = page.locator("text=/^(Success|Failure|Canceled)$/").first
    expect(status).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    assert status.inner_text() == "Success", f"promote run {run_id} ended {status.inner_text()}"

    # 2. The served-version view: its latest observation says v3 is served, promoted by that
    # run; the history in it holds the v2 promotion (by a command) and the v3 promotion.
    page.goto(f"{base}/assets/served_version")
    metadata = {
        key: page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))
        for key in ("served", "action", "by")
    }
    expect(metadata["served"].get_by_role("cell").last).to_have_text("v3", timeout=60_000)
    expect(metadata["action"].get_by_role("cell").last).to_have_text("promote")
    expect(metadata["by"].get_by_role("cell").last).to_have_text(f"run {run_id} (job promote)")
    history = page.get_by_role("columnheader", name="table @ LanceDB version").locator(
        "xpath=ancestor::table[1]"
    )
    rows = history.locator("xpath=./tbody/tr")
    expect(rows).to_have_count(2)  # newest first
    newest, oldest = (rows.nth(k).locator("td") for k in (0, 1))
    for cells, (seq, action, version) in (
        (newest, ("2", "promote", "v3")),
        (oldest, ("1", "promote", "v2")),
    ):
        expect(cells.nth(0)).to_have_text(seq)
        expect(cells.nth(1)).to_have_text(action)
        expect(cells.nth(2)).to_have_text(version)
        # Each version links to its eval report's page.
        href = cells.nth(2).locator("a").get_attribute("href")
        assert href.endswith(f"/assets/eval_report?partition={version}"), href
    expect(newest.nth(5)).to_have_text(f"run {run_id[:8]} (job promote)")
    # Tall enough for the metadata down to the history (the page scrolls inside its panes).
    page.set_viewport_size({"width": 1600, "height": 1400})
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / "served_version.png"))

    # 3. Its events are the deployments rows; the latest, an event of the promote run, says
    # in one line what serves after it.
    page.goto(f"{base}/assets/served_version?view=events")
    expect(page.get_by_text("v3 served: gallery_v3 @ LanceDB version").first).to_be_visible(
        timeout=60_000
    )
    expect(page.get_by_role("link", name=run_id[:8]).first).to_be_visible()
