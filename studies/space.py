"""What a tuning study searches: the base LR around the planner's default, and the schedule when it transfers.

- The proxy's base LR, log-uniform over ×/÷`LR_SPAN` around the planner's default (moved to the proxy's token
  horizon by the study, `study.py`).
- The warmup fraction in [0, 0.2] and the cooldown fraction in [0.1, 0.6], only when the schedule transfers
  (`schedule_rule`: a trial runs at least half the target's steps, or `--schedule transfer`); otherwise the
  trials run the planner's warmup and cooldown and only the LR is searched.
- Optionally 1−β₂ (log-uniform in [0.001, 0.1]) and the weight decay (log-uniform in [0.001, 0.3]).

The space is stored in the study, so every worker samples the same distributions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import optuna

from oneday.errors import UserError
from oneday.studies.proxy import TrialParams

LR_SPAN = 5.0
SCHEDULE_MIN_STEP_RATIO = 0.5


def schedule_rule(proxy_steps: int, target_steps: int, mode: str = "auto") -> tuple[bool, str]:
    """Whether the warmup/cooldown fractions are searched on the proxy and put into the plan, and why.

    "transfer"/"keep" force it; "auto" does it only when a trial runs at least `SCHEDULE_MIN_STEP_RATIO` of
    the target's steps. Schedule fractions found on a much shorter run do not carry over: a short run wants a
    short warmup and a long cooldown (a warmup of a few steps wastes less of it, annealing is a larger part of
    its gain), and the target then spends too long cooling down. Measured (bench/tune_transfer.py, a 34-step
    proxy, an 825-step target): the tuned LR with the proxy's best schedule (warmup 0.036, cooldown 0.447)
    reached 3.327 nats, with the planner's (0.1, 0.2) 3.240 (the LR grid's best: 3.241); the cooldown alone
    cost 1.9%. When the schedule is not transferred it is not searched either: the LR is then tuned under the
    schedule the plan will run (an LR tuned with a long cooldown is a different LR).
    """
    if mode not in ("auto", "transfer", "keep"):
        raise UserError(f"--schedule: must be auto, transfer or keep, got {mode!r}")
    ratio = proxy_steps / max(1, target_steps)
    if mode == "transfer":
        return True, "asked for (--schedule transfer)"
    if mode == "keep":
        return False, "asked for (--schedule keep): the planner's warmup and cooldown, LR tuned under them"
    if ratio >= SCHEDULE_MIN_STEP_RATIO:
        return True, f"a trial runs {ratio:.0%} of the target's steps"
    return False, (f"a trial runs {proxy_steps} steps, {ratio:.1%} of the target's {target_steps}: schedule "
                   "fractions found on so short a run do not carry over (they favour a short warmup and a long "
                   "cooldown), so the planner's warmup and cooldown are kept and the LR is tuned under them")


@dataclass(frozen=True)
class SearchSpace:
    """The ranges a study samples; stored in the study so every worker samples the same distributions.
    `warmup`/`cooldown` None: not searched, the trials run `fixed_warmup`/`fixed_cooldown` (the planner's)."""

    lr_low: float
    lr_high: float
    fixed_warmup: float
    fixed_cooldown: float
    warmup: tuple[float, float] | None = (0.0, 0.2)
    cooldown: tuple[float, float] | None = (0.1, 0.6)
    one_minus_beta2: tuple[float, float] | None = None
    weight_decay: tuple[float, float] | None = None

    @classmethod
    def around(cls, default: TrialParams, *, schedule: bool = True, beta2: bool = False,
               weight_decay: bool = False) -> SearchSpace:
        low = max(1e-6, default.lr / LR_SPAN)
        high = min(0.5, default.lr * LR_SPAN)
        space = cls(lr_low=low, lr_high=max(high, low * 1.01), fixed_warmup=default.warmup_fraction,
                    fixed_cooldown=default.cooldown_fraction, one_minus_beta2=(1e-3, 0.1) if beta2 else None,
                    weight_decay=(1e-3, 0.3) if weight_decay else None)
        return space if schedule else replace(space, warmup=None, cooldown=None)

    @property
    def schedule(self) -> bool:
        return self.warmup is not None

    def suggest(self, trial: optuna.Trial) -> TrialParams:
        lr = trial.suggest_float("lr", self.lr_low, self.lr_high, log=True)
        warmup = trial.suggest_float("warmup_fraction", *self.warmup) if self.warmup else self.fixed_warmup
        cooldown = trial.suggest_float("cooldown_fraction", *self.cooldown) if self.cooldown else self.fixed_cooldown
        beta2 = None
        if self.one_minus_beta2 is not None:
            beta2 = 1.0 - trial.suggest_float("one_minus_beta2", *self.one_minus_beta2, log=True)
        wd = None
        if self.weight_decay is not None:
            wd = trial.suggest_float("weight_decay", *self.weight_decay, log=True)
        return TrialParams(lr=lr, warmup_fraction=warmup, cooldown_fraction=cooldown, beta2=beta2, weight_decay=wd)

    def enqueue_params(self, params: TrialParams) -> dict[str, float]:
        """`params` as Optuna parameters, clipped into the ranges (for `enqueue_trial`)."""
        def clip(x: float, lo_hi: tuple[float, float]) -> float:
            return min(max(x, lo_hi[0]), lo_hi[1])

        out = {"lr": clip(params.lr, (self.lr_low, self.lr_high))}
        if self.warmup is not None:
            out["warmup_fraction"] = clip(params.warmup_fraction, self.warmup)
        if self.cooldown is not None:
            out["cooldown_fraction"] = clip(params.cooldown_fraction, self.cooldown)
        if self.one_minus_beta2 is not None and params.beta2 is not None:
            out["one_minus_beta2"] = clip(1.0 - params.beta2, self.one_minus_beta2)
        if self.weight_decay is not None and params.weight_decay is not None:
            out["weight_decay"] = clip(params.weight_decay, self.weight_decay)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchSpace:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


__all__ = ["LR_SPAN", "SearchSpace", "schedule_rule"]
