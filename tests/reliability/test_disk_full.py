"""A full disk during a publish: LanceDB on a small tmpfs that the test mounts (as root) and
unmounts. The served table stays as it was and keeps answering, the error is one line, and the
same publish completes once space is freed. Real LanceDB; the table is the backfill's publish."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fct_assets.lib import storage
from fct_assets.lib.records import VersionTable
from fct_assets.serving.deployment import append, current, search

SPACE = "new@000000000002"
DIM = 64


def _rows(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for start in range(0, n, 1000):
        k = min(1000, n - start)
        yield pa.record_batch(
            [
                pa.array(np.arange(start, start + k, dtype=np.int64)),
                pa.array(np.zeros(k, np.int32)),
                pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.random(k * DIM, dtype=np.float32)), DIM
                ),
                pa.array(np.zeros(k, np.float32)),
                pa.array(["transformed"] * k),
                pa.array([SPACE] * k),
            ],
            schema=_schema(),
        )


def _schema() -> pa.Schema:
    return storage.backfilled_schema(DIM, SPACE)


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs mounted at tmp_path/disk for the test, unmounted after it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """A filler file taking all but `leave` bytes of the file system."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_disk_full_during_publish_publishes_nothing(small_disk, reliability):
    import lancedb

    db = lancedb.connect(str(small_disk / "lancedb"))
    first = storage.publish(db, "gallery_v2", _schema(), _rows(2000, 0))
    served = append(
        db,
        "promote",
        VersionTable(
            version="v2", table="gallery_v2", table_version=first["version"], space_id=SPACE
        ),
    )
    query = np.full(DIM, 0.5, np.float32)
    answer = search(db, query, version=served, k=5)
    filler = _fill(small_disk, leave=512 * 1024)

    with pytest.raises(OSError) as full:
        storage.publish(db, "gallery_v2", _schema(), _rows(20_000, 1))  # ~5 MiB of vectors
    line = str(full.value)
    assert "\n" not in line and "gallery_v2: no space left on device" in line, line
    assert "nothing was published" in line
    table = db.open_table("gallery_v2")
    assert (table.version, table.count_rows()) == (first["version"], 2000)
    assert current(db) == served
    assert search(db, query, version=served, k=5) == answer  # still answering, the same

    filler.unlink()
    again = storage.publish(db, "gallery_v2", _schema(), _rows(20_000, 1))
    assert again["rows"] == 20_000 and again["version"] > first["version"]
    assert search(db, query, version=served, k=5) == answer  # the pinned version, unchanged
    reliability(
        "fault",
        "disk full during a publish (6 MiB tmpfs, 0.5 MiB left, a 5 MiB table)",
        f"refused: {line}; served table and answers unchanged; re-run after freeing space"
        f" published version {again['version']}",
        '{"name": "disk full during publish", "injected": "ENOSPC on a 6 MiB tmpfs",'
        ' "survived": true}',
    )
