"""What a study reports: each trial as the console shows it, the transfer check, and the tuning's result."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from oneday.plan import Plan
from oneday.studies.proxy import ProxySpec, TrialParams

STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


@dataclass(frozen=True)
class TrialResult:
    """One trial as the console and the result show it. `value`: the final validation loss (the cap when it
    diverged), or the last reported one of a pruned trial; None when failed or running."""

    number: int
    state: str  # running, complete, pruned, failed, diverged, waiting
    params: TrialParams | None
    value: float | None = None
    step: int | None = None
    seconds: float | None = None
    worker: str = ""
    note: str = ""

    @classmethod
    def from_frozen(cls, trial: FrozenTrial) -> TrialResult:
        state = STATE_NAMES.get(trial.state, trial.state.name.lower())
        if trial.state == TrialState.COMPLETE and trial.user_attrs.get("diverged"):
            state = "diverged"
        value = trial.value
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        seconds = None
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        raw = trial.user_attrs.get("params")
        params = TrialParams.from_dict(raw) if isinstance(raw, dict) and "lr" in raw else None
        note = str(trial.user_attrs.get("note") or trial.user_attrs.get("error") or "")
        return cls(number=trial.number, state=state, params=params,
                   value=value if value is not None and math.isfinite(value) else None,
                   step=trial.last_step, seconds=seconds, worker=str(trial.user_attrs.get("worker", "")), note=note)


@dataclass(frozen=True)
class TransferCheck:
    """Short runs at a width between the proxy and the target, at the proxy's horizon, with η*/2, η*, 2η*."""

    width: int
    steps: int
    multipliers: tuple[float, ...]
    lrs: tuple[float, ...]
    losses: tuple[float, ...]  # capped: a diverged run shows the cap
    diverged: tuple[bool, ...]
    seconds: float

    def best_multiplier(self) -> float:
        return self.multipliers[min(range(len(self.losses)), key=lambda i: self.losses[i])]

    def ok(self) -> bool:
        """η* (multiplier 1) is the best of the three."""
        return self.best_multiplier() == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width, "steps": self.steps, "seconds": round(self.seconds, 2),
            "runs": [{"multiplier": m, "lr": lr, "loss": round(loss, 5), "diverged": d}
                     for m, lr, loss, d in zip(self.multipliers, self.lrs, self.losses, self.diverged, strict=True)],
            "best_multiplier": self.best_multiplier(), "ok": self.ok(),
        }


@dataclass(frozen=True)
class TuneResult:
    """What `tune_plan` did and decided."""

    study: str
    storage: str
    proxy: ProxySpec
    trials: tuple[TrialResult, ...]
    best: TrialResult | None
    default_lr: float
    tuned_lr: float
    all_diverged: bool
    transfer: TransferCheck | None
    out: Path | None
    plan: Plan | None
    seconds: float
    budget_seconds: float
    warnings: tuple[str, ...] = ()
    mlflow_run_id: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def cost_fraction(self) -> float:
        """Wall time of this tuning over the plan's budget."""
        return self.seconds / self.budget_seconds if self.budget_seconds > 0 else math.nan


__all__ = ["STATE_NAMES", "TransferCheck", "TrialResult", "TuneResult"]
