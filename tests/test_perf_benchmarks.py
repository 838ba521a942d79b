"""benchmarks/perf's bookkeeping on hand-made inputs: the import breakdown of cli_startup.py and
the slowdowns of thread_budget.py."""

from __future__ import annotations

from benchmarks.perf.cli_startup import import_breakdown
from benchmarks.perf.thread_budget import summary

IMPORTTIME = """\
import time: self [us] | cumulative | imported package
import time:       100 |        100 |   _io
import time:    400000 |     400000 |     torch._C
import time:    200000 |     600000 |   torch
import time:      5000 |       5000 |       lance_namespace.api
import time:    300000 |     305000 |     lancedb.db
import time:     10000 |     315000 |   lancedb
import time:     50000 |     50000 | numpy
"""


def test_import_time_is_summed_by_top_level_package():
    assert import_breakdown(IMPORTTIME, top=2) == {
        "torch": 0.6,
        "lancedb": 0.31,
        "(other)": 0.055,  # numpy 0.05, lance_namespace 0.005, _io 0.0001
        "(total)": 0.965,
    }


def _case(epoch_s: float, ingest: bool = True) -> dict:
    case = {"epoch": {"epoch_s": epoch_s, "torch_threads": 1}}
    if ingest:
        case["ingest"] = {"ingest_s": 3.0, "items": 2000, "items_per_s": 666.7}
    return case


def test_the_slowdown_is_beside_over_alone_with_the_budget():
    cases = {
        "alone": _case(20.0, ingest=False),
        "alone, all cores": _case(16.0, ingest=False),
        "beside": _case(30.0),
        "beside, all cores": _case(80.0),
    }
    s = summary(cases)
    assert (s["slowdown"], s["slowdown_vs_all_cores_alone"], s["slowdown_all_cores"]) == (
        1.5,
        1.88,
        5.0,
    )
    assert s["met"] and s["ingest_finished"]
    cases["beside"] = _case(51.0)
    assert not summary(cases)["met"]  # 2.55x
