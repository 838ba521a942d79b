"""The living gallery under stress, in one environment (base assets, v2 deployed; chained
upgrades): single writer per table across processes (an ingest batch against a backfill of the
deployed table, leases held by real processes, a second run of a current version), hostile files
in the inbox, an ingest killed with SIGKILL, a full disk. Real Dagster instance, real LanceDB,
tiny preset; every concurrent writer is its own process. The tests run in file order: the first
backfills v2 again, which needs every stored item to have an old embedding (no ingest yet)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pyarrow.compute as pc
import pytest

from fct_assets.ingest.ingest import content_id
from fct_assets.lib import guards, storage
from fct_assets.serving.deployment import current, history, promote
from fct_assets.upgrade.backfill import claim_table, release_table
from tests.support.env import build_env

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("backfill_worker.py")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = build_env(tmp_path_factory.mktemp("living"), chained=True)
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
    is refused with one line naming it and writes nothing. One with a longer wait finds, once the
    backfill published, a table no blocking check ran on: it writes nothing and the deployment
    stays (invariant 2). Once a publish of v2 passed its checks, the ingest lands on it."""
    db = env.fct.connect()
    items = held_back(env, 4)
    ids = [content_id(image) for image, _ in items]
    folder = drop(tmp_path / "drop", items)

    def state():
        return (
            db.open_table("gallery_store").version,
            len(history(db)),
            counts(db, "gallery_store", ids),
        )

    before = state()
    served = current(db)
    backfill = start_backfill(env, "v2")
    try:
        refused = fct_cli(env, "ingest", str(folder), wait_s=1)
        _, err = refused.communicate(timeout=300)
        line = err.strip().splitlines()[-1]
        assert refused.returncode != 0
        assert "gallery_v2: process" in line and f"process {backfill.pid} on" in line, line
        assert "backfill, since" in line and "refused after waiting 1 s" in line, line
        assert state() == before  # nothing written, no deployment row

        waiting = fct_cli(env, "ingest", str(folder), "--json", wait_s=240)
        time.sleep(3.0)  # the ingest is waiting for the lease now
        assert waiting.poll() is None
        published = json.loads(finish(backfill).strip().splitlines()[-1].removeprefix("DONE "))
        _, err = waiting.communicate(timeout=300)
    finally:
        if backfill.poll() is None:
            backfill.send_signal(signal.SIGCONT)
            backfill.kill()
    unchecked = err.strip().splitlines()[-1]
    assert waiting.returncode == 1, err[-2000:]
    assert f"gallery_v2 version {published['version']} may not serve v2" in unchecked, unchecked
    assert "published again" in unchecked, unchecked
    assert state() == before and current(db) == served  # nothing written, nothing served

    # `fct catch-up v2`'s job: v2's table published again and evaluated in Dagster, its blocking
    # checks run on that publish. The ingest lands on it, and the deployment follows it.
    catch_up = env.defs.resolve_job_def("catch_up").execute_in_process(
        instance=env.instance, partition_key="v2"
    )
    assert catch_up.success
    checked = db.open_table("gallery_v2").version
    landing = fct_cli(env, "ingest", str(folder), "--json", wait_s=240)
    out, err = landing.communicate(timeout=600)
    assert landing.returncode == 0, err[-2000:]
    landed = json.loads(out)
    assert (landed["added_to_store"], landed["added_to_table"]) == (4, 4)
    table = db.open_table("gallery_v2")
    assert table.version > checked > published["version"] > served.table_version
    assert counts(db, "gallery_v2", ids) == [1] * 4
    store_ids = db.open_table("gallery_store").to_arrow().column("item_id")
    table_ids = table.to_arrow().column("item_id")
    assert sorted(table_ids.to_pylist()) == sorted(store_ids.to_pylist())  # every item once
    assert (current(db).action, current(db).table_version) == ("ingest", table.version)
    assert guards.holder(db, "gallery_v2") is None and guards.holder(db, "gallery_store") is None
    reliability(
        "writers raced",
        "an ingest batch while a backfill of the deployed version holds its table",
        "FCT_INGEST_WAIT_S=1: refused: " + line.split(": ", 1)[1] + "; nothing written."
        " FCT_INGEST_WAIT_S=240: waited; the backfill's publish had no checks, so it wrote"
        " nothing and the deployment stayed; once a publish passed its checks, it landed"
        " there; every item once",
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


def test_a_second_run_of_a_current_version_is_a_no_op_that_says_so(env, reliability):
    import dagster as dg

    from fct_assets.lib.event_log import latest_materialization
    from fct_assets.lib.keys import NO_OP_TAG

    checkpoint = env.root / "checkpoints" / "new_model" / "v2.safetensors"
    before_bytes, before_mtime = checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns
    keys = ("new_model", "transformation", "backfilled_gallery", "eval_report")
    before = {k: latest_materialization(env.instance, dg.AssetKey(k), "v2").run_id for k in keys}
    run = env.upgrade("v2")  # the same config as the run that made v2
    assert run.success
    why = env.instance.get_run_by_id(run.run_id).tags.get(NO_OP_TAG, "")
    assert why.startswith("v2 is current:") and "\n" not in why, why
    assert before[keys[-1]][:8] in why  # the run that materialised v2 last
    after = {k: latest_materialization(env.instance, dg.AssetKey(k), "v2").run_id for k in keys}
    assert after == before  # nothing materialised again
    assert not any(e.is_step_success for e in run.all_events if e.step_key != "new_model")
    assert checkpoint.read_bytes() == before_bytes
    assert checkpoint.stat().st_mtime_ns == before_mtime  # not even rewritten
    reliability(
        "writers raced",
        "a second upgrade run of v2, current, with the same config",
        f"no-op, the run says so (tag {NO_OP_TAG}): {why}",
    )


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (8-bit grey) and holds one row: a bomb's header."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = zlib.compress(b"\0" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def test_hostile_files_are_quarantined_and_the_rest_lands(env, tmp_path, reliability):
    from fct_assets.ingest.ingest import MAX_FILE_BYTES, QUARANTINE

    inbox = tmp_path / "inbox"
    good = held_back(env, 5, start=20)
    drop(inbox / "3", good[:2])  # item0.png, item1.png under label 3
    png = storage.encode_png(good[2][0])
    outside = tmp_path / "outside.png"
    outside.write_bytes(storage.encode_png(good[4][0]))
    hostile: dict[str, str] = {}  # relpath -> what the reason must say
    # Files that may still be being written: left in the inbox for a retry on a later tick
    # (tests/fct_assets/test_ingest.py follows one to its quarantine).
    incomplete: dict[str, str] = {}

    def put(name: str, data: bytes, expect: str, into: dict[str, str] = hostile) -> None:
        (inbox / name).write_bytes(data)
        into[name] = expect

    put("bomb.png", png_header(100_000, 100_000), "decompression bomb")
    put("bomb_warned.png", png_header(10_000, 9_000), "could be decompression bomb")
    put("poster.png", png_header(7_000, 7_000), "7000x7000 pixels, more than 40,000,000")
    with open(inbox / "huge.png", "wb") as f:  # 2 GB, sparse: no disk used
        f.truncate(2 * 2**30)
    hostile["huge.png"] = f"2,147,483,648 bytes, more than {MAX_FILE_BYTES:,}; not read"
    (inbox / "link_out.png").symlink_to(outside)
    hostile["link_out.png"] = "outside the inbox (a symlink)"
    (inbox / "zero_dev.png").symlink_to("/dev/zero")
    hostile["zero_dev.png"] = "outside the inbox (a symlink)"
    (inbox / "dangling.png").symlink_to(inbox / "gone.png")
    hostile["dangling.png"] = "cannot read (No such file or directory)"
    hostile["../outside.png"] = "outside the inbox: resolves to"
    put("truncated.png", png[: len(png) // 2], "still being written?", incomplete)
    put("empty.png", b"", "empty file", incomplete)
    put("text.png", b"hello, not a picture\n", "not an image")
    put("ghost.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image")
    put("page.png", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image")
    put("pickle.png", b"\x80\x04\x95cos\nsystem\n.", "not an image")
    put("zipped.png", gzip.compress(b"\0" * 10**6), "not an image")
    put("broken.jpg", b"\xff\xd8\xff\xe0" + os.urandom(200), "unreadable image", incomplete)
    os.mkfifo(inbox / "fifo.png")  # reading it would block for ever
    hostile["fifo.png"] = "not a regular file"
    # Odd names, harmless contents: they land; their names never reach a shell.
    landing = {
        "new\nline.png": good[2][0],
        "$(touch pwned);`id`&.png": good[3][0],
        "really_a_png.jpg": 255 - good[4][0],  # not the picture outside
    }
    for name, image in landing.items():
        (inbox / name).write_bytes(storage.encode_png(image))
    files = ["3/item0.png", "3/item1.png", *hostile, *incomplete, *landing]
    batch = "bhostile"
    env.instance.add_dynamic_partitions("ingest_batch", [batch])
    run = env.defs.resolve_job_def("ingest").execute_in_process(
        instance=env.instance,
        partition_key=batch,
        run_config={"ops": {"ingested_batch": {"config": {"files": files, "inbox": str(inbox)}}}},
    )
    assert run.success
    record = run.output_for_node("ingested_batch")
    reasons = {Path(q.file).relative_to(inbox).as_posix(): q.reason for q in record.quarantined}
    reasons = {os.path.normpath(k): v for k, v in reasons.items()}
    assert set(reasons) == {os.path.normpath(k) for k in hostile}, sorted(reasons)
    for name, expect in hostile.items():
        reason = reasons[os.path.normpath(name)]
        assert expect in reason and "\n" not in reason, (name, reason)
        moved = inbox / QUARANTINE / batch / name
        if name.startswith(".."):
            assert outside.exists() and not moved.exists()  # never moved out of its place
        else:
            assert moved.is_symlink() or moved.exists(), name
            assert (moved.parent / (moved.name + ".reason.txt")).read_text() == reason + "\n"
    left = {Path(q.file).name: q.reason for q in record.retrying}
    assert set(left) == set(incomplete), sorted(left)
    for name, expect in incomplete.items():
        assert expect in left[name] and "\n" not in left[name], (name, left[name])
        assert (inbox / name).exists()  # not moved
    landed = [*good[:2], *((image, -1) for image in landing.values())]
    ids = [content_id(image) for image, _ in landed]
    assert sorted(record.ingested) == sorted(ids)
    db = env.fct.connect()
    assert counts(db, "gallery_store", ids) == [1] * len(ids)
    assert counts(db, current(db).table, ids) == [1] * len(ids)
    assert not any(p.exists() for p in (tmp_path / "pwned", REPO / "pwned"))
    assert outside.read_bytes() == storage.encode_png(good[4][0])
    for name, reason in sorted(reasons.items()):
        reliability(
            "hostile file", name.encode("unicode_escape").decode(), f"quarantined: {reason}"
        )
    for name, reason in sorted(left.items()):
        reliability("hostile file", name, f"left in the inbox for a retry: {reason}")
    for name in landing:
        reliability(
            "hostile file",
            name.encode("unicode_escape").decode(),
            "a valid picture under an odd name: landed once; its name reaches no shell",
        )
    reliability(
        "hostile file",
        f"the batch: {len(files)} files",
        f"{len(ids)} landed, {len(reasons)} quarantined and {len(left)} left for a retry, each"
        " with one line",
        json.dumps(
            {
                "cases": len(hostile) + len(incomplete) + len(landing),
                "refused_with_one_line": len(reasons),
                "left_for_a_retry": len(left),
            }
        ),
    )


def test_ingest_killed_with_sigkill_then_rerun_gives_each_item_once(env, tmp_path, reliability):
    """`fct ingest` killed at two points (at once; as soon as gallery_store committed): no half
    batch is visible, and a re-run lands every item exactly once in both tables."""
    db = env.fct.connect()
    items = held_back(env, 30, start=40)
    ids = [content_id(image) for image, _ in items]
    folder = drop(tmp_path / "drop", items)
    outcomes = []
    for point in ("at start", "once gallery_store committed"):
        before = db.open_table("gallery_store").version
        proc = fct_cli(env, "ingest", str(folder), wait_s=60)
        deadline = time.monotonic() + 600
        try:
            if point == "at start":
                time.sleep(2.0)
            else:
                while db.open_table("gallery_store").version == before:
                    assert proc.poll() is None and time.monotonic() < deadline, "it never wrote"
                    time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        stored = counts(db, "gallery_store", ids)
        assert set(stored) in ({0}, {1}), stored  # a batch is one commit: all or nothing
        table = counts(db, current(db).table, ids)
        assert set(table) in ({0}, {1}), table
        outcomes.append(f"killed {point}: {sum(stored)} in gallery_store, {sum(table)} in table")
    rerun = fct_cli(env, "ingest", str(folder), "--json", wait_s=60)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-2000:]
    assert counts(db, "gallery_store", ids) == [1] * 30
    serving = current(db)
    assert counts(db, serving.table, ids) == [1] * 30
    # The served table version holds them: the deployment advanced past the killed run's commit.
    pinned = storage.open_pinned(db, serving.table, serving.table_version)
    held = pinned.to_arrow().column("item_id")
    assert all(pc.any(pc.equal(held, i)).as_py() for i in ids)
    assert guards.holder(db, "gallery_store") is None
    reliability(
        "fault",
        "SIGKILL during an ingest run (`fct ingest`, 30 files)",
        "; ".join(outcomes) + "; no half batch visible; the re-run took the dead run's leases"
        " over and landed each item exactly once in both tables, served",
        '{"name": "SIGKILL during ingest", "injected": "SIGKILL at start and after the'
        ' gallery_store commit", "survived": true}',
    )


def harness_size() -> tuple[int, float, int]:
    """(reader processes, seconds at least, ingest batches): FCT_CONCURRENCY="R,S,B"; `make test`
    runs 2,10,2 and `make reliability` more."""
    readers, seconds, batches = os.environ.get("FCT_CONCURRENCY", "2,10,2").split(",")
    return int(readers), float(seconds), int(batches)


def release(procs: list[subprocess.Popen], go: Path) -> None:
    for proc in procs:  # every process imported and connected: release them together
        assert proc.stdout.readline().strip() == "ready"
    go.touch()


def outcome(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=900)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, err[-2000:]
    return json.loads(lines[-1])


def meet(db, table: str, procs: list[subprocess.Popen]) -> list[dict]:
    """The outcomes of two writers of `table` released together, made to overlap: the one that
    takes the lease first is paused (SIGSTOP) while it holds it, until the other has finished.
    Released together, one tiny backfill can otherwise be done before the other starts (seen
    with 4 reader processes on 2 cores), and the race would not be run at all."""
    by_pid = {p.pid: p for p in procs}
    deadline = time.monotonic() + 300
    while (held := guards.holder(db, table)) is None or held.pid not in by_pid:
        assert time.monotonic() < deadline, f"no writer took {table}'s lease in 300 s"
        assert all(p.poll() is None for p in procs), "a writer ended before either held the lease"
        time.sleep(0.01)
    first = by_pid[held.pid]
    (second,) = [p for p in procs if p is not first]
    first.send_signal(signal.SIGSTOP)
    try:
        met = outcome(second)
    finally:
        first.send_signal(signal.SIGCONT)
    return [outcome(first), met]


def test_concurrency_harness(env, tmp_path, reliability):
    """Reader processes search the deployed table all along while, one after the other, ingest
    batches arrive (`fct ingest`), two backfills of v3 (catch_up runs) are released at the same
    instant, and two promotions of v3 are released at the same instant. Verdict: no failed read,
    every answer from a table version a deployment row names, one backfill published, every
    ingested item once everywhere, a deployment record that reads as one sequence."""
    n_readers, seconds, n_batches = harness_size()
    db = env.fct.connect()
    # v3's models, table and checks, before the clock starts. A better model than v2's, as a real
    # next version is (and as `make demo` makes it): the default one may miss the quality check.
    epochs = 2 * env.fct.experiment().new_train.epochs
    config = {"ops": {"new_model": {"config": {"seed": 1, "epochs": epochs}}}}
    assert env.upgrade("v3", config).success
    spawn = {
        "cwd": REPO,
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
        "env": {**os.environ, **env.environ(), "PYTHONPATH": str(REPO)},
    }
    gates = {name: tmp_path / name for name in ("read", "catch_up", "promote", "stop")}
    logs = [open(tmp_path / f"reader{i}.err", "w") for i in range(n_readers)]  # noqa: SIM115
    readers = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests/reliability/reader_worker.py"),
                env.fct.lancedb_uri,
                str(gates["read"]),
                str(gates["stop"]),
                str(tmp_path / f"reader{i}.json"),
            ],
            # stderr to a file: LanceDB logs warnings there, and a pipe nobody drains until the
            # end fills and blocks the reader for ever.
            **{**spawn, "stderr": logs[i]},
        )
        for i in range(n_readers)
    ]
    writer = str(REPO / "tests/reliability/writer_worker.py")
    extra = {"catch_up": ["32"], "promote": []}  # catch_up: 32-row pages, a longer backfill
    writers = {
        what: [
            subprocess.Popen(
                [sys.executable, writer, str(gates[what]), what, "v3", *extra[what]], **spawn
            )
            for _ in range(2)
        ]
        for what in ("catch_up", "promote")
    }
    items = held_back(env, 5 * n_batches, start=100)
    ids = [content_id(image) for image, _ in items]
    try:
        release(readers, gates["read"])
        started = time.monotonic()
        for b in range(n_batches):
            folder = drop(tmp_path / f"batch{b}", items[5 * b : 5 * b + 5])
            ingest = fct_cli(env, "ingest", str(folder), wait_s=600)
            _, err = ingest.communicate(timeout=900)
            assert ingest.returncode == 0, err[-2000:]
        release(writers["catch_up"], gates["catch_up"])
        backfills = meet(db, "gallery_v3", writers["catch_up"])
        release(writers["promote"], gates["promote"])
        promotions = [outcome(p) for p in writers["promote"]]
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        gates["stop"].touch()
        for proc in [*readers, *writers["catch_up"], *writers["promote"]]:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    elapsed = time.monotonic() - started
    reads = [json.loads((tmp_path / f"reader{i}.json").read_text()) for i in range(n_readers)]

    # Readers: no failure; every answer from a table version a deployment row names.
    rows = history(db)
    named = {(r.version, r.table_version) for r in rows}
    seen = {tuple(s) for r in reads for s in r["seen"]}
    assert sum(r["failed"] for r in reads) == 0, [r["errors"] for r in reads]
    assert seen <= named, seen - named
    assert all(r["queries"] > 0 for r in reads)
    # Two backfills of v3 at once: one published, the other refused naming it.
    won = [b for b in backfills if b["ok"]]
    lost = [b for b in backfills if not b["ok"]]
    assert len(won) == 1, backfills
    assert "gallery_v3: run " + won[0]["run_id"] in lost[0]["line"], lost[0]["line"]
    # Two promotions at once: both recorded, seqs distinct and gap-free, the last one served.
    assert all(p["ok"] for p in promotions), promotions
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert current(db) == rows[-1] and rows[-1].version == "v3"
    # By number: "seq 10" sorts before "seq 9" as text (4 ingest batches reach seq 10).
    told = sorted(int(p["line"].removeprefix("seq ")) for p in promotions)
    assert told == [r.seq for r in rows[-2:]], promotions
    # Every ingested item once: in the store, the served v3 table, and v2's last served table.
    served = storage.open_pinned(db, rows[-1].table, rows[-1].table_version)
    v2 = [r for r in rows if r.version == "v2"][-1]
    tables = {
        "gallery_store": db.open_table("gallery_store"),
        "gallery_v3 (served)": served,
        "gallery_v2 (as last served)": storage.open_pinned(db, v2.table, v2.table_version),
    }
    lost_items = duplicated = 0
    for name, table in tables.items():
        column = table.to_arrow().column("item_id")
        found = [pc.sum(pc.equal(column, i)).as_py() for i in ids]
        lost_items += found.count(0)
        duplicated += sum(1 for f in found if f > 1)
        assert pc.count_distinct(column).as_py() == len(column), f"{name}: a duplicated id"
    assert lost_items == 0 and duplicated == 0
    queries = sum(r["queries"] for r in reads)
    figures = {
        "reader_processes": n_readers,
        "seconds": round(elapsed),
        "queries_answered": queries,
        "failed_reads": 0,
        "lost_items": lost_items,
        "duplicated_items": duplicated,
        "backfills_published": len(won),
        "promotions": len(promotions),
        "ingest_batches": n_batches,
        "items_ingested": len(ids),
    }
    reliability(
        "concurrency",
        f"{n_readers} reader processes for {elapsed:.0f} s during {n_batches} ingest batches, two"
        " backfills of v3 at once, two promotions of v3 at once",
        f"{queries} queries answered, 0 failed, every answer from a recorded table version; one"
        f" backfill published, the other refused: {lost[0]['line']}; promotions got seqs"
        f" {[r.seq for r in rows[-2:]]} of a gap-free record; {len(ids)} items once in each table",
        json.dumps(figures),
    )
