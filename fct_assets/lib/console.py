"""Quiet program output: the story on the terminal, the full log in a file.

`quiet(log_path)` sends whatever is written to file descriptors 1 and 2 to a log file (Dagster's
console log at DEBUG, Python warnings, lance's native WARN lines, tracebacks of failed steps)
and points `sys.stdout` at the terminal and the log, so a program's own `print`s tell its story
and the log holds that story in order with everything else. `run_job` runs a Dagster job in
process with a progress bar over its steps (on a terminal only) and returns its result and time.
`verbose()` says whether the user asked for everything (FCT_VERBOSE).
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import dagster as dg

VERBOSE_ENV = "FCT_VERBOSE"

# Dagster warnings about APIs we use on purpose, each matched by its message (a regular
# expression matched at the start), with the reason we accept it: the two a demo run raises.
# pyproject's pytest filterwarnings accepts them too.
ACCEPTED_WARNINGS: tuple[tuple[str, str], ...] = (
    (
        "BetaWarning",
        r"Parameter `data_version` of initializer `Output.__init__` is currently in beta",
        # The models' data version is their content digest, which is how a re-trained model
        # makes what is downstream stale (docs/design.md).
    ),
    (
        "PreviewWarning",
        r"Specifying a partitions_def on an AssetCheckSpec is currently in preview",
        # Checks of a partitioned asset need partitions_def, or each run loads every partition
        # (raised when the definitions load).
    ),
)


def verbose(flag: bool = False) -> bool:
    """True when the user asked for the full output: the flag, or FCT_VERBOSE set to anything
    but "", "0" or "false"."""
    return flag or os.environ.get(VERBOSE_ENV, "").lower() not in ("", "0", "false")


def ignore_accepted_warnings() -> None:
    """Hide ACCEPTED_WARNINGS, unless the user chose warning filters (-W, PYTHONWARNINGS)."""
    if sys.warnoptions:
        return
    # Deferred: the filters go in before anything imports dagster, so its import-time warnings are caught.
    import dagster as dg

    for category, message in ACCEPTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=getattr(dg, category))


@dataclass(frozen=True)
class Terminal:
    """Where the story goes: `out` (the user's stdout), `err` (stderr: errors, progress bars),
    and the log file that holds everything, or None when nothing is redirected."""

    out: TextIO
    err: TextIO
    log: Path | None = None

    def fail(self, message: str, tail: int = 20) -> None:
        """Print an error, with the log's last `tail` lines (the failure's traceback) and its
        path when there is a log."""
        if self.log is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            lines = self.log.read_text(errors="replace").splitlines()[-tail:]
            self.err.write("".join(f"  | {line}\n" for line in lines))
            message += f" (full log: {self.log})"
        self.err.write(f"{message}\n")
        self.err.flush()


class _Tee(io.TextIOBase):
    """A text stream writing to several: the terminal first (its fileno and isatty)."""

    def __init__(self, *streams: TextIO):
        self.streams = streams

    def write(self, s: str) -> int:
        for stream in self.streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return self.streams[0].isatty()

    def fileno(self) -> int:
        return self.streams[0].fileno()


@contextmanager
def loud() -> Iterator[Terminal]:
    """Nothing redirected: everything on the terminal, as it comes."""
    yield Terminal(sys.stdout, sys.stderr)


@contextmanager
def quiet(log_path: Path) -> Iterator[Terminal]:
    """Send file descriptors 1 and 2 (and so `sys.stderr`) to `log_path`, truncated; `sys.stdout`
    writes to the terminal and the log. Everything is restored on exit."""
    log_path = Path(log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # Line-buffered, so that the story and what native code writes to fd 1 and 2 (the same open
    # file, one offset) land in the order they happen.
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 (closed in finally)
    out = os.fdopen(os.dup(saved_out), "w", buffering=1)
    err = os.fdopen(os.dup(saved_err), "w", buffering=1)
    stdout = sys.stdout
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = _Tee(out, log)
    try:
        yield Terminal(out, err, log_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout = stdout
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for closing in (log, out, err):
            closing.close()
        os.close(saved_out)
        os.close(saved_err)


def format_stage(label: str, seconds: float) -> str:
    """`label` and its time, one line: `base assets .......... 42 s`."""
    # Deferred: fct_ml loads torch (~1.6 s); the console serves commands that never train.
    from fct_ml.progress import format_seconds

    return f"{label} {'.' * max(2, 62 - len(label))} {format_seconds(seconds)}"


def run_job(
    term: Terminal,
    instance: dg.DagsterInstance,
    job: dg.JobDefinition,
    label: str,
    **execute_kwargs,
) -> tuple[dg.ExecuteInProcessResult, float]:
    """`job.execute_in_process(instance=instance, **execute_kwargs)` with a progress bar over its
    steps on `term.err` when the output is quiet and that is a terminal (gone when the run ends).
    Returns the result and the seconds it took."""
    # Deferred, as above: this module is loaded before dagster is.
    import dagster as dg
    from tqdm.auto import tqdm

    # The run's id is chosen here so that the instance's event listener for it can be
    # registered before the run starts.
    run_id = str(uuid.uuid4())
    # One unit per op; a dynamic fan-out (the backfill's shards) adds units as its steps start.
    total = sum(1 for _ in job.graph.iterate_op_defs())
    bar = tqdm(
        total=total,
        desc=label,
        unit="step",
        file=term.err,
        leave=False,
        # Verbose (nothing redirected): the run log itself shows the progress.
        disable=term.log is None or not term.err.isatty(),
        dynamic_ncols=True,
        bar_format="{desc}: {bar} {n_fmt}/{total_fmt} steps, {elapsed} {postfix}",
    )
    started, seen = time.perf_counter(), set()
    finished = (
        dg.DagsterEventType.STEP_SUCCESS,
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.STEP_SKIPPED,
    )

    def on_event(entry) -> None:
        kind = entry.dagster_event_type
        if kind == dg.DagsterEventType.STEP_START:
            seen.add(entry.step_key)
            if len(seen) > bar.total:
                bar.total = len(seen)
            bar.set_postfix_str(_short_step(entry.step_key), refresh=True)
        elif kind in finished:
            bar.update(1)

    instance.add_event_listener(run_id, on_event)
    try:
        result = job.execute_in_process(instance=instance, run_id=run_id, **execute_kwargs)
    finally:
        bar.close()
    return result, time.perf_counter() - started


def _short_step(step_key: str) -> str:
    # backfilled_gallery.backfill_shard[shard_3] -> backfill_shard[shard_3]
    return re.sub(r"^[^.\[]+\.", "", step_key)


def failure_line(result) -> str:
    """Why a run executed in process failed, in one line: the first failed step's `dg.Failure`
    description, else its exception's first line (the step's own error, not Dagster's wrapper)."""
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data and data.user_failure_data.description:
            return data.user_failure_data.description.strip().splitlines()[0]
        error = data.error.cause or data.error
        line = (error.message.strip().splitlines() or [error.cls_name or "error"])[0]
        return f"{event.step_key}: {line}"
    return "no step failed (the run itself did; see its log)"
