"""The loop's sense of time: how long it has trained, and what is due before the next step.

- `TrainingClock` splits wall time into training and the rest. Training time (what the LR schedule is keyed to)
  is everything except evaluations, checkpoints and the first step of each session (warm-up: `torch.compile`
  traces and compiles there, CUDA loads its kernels); all of it still counts against the deadline. The mean
  of this session's timed steps is the step time the schedule projects with.
- `Pacer` says, before every step, whether to stop, evaluate or checkpoint, and the schedule's progress at the
  end of the next step. Clock-keyed (the default): the horizon is re-projected from the measured step time so
  that the cooldown ends at the deadline (`schedule.train_seconds_left`, `schedule.clock_progress`).
  Step-keyed (`TrainSpec.max_steps`, for tests and benchmarks): exactly that many steps, whatever the clock.
  Evaluations come every `eval_every_seconds` of training time, but not in the final interval (the final one
  follows it); checkpoints every `checkpoint_every_seconds` of wall time unless the end is nearer than one
  checkpoint takes to write.
- `Due.agreed` makes every rank take rank 0's decision (the clock's owner), with a stop on any rank.

Pure Python apart from the all-reduce in `Due.agreed`; the clock is injected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oneday.plan import TrainSpec
from oneday.runner.schedule import OVERHEAD_SAFETY, clock_progress, train_seconds_left


class TrainingClock:
    """Training seconds and the session's step time, measured on `clock`. `mark` starts a segment."""

    def __init__(self, clock: Callable[[], float], *, train_elapsed: float, prior_step_seconds: float) -> None:
        self._clock = clock
        self.train_elapsed = train_elapsed
        self.warmup_seconds = 0.0
        self._prior_step_seconds = prior_step_seconds
        self._steps = 0  # this session's steps
        self._timed_seconds = 0.0  # of this session's timed steps
        self._window_seconds = 0.0  # training seconds since the last `take_window`
        self._window_tokens = 0
        self._mark = clock()

    def now(self) -> float:
        return self._clock()

    def count_training(self) -> float:
        """The time since the mark was training (host bookkeeping between steps, reading back results); the
        mark moves to now, which is returned."""
        now = self._clock()
        self.train_elapsed += now - self._mark
        self._window_seconds += now - self._mark
        self._mark = now
        return now

    def restart(self) -> None:
        """The time since the mark was not training (an evaluation, a checkpoint): start a new segment."""
        self._mark = self._clock()

    def step_done(self, tokens: int) -> bool:
        """A training step of `tokens` tokens ended now. True when it was timed (not the session's first)."""
        now = self._clock()
        seconds, self._mark = now - self._mark, now
        self._steps += 1
        if self._steps == 1:
            self.warmup_seconds += seconds
            return False
        self.train_elapsed += seconds
        self._timed_seconds += seconds
        self._window_seconds += seconds
        self._window_tokens += tokens
        return True

    @property
    def step_seconds(self) -> float:
        """Mean seconds of this session's timed steps; the planner's estimate until one is timed."""
        timed = self._steps - 1
        return self._timed_seconds / timed if timed > 0 else self._prior_step_seconds

    def take_window(self) -> float:
        """Tokens per second over the steps since the last call (0 when none were timed)."""
        rate = self._window_tokens / self._window_seconds if self._window_seconds > 0 else 0.0
        self._window_tokens, self._window_seconds = 0, 0.0
        return rate


@dataclass(frozen=True)
class Due:
    """What happens before the next step; `progress` is the schedule's at the end of that step."""

    stop: bool  # interrupted (Ctrl-C, SIGTERM, a pruner): save and return
    done: bool  # no further step fits
    evaluate: bool
    checkpoint: bool
    progress: float

    def agreed(self, *, dist: Any, group: Any) -> Due:
        """Every rank's copy of rank 0's decision; `stop` when any rank was stopped. Unchanged without DDP."""
        if dist is None:
            return self
        import torch
        import torch.distributed as torch_dist

        mine = [float(self.stop), float(self.done), float(self.evaluate), float(self.checkpoint), self.progress]
        if dist.rank != 0:
            mine[1:] = [0.0] * 4
        tensor = torch.tensor(mine, dtype=torch.float64)
        torch_dist.all_reduce(tensor, group=group)
        stop, done, evaluate, checkpoint, progress = tensor.tolist()
        return Due(stop=stop > 0, done=bool(done), evaluate=bool(evaluate), checkpoint=bool(checkpoint),
                   progress=progress)


class Pacer:
    """Decides what is due (module docstring). `eval_seconds`/`checkpoint_seconds` start as the cost model's
    estimates and become the measured durations once there are some."""

    def __init__(self, spec: TrainSpec, *, deadline: float, eval_seconds: float, checkpoint_seconds: float,
                 train_elapsed: float, now: float, final_checkpoint_seconds: float = 0.0) -> None:
        self.spec = spec
        self.deadline = deadline
        self.eval_seconds = eval_seconds
        self.checkpoint_seconds = checkpoint_seconds
        # The final checkpoint is written in the foreground: its estimated write, or a periodic one's time if more.
        self.final_checkpoint_seconds = final_checkpoint_seconds
        self._next_eval_at = self._next_eval(train_elapsed)
        self._last_checkpoint = now

    def _next_eval(self, train_elapsed: float) -> float:
        every = self.spec.eval_every_seconds
        return (math.floor(train_elapsed / every) + 1) * every

    def _train_left(self, *, now: float, train_elapsed: float, step_seconds: float, step: int) -> float:
        """Training seconds that still fit: by the step count when step-keyed, else by the deadline (after the
        evaluations and checkpoints still to come, one step of slack) and the planned training time."""
        spec = self.spec
        if spec.max_steps is not None:
            return max(0, spec.max_steps - step) * step_seconds
        by_deadline = train_seconds_left(
            now=now, deadline=self.deadline, eval_seconds=self.eval_seconds,
            eval_every_seconds=spec.eval_every_seconds, checkpoint_seconds=self.checkpoint_seconds,
            checkpoint_every_seconds=spec.checkpoint_every_seconds, slack_seconds=step_seconds,
            final_checkpoint_seconds=max(self.checkpoint_seconds, self.final_checkpoint_seconds))
        return min(by_deadline, spec.train_seconds - train_elapsed)

    def due(self, *, now: float, train_elapsed: float, step_seconds: float, step: int, stop: bool) -> Due:
        spec = self.spec
        left = self._train_left(now=now, train_elapsed=train_elapsed, step_seconds=step_seconds, step=step)
        # The final evaluation comes within an interval: a periodic one there would only cost time (and would cut
        # the projected run short by more than a step, so the last step would miss the end). A checkpoint is
        # insurance, not a measurement: it is skipped only when the final one would come sooner than it takes to
        # write, so that a kill anywhere loses at most one interval of work.
        every_eval, every_checkpoint = spec.eval_every_seconds, spec.checkpoint_every_seconds
        evaluate = train_elapsed >= self._next_eval_at and left >= every_eval
        checkpoint = now - self._last_checkpoint >= every_checkpoint and left > self.checkpoint_seconds
        if spec.max_steps is not None:
            return Due(stop=stop, done=step >= spec.max_steps, evaluate=evaluate, checkpoint=checkpoint,
                       progress=min(1.0, (step + 1) / spec.max_steps))
        if evaluate or checkpoint:  # they happen before the next step: take their time off first
            soon = now + OVERHEAD_SAFETY * (self.eval_seconds * evaluate + self.checkpoint_seconds * checkpoint)
            left = self._train_left(now=soon, train_elapsed=train_elapsed, step_seconds=step_seconds, step=step)
        progress, steps_left = clock_progress(train_elapsed=train_elapsed, step_seconds=step_seconds, train_left=left)
        return Due(stop=stop, done=steps_left < 1, evaluate=evaluate, checkpoint=checkpoint, progress=progress)

    def evaluated(self, *, train_elapsed: float, seconds: float | None) -> None:
        """An evaluation ended (`seconds`: its measured duration; None on ranks that did not evaluate)."""
        if seconds is not None:
            self.eval_seconds = seconds
        self._next_eval_at = self._next_eval(train_elapsed)

    def checkpointed(self, *, now: float, seconds: float | None) -> None:
        """A checkpoint ended (`seconds`: its measured duration; None on ranks that did not write it)."""
        if seconds is not None:
            self.checkpoint_seconds = seconds
        self._last_checkpoint = now


__all__ = ["Due", "Pacer", "TrainingClock"]
