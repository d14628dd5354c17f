"""Faults injected on purpose, so that the tests can prove what happens when training goes wrong.

`ONEDAY_INJECT_NAN_AT_STEP` ("7", "7,8,9", "7-9", or "7-" for every step from 7 on) makes the training loss
of those optimizer steps NaN, numbered from 1 like `StepRecord.step`. It works through the command line too
(a `oneday run` subprocess inherits the variable). When it is set, the loop trains through a
`PoisonedLoss` wrapped around its loss; when it is not, nothing here runs: the hot loop never checks it.

`ONEDAY_INJECT_OOM` ("8": a card that fits micro-batches of at most 8 windows; "8@1-3": only on steps 1 to 3)
makes a forward pass on a larger micro-batch raise `torch.OutOfMemoryError`, as CUDA would: how the tests
prove on a CPU that the loop halves its micro-batch and goes on (`OutOfMemoryLoss`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

INJECT_NAN_ENV = "ONEDAY_INJECT_NAN_AT_STEP"
INJECT_OOM_ENV = "ONEDAY_INJECT_OOM"


def nan_steps_from_env() -> Callable[[int], bool] | None:
    """The steps `ONEDAY_INJECT_NAN_AT_STEP` poisons, as a predicate on 1-based step numbers; None when unset."""
    text = os.environ.get(INJECT_NAN_ENV, "").strip()
    if not text:
        return None
    log.warning("%s=%s: the loss of these steps will be NaN (test hook)", INJECT_NAN_ENV, text)
    return _steps(text)


def _steps(text: str) -> Callable[[int], bool]:
    """"7", "7,8,9", "7-9" or "7-" as a predicate on 1-based step numbers."""
    singles: set[int] = set()
    ranges: list[tuple[int, float]] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if dash:
            ranges.append((int(low), float(high) if high.strip() else math.inf))
        else:
            singles.add(int(low))
    return lambda step: step in singles or any(lo <= step <= hi for lo, hi in ranges)


class PoisonedLoss(nn.Module):
    """The training loss, NaN on the chosen optimizer steps. It counts its calls: `grad_accum` calls make one
    step, and the first call of this session belongs to step `first_step + 1`."""

    def __init__(self, loss: nn.Module, poisoned: Callable[[int], bool], *, first_step: int, grad_accum: int) -> None:
        super().__init__()
        self.loss = loss
        self.poisoned = poisoned
        self.first_step = first_step
        self.grad_accum = grad_accum
        self.calls = 0

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = self.loss(inputs, targets)
        step = self.first_step + self.calls // self.grad_accum + 1
        self.calls += 1
        return value * math.nan if self.poisoned(step) else value


def oom_from_env() -> tuple[int, Callable[[int], bool]] | None:
    """(the largest micro-batch that fits, the steps on which a larger one fails) from `ONEDAY_INJECT_OOM`."""
    text = os.environ.get(INJECT_OOM_ENV, "").strip()
    if not text:
        return None
    fits, _, steps = text.partition("@")
    log.warning("%s=%s: micro-batches over %s windows will run out of memory (test hook)", INJECT_OOM_ENV, text,
                fits.strip())
    return int(fits), _steps(steps) if steps.strip() else (lambda step: True)


class OutOfMemoryLoss(nn.Module):
    """The training loss, raising `torch.OutOfMemoryError` on a micro-batch of more than `fits` windows on the
    chosen steps. `step_of_next_call()` is set by the loop (it knows the step being trained)."""

    def __init__(self, loss: nn.Module, *, fits: int, on_step: Callable[[int], bool]) -> None:
        super().__init__()
        self.loss = loss
        self.fits = fits
        self.on_step = on_step
        self.step = 1

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if inputs.shape[0] > self.fits and self.on_step(self.step):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: micro-batch {inputs.shape[0]} > "
                                         f"{self.fits} windows at step {self.step})")
        return self.loss(inputs, targets)


__all__ = ["INJECT_NAN_ENV", "INJECT_OOM_ENV", "OutOfMemoryLoss", "PoisonedLoss", "nan_steps_from_env",
           "oom_from_env"]
