"""`make screenshots`: the README's pictures of the UI, taken from the `make demo` instance.

Starts `dagster dev` over the checkout's dagster_home and data/ (what `make demo` left: the base
assets on Fashion-MNIST, model versions v2 and v3, demo preset, a batch ingested through the
inbox), opens the asset graph, the upgrade launchpad with v3's config, v3's eval report, the
latest ingest run's page and its batch (a partition of `ingested_batch`) and the served-version
view (`served_version`: what serves now, and the deployments history) in Chromium, saves them
to docs/ui/, and stops the server by its PID. Nothing is launched from here (automatic upgrades
are off). Run `make demo` first.

    python -m tests.ui.screenshots [--version v3] [--out docs/ui]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tests.ui.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.ui.server import REPO, DagsterDev


def demo_environment() -> dict[str, str]:
    """The demo's instance and storage (the defaults `make demo` used), automation off so that
    the server only shows what is there."""
    return {
        "DAGSTER_HOME": os.environ.get("DAGSTER_HOME", str(REPO / "dagster_home")),
        "FCT_PRESET": os.environ.get("FCT_PRESET", "demo"),
        "FCT_AUTO_UPGRADE": "off",
    }


def _materialised(env: dict[str, str], version: str) -> bool:
    import dagster as dg

    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.get() as instance:
            flt = dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("eval_report"), asset_partitions=[version]
            )
            return bool(instance.fetch_materializations(flt, limit=1).records)
    finally:
        os.environ.pop("DAGSTER_HOME") if saved is None else os.environ.update(DAGSTER_HOME=saved)


def _latest_ingest(env: dict[str, str]) -> tuple[str, str] | None:
    """(run id, batch) of the latest successful ingest run in the instance, or None."""
    import dagster as dg

    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    try:
        with dg.DagsterInstance.get() as instance:
            runs = instance.get_runs(
                dg.RunsFilter(job_name="ingest", statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
            )
            return (runs[0].run_id, runs[0].tags["dagster/partition"]) if runs else None
    finally:
        os.environ.pop("DAGSTER_HOME") if saved is None else os.environ.update(DAGSTER_HOME=saved)


def take(url: str, version: str, out: Path, ingest: tuple[str, str] | None = None) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    shots = []
    # Assertions wait as long as actions: on a loaded machine a page can take a minute.
    expect.set_options(timeout=120_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # At 1440x900 the graph draws each node's details (latest event, checks, kind).
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.set_default_timeout(120_000)

            page.goto(f"{url}/locations/fct/asset-groups/upgrade")
            expect(page.get_by_text("eval_report", exact=True).first).to_be_visible()
            expect(page.get_by_text("Asset checks").first).to_be_visible()
            page.wait_for_timeout(2000)  # the graph's layout settles after the nodes appear
            shots.append(out / "asset_graph.png")
            page.screenshot(path=str(shots[-1]))

            # The ingest pictures first: the launchpad's are the slowest to load.
            if ingest is not None:
                run_id, batch = ingest
                page.goto(f"{url}/runs/{run_id}")
                expect(page.locator("text=/^Success$/").first).to_be_visible()
                expect(page.get_by_text(f"ingest {batch}:").first).to_be_visible()
                page.wait_for_timeout(1000)
                shots.append(out / "ingest_run.png")
                page.screenshot(path=str(shots[-1]))

                page.goto(f"{url}/assets/ingested_batch?view=partitions")
                page.get_by_text(batch, exact=True).first.click()
                expect(page.get_by_text("added_to_store").first).to_be_visible()
                page.wait_for_timeout(1000)
                shots.append(out / "ingest_batch.png")
                page.screenshot(path=str(shots[-1]))

            # What is served: the latest observation of served_version and its history.
            page.goto(f"{url}/assets/served_version")
            # (v3 if the demo's gates let it be promoted, else what serves instead.)
            expect(page.get_by_text(" served: gallery_").first).to_be_visible()
            expect(
                page.locator("table").filter(has_text="table @ LanceDB version").first
            ).to_be_visible()
            page.wait_for_timeout(1000)
            shots.append(out / "served_version.png")
            page.screenshot(path=str(shots[-1]))

            page.set_viewport_size({"width": 1280, "height": 800})
            page.goto(f"{url}/locations/fct/jobs/upgrade/playground")
            partition = page.get_by_placeholder("Partition")
            partition.click()
            partition.fill(version)
            expect(page.get_by_text(version, exact=True).last).to_be_visible()
            page.keyboard.press("Enter")
            expect(page.get_by_text(f"partition: {version}")).to_be_visible()
            expect(page.get_by_text("No errors")).to_be_visible()
            shots.append(out / "launchpad.png")
            page.screenshot(path=str(shots[-1]))

            page.goto(f"{url}/assets/eval_report?partition={version}")
            page.get_by_text("[Show Markdown]").first.click()
            report = page.get_by_role("dialog")
            expect(report.get_by_text(f"Evaluation of {version}")).to_be_visible()
            plot = report.locator("img").first
            expect(plot).to_be_visible()
            page.wait_for_function(
                "() => { const i = document.querySelector('[role=dialog] img');"
                " return i && i.complete && i.naturalWidth > 100; }"
            )
            # The dialog fades in: wait until it is fully opaque before the picture.
            page.wait_for_function(
                "() => [...document.querySelectorAll('[role=dialog]')].every(d =>"
                " getComputedStyle(d.parentElement).opacity === '1'"
                " && getComputedStyle(d).opacity === '1')"
            )
            page.wait_for_timeout(500)
            shots.append(out / "eval_report.png")
            page.screenshot(path=str(shots[-1]))
        finally:
            browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.ui.screenshots")
    parser.add_argument("--version", default="v3", help="the model version `make demo` built last")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ui")
    args = parser.parse_args(argv)
    env = demo_environment()
    if not _materialised(env, args.version):
        print(
            f"screenshots: no eval_report[{args.version}] in {env['DAGSTER_HOME']}; run `make demo`"
            " first",
            file=sys.stderr,
        )
        return 1
    ingest = _latest_ingest(env)
    if ingest is None:
        print(
            "screenshots: no successful ingest run in the instance (was the demo run with"
            " --ingest 0?); the ingest pictures are left as they are",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    log = REPO / "test-artifacts" / "screenshots_dagster_dev.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    server = DagsterDev(env, log)
    try:
        server.wait_ready()
        for path in take(server.url, args.version, args.out, ingest):
            print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
