"""The deadline of a run session: the budget is wall time from process start to exit, across resumes.

For `oneday run` the command passes `process_start_time()`, read from the kernel (`/proc/self/stat` start time
against `CLOCK_BOOTTIME`, ~10 ms resolution), so interpreter start-up and the torch/transformers imports count
against the budget just as a stopwatch around the command counts them (and the command ends with `os._exit`
after its last output, skipping 2–4 s of interpreter teardown). A library caller that does not pass a process
start (a notebook, a tuner running many trials in one process) gets the budget counted from the call. Then

    deadline = process_start + budget_seconds − prior_wall + data_prep_seconds − final_reserve

- `prior_wall` (resumed runs only): wall time that earlier sessions had charged when they wrote the checkpoint
  this session resumes from (`run.json` records it at every checkpoint). Time an earlier session spent after its
  last checkpoint is lost work and is not charged again, so a run killed and resumed ends within the budget plus
  one checkpoint interval. The checkpoint's own `wall_elapsed` counts only time inside `train()` (no process
  start-up), so it is the fallback, plus the start-up times run.json recorded, for a session killed between
  writing a checkpoint and the ledger;
- `data_prep_seconds`: one-off data preparation done by this call when the plan's cache was missing;
- `final_reserve`: what happens after the loop returns — the final model and tokenizer, the summary and plot,
  the artifacts to MLflow, and exit (`runner.costs.final_save_seconds`). The loop fits its final evaluation
  before the deadline itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from oneday.processes import start_ticks
from oneday.runner.run_dir import RunLedger

if TYPE_CHECKING:  # torch: the deadline is read before anything heavy is imported
    from oneday.runner.checkpoint import CheckpointStore

log = logging.getLogger(__name__)


def process_start_time(clock: Callable[[], float] = time.monotonic) -> float:
    """The value `clock` had when this process started (Linux: `/proc/self/stat` field 22 vs CLOCK_BOOTTIME).

    Falls back to the time `oneday.runner.deadline` was imported when /proc is not there. Only meaningful for a
    clock that ticks in real seconds (time.monotonic, time.time).
    """
    ticks = start_ticks()
    if ticks is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
            if 0 <= age < 10 * 365 * 86400:
                return clock() - age
    return clock() - (time.monotonic() - _IMPORTED_AT)


_IMPORTED_AT = time.monotonic()


def prior_wall(store: CheckpointStore, ledger: RunLedger) -> tuple[float, int | None]:
    """(wall seconds charged before the checkpoint this session resumes from, its step), or (0, None).

    From run.json's ledger (charged time, process start-up included). If a session died between writing a
    checkpoint and the ledger, the checkpoint's own `wall_elapsed` (time inside `train()`, start-up not
    included) plus the start-up overhead earlier sessions recorded stands in.
    """
    latest = store.latest_state()
    if latest is None:
        return 0.0, None
    step = latest.get("step")
    wall = ledger.wall_at(int(step)) if step is not None else None
    if wall is None:
        inside = latest.get("wall_elapsed")
        if inside is not None:
            overhead = sum(float(s.get("startup_seconds") or 0.0) for s in ledger.data["sessions"])
            wall = float(inside) + overhead
    if wall is None:
        entry = ledger.latest_wall()
        wall = entry[1] if entry is not None else 0.0
    return float(wall), (int(step) if step is not None else None)


__all__ = ["prior_wall", "process_start_time"]
