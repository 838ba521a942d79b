"""`dagster dev` for the browser test: a real webserver, daemon and code server on a free
loopback port, over a temporary DAGSTER_HOME and LanceDB folder, stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ui_environment(root: Path) -> dict[str, str]:
    """Environment of the server and of the in-process base run: everything under `root` (the
    inbox too: the sensor must never watch the checkout's data/inbox), tiny preset, CPU, and no
    automatic upgrade (the test launches it from the UI)."""
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(
        REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml"
    )  # no telemetry, no pop-ups
    return {
        "DAGSTER_HOME": str(home),
        "FCT_LANCEDB_URI": str(root / "lancedb"),
        "FCT_STORAGE_URI": str(root),  # checkpoints/ and records/ below it
        "FCT_PRESET": "tiny",
        "FCT_DEVICE": "cpu",
        "FCT_AUTO_UPGRADE": "off",
        "FCT_INBOX": str(root / "inbox"),
    }


class DagsterDev:
    """One `dagster dev` process group; `stop()` ends it by its PID (also after a failure)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # A fixed argv, no shell; its own session so the webserver, daemon and code server
        # it spawns go with it.
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dagster",
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
            ],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dagster dev exited with {self.process.returncode}; log: {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(1)
        raise TimeoutError(
            f"dagster dev did not answer on {self.url} within {timeout:.0f} s; log: {self.log_path}"
        )

    def stop(self, grace: float = 20.0) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(timeout=grace)
            except ProcessLookupError:
                pass
        # The webserver, daemon, code server and run workers share the group: none may outlive it.
        deadline = time.monotonic() + grace
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()

    def alive(self) -> bool:
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        return True
