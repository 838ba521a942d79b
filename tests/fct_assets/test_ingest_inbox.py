"""A file still being written, in a real inbox folder (fct_assets/ingest/ingest.py): the scan
waits until its mtime has settled, and a file found incomplete is left for a retry on a later
tick before it is quarantined. The whole path through the sensor and ingest runs is in
test_ingest.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from fct_assets.ingest import ingest
from fct_assets.lib import storage
from fct_assets.lib.images import decode_image

IMAGE = np.random.default_rng(0).integers(0, 256, (1, 8, 8), dtype=np.uint8)
PNG = storage.encode_png(IMAGE)  # 140 bytes; the first 70 end inside its pixel data


def age(path: Path, seconds: float) -> None:
    """Set the file's mtime `seconds` in the past, as if its last write were then."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def decode(inbox: Path, names: list[str]) -> ingest.Decoded:
    return ingest.decode_files([(str(inbox / n), -1) for n in names], 1, (8, 8))


def test_the_settle_time_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ingest.SETTLE_ENV, raising=False)
    assert ingest.inbox_settle_s() == 2.0
    monkeypatch.setenv(ingest.SETTLE_ENV, "0.5")
    assert ingest.inbox_settle_s() == 0.5
    for bad in ("-1", "soon", "inf", "nan"):
        monkeypatch.setenv(ingest.SETTLE_ENV, bad)
        with pytest.raises(ingest.IngestError, match=rf"^FCT_INBOX_SETTLE_S='{bad}': expected"):
            ingest.inbox_settle_s()


def test_a_file_being_written_is_taken_once_it_has_settled(tmp_path, monkeypatch):
    monkeypatch.setenv(ingest.SETTLE_ENV, "30")
    inbox = tmp_path / "inbox"
    (inbox / "3").mkdir(parents=True)
    path = inbox / "3" / "slow.png"
    with open(path, "wb") as writer:
        writer.write(PNG[: len(PNG) // 2])
        writer.flush()
        assert ingest.scan_inbox(inbox) == []  # half written, just now
        writer.write(PNG[len(PNG) // 2 :])
    assert ingest.scan_inbox(inbox) == []  # complete, but written within the settle time
    age(path, 31)
    (found,) = ingest.scan_inbox(inbox)
    assert (found.relpath, found.size, found.retry) == ("3/slow.png", len(PNG), "")
    assert np.array_equal(decode_image(path.read_bytes(), 1, (8, 8)), IMAGE)
    # A file whose mtime is in the future (copied with its source's) is settled.
    future = inbox / "future.png"
    future.write_bytes(PNG)
    later = time.time() + 3600
    os.utime(future, (later, later))
    assert [f.relpath for f in ingest.scan_inbox(inbox)] == ["3/slow.png", "future.png"]


def test_a_truncated_file_is_retried_once_then_quarantined(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "dead.png").write_bytes(PNG[: len(PNG) // 2])  # its writer died
    (inbox / "empty.png").write_bytes(b"")
    for name in ("dead.png", "empty.png"):
        age(inbox / name, 60)
    names = ["dead.png", "empty.png"]
    first = {f.relpath: f.stamp for f in ingest.scan_inbox(inbox, settle_s=2)}

    # Batch b1 finds both incomplete: left in the inbox, each with a retry marker.
    decoded = decode(inbox, names)
    assert decoded.quarantined == [] and len(decoded.incomplete) == 2
    retrying, given_up = ingest.retry_or_give_up(decoded.incomplete, inbox, "b1")
    assert given_up == []
    reasons = {Path(q.file).name: q.reason for q, _, _ in retrying}
    assert reasons["dead.png"].startswith("unreadable image (image file is truncated")
    assert reasons["empty.png"] == (
        "empty file; still being written? left in the inbox for a retry on a later tick"
    )
    ingest._mark_retries(inbox, [(str(inbox / n), -1) for n in names], "b1", retrying)
    for name in names:
        ingest.settle(inbox, name, "b1", None)
        assert (inbox / name).exists()  # not moved
    # Their stamps changed: the sensor's next tick launches them again.
    second = {f.relpath: f.stamp for f in ingest.scan_inbox(inbox, settle_s=2)}
    assert second == {name: f"{first[name]}:retry:b1" for name in names}

    # Batch b2 finds them the same: quarantined, each with its one-line reason.
    retrying, given_up = ingest.retry_or_give_up(decode(inbox, names).incomplete, inbox, "b2")
    assert retrying == []
    for q in given_up:
        name = Path(q.file).name
        assert q.reason.endswith("; the same on a retry, unchanged since batch b1 tried it")
        assert "\n" not in q.reason
        ingest.settle(inbox, name, "b2", q.reason)
        moved = inbox / ingest.QUARANTINE / "b2" / name
        assert moved.exists() and not (inbox / name).exists()
        assert (moved.parent / f"{name}.reason.txt").read_text() == q.reason + "\n"
    assert sorted(Path(q.file).name for q in given_up) == names
    assert list((inbox / ingest.RETRY).rglob("*.json")) == []
    assert ingest.scan_inbox(inbox, settle_s=2) == []


def test_a_file_completed_after_its_first_try_lands(tmp_path):
    inbox = tmp_path / "inbox"
    (inbox / "3").mkdir(parents=True)
    path = inbox / "3" / "slow.png"
    path.write_bytes(PNG[:40])
    age(path, 60)
    retrying, _ = ingest.retry_or_give_up(decode(inbox, ["3/slow.png"]).incomplete, inbox, "b1")
    ingest._mark_retries(inbox, [(str(path), -1)], "b1", retrying)
    ingest.settle(inbox, "3/slow.png", "b1", None)

    # Written on, still incomplete: its writer is still going, so b2 leaves it for b3.
    with open(path, "ab") as writer:
        writer.write(PNG[40:-30])
    age(path, 30)
    retrying, given_up = ingest.retry_or_give_up(
        decode(inbox, ["3/slow.png"]).incomplete, inbox, "b2"
    )
    assert given_up == [] and [r.batch for _, _, r in retrying] == ["b2"]
    ingest._mark_retries(inbox, [(str(path), -1)], "b2", retrying)
    ingest.settle(inbox, "3/slow.png", "b2", None)
    assert ingest.read_retry(inbox, "3/slow.png").batch == "b2"

    # Finished: b3 decodes it, and it lands with its marker gone.
    with open(path, "ab") as writer:
        writer.write(PNG[-30:])
    decoded = decode(inbox, ["3/slow.png"])
    assert decoded.incomplete == [] and np.array_equal(decoded.images[0], IMAGE)
    ingest._mark_retries(inbox, [(str(path), -1)], "b3", [])
    ingest.settle(inbox, "3/slow.png", "b3", None)
    landed = inbox / ingest.PROCESSED / "b3" / "3" / "slow.png"
    assert landed.read_bytes() == PNG
    assert time.time() - landed.stat().st_mtime < 60  # mtime: when it landed
    assert ingest.read_retry(inbox, "3/slow.png") is None


def test_a_rerun_of_the_batch_that_left_a_file_moves_it_once_it_decodes(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    path = inbox / "slow.png"
    path.write_bytes(PNG[:40])
    retrying, _ = ingest.retry_or_give_up(decode(inbox, ["slow.png"]).incomplete, inbox, "b1")
    ingest._mark_retries(inbox, [(str(path), -1)], "b1", retrying)
    # The run failed after that (a lease wait, say); its re-execution finds the file complete.
    path.write_bytes(PNG)
    assert decode(inbox, ["slow.png"]).incomplete == []
    ingest._mark_retries(inbox, [(str(path), -1)], "b1", [])
    ingest.settle(inbox, "slow.png", "b1", None)
    assert (inbox / ingest.PROCESSED / "b1" / "slow.png").exists() and not path.exists()


def test_without_an_inbox_an_incomplete_file_is_quarantined_at_once(tmp_path):
    path = tmp_path / "half.png"
    path.write_bytes(PNG[: len(PNG) // 2])
    incomplete = ingest.decode_files([(str(path), -1)], 1, (8, 8)).incomplete
    retrying, given_up = ingest.retry_or_give_up(incomplete, None, "b1")
    assert retrying == [] and given_up[0].reason.endswith("; still being written?")
