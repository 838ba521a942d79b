"""Single writer per table across processes: an ingest batch against a backfill of the deployed
version's table, leases held by real processes, a second run of a current version. Real Dagster
instance, real LanceDB, tiny preset; every writer is its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from fct_assets import guards, storage
from fct_assets.backfill import claim_table, release_table
from fct_assets.deployment import current, history, promote
from fct_assets.ingest import content_id
from tests.fct_assets.env import build_env

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("backfill_worker.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = build_env(tmp_path_factory.mktemp("writers"))
    promote(e.instance, e.fct.connect(), "v2")
    return e


def held_back(env, n: int, start: int = 0):
    """n (image (C, H, W) uint8, label) of the validation split: not in the gallery."""
    from fct_ml.pipeline import validation_split

    data = env.fct.load_dataset("digits")
    val = validation_split(data, env.fct.experiment())
    return [(val.images[i].numpy(), int(val.labels[i])) for i in range(start, start + n)]


def drop(folder: Path, items) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, (image, _) in enumerate(items):
        (folder / f"item{k}.png").write_bytes(storage.encode_png(image))
    return folder


def fct_cli(env, *args: str, wait_s: float | None = None, **popen) -> subprocess.Popen:
    """`fct ARGS...` in its own process, pointed at the test's instance and storage."""
    extra = {} if wait_s is None else {"FCT_INGEST_WAIT_S": str(wait_s)}
    return subprocess.Popen(
        [sys.executable, "-m", "fct_assets.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env.environ(), **extra, "PYTHONPATH": str(REPO)},
        **popen,
    )


def start_backfill(env, version: str) -> subprocess.Popen:
    """A backfill of `version` in its own process, paused (SIGSTOP) once it holds the lease."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(env.root), version, "64"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().startswith(f"backfill {version}")  # it holds the lease
    proc.send_signal(signal.SIGSTOP)
    return proc


def finish(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    return out


def counts(db, table: str, ids) -> list[int]:
    column = db.open_table(table).to_arrow().column("item_id")
    return [pc.sum(pc.equal(column, i)).as_py() for i in ids]


def test_ingest_meets_a_backfill_of_the_deployed_table(env, tmp_path, reliability):
    """While a backfill of v2 (the deployed version) holds gallery_v2: an ingest with a short wait
    is refused with one line naming it and writes nothing; one with a longer wait lands after the
    backfill published, so neither drops the other's rows."""
    db = env.fct.connect()
    items = held_back(env, 4)
    ids = [content_id(image) for image, _ in items]
    folder = drop(tmp_path / "drop", items)
    before = (
        db.open_table("gallery_store").version,
        db.open_table("gallery_v2").version,
        len(history(db)),
    )
    backfill = start_backfill(env, "v2")
    try:
        refused = fct_cli(env, "ingest", str(folder), wait_s=1)
        _, err = refused.communicate(timeout=300)
        line = err.strip().splitlines()[-1]
        assert refused.returncode != 0
        assert "gallery_v2: process" in line and f"process {backfill.pid} on" in line, line
        assert "backfill, since" in line and "refused after waiting 1 s" in line, line
        after = (
            db.open_table("gallery_store").version,
            db.open_table("gallery_v2").version,
            len(history(db)),
        )
        assert after == before  # nothing written, no deployment row
        assert counts(db, "gallery_store", ids) == [0] * 4

        waiting = fct_cli(env, "ingest", str(folder), "--json", wait_s=240)
        time.sleep(3.0)  # the ingest is waiting for the lease now
        assert waiting.poll() is None
        published = json.loads(finish(backfill).strip().splitlines()[-1].removeprefix("DONE "))
        out, err = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, err[-2000:]
    finally:
        if backfill.poll() is None:
            backfill.send_signal(signal.SIGCONT)
            backfill.kill()
    landed = json.loads(out)
    assert (landed["added_to_store"], landed["added_to_table"]) == (4, 4)
    table = db.open_table("gallery_v2")
    # The ingest appended to the table the backfill published, after it: both kept.
    assert table.version > published["version"] > before[1]
    assert counts(db, "gallery_v2", ids) == [1] * 4
    store_ids = db.open_table("gallery_store").to_arrow().column("item_id")
    table_ids = table.to_arrow().column("item_id")
    assert sorted(table_ids.to_pylist()) == sorted(store_ids.to_pylist())  # every item once
    assert current(db).table_version == table.version
    assert guards.holder(db, "gallery_v2") is None and guards.holder(db, "gallery_store") is None
    reliability(
        "writers raced",
        "an ingest batch while a backfill of the deployed version holds its table",
        "FCT_INGEST_WAIT_S=1: refused: " + line.split(": ", 1)[1] + "; nothing written."
        " FCT_INGEST_WAIT_S=240: waited, landed after the backfill's publish; every item once",
    )


def test_a_backfill_waits_for_an_ingest_but_not_for_a_backfill(env, reliability):
    """Leases held by live processes (a `sleep`): a backfill waits for an ingest's lease and takes
    the table once that process ended; another backfill's lease refuses it at once."""
    db = env.fct.connect()
    for purpose in ("ingest", "backfill"):
        holder = subprocess.Popen(["sleep", "2" if purpose == "ingest" else "60"])
        reaper = threading.Thread(target=holder.wait)  # reaped: its pid is gone once it ends
        reaper.start()
        other = guards.Writer.me(purpose=purpose).model_copy(update={"pid": holder.pid})
        try:
            guards.claim(db, "gallery_v5", other, ended=guards.process_ended)
            started = time.monotonic()
            if purpose == "ingest":
                me = claim_table(db, "v5")
                waited = time.monotonic() - started
                assert holder.poll() is not None and waited >= 1.0
                assert guards.holder(db, "gallery_v5").same(me)
                release_table(db, "v5", me)
                outcome = f"waited {waited:.1f} s, took the table once the ingest had ended"
            else:
                with pytest.raises(guards.TableBusyError) as refused:
                    claim_table(db, "v5")
                line = str(refused.value)
                assert "\n" not in line and f"process {holder.pid} on" in line
                assert "(backfill, since" in line and time.monotonic() - started < 30
                assert holder.poll() is None  # refused while the holder still runs
                outcome = f"refused at once: {line}"
        finally:
            holder.kill()
            reaper.join()
            guards.release(db, "gallery_v5", other)
        reliability("writers raced", f"a backfill while an {purpose} holds the table", outcome)
