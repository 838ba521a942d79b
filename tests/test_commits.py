"""Commit subjects fit `git log --oneline`: at most 72 characters, from the commit that set the
rule on (older history is not rewritten)."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULE_FROM = "d05061c"  # the rule holds for every commit after this one


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def test_commit_subjects_are_at_most_72_characters():
    if _git("cat-file", "-e", f"{RULE_FROM}^{{commit}}").returncode != 0:
        pytest.skip("no git history here (an archive or a shallow clone)")
    # By commit time, not by ancestry: a branch that forked before the rule and merged after it
    # brings older commits into RULE_FROM..HEAD, and their history is not rewritten either.
    since = int(_git("log", "-1", "--format=%ct", RULE_FROM).stdout)
    log = _git("log", "--no-merges", "--format=%ct %h %s", "HEAD")
    assert log.returncode == 0, log.stderr
    rows = [line.split(" ", 2) for line in log.stdout.splitlines()]
    long = [f"{h} {s}" for ct, h, s in rows if int(ct) > since and len(s) > 72]
    assert not long, f"subjects over 72 characters (put the details in the body): {long}"
