"""`make demo`'s script end to end, on the tiny preset and digits: base, v2, promote, ingest
through the inbox (a real sensor tick), the chained v3, promote, search, lineage.

It runs as a user runs it, in a process of its own, pointed at a temporary instance and
storage by the same environment variables `make ui` and the CLI read. At default verbosity the
terminal shows the story within its line budget; the search hits and the lineage are in the
log with Dagster's run log."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

INGEST = 12
# The terminal's budget at default verbosity: `make demo` on a fresh clone prints at most about
# 60 lines, of which the Makefile's install steps take up to 3.
LINES = 57


def test_demo_lives_the_whole_life(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "FCT_LANCEDB_URI": str(tmp_path / "lancedb"),
        "FCT_STORAGE_URI": str(tmp_path / "store"),
        "FCT_INBOX": str(tmp_path / "inbox"),
        "FCT_PRESET": "tiny",
        "FCT_DEVICE": "cpu",
    }
    log = tmp_path / "demo.log"
    argv = [
        "--dataset",
        "digits",
        "--old-classes",
        "0-4",
        "--ingest",
        str(INGEST),
        "--log",
        str(log),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "fct_assets.demo", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = proc.stdout
    assert proc.returncode == 0, (out[-2000:], proc.stderr[-3000:])
    assert len(out.splitlines()) <= LINES, out
    # Dagster's run log, its warnings and lance's are in the log, not on the terminal.
    assert proc.stderr == ""
    for noise in ("DEBUG", "STEP_SUCCESS", "Warning", "WARN"):
        assert noise not in out, noise
    full = log.read_text()
    assert "STEP_SUCCESS" in full

    assert "promoted v2: serving gallery_v2" in out
    assert "promoted v3: serving gallery_v3" in out
    ingested = re.search(
        r"ingest batch (\S+): (\d+) items in gallery_store, (\d+) in gallery_v2", out
    )
    assert ingested, out[-3000:]
    batch, to_store, to_table = ingested.group(1), int(ingested.group(2)), int(ingested.group(3))
    assert (to_store, to_table) == (INGEST, INGEST)

    # The search for an ingested item, in v3's table, which it reached through v2's space only
    # (it has no old embedding): v3's embedding of its image finds the item itself first.
    searched = re.search(
        rf"fct search --item-id (\d+) \(an item of batch {batch}\), deployed v3", full
    )
    assert searched, full[-3000:]
    # The hits come from v3's table, ranked; whether the item finds itself first depends on the
    # tiny preset's chained h (the demo's line says which, as it happened).
    first = full[searched.end() :].splitlines()[2].split()
    assert first[0] == "1" and first[-1] in ("transformed", "re-embedded", "ingested")
    found = re.search(
        rf"search v3: ingested item {searched.group(1)} finds (itself|item \d+) first", out
    )
    assert found, out[-2000:]

    # Lineage: v3's chain, then one original row (old -> v2 -> v3) and the ingested row, which
    # arrived with its batch in v2's space (v2 -> v3).
    assert "upgrade chain    old_model -> v2 -> v3" in full
    assert "arrived          with the base gallery" in full
    row = full[full.index(f"item {searched.group(1)} in gallery_v3") :]
    assert f"arrived          ingest batch {batch}" in row
    assert "space           new_model:v2@" in row
    assert "fct demo: done in" in out
