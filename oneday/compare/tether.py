"""A process group that ends with the process that started it: how `oneday ui` keeps `mlflow server` from
outliving it, even when `oneday ui` is killed with SIGKILL and has no chance to stop the server itself.

`start_tethered` starts `python -m oneday.compare.tether <parent pid> <grace> -- <command>` as the leader of a
new session (so of a new process group). This small supervisor asks Linux for a signal when its parent dies
(`prctl(PR_SET_PDEATHSIG)`; elsewhere it notices within a second that its parent pid changed), then runs the
command in its own group. `mlflow server` starts uvicorn (and, unless it is switched off, a job runner) as
children of its own; all of them stay in this group. When the supervisor is told to stop (its parent died,
or SIGTERM / SIGINT / SIGHUP), it sends SIGTERM to the whole group, waits up to `grace` seconds and then
SIGKILLs whatever is left (uvicorn waits for open browser connections before it exits on SIGTERM), and
ends by the signal it got. When the command ends by itself, the supervisor ends with its exit status.

Linux ties the parent-death signal to the thread that started the supervisor: when that thread ends before
the process (a server started from a worker thread), the supervisor sees its parent pid unchanged and carries
on; the process's own end is then noticed by polling, within a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

# Seconds the group gets to exit on SIGTERM before the rest is SIGKILLed.
DEFAULT_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def start_tethered(
    command: Sequence[str],
    *,
    stdout: IO[Any] | int | None = None,
    env: dict[str, str] | None = None,
    grace: float = DEFAULT_GRACE_S,
) -> subprocess.Popen[bytes]:
    """Start `command` under the supervisor, as a new process group whose id is the returned process's pid:
    `os.killpg(process.pid, ...)` reaches the supervisor, the command and everything the command starts.
    The group ends when this process (this thread) ends, however it ends. stderr goes where stdout goes."""
    supervisor = [sys.executable, "-m", __name__, str(os.getpid()), str(grace), "--", *command]
    return subprocess.Popen(supervisor, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes of group `pgid` (Linux: from /proc). Zombies do not count: an orphan the
    init process has not reaped yet is gone for every purpose here (it holds no port, no memory)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_stopping: list[int] = []


def _raise_stop(signum: int, frame: Any) -> None:
    # Only the first signal unwinds: a second one must not interrupt the group's teardown.
    if not _stopping:
        _stopping.append(signum)
        raise _Stop(signum)


def _ask_for_parent_death_signal(parent: int) -> None:
    """SIGUSR1 to this process when its parent dies (Linux only; elsewhere the parent pid is polled).

    Linux sends it when the *thread* that started this process ends, which need not be the parent's end (a
    server started from a worker thread that then returns): the handler stops only when the parent pid is
    gone, and the polling in `supervise` still catches the real end later."""
    if not sys.platform.startswith("linux"):
        return

    def parent_maybe_died(signum: int, frame: Any) -> None:
        if os.getppid() != parent:
            _raise_stop(signal.SIGTERM, frame)

    signal.signal(signal.SIGUSR1, parent_maybe_died)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGUSR1), 0, 0, 0)


def _end_group(child: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM to this whole group, then SIGKILL to each member but this process after `grace` seconds."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # the group's SIGTERM reaches this process too
    group = os.getpgrp()
    own = os.getpid()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGTERM)
    if not Path("/proc").is_dir():  # no way to list the group: wait, then SIGKILL it, this process included
        time.sleep(grace)
        os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while True:
        if child is not None:
            child.poll()  # reap it, so that it does not count as running
        others = [pid for pid in group_members(group) if pid != own]
        if not others or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in others:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=5)


def _end_like(returncode: int) -> None:
    """Exit with `returncode` as `Popen` reports it: a negative one by the same signal."""
    if returncode < 0:
        signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
    sys.exit(returncode)


def supervise(parent: int, grace: float, command: Sequence[str]) -> int:
    """The supervisor's body (see the module's docstring). Returns the `Popen`-style status to end with."""
    child: subprocess.Popen[bytes] | None = None
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _raise_stop)
    try:
        _ask_for_parent_death_signal(parent)
        if os.getppid() != parent:  # the parent died before the request took effect
            raise _Stop(signal.SIGTERM)
        child = subprocess.Popen(command)
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=1.0)
            if os.getppid() != parent:
                raise _Stop(signal.SIGTERM)
    except _Stop as stop:
        _end_group(child, grace)
        return -stop.signum


def main(argv: Sequence[str]) -> None:
    parent, grace, separator, *command = argv
    if separator != "--" or not command:
        sys.exit("usage: python -m oneday.compare.tether PARENT_PID GRACE_S -- COMMAND...")
    _end_like(supervise(int(parent), float(grace), command))


__all__ = ["DEFAULT_GRACE_S", "group_members", "start_tethered", "supervise"]


if __name__ == "__main__":
    main(sys.argv[1:])
