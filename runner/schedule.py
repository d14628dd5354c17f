"""The learning-rate schedule and the clock projection that keys it to the deadline (docs/design.md, Training).

Pure Python, no torch, no clock: the training loop feeds it measured seconds.

Shape: linear warmup → constant → cooldown over the last `cooldown_fraction` of the run to
`final_lr_fraction`·lr (warmup-stable-decay). Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations") show constant + cooldown matches cosine, and that a 1−sqrt cooldown beats a
linear one. Budget-aware schedules beat budget-blind ones (Li et al. 2020, "Budgeted Training"; Izsak et al.
2021; Cramming's `budget-*` schedulers read elapsed time), so progress is elapsed *training seconds* over a
horizon that the loop re-projects every step from the measured step time, so that the cooldown ends at the
deadline (openai parameter-golf starts its warmdown from measured step time in the same way).
"""

from __future__ import annotations

import math
from typing import Literal

CooldownShape = Literal["1-sqrt", "linear", "cosine"]

# Overhead estimates (eval, checkpoint durations) are scaled by these before they are reserved: finishing a
# little early costs a few steps, finishing late breaks the promise of the budget. The final eval and save get
# the larger factor: nothing after them can absorb an overrun.
OVERHEAD_SAFETY = 1.1
FINAL_SAFETY = 1.5


def lr_multiplier(
    progress: float,
    *,
    warmup_fraction: float,
    cooldown_fraction: float,
    cooldown_shape: CooldownShape,
    final_lr_fraction: float,
) -> float:
    """The LR as a fraction of the peak LR at `progress` ∈ [0, 1] (clamped).

    - [0, warmup): linear from 0 to 1;
    - constant 1 until the cooldown starts at 1 − cooldown_fraction;
    - cooldown to f = final_lr_fraction, with x ∈ [0, 1] the fraction of the cooldown elapsed:
      "1-sqrt": f + (1−f)·(1 − sqrt(x)) (Hägele et al. 2024), "linear": f + (1−f)·(1 − x),
      "cosine": f + (1−f)·(1 + cos(πx))/2;
    - exactly f at progress 1 (also when there is no cooldown: the last step ends the schedule).

    Warmup and cooldown never overlap (the plan checks warmup + cooldown ≤ 1), so the curve is continuous
    and non-increasing after the warmup.
    """
    if cooldown_shape not in ("1-sqrt", "linear", "cosine"):
        raise ValueError(f"cooldown_shape must be '1-sqrt', 'linear' or 'cosine', got {cooldown_shape!r}")
    p = min(max(float(progress), 0.0), 1.0)
    f = final_lr_fraction
    if p >= 1.0:
        return f
    if p < warmup_fraction:
        return p / warmup_fraction
    cooldown_start = 1.0 - cooldown_fraction
    if cooldown_fraction <= 0.0 or p < cooldown_start:
        return 1.0
    x = (p - cooldown_start) / cooldown_fraction
    if cooldown_shape == "1-sqrt":
        decay = 1.0 - math.sqrt(x)
    elif cooldown_shape == "linear":
        decay = 1.0 - x
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * x))
    return f + (1.0 - f) * decay


def train_seconds_left(
    *,
    now: float,
    deadline: float,
    eval_seconds: float,
    eval_every_seconds: float,
    checkpoint_seconds: float,
    checkpoint_every_seconds: float,
    slack_seconds: float = 0.0,
    safety: float = OVERHEAD_SAFETY,
    final_safety: float = FINAL_SAFETY,
    final_checkpoint_seconds: float | None = None,
) -> float:
    """Training seconds T that still fit before `deadline`, after the overhead still to come.

    What must fit in the wall time left, R = deadline − now:
      T                                   training steps,
      e · T / eval_every                  periodic evals (one per `eval_every` seconds of *training* time),
      c · R / checkpoint_every            periodic checkpoints (one per `checkpoint_every` *wall* seconds),
      e + c                               the final eval and the final checkpoint,
      slack                               room for step-time noise (the loop passes one mean step),
    with e and c the measured (or estimated) durations, scaled by `safety` (s) for the periodic ones and by
    `final_safety` (f) for the final ones (the final checkpoint costs `final_checkpoint_seconds` when given:
    it is written in the foreground, the periodic ones in the background). Solving for T:
      T = (R − f·(e + c) − s·c·R/checkpoint_every − slack) / (1 + s·e/eval_every).
    The counts are continuous (a fraction of an eval is reserved when less than an interval is left); the
    loop skips periodic evals/checkpoints in the final interval, so this errs on finishing a little early.
    """
    wall_left = deadline - now
    if wall_left <= 0:
        return 0.0
    final_checkpoint = checkpoint_seconds if final_checkpoint_seconds is None else final_checkpoint_seconds
    fixed = (final_safety * (eval_seconds + final_checkpoint)
             + safety * checkpoint_seconds * wall_left / checkpoint_every_seconds + slack_seconds)
    per_train_second = 1.0 + safety * eval_seconds / eval_every_seconds
    return max(0.0, (wall_left - fixed) / per_train_second)


def clock_progress(*, train_elapsed: float, step_seconds: float, train_left: float) -> tuple[float, int]:
    """(progress at the end of the next step, steps that fit in `train_left` counting the next one).

    The horizon is projected so that the last step that fits ends the schedule:
    horizon = train_elapsed + n·step_seconds with n = floor(train_left / step_seconds), and the next step is
    scheduled at its *end* point, (train_elapsed + step_seconds) / horizon, which is exactly 1 when n = 1.
    n = 0 means another step would overrun: stop.
    """
    if step_seconds <= 0:
        raise ValueError(f"step_seconds must be > 0, got {step_seconds}")
    # The tiny epsilon keeps k·dt / dt from flooring to k − 1 through rounding.
    steps = math.floor(train_left / step_seconds + 1e-9) if train_left > 0 else 0
    if steps < 1:
        return 1.0, 0
    return (train_elapsed + step_seconds) / (train_elapsed + steps * step_seconds), steps


__all__ = ["FINAL_SAFETY", "OVERHEAD_SAFETY", "CooldownShape", "clock_progress", "lr_multiplier", "train_seconds_left"]
