"""Successive halving with a tolerance: the pruner of a tuning study.

Successive halving (Jamieson & Talwalkar 2016; asynchronous form, ASHA, Li et al. 2020): when a trial's
reported step reaches rung k (step ≥ min_resource · η^k) its value is recorded for that rung and compared
with every value recorded there by earlier trials; it goes on only if it is among the best 1/η of them.
Optuna's `SuccessiveHalvingPruner` does this exactly, and with few trials it is harsh: the second trial at a
rung must beat the first. Mid-trial losses are also biased: a trial is still in its stable phase (or already
in its cooldown) when it is compared, so a slightly higher LR, or a shorter cooldown, looks worse at 50% than
it ends. This pruner therefore only stops a trial that is clearly behind, by more than `tolerance` (relative)
above the 1/η-quantile of the rung; diverged and hopeless trials (too low or too high an LR) are far behind
and are stopped at the first rung, near-ties run to the end. The trials' own step counts are identical
(one proxy, one horizon), so rungs mean the same progress for every trial.
"""

from __future__ import annotations

import math

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

RUNG_KEY = "oneday_rung_{}"


class TolerantHalvingPruner(BasePruner):
    """Prune at rung k when the value is more than `tolerance` above the best-1/η value recorded there."""

    def __init__(self, *, min_resource: int, reduction_factor: int = 2, tolerance: float = 0.02,
                 min_trials: int = 2) -> None:
        if min_resource < 1:
            raise ValueError(f"min_resource must be >= 1, got {min_resource}")
        if reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {reduction_factor}")
        self.min_resource = min_resource
        self.reduction_factor = reduction_factor
        self.tolerance = tolerance
        self.min_trials = min_trials

    def describe(self) -> str:
        return (f"successive halving (min resource {self.min_resource} steps, η={self.reduction_factor}) "
                f"with a {self.tolerance:.0%} tolerance")

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        rung = 0
        while RUNG_KEY.format(rung) in trial.system_attrs:
            rung += 1
        trials: list[FrozenTrial] | None = None
        while step >= self.min_resource * self.reduction_factor**rung:
            key = RUNG_KEY.format(rung)
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
            if trials is None:
                trials = study.get_trials(deepcopy=False)
            others = [t.system_attrs[key] for t in trials if t.number != trial.number and key in t.system_attrs]
            values = sorted([*others, value])
            if len(values) >= self.min_trials:
                k = max(0, math.ceil(len(values) / self.reduction_factor) - 1)
                threshold = values[k]
                if value > threshold + self.tolerance * abs(threshold):
                    return True
            rung += 1
        return False


__all__ = ["TolerantHalvingPruner"]
