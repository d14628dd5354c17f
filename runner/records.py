"""What the training loop reports, and to whom: its records, the `Observer` protocol, and a fan-out.

The loop (`oneday.runner.loop.train`) calls an `Observer` with a `StepRecord` every few steps, an `EvalRecord`
after each evaluation and a line for each event (a skipped step, a checkpoint, a rollback, a resume), and
returns a `LoopResult`. The orchestrator (`run_plan`), the tuner's trials and the CLI's progress bar observe
it; `FanOut` hands each record to several of them. Pure Python, no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from oneday.errors import first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What the steps since the last record did (one record every `log_every` steps)."""

    step: int  # optimizer steps taken so far (including skipped ones)
    tokens: int  # tokens consumed so far, all ranks
    lr: float  # base LR of the last step (group LRs are this × their lr_scale)
    loss: float  # mean training loss over the window's good steps (NaN if all were skipped)
    grad_norm: float  # mean gradient norm (before clipping) over the window's good steps
    tokens_per_s: float  # all ranks, over the window's training seconds
    mfu: float
    train_elapsed: float
    budget_fraction: float  # the schedule's progress in [0, 1]
    epoch: float  # passes over the training windows so far


@dataclass(frozen=True)
class EvalRecord:
    step: int
    tokens: int
    val_loss: float
    val_bpb: float
    train_elapsed: float
    final: bool
    val_loss_se: float | None = None  # the standard error of val_loss over the validation batches


@dataclass(frozen=True)
class Event:
    kind: str  # skip, rollback, checkpoint, checkpoint-error, checkpoint-fallback, resume, interrupt, oom
    message: str
    step: int


class Observer(Protocol):
    """Receives progress; implemented by the orchestrator (MLflow, metrics.jsonl, the progress bar).

    Only rank 0's observer is called. Subclass `NullObserver` to implement only some methods.
    """

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None: ...
    def on_step(self, record: StepRecord) -> None: ...
    def on_eval(self, record: EvalRecord) -> None: ...
    def on_event(self, kind: str, message: str, *, step: int) -> None: ...


class NullObserver:
    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        pass

    def on_step(self, record: StepRecord) -> None:
        pass

    def on_eval(self, record: EvalRecord) -> None:
        pass

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        pass


@dataclass(frozen=True)
class LoopResult:
    steps: int
    tokens: int
    train_seconds: float  # train_elapsed at the end, across resumes
    skipped_steps: int
    rollbacks: int
    resumes: int
    final_val_loss: float | None  # None when interrupted, and on ranks other than 0
    final_val_bpb: float | None
    mean_tokens_per_s: float  # all ranks, over the whole run's training seconds
    mfu: float
    final_lr: float
    interrupted: bool
    events: tuple[Event, ...]
    micro_batch_changes: tuple[str, ...] = ()  # "oom: micro-batch 32→16, accumulation 2→4", in order
    wall_seconds: float = 0.0  # wall time inside train(), across resumes
    warmup_seconds: float = 0.0  # this session's first step (compile), not in train_seconds
    epochs: float = 0.0
    checkpoint: Path | None = None  # the final checkpoint (rank 0)


class FanOut:
    """Calls several observers in turn; one that raises is logged and dropped, training goes on."""

    def __init__(self, *observers: Any) -> None:
        self._observers = [o for o in observers if o is not None]

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        for observer in list(self._observers):
            method = getattr(observer, name, None)
            if method is None:
                continue
            try:
                method(*args, **kwargs)
            except Exception as exc:  # one line (a full disk under metrics.jsonl, say); the traceback at debug
                log.error("observer %s.%s failed (%s); it gets no more records, training goes on",
                          type(observer).__name__, name, first_line(exc))
                log.debug("observer failure", exc_info=True)
                self._observers.remove(observer)

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self._call("on_start", step=step, tokens=tokens, resumed=resumed)

    def on_step(self, record: Any) -> None:
        self._call("on_step", record)

    def on_eval(self, record: Any) -> None:
        self._call("on_eval", record)

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        self._call("on_event", kind, message, step=step)


__all__ = ["EvalRecord", "Event", "FanOut", "LoopResult", "NullObserver", "Observer", "StepRecord"]
