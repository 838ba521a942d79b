"""Reliability tests record what they tried and what happened; `benchmarks/system/reliability.py`
runs them with FCT_RELIABILITY_RECORDS set and turns the records into
benchmarks/results/reliability.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

_RECORDS: list[dict[str, str]] = []


@pytest.fixture
def reliability(request):
    """record(category, case, outcome, detail=''): one line of the reliability report."""

    def record(category: str, case: str, outcome: str, detail: str = "") -> None:
        _RECORDS.append(
            {
                "category": category,
                "case": case,
                "outcome": outcome,
                "detail": detail,
                "test": request.node.nodeid,
            }
        )

    return record


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FCT_RELIABILITY_RECORDS")
    if path and _RECORDS:
        Path(path).write_text(json.dumps(_RECORDS, indent=2))
