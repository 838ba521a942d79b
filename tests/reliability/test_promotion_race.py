"""Promotions released at the same instant from several processes: every caller that is told
it succeeded has its own seq, the seqs are 1..N without a gap, and the served version is the
row with the highest seq. FCT_PROMOTION_RACE=N,P sets the size with the folder's file lock
(`make reliability`: 100 promotions, 4 processes), FCT_PROMOTION_RACE_COMMIT_ONLY without it:
there every lost race costs a LanceDB commit retry, so it stays small."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lancedb
import pytest

from fct_assets.lib import guards, storage
from fct_assets.serving import deployment

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("promotion_worker.py")


def _size(file_lock: bool) -> tuple[int, int]:
    if file_lock:
        size = os.environ.get("FCT_PROMOTION_RACE", "12,3")
    else:
        size = os.environ.get("FCT_PROMOTION_RACE_COMMIT_ONLY", "4,2")
    promotions, processes = size.split(",")
    return int(promotions), int(processes)


def race(uri: str, promotions: int, processes: int, *, file_lock: bool = True) -> dict:
    """Run the race; returns what each worker was told and the resulting record."""
    share = [promotions // processes + (i < promotions % processes) for i in range(processes)]
    go = Path(uri).with_name("go")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), uri, str(i), str(n), str(go)]
            + ([] if file_lock else ["no-file-lock"]),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        for i, n in enumerate(share)
    ]
    for proc in procs:  # every worker imported and connected: release them together
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    told, errors = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        told += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            errors.append(err.strip().splitlines()[-1:])
    return {"told": told, "errors": errors, "history": deployment.history(lancedb.connect(uri))}


@pytest.mark.parametrize(
    "file_lock", [True, False], ids=["folder: file lock + conditional commit", "conditional commit"]
)
def test_promotions_at_the_same_instant_get_distinct_gap_free_seqs(
    tmp_path, reliability, file_lock
):
    promotions, processes = _size(file_lock)
    uri = str(tmp_path / "lancedb")
    result = race(uri, promotions, processes, file_lock=file_lock)
    history = result["history"]
    seqs = [r.seq for r in history]
    told = sorted(t["seq"] for t in result["told"])
    assert result["errors"] == []
    # Every caller told "promoted" owns a distinct row, and nothing else was recorded.
    assert told == seqs == list(range(1, promotions + 1))
    by_seq = {r.seq: r for r in history}
    for t in result["told"]:
        assert by_seq[t["seq"]].version == f"w{t['worker']}"
        assert by_seq[t["seq"]].table_version == t["k"]
        assert t["served_seq"] >= t["seq"]  # what a caller reads after is never older
    assert deployment.current(lancedb.connect(uri)).seq == promotions
    schema = lancedb.connect(uri).open_table(storage.DEPLOYMENTS).schema
    assert guards.has_primary_key(schema, "seq")
    figures = {
        "promotions": promotions,
        "processes": processes,
        "distinct_seq": len(set(seqs)),
        "gap_free": seqs == list(range(1, len(seqs) + 1)),
        "mechanism": "file lock + conditional commit" if file_lock else "conditional commit",
    }
    reliability(
        "promotion race",
        f"{promotions} promotions from {processes} processes released at the same instant"
        f" ({figures['mechanism']})",
        f"{figures['distinct_seq']} distinct seqs, gap-free {figures['gap_free']}, served seq"
        f" {deployment.current(lancedb.connect(uri)).seq} = the last recorded",
        json.dumps(figures),
    )
