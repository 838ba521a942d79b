"""Commit subjects fit `git log --oneline`: at most 72 characters, from the commit that set the
rule on (older history is not rewritten)."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULE_FROM = "d05061c"  # the rule holds for every commit after this one
# Made on a branch before the rule reached it, merged after it (history is not rewritten).
EXEMPT = {"f9a6724", "dd4c243", "691ee2e"}


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def test_commit_subjects_are_at_most_72_characters():
    if _git("cat-file", "-e", f"{RULE_FROM}^{{commit}}").returncode != 0:
        pytest.skip("no git history here (an archive or a shallow clone)")
    log = _git("log", "--no-merges", "--format=%h %s", f"{RULE_FROM}..HEAD")
    assert log.returncode == 0, log.stderr
    long = [
        line
        for line in log.stdout.splitlines()
        if len(line.split(" ", 1)[1]) > 72 and line.split(" ", 1)[0] not in EXEMPT
    ]
    assert not long, f"subjects over 72 characters (put the details in the body): {long}"
