"""The churn harness: a living gallery under every operation at once, with the processes users
run, and a verdict read from the tables alone (tests/reliability/churn_audit.py).

A real `dagster-daemon` (sensors, run queue, run retries, the code location in its own server,
runs in their own worker processes) over an instance with base assets and two promoted versions
(v2, then v3; tiny preset, digits), configured as `make ui` configures it. Then, at once:

- W writer processes drop F files each into the inbox over S seconds (class sub-folders, as
  ingest expects): most written whole, every 20th no image at all, every 5th a slow copy that
  grows a little every 0.5-2 s and is still growing when an ingest step reaches it (the test
  opens its gate when a step that lists it is about to read; it completes 10 s later), as a
  copy over a slow link would be (tests/reliability/churn_writer.py);
- every T seconds a `fct rollback` or a `fct promote` of the version not served, alternately;
  `fct catch-up` runs once (when a promotion says to catch up first, or half-way);
- one ingest step, seen starting in the event log, is killed with SIGKILL.

Then the harness waits, bounded, for the daemon to drain the inbox by itself. Where it stalls
(files waiting, no ingest run queued or running, nothing changing) the harness does what the
user would do by hand: re-executes each failed ingest run whose files still wait, counting each
as a manual step, and waits again. The verdict counts every written file as searchable once in
the served table version, quarantined with a one-line reason (not-images only), lost or
duplicated, and checks invariants 2-4 (churn_audit.py). It is recorded as the report's `churn`.

FCT_CHURN="W,F,S,T" sets the size: `make test` runs 2,40,30,4 (80 files over 30 s, a switch
every 4 s); `make reliability` 4,1000,180,10 (4,000 files over 3 minutes, a switch every 10 s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import lancedb
import numpy as np
import pytest

from fct_assets.ingest.ingest import scan_inbox
from fct_assets.lib.keys import INGESTED_BATCH
from fct_assets.serving.deployment import current, promote
from fct_ml.pipeline import validation_split
from tests.reliability.churn_audit import audit
from tests.support.env import build_env

REPO = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("churn_writer.py")
pytestmark = pytest.mark.slow

REAPER_INTERVAL_S = 5  # run_reaper's tick (FCT_REAPER_INTERVAL; the product's default is 30)
STALL_S = 90  # files waiting, no ingest run in flight, nothing changed for this long: stalled
# Switching goes on after the writers' S seconds while they still write (slow copies) and until
# MET_RUNS ingest runs ended, so that ingest runs meet promotions and rollbacks whatever the
# size; at most this much longer.
MET_RUNS = 3
MORE_SWITCHING_S = 300
IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


@dataclass(frozen=True)
class Size:
    writers: int
    files: int  # per writer
    seconds: float  # the writers' spread, and how long promotions and rollbacks alternate
    switch_s: float

    @property
    def drain_s(self) -> float:
        """How long the daemon gets to empty the inbox once the writers are done."""
        return max(300.0, 4 * self.seconds)


def churn_size() -> Size:
    """FCT_CHURN="writers,files per writer,seconds,seconds between switches" (default 2,40,30,4)."""
    writers, files, seconds, switch_s = os.environ.get("FCT_CHURN", "2,40,30,4").split(",")
    return Size(int(writers), int(files), float(seconds), float(switch_s))


def spawn(environ: dict[str, str], argv: list[str], log: Path) -> subprocess.Popen:
    """A process of the test's own, its output into `log`, in its own session (so that ending it
    ends what it spawned, and nothing else)."""
    with open(log, "ab") as out:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **environ},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """End `proc`'s session (SIGTERM, then SIGKILL after `grace` seconds): only what it spawned."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent
    except ProcessLookupError:
        pass


def fct(environ: dict[str, str], *args: str, timeout: float = 600) -> tuple[bool, str]:
    """`fct ARGS...` as a user runs it: (exit code 0, its last line: the result or the error)."""
    done = subprocess.run(
        [sys.executable, "-m", "fct_assets.cli", *args],
        cwd=REPO,
        env={**os.environ, **environ},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()
    return done.returncode == 0, lines[-1] if lines else f"exit {done.returncode}, no output"


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process `pid` is `ancestor` or below it (/proc's parent links)."""
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


class Switcher(threading.Thread):
    """Promotions and rollbacks, alternately, every `size.switch_s` seconds for `size.seconds`
    and as long as `more()` says (the writers still write, ingest runs have yet to meet a
    switch); `fct catch-up` once: of the version a promotion told to catch up, or of the version
    not served half-way through."""

    def __init__(self, environ: dict[str, str], uri: str, size: Size, log: Path, more):
        super().__init__(daemon=True)
        self.environ, self.uri, self.size, self.log, self.more = environ, uri, size, log, more
        self.switches: list[dict] = []
        self.catch_up: subprocess.Popen | None = None
        self.catch_up_version = ""

    def start_catch_up(self, version: str) -> None:
        self.catch_up_version = version
        argv = [sys.executable, "-m", "fct_assets.cli", "catch-up", version]
        self.catch_up = spawn(self.environ, argv, self.log)

    def run(self) -> None:
        db = lancedb.connect(self.uri)
        started = time.monotonic()
        n = 0
        while (due := started + n * self.size.switch_s) < started + self.size.seconds or (
            self.more() and time.monotonic() < started + self.size.seconds + MORE_SWITCHING_S
        ):
            time.sleep(max(0.0, due - time.monotonic()))
            served = current(db).version
            other = "v2" if served == "v3" else "v3"
            args = ("rollback",) if n % 2 == 0 else ("promote", other)
            ok, line = fct(self.environ, *args)
            now = current(db).version
            self.switches.append(
                {"at_s": round(time.monotonic() - started, 1), "fct": " ".join(args), "ok": ok}
                | {"line": line, "served_before": served, "served_after": now, "at": time.time()}
            )
            if self.catch_up is None and "catch up first" in line:
                self.start_catch_up(other)  # as the refusal says
            elif self.catch_up is None and time.monotonic() - started >= self.size.seconds / 2:
                self.start_catch_up("v2" if now == "v3" else "v3")
            n += 1
        if self.catch_up is None:
            self.start_catch_up("v2" if current(db).version == "v3" else "v3")


class Killer(threading.Thread):
    """SIGKILL, once, to the process running an ingest step (its pid from the step's start event
    in the event log), once it logged that it is embedding its files, and not before
    `not_before` (time.monotonic()); only a process below the daemon the test started."""

    def __init__(self, instance: dg.DagsterInstance, daemon_pid: int, not_before: float):
        super().__init__(daemon=True)
        self.instance, self.daemon_pid, self.not_before = instance, daemon_pid, not_before
        self.killed: dict | None = None
        self.halt = threading.Event()

    def target(self) -> dict | None:
        running = dg.RunsFilter(job_name="ingest", statuses=[dg.DagsterRunStatus.STARTED])
        for run in self.instance.get_runs(running):
            events = self.instance.all_logs(run.run_id)
            kinds = [e.dagster_event.event_type if e.dagster_event else None for e in events]
            starts = [
                e.dagster_event.pid
                for e, kind in zip(events, kinds)
                if kind == dg.DagsterEventType.STEP_START and e.step_key == INGESTED_BATCH
            ]
            working = any("files, embedded by" in (e.user_message or "") for e in events)
            ended = dg.DagsterEventType.STEP_SUCCESS in kinds
            ended |= dg.DagsterEventType.STEP_FAILURE in kinds
            if starts and working and not ended:
                batch = run.tags.get("dagster/partition")
                return {"run_id": run.run_id, "batch": batch, "pid": starts[-1]}
        return None

    def run(self) -> None:
        while not self.halt.is_set() and self.killed is None:
            found = self.target() if time.monotonic() >= self.not_before else None
            if found and descends_from(found["pid"], self.daemon_pid):
                try:
                    cmdline = Path(f"/proc/{found['pid']}/cmdline").read_bytes()
                    os.kill(found["pid"], signal.SIGKILL)
                    found["process"] = cmdline.replace(b"\0", b" ").decode().strip()[:200]
                    self.killed = found
                except (FileNotFoundError, ProcessLookupError):  # it ended: wait for the next
                    pass
            time.sleep(0.1)


class Gatekeeper(threading.Thread):
    """Opens the gate of every file an ingest step is about to read (the step logged "N files,
    embedded by"): GATES/<relpath with '/' as '__'>, which a slow copy waits for
    (churn_writer.py)."""

    def __init__(self, instance: dg.DagsterInstance, gates: Path):
        super().__init__(daemon=True)
        self.instance, self.gates = instance, gates
        self.seen: set[str] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        running = dg.RunsFilter(job_name="ingest", statuses=[dg.DagsterRunStatus.STARTED])
        while not self.halt.is_set():
            for run in self.instance.get_runs(running):
                if run.run_id in self.seen:
                    continue
                events = self.instance.all_logs(run.run_id)
                if any("files, embedded by" in (e.user_message or "") for e in events):
                    self.seen.add(run.run_id)
                    for f in run.run_config["ops"][INGESTED_BATCH]["config"]["files"]:
                        (self.gates / f.replace("/", "__")).touch()
            time.sleep(0.2)


def wait_for_daemon(instance: dg.DagsterInstance, daemon: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while "SENSOR" not in instance.get_daemon_heartbeats():
        assert daemon.poll() is None, f"dagster-daemon exited; log: {log}"
        assert time.monotonic() < deadline, f"dagster-daemon not up in 300 s; log: {log}"
        time.sleep(1)


def ingest_runs(instance: dg.DagsterInstance, statuses=None) -> list[dg.DagsterRun]:
    return instance.get_runs(dg.RunsFilter(job_name="ingest", statuses=statuses or []))


def drain(instance: dg.DagsterInstance, inbox: Path, timeout: float) -> str:
    """Wait until the inbox is empty and no ingest run is in flight: "drained"; "stalled" when
    files wait, no ingest run is in flight and nothing changed for STALL_S seconds; else "timed
    out, ..." after `timeout` seconds, saying what was left."""
    deadline = time.monotonic() + timeout
    last, changed = None, time.monotonic()
    waiting: list[str] = []
    flying: list[str] = []
    while time.monotonic() < deadline:
        waiting = [f.relpath for f in scan_inbox(inbox)]
        flying = [r.run_id for r in ingest_runs(instance, IN_FLIGHT)]
        if not waiting and not flying:
            return "drained"
        state = (tuple(waiting), tuple(flying), len(ingest_runs(instance)))
        if state != last:
            last, changed = state, time.monotonic()
        elif not flying and time.monotonic() - changed > STALL_S:
            return "stalled"
        time.sleep(2)
    if waiting:
        return f"timed out, {len(waiting)} files in the inbox"
    # Runs of batches whose files earlier runs moved (a slow copy's stamp changed, so the sensor
    # launched it again): waiting for them would change no file's place.
    return f"timed out, inbox empty, {len(flying)} ingest runs of moved files still queued"


def reexecute_stranded(env, inbox: Path) -> list[str]:
    """What the user does by hand when files stay in the inbox: re-execute each failed ingest
    run whose files still wait there and that no run of its group finished; its run ids."""
    done, batches = [], set()
    for run in ingest_runs(env.instance, [dg.DagsterRunStatus.FAILURE]):
        group = env.instance.get_run_group(run.run_id)
        batch = run.tags["dagster/partition"]
        if batch in batches or any(
            r.status == dg.DagsterRunStatus.SUCCESS for r in (group[1] if group else [])
        ):
            continue  # its batch re-executed already, or a retry of it landed
        config = run.run_config["ops"][INGESTED_BATCH]["config"]
        if not any((inbox / f).exists() for f in config["files"]):
            continue
        again = env.defs.resolve_job_def("ingest").execute_in_process(
            instance=env.instance,
            partition_key=batch,
            run_config=run.run_config,
            raise_on_error=False,
        )
        batches.add(batch)
        done.append(again.run_id)
    return done


def met_a_switch(instance: dg.DagsterInstance, switches: list[dict]) -> int:
    """How many ingest runs had the served version change while they ran."""
    changes = [s["at"] for s in switches if s["served_before"] != s["served_after"]]
    met = 0
    for run in ingest_runs(instance):
        record = instance.get_run_record_by_id(run.run_id)
        start, end = record.start_time, record.end_time
        met += bool(start and end and any(start <= at <= end for at in changes))
    return met


def retried(instance: dg.DagsterInstance, killer: Killer) -> str:
    """What became of the killed run: the status of the run that retried it, or "not retried"."""
    group = instance.get_run_group(killer.killed["run_id"])
    again = [r for r in (group[1] if group else []) if r.parent_run_id == killer.killed["run_id"]]
    return again[0].status.value if again else "not retried"


def switched(switches: list[dict]) -> dict:
    """How many promotions and rollbacks were done and refused, and the refusals' lines."""
    out = {}
    for what in ("promote", "rollback"):
        ok = [s["ok"] for s in switches if s["fct"].startswith(what)]
        out[f"{what}_done"], out[f"{what}_refused"] = ok.count(True), ok.count(False)
    refusals = list(dict.fromkeys(s["line"] for s in switches if not s["ok"]))
    return {**out, "refusals": refusals[:3]}


def test_churn(tmp_path, reliability):
    size = churn_size()
    setup = time.monotonic()
    env = build_env(tmp_path, chained=True)
    db = env.fct.connect()
    promote(env.instance, db, "v2")
    # v3 better than v2, as a real next version is (the quality check gates promotion).
    epochs = 2 * env.fct.experiment().new_train.epochs
    config = {"ops": {"new_model": {"config": {"seed": 1, "epochs": epochs}}}}
    assert env.upgrade("v3", config).success
    promote(env.instance, db, "v3")
    # The instance as `make ui` configures it: run queue, pools, run retries, run monitoring.
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path / "dagster_home" / "dagster.yaml")
    held = validation_split(env.fct.load_dataset("digits"), env.fct.experiment())
    base = tmp_path / "base.npz"  # pictures the gallery does not hold, with their labels
    np.savez(base, images=held.images.numpy(), labels=held.labels.numpy())
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    environ = {
        **env.environ(),
        "FCT_INBOX": str(inbox),
        "FCT_AUTO_UPGRADE": "off",
        "FCT_REAPER_INTERVAL": str(REAPER_INTERVAL_S),
        "PYTHONPATH": str(REPO),
    }
    logs, gates = tmp_path / "logs", tmp_path / "gates"
    logs.mkdir()
    gates.mkdir()
    setup_s = time.monotonic() - setup

    daemon = spawn(
        environ,
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", "workspace.yaml"],
        logs / "daemon.log",
    )
    writers: list[subprocess.Popen] = []

    def more() -> bool:
        ended = ingest_runs(
            env.instance, [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
        )
        return any(w.poll() is None for w in writers) or len(ended) < MET_RUNS

    switcher = Switcher(environ, env.fct.lancedb_uri, size, logs / "catch_up.log", more)
    watchers: list[Killer | Gatekeeper] = []
    try:
        wait_for_daemon(env.instance, daemon, logs / "daemon.log")
        started = time.monotonic()
        killer = Killer(env.instance, daemon.pid, not_before=started + size.seconds / 4)
        watchers = [killer, Gatekeeper(env.instance, gates)]
        for thread in watchers:
            thread.start()
        writers = [
            spawn(
                environ,
                [
                    sys.executable,
                    str(WRITER),
                    str(inbox),
                    str(w),
                    str(size.files),
                    str(size.seconds),
                    str(base),
                    str(gates),
                    str(tmp_path / f"manifest{w}.json"),
                ],
                logs / f"writer{w}.log",
            )
            for w in range(size.writers)
        ]
        switcher.start()
        for w, proc in enumerate(writers):
            assert proc.wait(timeout=size.seconds + 600) == 0, f"writer {w}: {logs}/writer{w}.log"
        switcher.join(timeout=900)
        assert not switcher.is_alive(), "a promotion or rollback hung"
        assert switcher.catch_up.wait(timeout=900) is not None
        catch_up_ok = switcher.catch_up.returncode == 0
        churn_s = time.monotonic() - started  # writers, switches and catch-up done
        drained = drain(env.instance, inbox, size.drain_s)
        manual: list[str] = []
        if drained != "drained":
            manual = reexecute_stranded(env, inbox)
            if manual:
                drained = drain(env.instance, inbox, size.drain_s) + " after manual steps"
        wall_s = time.monotonic() - started
    finally:
        for thread in watchers:
            thread.halt.set()
            thread.join(timeout=30)
        for proc in [*writers, *([switcher.catch_up] if switcher.catch_up else []), daemon]:
            stop(proc)
    manifest = [
        e
        for w in range(size.writers)
        for e in json.loads((tmp_path / f"manifest{w}.json").read_text())
    ]
    verdict = audit(env.instance, db, inbox, manifest, env.fct.experiment(), held.images.shape[1])
    runs = ingest_runs(env.instance)
    catch_up_line = (logs / "catch_up.log").read_text().strip().splitlines()[-1:] or [""]
    figures = {
        "writers": size.writers,
        "files_per_writer": size.files,
        "write_seconds": size.seconds,
        "switch_every_s": size.switch_s,
        **{k: verdict.pop(k) for k in ("files", "searchable", "quarantined", "lost", "duplicated")},
        "manual_steps": len(manual),
        "slow_copies": sum(e["kind"] == "slow" for e in manifest),
        "slow_copies_met_by_an_ingest_step": sum(e.get("met_a_reader", False) for e in manifest),
        "wall_seconds": round(wall_s),
        "churn_seconds": round(churn_s),
        "setup_seconds": round(setup_s),
        "drain": drained,
        **switched(switcher.switches),
        "catch_up": {
            "version": switcher.catch_up_version,
            "ok": catch_up_ok,
            "line": catch_up_line[0],
        },
        "killed": killer.killed and {**killer.killed, "retried": retried(env.instance, killer)},
        "ingest_runs": len(runs),
        "ingest_runs_failed": sum(r.status == dg.DagsterRunStatus.FAILURE for r in runs),
        "ingest_runs_that_met_a_switch": met_a_switch(env.instance, switcher.switches),
        "served_at_end": current(db).version,
        **verdict,
    }
    (tmp_path / "switches.json").write_text(json.dumps(switcher.switches, indent=2))
    reliability(
        "churn",
        f"{size.writers} writers x {size.files} files over {size.seconds:.0f} s (every 5th"
        " written in pieces, every 20th not an image), a promotion or rollback every"
        f" {size.switch_s:.0f} s, one catch-up, one ingest step killed with SIGKILL, under"
        " dagster-daemon",
        f"{figures['files']} files: {figures['searchable']} searchable once in the served"
        f" version, {figures['quarantined']} quarantined, {figures['lost']} lost"
        f" {figures['lost_by_cause']}, {figures['duplicated']} duplicated;"
        f" {figures['manual_steps']} manual steps; inbox {drained}",
        json.dumps(figures),
    )
    broken = {
        "lost": figures["lost"],
        "duplicated": figures["duplicated"],
        "manual_steps": figures["manual_steps"],
        "left_in_inbox": figures["left_in_inbox"],
        "served_failing_checks": figures["served_failing_checks"],
        "served_without_a_passed_check": figures["served_without_a_passed_check"],
        "rows_of_another_space": figures["rows_of_another_space"],
        "ingested_rows_not_in_their_space": figures["ingested_rows_not_in_their_space"],
        "silent_shrinks": figures["silent_shrinks"],
    }
    # The harness measured what it claims: the kill happened, the switches switched.
    assert killer.killed is not None, "no ingest step was seen running: nothing was killed"
    assert figures["promote_done"] + figures["rollback_done"] >= 2, switcher.switches
    assert figures["space_labels_agree"], figures["space_labels"]
    assert not any(broken.values()), json.dumps(figures, indent=1)
