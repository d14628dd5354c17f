"""How the wall-clock budget splits: the time reserved for everything that is not a training step, and the
cadence of the run's evaluations and checkpoints.

Pure Python. The probe, start-up and compile, evaluations, checkpoints and the final save are all paid out of
the person's budget (Cramming, Geiping & Goldstein 2023, counts the probing too); what is left is training time.
The per-item costs come from the runner's cost model (`oneday.runner.costs`): start-up (imports, model build,
first step) plus the compile time measured on the nearest measured shape, scaled by depth; evaluations =
count × (eval_tokens / measured no-grad forward tok/s + 0.2 s); checkpoints = count × (0.5 s + 12 bytes per
parameter at 200 MB/s); the final save = 1.5 s + 8 bytes per parameter at 200 MB/s.

Cadence: an evaluation every max(30 s, budget / 40) — 20 to 40 evaluations a run, never closer than 30 s — on
min(val tokens, 2^20 on CUDA / 2^16 on CPU) tokens, halved (not below 8 windows) while the evaluations would
cost more than 5% of the budget; if even that is too dear (a slow or busy CPU), fewer evaluations (at least 2)
further apart; a checkpoint every 10% of the budget, clamped to [60 s, 30 min]; keep the last 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.planner.policy import Setup
from oneday.runner import costs


@dataclass(frozen=True)
class Reserve:
    """How the wall-clock budget splits: everything but training is reserved up front (seconds)."""

    budget_seconds: float
    probe_seconds: float
    compile_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    final_save_seconds: float

    def reserved_seconds(self) -> float:
        return (self.probe_seconds + self.compile_seconds + self.eval_seconds
                + self.checkpoint_seconds + self.final_save_seconds)

    def train_seconds(self) -> float:
        return self.budget_seconds - self.reserved_seconds()

    def train_fraction(self) -> float:
        return self.train_seconds() / self.budget_seconds


def reserve_seconds(
    *,
    budget_seconds: float,
    compile_seconds: float,
    eval_seconds_each: float,
    eval_count: int,
    checkpoint_seconds_each: float,
    checkpoint_count: int,
    final_save_seconds: float,
    probe_seconds: float,
) -> Reserve:
    """Training seconds = budget − (probe + compile/warm-up + evals + checkpoints + final save).

    The probing and measuring count against the budget, as in Cramming (Geiping & Goldstein 2023):
    the budget is the person's wall-clock, not the optimizer's. UserError when nothing is left.
    """
    if not budget_seconds > 0:
        raise UserError(f"budget must be positive, got {budget_seconds:.3g} s")
    parts = dict(compile_seconds=compile_seconds, eval_seconds_each=eval_seconds_each, eval_count=eval_count,
                 checkpoint_seconds_each=checkpoint_seconds_each, checkpoint_count=checkpoint_count,
                 final_save_seconds=final_save_seconds, probe_seconds=probe_seconds)
    for name, value in parts.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
    reserve = Reserve(
        budget_seconds=budget_seconds,
        probe_seconds=probe_seconds,
        compile_seconds=compile_seconds,
        eval_seconds=eval_seconds_each * eval_count,
        checkpoint_seconds=checkpoint_seconds_each * checkpoint_count,
        final_save_seconds=final_save_seconds,
    )
    if reserve.train_seconds() <= 0:
        raise UserError(
            f"budget too small: {budget_seconds:.0f} s leaves nothing for training after "
            f"{reserve.reserved_seconds():.0f} s of probing ({probe_seconds:.0f}), compiling "
            f"({compile_seconds:.0f}), evaluation ({reserve.eval_seconds:.0f}), checkpoints "
            f"({reserve.checkpoint_seconds:.0f}) and the final save ({final_save_seconds:.0f})"
        )
    return reserve


# --------------------------------------------------------------------------------------------------
# How often the run evaluates and checkpoints, and what that reserves
# --------------------------------------------------------------------------------------------------
EVAL_MIN_SPACING = 30.0
EVALS_PER_RUN = 40
EVAL_TOKENS = {"cuda": 2**20, "cpu": 2**16}
EVAL_MAX_SHARE = 0.05
CHECKPOINT_FRACTION = 0.10
CHECKPOINT_MIN_SECONDS = 60.0
CHECKPOINT_MAX_SECONDS = 1800.0
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Cadence:
    """The run's evaluation and checkpoint cadence, and the seconds each item costs (`runner.costs`)."""

    eval_every: float
    eval_tokens: int
    eval_count: int
    eval_each: float
    checkpoint_every: float
    checkpoint_count: int
    checkpoint_each: float
    startup: float
    compile: float
    final_save: float


def plan_cadence(
    spec: ModelSpec,
    *,
    setup: Setup,
    budget_seconds: float,
    val_tokens: int,
    forward_tokens_per_s: float,
    compile_seconds: float,
) -> Cadence:
    params = spec.params_total()
    eval_every = max(EVAL_MIN_SPACING, budget_seconds / EVALS_PER_RUN)
    eval_count = max(1, math.ceil(budget_seconds / eval_every))  # the periodic ones and the final one
    eval_tokens = min(int(val_tokens), EVAL_TOKENS[setup.device])
    floor = min(int(val_tokens), 8 * (spec.seq_len + 1))

    def each(tokens: int) -> float:
        return costs.eval_seconds(tokens, forward_tokens_per_s=forward_tokens_per_s)

    while eval_tokens > floor and eval_count * each(eval_tokens) > EVAL_MAX_SHARE * budget_seconds:
        eval_tokens = max(floor, eval_tokens // 2)
    if eval_count > 2 and eval_count * each(eval_tokens) > EVAL_MAX_SHARE * budget_seconds:
        # even the smallest evaluation is too dear at this spacing (a slow device): evaluate less often
        eval_count = max(2, int(EVAL_MAX_SHARE * budget_seconds // each(eval_tokens)))
        eval_every = budget_seconds / eval_count
    checkpoint_every = min(CHECKPOINT_MAX_SECONDS, max(CHECKPOINT_MIN_SECONDS, CHECKPOINT_FRACTION * budget_seconds))
    return Cadence(
        eval_every=eval_every,
        eval_tokens=eval_tokens,
        eval_count=eval_count,
        eval_each=each(eval_tokens),
        checkpoint_every=checkpoint_every,
        checkpoint_count=int(budget_seconds // checkpoint_every),
        checkpoint_each=costs.checkpoint_seconds(params, every_seconds=checkpoint_every),
        startup=costs.startup_seconds(setup.device),
        compile=compile_seconds if setup.compile else 0.0,
        final_save=costs.final_save_seconds(params) + costs.checkpoint_write_seconds(params),  # + final checkpoint
    )


def reserve_for(cadence: Cadence, *, budget_seconds: float, probe_seconds: float) -> Reserve:
    return reserve_seconds(
        budget_seconds=budget_seconds,
        compile_seconds=cadence.startup + cadence.compile,
        eval_seconds_each=cadence.eval_each,
        eval_count=cadence.eval_count,
        checkpoint_seconds_each=cadence.checkpoint_each,
        checkpoint_count=cadence.checkpoint_count,
        final_save_seconds=cadence.final_save,
        probe_seconds=probe_seconds,
    )


__all__ = ["KEEP_CHECKPOINTS", "Cadence", "Reserve", "plan_cadence", "reserve_for", "reserve_seconds"]
