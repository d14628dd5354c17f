"""Real servers for tests: a PostgreSQL cluster and an `mlflow server` on it, both on 127.0.0.1.

`PostgresServer` runs `initdb` into a fresh folder and `postgres` on a free port with trust authentication (the
folder and the port are this test session's only). PostgreSQL refuses to run as root: as root the cluster belongs
to the `postgres` system user (Debian's package creates it) and runs through `runuser`. Durability is switched
off (fsync, synchronous_commit): the tests need a real server, not a safe one.

`MlflowServer` is `mlflow server` with a PostgreSQL backend store and a local artifact root served by the server
(`--artifacts-destination`, `--serve-artifacts`): clients upload artifacts over HTTP, as they would from another
machine. `stop()` and `start()` again on the same port simulate an outage.

`postgres_or_skip()`: the binaries, or a skip, except under `CI=true`, where a missing PostgreSQL fails the test
(`.ci/run` installs Debian's `postgresql`).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

USER = "oneday"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"server test cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The folder with `initdb` and `postgres`: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("postgres", path=str(Path(found).parent)):
        return Path(found).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "postgres").exists():
            return Path(folder)
    return None


def postgres_or_skip() -> Path:
    folder = postgres_bin()
    if folder is None:
        unavailable("no PostgreSQL binaries (initdb, postgres); apt-get install -y postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("no psycopg (pip install 'oneday[postgres]')")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run PostgreSQL as")
    return folder  # type: ignore[return-value]


def _wait(check, *, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {log.read_text(errors='replace')[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer in {timeout:.0f} s: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)


class PostgresServer:
    """One PostgreSQL cluster on 127.0.0.1:`port`; `url(database)` after `create_database(database)`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="oneday-pg-"))
        self.port = free_port()
        self._as = []
        if os.geteuid() == 0:  # postgres refuses root: the cluster belongs to the postgres user
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.root / "data"
        subprocess.run([*self._as, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", USER, "-E",
                        "UTF8", "--no-sync"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log = self.root / "postgres.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [*self._as, str(bin_dir / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(data), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(self._answers, timeout=60, what="postgres", process=self.process, log=self.log)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
            import psycopg

            psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", connect_timeout=2).close()
            return True
        except Exception:
            return False

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, database: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        return self.url(database)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)  # "fast shutdown"
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a PostgreSQL backend and a served local artifact root."""

    def __init__(self, backend: str, artifacts: Path) -> None:
        self.backend = backend
        self.artifacts = artifacts
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = artifacts.parent / f"mlflow-server-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self, timeout: float = 120) -> None:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", str(self.artifacts), "--serve-artifacts", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait(self._answers, timeout=timeout, what="mlflow server", process=self.process, log=self.log)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self, *, crash: bool = False) -> None:
        """SIGTERM (a graceful stop), or with `crash` SIGKILL: the server dies with connections open."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL if crash else signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


__all__ = ["MlflowServer", "PostgresServer", "free_port", "in_ci", "postgres_or_skip", "unavailable"]
