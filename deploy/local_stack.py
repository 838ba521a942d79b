"""deploy/'s storage on one machine: a private Postgres cluster and an S3 endpoint on loopback.

    with LocalStack(root) as stack:     # root: an empty folder, removed by nobody but the caller
        os.environ.update(stack.environ())
        ...                             # Dagster on Postgres, LanceDB and checkpoints on s3://

Postgres: `initdb` into a temporary folder of its own as an unprivileged user (Postgres
refuses to run as root; the Debian package's `postgres` user, else one created as `fct-pg`),
then the `postgres` server on a free 127.0.0.1 port, password authentication, a database
`dagster`. S3: moto's server (`moto[server]`, the `stack` extra) on another free port, with IAM
checks on: a user with an S3 policy and an access key, then the bucket, so a wrong secret is
refused as on AWS.
DAGSTER_HOME/dagster.yaml is deploy/dagster.yaml's storage (Postgres from DAGSTER_PG_*),
concurrency pools and settings, without the Kubernetes run launcher.

Every server is a child process started here and stopped here by its PID (SIGINT/SIGTERM, then
SIGKILL), on exit of the `with` block whatever happened inside, and at interpreter exit.
Used by benchmarks/system/stack_check.py (`make stack-check`) and tests/stack.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
BUCKET = "fct-bucket"
REGION = "us-east-1"
PG_USER_FALLBACK = "fct-pg"


class StackError(RuntimeError):
    """A server of the local stack could not be started (one line saying which and why)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> Path | None:
    """The folder holding `postgres` and `initdb` (Debian: /usr/lib/postgresql/N/bin), or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/postgres"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    return Path(which).resolve().parent if which else None


def postgres_missing_reason() -> str | None:
    """Why the local Postgres cannot run here, or None when it can."""
    if postgres_bindir() is None:
        return (
            "Postgres is not installed (Debian: apt-get install postgresql; `make stack-check`"
            " installs it)"
        )
    if os.geteuid() == 0 and shutil.which("useradd") is None:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root with no unprivileged user for Postgres and no useradd"
    return None


def _kill(proc: subprocess.Popen, sig: int, wait_s: float) -> None:
    """Stop `proc` by its PID: `sig`, then SIGKILL after `wait_s` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass


def _wait_until(ready, what: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise StackError(f"{what} exited with {proc.returncode}: {' '.join(tail)} (log {log})")
        if ready():
            return
        time.sleep(0.2)
    raise StackError(f"{what} not ready after {timeout_s:.0f} s (log {log})")


class Postgres:
    """A private Postgres cluster in a temporary folder, on 127.0.0.1:`port`, owned by an
    unprivileged user."""

    def __init__(self, password: str = "fct-local") -> None:
        # Its own folder straight under the system temp dir, not below `root`: the server's user
        # must traverse every parent, and pytest resets its /tmp/pytest-of-USER to 0700 whenever
        # another session starts; a minute later Postgres finds its lock file unreadable and shuts
        # down. `remove()` deletes it.
        self.root = Path(tempfile.mkdtemp(prefix="fct-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self.user, self.password, self.db = "dagster", password, "dagster"
        self.proc: subprocess.Popen | None = None
        bindir = postgres_bindir()
        if bindir is None:
            raise StackError(postgres_missing_reason() or "Postgres not found")
        self.bindir = bindir

    def _os_user(self) -> tuple[int, int] | None:
        """(uid, gid) to run Postgres as; None when this process is not root."""
        if os.geteuid() != 0:
            return None
        for name in ("postgres", PG_USER_FALLBACK):
            try:
                entry = pwd.getpwnam(name)
                return entry.pw_uid, entry.pw_gid
            except KeyError:
                continue
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            + [PG_USER_FALLBACK],
            check=True,
        )
        entry = pwd.getpwnam(PG_USER_FALLBACK)
        return entry.pw_uid, entry.pw_gid

    def _as_user(self) -> dict:
        ids = self._os_user()
        return {} if ids is None else {"user": ids[0], "group": ids[1], "extra_groups": []}

    def init(self) -> None:
        """initdb (no fsync: a throw-away cluster), password auth on loopback."""
        self.root.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        ids = self._os_user()
        if ids is not None:
            for path in (self.root, pwfile):
                os.chown(path, *ids)
        done = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user]
            + [f"--pwfile={pwfile}", "--auth=scram-sha-256", "--no-sync", "-E", "UTF8"],
            capture_output=True,
            text=True,
            cwd=self.root,
            **self._as_user(),
        )
        pwfile.unlink()
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["?"])[-1]
            raise StackError(f"initdb {self.data} failed: {last}")

    def start(self) -> None:
        """The server on its port (same data and port on a restart); returns when it accepts."""
        with self.log.open("a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
                + ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}"]
                + ["-c", "fsync=off", "-c", "max_connections=200"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                start_new_session=True,  # own session: a Ctrl-C reaches us, and we stop it
                **self._as_user(),
            )
        _wait_until(self._accepts, f"postgres on port {self.port}", self.proc, self.log, 180)

    def _accepts(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(self.dsn("postgres"), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def create_db(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.dsn("postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.db}"')
        conn.close()

    def dsn(self, db: str | None = None) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{db or self.db}"

    def url(self) -> str:
        """The storage URI for reports, without the password."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.db}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions ended, a clean checkpoint), by the server's PID."""
        if self.proc is not None:
            _kill(self.proc, signal.SIGINT, 30)

    def remove(self) -> None:
        """Delete the cluster's folder (after `stop`)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class MotoS3:
    """moto's server (S3 and IAM) on 127.0.0.1:`port`, with an authorised user and the bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = root / "moto.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.key_id = self.secret = ""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Requests are authorised against moto's IAM after the first 3 (create the user, its
        # policy and its key), as S3 authorises them: a wrong secret is SignatureDoesNotMatch.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        _wait_until(self._answers, f"moto S3 on port {self.port}", self.proc, self.log, 180)
        import boto3

        anonymous = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name=REGION, **anonymous)
        iam.create_user(UserName="fct")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="fct", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="fct")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=BUCKET)

    def client(self, endpoint: str | None = None):
        """A boto3 S3 client with the stack's credentials (for checks: read back what fct wrote)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            _kill(self.proc, signal.SIGTERM, 15)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None


class Relay:
    """A TCP relay on its own loopback port in front of `target_port`, which can be taken down
    (listener and open connections closed: clients get connection refused) and brought back, so
    that an endpoint can go down without losing the in-memory state of the server behind it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        for s in [listener, *conns]:
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # taken down
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def instance_yaml(home: Path) -> Path:
    """DAGSTER_HOME/dagster.yaml: deploy/dagster.yaml less what needs Kubernetes (the run
    launcher, run monitoring of pods); storage stays Postgres from the DAGSTER_PG_* variables."""
    config = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())
    for key in ("run_launcher", "run_monitoring"):
        config.pop(key, None)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(
        "# Written by deploy/local_stack.py from deploy/dagster.yaml (no Kubernetes run launcher).\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


class LocalStack:
    """Postgres + moto S3 under `root`, stopped by PID on exit; `environ()` points fct at them."""

    def __init__(self, root: Path, *, preset: str = "tiny") -> None:
        self.root = Path(root)
        self.preset = preset
        self.postgres = Postgres()
        self.s3 = MotoS3(self.root / "moto")
        self.home = self.root / "dagster_home"
        self._stopped = False

    def __enter__(self) -> LocalStack:
        atexit.register(self.stop)
        try:
            self.postgres.init()
            self.postgres.start()
            self.postgres.create_db()
            self.s3.start()
            instance_yaml(self.home)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Both servers stopped by PID (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.s3.stop()
        finally:
            self.postgres.stop()
            self.postgres.remove()

    @property
    def lancedb_uri(self) -> str:
        return f"s3://{BUCKET}/lancedb"

    @property
    def storage_uri(self) -> str:
        return f"s3://{BUCKET}/fct"

    def environ(self, endpoint: str | None = None) -> dict[str, str]:
        """The variables a user sets for this stack (deploy/fct-env.yaml's, values for here)."""
        return {
            "DAGSTER_HOME": str(self.home),
            "DAGSTER_PG_USERNAME": self.postgres.user,
            "DAGSTER_PG_PASSWORD": self.postgres.password,
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_PORT": str(self.postgres.port),
            "DAGSTER_PG_DB": self.postgres.db,
            "FCT_LANCEDB_URI": self.lancedb_uri,
            "FCT_STORAGE_URI": self.storage_uri,
            "AWS_ENDPOINT_URL": endpoint or self.s3.endpoint,
            "AWS_ACCESS_KEY_ID": self.s3.key_id,
            "AWS_SECRET_ACCESS_KEY": self.s3.secret,
            "AWS_DEFAULT_REGION": REGION,
            "FCT_PRESET": self.preset,
            "FCT_DEVICE": "cpu",
            "FCT_EXECUTOR": "multiprocess",
        }

    def pids(self) -> dict[str, int | None]:
        return {"postgres": self.postgres.pid, "moto_s3": self.s3.pid}
