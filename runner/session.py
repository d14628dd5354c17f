"""One session of a run: what `run_plan` settled before training, and what its observers are told.

A run may take several sessions (a crash, Ctrl-C, a kill, then the same command again); each resolves the
device, the folder and tracking anew and continues from the newest checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oneday.plan import Plan, TrainSpec
from oneday.runner.run_dir import RunLedger, RunPaths


@dataclass(frozen=True)
class Session:
    """The facts of this session: the plan and the training slice it runs (device overrides applied), where,
    on what, and where it is tracked. `dist` is the process group under torchrun, else None."""

    plan: Plan
    spec: TrainSpec
    paths: RunPaths
    ledger: RunLedger
    digest: str
    device: str  # cpu or cuda
    device_name: str  # the torch device, e.g. cuda:1
    dist: Any
    tracking_uri: str
    experiment: str
    notes: tuple[str, ...]
    clock: Callable[[], float]
    process_start: float

    @property
    def rank0(self) -> bool:
        return self.dist is None or self.dist.rank == 0


@dataclass(frozen=True)
class SessionInfo:
    """What an observer of `run_plan` (the CLI's progress bar) learns before training starts."""

    plan_name: str
    budget_seconds: float
    budget_start: float  # clock value at which the budget (as charged to this session) began
    clock: Callable[[], float]
    resumed_from_step: int | None

    def elapsed(self) -> float:
        """Wall seconds charged to the budget so far (earlier sessions included)."""
        return self.clock() - self.budget_start


__all__ = ["Session", "SessionInfo"]
