"""What a step costs: wall time, CPU time and peak RSS, recorded as numeric asset metadata.

Numeric metadata under stable keys (`cost/wall_s`, `cost/cpu_s`, `cost/peak_rss_mb`) is what the
Dagster UI plots across an asset's materialisations, so an upgrade's cost can be followed version
after version. benchmarks/perf/upgrade_cost.py reads the same entries.

Peak RSS is the step's own: on Linux the process's high-water mark is reset when the step starts
(/proc/self/clear_refs, "5"), so a step that runs in a process after another (the in-process
executor, `make demo`) does not inherit the other's peak. Where the reset is refused, the
process's peak since it started is reported instead (`cost/peak_rss_scope`: "process").
"""

from __future__ import annotations

import functools
import inspect
import re
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from fct_assets.lib.records import StepCost

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS; whether that was possible."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """The process's peak RSS (MB): VmHWM on Linux, else getrusage's maximum."""
    try:
        found = re.search(r"VmHWM:\s+(\d+)\s+kB", _STATUS.read_text())
        if found:
            return int(found.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process's threads and of its children waited for."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


@contextmanager
def measure() -> Iterator[Callable[[], StepCost]]:
    """Measure the block: yields a function that returns the cost so far (call it at the end)."""
    step_scope = _reset_peak_rss()
    wall0, cpu0 = time.perf_counter(), _cpu_s()

    def so_far() -> StepCost:
        return StepCost(
            wall_s=round(time.perf_counter() - wall0, 3),
            cpu_s=round(_cpu_s() - cpu0, 3),
            peak_rss_mb=round(_peak_rss_mb(), 1),
            peak_rss_scope="step" if step_scope else "process",
        )

    yield so_far


def cost_metadata(cost: StepCost, prefix: str = "cost/") -> dict[str, Any]:
    """{"cost/wall_s", "cost/cpu_s", "cost/peak_rss_mb", "cost/peak_rss_scope"} (numbers as
    floats, so that the UI plots them)."""
    return {
        f"{prefix}wall_s": float(cost.wall_s),
        f"{prefix}cpu_s": float(cost.cpu_s),
        f"{prefix}peak_rss_mb": float(cost.peak_rss_mb),
        f"{prefix}peak_rss_scope": cost.peak_rss_scope,
    }


def _with_cost(out, spent: StepCost):
    """A dg.Output with the cost added to its metadata; anything else unchanged."""

    if not isinstance(out, dg.Output):
        return out
    return out.with_metadata({**(out.metadata or {}), **cost_metadata(spent)})


def measured(fn: Callable) -> Callable:
    """`fn` (an asset's compute function that returns or yields dg.Output) with its cost added to
    the output's metadata; a generator that yields nothing (a no-op run) stays silent. The
    signature, annotations and generator-ness stay `fn`'s (Dagster reads them)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def timed_outputs(*args, **kwargs):
            with measure() as cost:
                for out in fn(*args, **kwargs):
                    yield _with_cost(out, cost())

        return timed_outputs

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        with measure() as cost:
            out = fn(*args, **kwargs)
            spent = cost()
        return _with_cost(out, spent)

    return timed
