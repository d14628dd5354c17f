"""`oneday ui`: the links into the MLflow UI, a free port, and a lean `mlflow server` started and stopped.

Given an MLflow server (`--tracking-uri http://host:5000`), nothing is started: `server_links` only lists the
links into that server's UI (it must answer).

The server runs in its own process group with one worker and MLflow's job runner switched off (it answers in
seconds instead of starting 15 processes); `serve_forever` stops the whole group on Ctrl-C, SIGTERM or SIGHUP,
and the group ends by itself when `oneday ui` is killed outright (`oneday.compare.tether`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from oneday.compare.readers import RestReader, check_store
from oneday.compare.runs import select_runs
from oneday.compare.tether import group_members, start_tethered
from oneday.errors import UserError, first_line
from oneday.signals import handling, raise_interrupt
from oneday.tracking import names
from oneday.tracking.store import resolve_tracking_uri, unreachable_reason

DEFAULT_UI_PORT = 5000
DEFAULT_UI_HOST = "127.0.0.1"
UI_READY_TIMEOUT_S = 90.0


# --------------------------------------------------------------------------------------------------------
# MLflow UI links (the routes the UI itself builds: mlflow/server/js, getCompareRunPageRoute and
# getMetricPageRoute)


def _js(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}"


def compare_url(base: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The compare view: names, params (with "Show diff only"), metrics of the runs side by side."""
    experiments = _js(list(dict.fromkeys(experiment_ids)))
    return f"{base.rstrip('/')}/#/compare-runs?runs={_js(list(run_ids))}&experiments={experiments}"


def metric_url(base: str, run_ids: Sequence[str], experiment_ids: Sequence[str], metric: str = names.METRIC_TRAIN_LOSS,
               *, x_axis: str = "step") -> str:
    """The metric view: one curve per run (`x_axis` step, wall or relative)."""
    return (
        f"{base.rstrip('/')}/#/metric/?runs={_js(list(run_ids))}&metric={quote(_js(metric), safe='')}"
        f"&experiments={_js(list(dict.fromkeys(experiment_ids)))}&plot_metric_keys={quote(_js([metric]), safe='')}"
        f"&plot_layout={{}}&x_axis={x_axis}&y_axis_scale=linear&line_smoothness=1&show_point=false"
        f"&deselected_curves=[]&last_linear_y_axis_range=[]"
    )


# --------------------------------------------------------------------------------------------------------
# `oneday ui`: a lean MLflow server


def _bind_address(host: str, port: int) -> tuple[int, Any]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


# Ports Chromium and Firefox refuse to open (ERR_UNSAFE_PORT; Chromium net/base/port_util.cc, the Fetch
# standard's "bad ports"): a UI there cannot be seen in a browser.
BROWSER_BLOCKED_PORTS = frozenset({
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103, 104, 109,
    110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513, 514, 515, 526, 530,
    531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190,
    5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
})


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as uvicorn binds)."""
    family, address = _bind_address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            if exc.errno == errno.EACCES:
                raise UserError(f"--port {port}: not allowed to listen there (ports below 1024 need root)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host}: not an address of this machine") from None
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return True


def free_port(host: str, start: int) -> int:
    """The first free port after `start` (within 200), else one the system picks."""
    for candidate in range(start + 1, min(start + 200, 65536)):
        if candidate not in BROWSER_BLOCKED_PORTS and port_free(host, candidate):
            return candidate
    family, address = _bind_address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(address)
        return int(sock.getsockname()[1])


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _log_tail(path: Path, lines: int = 8) -> list[str]:
    """The last `lines` lines of the server's log that say something (no blank lines, no Python warnings)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    kept = [line.strip() for line in text.splitlines()
            if line.strip() and "Warning" not in line and "warn(" not in line]
    return kept[-lines:]


# A traceback's "module.SomeError: message" line (SQLAlchemy adds a "(Background on this error at: ...)" line
# after it, which says nothing).
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)(:|$)")


def server_failure(what: str, log_path: Path) -> str:
    """One line for a server that failed: `what` happened, the log's last exception line (else its last line
    that says something), and where the whole log is."""
    tail = _log_tail(log_path, lines=40)
    exceptions = [line for line in tail if _EXCEPTION_LINE.match(line)]
    last = exceptions[-1] if exceptions else tail[-1] if tail else ""
    said = f": {last[:300]}" if last else ""
    return f"{what}{said} (the whole log: {log_path})"


@dataclass
class ServerLinks:
    """The links into a running MLflow server's UI that `oneday ui` prints (no server of its own)."""

    url: str
    experiment: str | None = None
    experiment_url: str | None = None
    compare_url: str | None = None
    metric_url: str | None = None
    run_names: tuple[str, ...] = ()
    note: str | None = None


@dataclass(kw_only=True)
class UiServer(ServerLinks):
    """A running `mlflow server` (its own process group), with the links `oneday ui` prints."""

    tracking_uri: str
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_seconds: float

    def __enter__(self) -> UiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout`; the log is removed on a clean stop
        unless `keep_log` (an error message names it)."""
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        while time.monotonic() < deadline and process_group_alive(pgid):
            time.sleep(0.1)
        if process_group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.process.returncode in (0, -signal.SIGTERM) and not keep_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def serve_forever(self) -> int:
        """Wait until the server ends (its exit code) or this process gets Ctrl-C / SIGTERM / SIGHUP (then stop
        it and return 0). SIGINT is handled even where it was ignored at start (`oneday ui &` in a script)."""
        try:
            with handling((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), raise_interrupt):
                code = self.process.wait()
        except KeyboardInterrupt:
            self.stop()
            return 0
        self.stop(keep_log=code != 0)
        return code


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies do not count: `tether.group_members`)."""
    if Path("/proc").is_dir():
        return bool(group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_command(uri: str, *, host: str, port: int, artifacts: Path | None = None) -> list[str]:
    """`mlflow server` in the lean mode: one worker (job execution is switched off through the environment)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts)]
    return command


def start_ui(
    tracking_uri: str | None = None,
    *,
    host: str = DEFAULT_UI_HOST,
    port: int = DEFAULT_UI_PORT,
    experiment: str | None = None,
    last: int = 5,
    ready_timeout: float = UI_READY_TIMEOUT_S,
) -> UiServer:
    """Start the MLflow UI on the runs' store and wait until it answers HTTP. The returned server carries the
    links to the experiment and to a compare view of its newest `last` oneday runs (when there are any).

    `UserError`: a sqlite store that does not exist (nothing is created), an http(s) URI (already a server),
    a port in use (naming a free one), a server that exits or does not answer within `ready_timeout`."""
    uri = resolve_tracking_uri(tracking_uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        raise UserError(f"{uri} is an MLflow server already: open it in a browser (oneday ui serves a local store)")
    db = check_store(uri)
    if db is not None:
        uri = f"sqlite:///{db}"  # absolute, whatever folder the server runs in
    if not 0 < port < 65536:
        raise UserError(f"--port: must be in 1..65535, got {port}")
    if port in BROWSER_BLOCKED_PORTS:
        raise UserError(f"--port {port}: browsers refuse to open this port (ERR_UNSAFE_PORT); "
                        f"try --port {free_port(host, port)}")
    if not port_free(host, port):
        raise UserError(f"port {port} on {host} is in use (another MLflow UI?); try --port {free_port(host, port)}")
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes: starts in seconds
    env.setdefault("PYTHONUNBUFFERED", "1")
    artifacts = db.parent / "mlartifacts" if db is not None else None
    handle = tempfile.NamedTemporaryFile(prefix=f"oneday-ui-{port}-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(handle.name)
    started = time.monotonic()
    try:
        process = start_tethered(server_command(uri, host=host, port=port, artifacts=artifacts), stdout=handle,
                                 env=env)
    finally:
        handle.close()
    base = f"http://{_connect_host(host)}:{port}"
    server = UiServer(url=base, tracking_uri=uri, process=process, log_path=log_path, startup_seconds=0.0)
    try:
        while not _answers(f"{base}/health"):
            if process.poll() is not None:
                if "address already in use" in "\n".join(_log_tail(log_path)).lower():
                    raise UserError(f"port {port} on {host} is in use; try --port {free_port(host, port)}")
                raise UserError(server_failure(
                    f"the MLflow server exited (code {process.returncode}) before answering", log_path))
            if time.monotonic() - started > ready_timeout:
                raise UserError(server_failure(f"the MLflow server did not answer within {ready_timeout:.0f} s",
                                               log_path))
            time.sleep(0.1)
        server.startup_seconds = time.monotonic() - started
        _add_links(server, experiment=experiment, last=last)
    except BaseException as exc:
        server.stop(keep_log=str(log_path) in str(exc))
        raise
    return server


def server_links(uri: str, *, experiment: str | None = None, last: int = 5) -> ServerLinks:
    """The links (experiment, compare view, train/loss) of the newest oneday runs on the MLflow server at `uri`;
    `UserError` when it does not answer."""
    reason = unreachable_reason(uri)
    if reason is not None:
        raise UserError(f"{uri} is an MLflow server already (oneday ui only lists its links), and it does not "
                        f"answer: {reason}")
    links = ServerLinks(url=uri.rstrip("/"))
    _add_links(links, experiment=experiment, last=last)
    return links


def _add_links(server: ServerLinks, *, experiment: str | None, last: int) -> None:
    reader = RestReader(server.url)
    try:
        selection = select_runs(reader, experiment=experiment, last=last)
    except UserError as exc:
        if experiment is not None and "no experiment named" in str(exc):
            raise
        server.note = str(exc)
        return
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        server.note = f"could not list the runs ({first_line(exc)})"
        return
    ids = [r.run_id for r in selection.records]
    experiments = [r.experiment_id for r in selection.records]
    server.experiment = selection.experiment
    server.experiment_url = experiment_url(server.url, selection.experiment_id)
    server.run_names = tuple(r.name for r in selection.records)
    server.compare_url = compare_url(server.url, ids, experiments)
    server.metric_url = metric_url(server.url, ids, experiments)


__all__ = [
    "BROWSER_BLOCKED_PORTS",
    "DEFAULT_UI_PORT",
    "ServerLinks",
    "UiServer",
    "compare_url",
    "experiment_url",
    "free_port",
    "metric_url",
    "port_free",
    "process_group_alive",
    "server_command",
    "server_failure",
    "server_links",
    "start_ui",
]
