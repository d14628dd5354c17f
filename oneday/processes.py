"""Facts about processes that several rooms need: when one started, and whether it still runs.

Linux `/proc/<pid>/stat` field 22 is the process's start time in clock ticks since boot: with the pid it
identifies a process even after the pid is reused. The deadline of `oneday run` starts at this process's start;
a data preparation or a tuning trial left behind by a killed process is recognised by a pid that is gone, or
taken by another process.
"""

from __future__ import annotations

import os
from pathlib import Path


def start_ticks(pid: int | str = "self") -> int | None:
    """The start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, ticks: int | None = None) -> bool:
    """Whether process `pid` runs (one we may not signal counts as running); with `ticks` (its `start_ticks`
    when it was seen), a pid that another process has taken since counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if ticks is not None:
        now = start_ticks(pid)
        if now is not None and now != ticks:
            return False
    return True


__all__ = ["pid_alive", "start_ticks"]
