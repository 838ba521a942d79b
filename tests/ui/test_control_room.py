"""The Dagster UI as the control room, in a real browser (Debian's Chromium, Playwright).

One flow, as a person does it: open the asset graph; add model version v3 from the
materialise dialog; open the `upgrade` launchpad, pick v3, change the config by typing;
launch; wait for the run to succeed; read the eval report (table and plot); see the blocking
check's status; the graph again. Then items arrive: files dropped into the inbox, the
sensor's ingest run found in the job's run list and followed to its success, the batch's
metadata. Every action goes through the UI's own controls, never GraphQL. Screenshots land in
test-artifacts/ui/ (the README's pictures come from `make screenshots`, over the demo).
"""

from __future__ import annotations

import json
import re
import time

import pytest
from playwright.sync_api import Page, expect

VERSION = "v3"
REEMBED = 0.25  # typed into the launchpad; the backfilled table must show it took effect
SHARDS = 2  # likewise: the backfill runs as two shard steps and one publish
RUN_TIMEOUT_S = 600


def _shot(page: Page, artifacts, name: str, **kwargs) -> None:
    page.screenshot(path=str(artifacts / f"{name}.png"), **kwargs)


def _set_yaml_value(page: Page, key: str, value: str) -> None:
    """Replace `key: <old>` in the launchpad's editor by typing, as a person would."""
    line = page.locator(".CodeMirror-line", has_text=f"{key}:")
    expect(line).to_have_count(1)
    old = line.inner_text().split(f"{key}:", 1)[1].strip()
    line.click()
    page.keyboard.press("End")
    for _ in old:
        page.keyboard.press("Backspace")
    page.keyboard.type(value)
    expect(line).to_contain_text(f"{key}: {value}")


@pytest.mark.slow
def test_upgrade_launched_from_the_ui(dagster_dev, ui_root, page: Page, artifacts):
    root, _ = ui_root
    base = dagster_dev.url

    # 1. The asset graph of the upgrade group.
    page.goto(f"{base}/locations/fct/asset-groups/upgrade")
    for name in ("new_model", "transformation", "backfilled_gallery", "eval_report"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=120_000)
    page.wait_for_timeout(1500)  # the graph's layout settles after the nodes appear
    _shot(page, artifacts, "asset_graph_before")

    # 2. Add model version v3 from the materialise dialog, then leave it (the launchpad runs it).
    page.locator("button", has_text="Materialize all").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Add a partition").click()
    add = page.get_by_role("dialog").filter(has_text="Add a partition for model_version")
    add.locator("input").fill(VERSION)
    add.get_by_role("button", name="Save").click()
    expect(add).to_have_count(0)
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()

    # 3. The upgrade job's launchpad: pick v3, type a config change, launch.
    page.goto(f"{base}/locations/fct/jobs/upgrade/playground")
    partition = page.get_by_placeholder("Partition")
    partition.click()
    partition.fill(VERSION)
    expect(page.get_by_text(VERSION, exact=True).last).to_be_visible()
    page.keyboard.press("Enter")
    expect(page.get_by_text(f"partition: {VERSION}")).to_be_visible()
    _set_yaml_value(page, "reembed_fraction", str(REEMBED))
    _set_yaml_value(page, "shards", str(SHARDS))
    expect(page.get_by_text("No errors")).to_be_visible()
    _shot(page, artifacts, "launchpad")
    page.get_by_role("button", name="Launch Run").click()
    page.wait_for_url("**/runs/**")
    run_id = page.url.rstrip("/").split("/")[-1]

    # 4. Wait for the run, as its page shows it.
    status = page.locator("text=/^(Success|Failure|Canceled)$/").first
    expect(status).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    _shot(page, artifacts, "run")
    assert status.inner_text() == "Success", (
        f"run {run_id} ended {status.inner_text()}; see {artifacts / 'run.png'}"
    )

    # The launched config reached the run: a quarter of the gallery was re-embedded.
    record = json.loads((root / "records" / "backfilled_gallery" / f"{VERSION}.json").read_text())
    assert record["reembedded"] == round(REEMBED * record["gallery_rows"]) > 0
    assert record["reembed_fraction"] == REEMBED and record["shards"] == SHARDS

    # 5. The eval report: the upgrade decision first (served against proposed), then the
    # markdown table of the paper's cases and the backfilling plot.
    page.goto(f"{base}/assets/eval_report?partition={VERSION}")
    page.get_by_text("[Show Markdown]").first.click()
    report = page.get_by_role("dialog")
    expect(report.get_by_text(f"Evaluation of {VERSION}")).to_be_visible()
    expect(report.get_by_text("NFR").first).to_be_visible()
    table = report.locator("table").filter(has_text="new/h(old)").first
    for case in ("old/old", "new/new", "new/h(old)", f"new/gallery_{VERSION}"):
        expect(table.get_by_text(case, exact=True)).to_be_visible()
    plot = report.locator("img").first
    expect(plot).to_be_visible()
    assert plot.evaluate("img => img.complete && img.naturalWidth") > 100, (
        "the backfilling-curve plot did not decode"
    )
    # The dialog fades in: wait until it is fully opaque before the picture.
    page.wait_for_function(
        "() => [...document.querySelectorAll('[role=dialog]')].every(d =>"
        " getComputedStyle(d.parentElement).opacity === '1' && getComputedStyle(d).opacity === '1')"
    )
    page.wait_for_timeout(500)
    _shot(page, artifacts, "eval_report")
    report.get_by_role("button", name="Close").click()

    # 6. The blocking check on the backfilled table, and its status.
    page.goto(f"{base}/assets/backfilled_gallery?view=checks")
    check = page.get_by_text("backfilled_gallery_schema", exact=True).first
    expect(check).to_be_visible()
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible(timeout=60_000)
    _shot(page, artifacts, "check")

    # 7. The graph again, now with v3 materialised and its checks passed (the README's picture).
    # At 1440x900 the graph is drawn with each node's details (latest event, checks, partitions,
    # kind).
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{base}/locations/fct/asset-groups/upgrade")
    expect(page.get_by_text("eval_report", exact=True).first).to_be_visible()
    expect(page.get_by_text("Asset checks").first).to_be_visible()
    page.wait_for_timeout(1500)
    _shot(page, artifacts, "asset_graph")


def _held_back_pngs(n: int) -> list[bytes]:
    """n PNG files of digits' validation split: never trained on, not in the gallery."""
    from fct_assets.lib import storage
    from fct_assets.lib.resources import FctResource
    from fct_ml.pipeline import validation_split

    fct = FctResource(lancedb_uri="unused", preset="tiny", device="cpu", data_dir=None)
    val = validation_split(fct.load_dataset("digits"), fct.experiment())
    return [storage.encode_png(val.images[i].numpy()) for i in range(n)]


@pytest.mark.slow
def test_an_ingest_run_in_the_ui(dagster_dev, ui_root, page: Page, artifacts):
    root, _ = ui_root
    base = dagster_dev.url
    # Three held-back images and a broken file dropped into the inbox (dot-name, then renamed,
    # as the README asks); the inbox sensor of the running daemon launches one run for them.
    inbox = root / "inbox"
    (inbox / "3").mkdir(parents=True)
    for k, png in enumerate(_held_back_pngs(3)):
        (inbox / "3" / f".item{k}.png").write_bytes(png)
        (inbox / "3" / f".item{k}.png").rename(inbox / "3" / f"item{k}.png")
    (inbox / ".broken.png").write_bytes(b"not an image")
    (inbox / ".broken.png").rename(inbox / "broken.png")

    # 1. The ingest job's runs, as the UI lists them: wait for the sensor's run and open it.
    runs = f"{base}/locations/fct/jobs/ingest/runs"
    page.goto(runs)
    # The list refreshes itself (a reload would restart its loading, slow on a loaded machine).
    link = page.locator("a[href*='/runs/']").filter(has_text=re.compile(r"^[0-9a-f]{8}$"))
    expect(link.first).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    link.first.click()
    page.wait_for_url("**/runs/**")
    status = page.locator("text=/^(Success|Failure|Canceled)$/").first
    expect(status).to_be_visible(timeout=RUN_TIMEOUT_S * 1000)
    assert status.inner_text() == "Success", f"ingest run ended {status.inner_text()}"
    expect(page.get_by_text("broken.png").first).to_be_visible(timeout=60_000)  # in its log
    _shot(page, artifacts, "ingest_run")

    # 2. The batch, a partition of ingested_batch: its metadata counts the rows and names the
    # quarantined file with its reason.
    # The batch key is the folder its files were moved to. The page is opened on that partition
    # by URL: the partition list is virtualised and on a loaded machine did not always draw the
    # new key in time to be clicked.
    processed = inbox / ".processed"
    deadline = time.monotonic() + 60
    while not (processed.is_dir() and any(processed.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.5)
    (key,) = [d.name for d in processed.iterdir()]
    assert re.fullmatch(r"b\d{8}-\d{6}-[0-9a-f]{8}", key), key
    page.goto(f"{base}/assets/ingested_batch?view=partitions&partition={key}")
    expect(page.get_by_text(key).filter(visible=True).first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("added_to_store").first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("quarantine_reasons").first).to_be_visible(timeout=60_000)
    _shot(page, artifacts, "ingest_batch")
    # The three items landed, the broken file was quarantined beside its reason.
    assert sorted(p.name for p in (inbox / ".processed").rglob("*.png")) == [
        "item0.png",
        "item1.png",
        "item2.png",
    ]
    assert [p.name for p in (inbox / ".quarantine").rglob("broken.png")] == ["broken.png"]
