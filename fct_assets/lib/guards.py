"""Single writer per table: who is writing a LanceDB table now, and what a second writer does.

Two mechanisms, each where it works:

- `local_lock(db, name)`: an OS file lock (`fcntl.flock`) on `<lancedb folder>/<name>.lock`,
  held for one short read-decide-write (a promotion). Writers on one machine queue on it; the
  kernel releases it when the holder dies, so a crash leaves nothing to clean. It does not exist
  on an object store (`s3://`): there it is a no-op and the conditional commit below decides.
- `insert_if_absent(table, rows, key)`: LanceDB's optimistic commit made conditional. The key
  column is the table's *unenforced primary key*; `merge_insert(key).when_not_matched_insert_all()`
  then detects a concurrent insert of the same key at commit time (Lance's conflict resolution,
  on a folder and on S3 alike), rebases, and inserts nothing. The caller re-reads and retries.
- `claim(db, table, writer)` / `release(...)`: a *lease* on a table whose write spans processes
  (a sharded backfill: plan, shards and publish are separate processes), one row of the
  `_writers` table keyed by the table name, inserted conditionally as above. A second writer
  is refused with one line naming the run that holds it, unless that run has ended (failed,
  cancelled, killed): then its lease is taken over. A short writer (an ingest batch) waits for
  the lease instead, up to a bound, and is then refused the same way (`leased`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from fct_assets.lib.resources import is_object_store

# Lance's marker of an unenforced primary key (position 1: a one-column key), as
# `Table.set_unenforced_primary_key` writes it.
PRIMARY_KEY = {"lance-schema:unenforced-primary-key:position": "1"}
WRITERS = "_writers"
ONE_PROCESS = ("ingest", "gallery_store")  # purposes whose lease one process holds, start to end


class TableBusyError(RuntimeError):
    """Another writer holds the table (one line naming it)."""


class Writer(BaseModel):
    """Who writes a table: a Dagster run (run_id) or a process outside Dagster (pid on host)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: str = ""
    pid: int
    host: str
    since: str
    # What it is writing for: "backfill", "ingest", "gallery_store" ("" in leases written before
    # the field existed). A backfill waits for an ingest's lease (seconds), not for a backfill's.
    purpose: str = ""

    @classmethod
    def me(cls, run_id: str = "", purpose: str = "") -> Writer:
        now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        return cls(
            run_id=run_id or "",
            pid=os.getpid(),
            host=socket.gethostname(),
            since=now,
            purpose=purpose,
        )

    def describe(self) -> str:
        who = f"run {self.run_id}" if self.run_id else f"process {self.pid} on {self.host}"
        what = f"{self.purpose}, " if self.purpose else ""
        return f"{who} ({what}since {self.since})"

    def same(self, other: Writer) -> bool:
        if self.run_id or other.run_id:
            return self.run_id == other.run_id
        return (self.pid, self.host) == (other.pid, other.host)


def _local_folder(db) -> Path | None:
    uri = str(getattr(db, "uri", ""))
    if not uri or is_object_store(uri) or "://" in uri.replace("file://", ""):
        return None
    return Path(uri.replace("file://", ""))


@contextlib.contextmanager
def local_lock(db, name: str, *, wait_s: float = 60.0) -> Iterator[None]:
    """Hold the OS file lock of table `name` (a folder's LanceDB only; a no-op on an object store).

    Waits up to `wait_s` for another holder, then raises TableBusyError naming it."""
    folder = _local_folder(db)
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    held = handle.read().strip() or "another process"
                    raise TableBusyError(
                        f"{name}: still locked by {held} after {wait_s:.0f} s ({path});"
                        " nothing was written"
                    ) from None
                time.sleep(0.02)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(Writer.me().describe())
            handle.flush()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def has_primary_key(schema: pa.Schema, key: str) -> bool:
    field = schema.field(key)
    return any(k.startswith(b"lance-schema:unenforced-primary-key") for k in field.metadata or {})


def ensure_primary_key(table, key: str) -> None:
    """Make `key` the table's unenforced primary key (tables written before it was one)."""
    if has_primary_key(table.schema, key):
        return
    if table.schema.field(key).nullable:
        table.alter_columns({"path": key, "nullable": False})
    table.set_unenforced_primary_key(key)


def _conflict(err: Exception) -> bool:
    text = str(err).lower()
    return any(w in text for w in ("conflict", "retryable", "too many concurrent", "retries"))


def insert_if_absent(db, name: str, rows: pa.Table, key: str) -> bool:
    """Insert `rows` into table `name` unless a row with the same `key` exists, in ONE conditional
    commit; creates the table on first use. False: the key was taken (or the commit lost a race):
    re-read and decide again."""
    try:
        table = db.open_table(name)
    except (ValueError, FileNotFoundError):
        # Created empty, then written like any other time: a create that carried the row would
        # race another first writer's (both "succeed"); an empty one changes nothing if it loses.
        try:
            table = db.create_table(name, schema=rows.schema, exist_ok=True)
        except (ValueError, OSError, RuntimeError) as err:
            if "exist" in str(err).lower() or _conflict(err):
                return False
            raise
    try:
        ensure_primary_key(table, key)
        result = table.merge_insert(key).when_not_matched_insert_all().execute(rows)
    except RuntimeError as err:
        if _conflict(err):
            return False
        raise
    return result.num_inserted_rows == rows.num_rows


# ---------------------------------------------------------------- leases (writes over processes)

WRITERS_SCHEMA = pa.schema(
    [
        pa.field("table", pa.string(), nullable=False, metadata=PRIMARY_KEY),
        pa.field("writer", pa.string(), nullable=False),  # Writer as JSON
    ]
)


def holder(db, table: str) -> Writer | None:
    """The writer holding a lease on `table`, or None."""
    try:
        leases = db.open_table(WRITERS)
    except (ValueError, FileNotFoundError):
        return None
    found = leases.search().where(f"`table` = '{table}'").limit(1).to_list()
    return Writer(**json.loads(found[0]["writer"])) if found else None


def claim(
    db,
    table: str,
    me: Writer,
    *,
    ended: Callable[[Writer], bool],
    attempts: int = 20,
    wait_s: float = 0.0,
    wait_for: Callable[[Writer], bool] = lambda writer: True,
    poll_s: float = 0.25,
) -> Writer | None:
    """Take the lease on `table` for `me`; returns the ended writer it took over from (whose
    leftovers the caller may now clean), or None. A live holder that `wait_for` accepts is waited
    for up to `wait_s`; then (or at once) raises TableBusyError, one line naming the holder."""
    row = pa.Table.from_pylist([{"table": table, "writer": me.model_dump_json()}], WRITERS_SCHEMA)
    took_over: Writer | None = None
    started = time.monotonic()
    tries = 0
    while tries < attempts:
        tries += 1
        if insert_if_absent(db, WRITERS, row, "table"):
            return took_over
        other = holder(db, table)
        if other is None:
            continue  # released meanwhile
        if other.same(me):
            return None
        if not ended(other):
            waited = time.monotonic() - started
            if wait_for(other) and waited < wait_s:
                tries -= 1  # waiting for a live holder is not a lost race
                time.sleep(poll_s)
                continue
            after = f" after waiting {waited:.0f} s" if wait_s > 0 else ""
            raise TableBusyError(
                f"{table}: {other.describe()} is writing it; refused{after} (nothing was"
                " written), retry when that run has ended"
            )
        # Its run ended without releasing (failed, killed): take over. Deleting by its exact row
        # leaves a lease another taker inserted meanwhile untouched.
        db.open_table(WRITERS).delete(f"`table` = '{table}' AND writer = '{_quoted(other)}'")
        took_over = other
    raise TableBusyError(f"{table}: its lease changed hands {attempts} times in a row; retry")


def _quoted(writer: Writer) -> str:
    return writer.model_dump_json().replace("'", "''")


def release(db, table: str, me: Writer) -> None:
    """Give up `me`'s lease on `table` (a run's from any of its processes); nothing if another
    writer holds it."""
    held = holder(db, table)
    if held is not None and held.same(me):
        db.open_table(WRITERS).delete(f"`table` = '{table}' AND writer = '{_quoted(held)}'")


def ended_check(instance=None) -> Callable[[Writer], bool]:
    """Whether a lease's holder has ended: a Dagster run by its status on `instance` (a run the
    instance does not know has ended), a process outside Dagster by its pid. A one-process write
    (ingest, the gallery_store rebuild) has also ended when its process is gone: a run executed
    in a process that was killed stays "started" in the run storage forever. A backfill's lease
    spans the processes of its ops, so only its run's status counts."""

    def ended(writer: Writer) -> bool:
        if writer.purpose in ONE_PROCESS and process_ended(writer):
            return True
        if writer.run_id and instance is not None:
            run = instance.get_run_by_id(writer.run_id)
            return run is None or run.is_finished
        return process_ended(writer)

    return ended


@contextlib.contextmanager
def leased(
    db,
    tables: list[str],
    me: Writer,
    *,
    ended: Callable[[Writer], bool],
    wait_s: float,
) -> Iterator[None]:
    """Hold the leases on `tables` (taken in name order, so two writers of overlapping tables
    never wait for each other in a circle) for a short write; waits up to `wait_s` for each live
    holder, then raises TableBusyError naming it. Released on exit, failed or not; a process
    killed meanwhile leaves its leases, which the next writer takes over (`ended`)."""
    held: list[str] = []
    try:
        for table in sorted(set(tables)):
            claim(db, table, me, ended=ended, wait_s=wait_s)
            held.append(table)
        yield
    finally:
        for table in reversed(held):
            release(db, table, me)


def process_ended(writer: Writer) -> bool:
    """Whether a writer outside Dagster has ended: its process is gone (same host only; a writer
    on another host is taken as live)."""
    if writer.host != socket.gethostname():
        return False
    try:
        os.kill(writer.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
