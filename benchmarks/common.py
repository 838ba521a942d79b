"""What every benchmark script shares: the machine line and the writer of its results.

    from benchmarks.common import machine, write_results

    result["machine"] = machine("lancedb 0.40")   # one line; script-specific parts appended
    write_results("backfill", result, markdown_text)   # benchmarks/results/backfill.{json,md}

The scripts run as `python benchmarks/<folder>/<script>.py`; each puts the repository root on
sys.path before importing this module. Only the standard library is imported here, and torch
lazily, so that gpu_check.py still runs on a bare GPU box with torch alone.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.system()


def memory_gib() -> float | None:
    """Physical memory in GiB, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def gpu() -> str | None:
    """The first CUDA device's name, or None (no torch imported yet, no CUDA, or no torch)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def machine(*extra: str) -> str:
    """One line naming the machine: architecture, CPU model, cores, memory, python, torch (when
    the script imported it), GPU, then `extra` (a library's version, the load average, ...)."""
    parts = [f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()})"]
    mem = memory_gib()
    if mem is not None:
        parts.append(f"{mem:.0f} GiB memory")
    parts.append(f"python {platform.python_version()}")
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    parts.append(f"GPU {gpu() or 'none'}")
    return ", ".join([*parts, *extra])


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '1.9 2.0 2.1'."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def write_results(
    name: str,
    result: dict,
    markdown: str | None = None,
    out: Path | str = RESULTS,
    dumps: Callable[[dict], str] | None = None,
) -> Path:
    """Write `result` to `out`/`name`.json (`dumps`, default indented JSON, one trailing newline)
    and, when given, `markdown` (a table and a short text) to `out`/`name`.md; return the JSON's
    path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text((dumps(result) if dumps else json.dumps(result, indent=2)) + "\n")
    tmp.replace(path)  # an interrupted run never leaves half a record
    if markdown is not None:
        (out / f"{name}.md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return path
