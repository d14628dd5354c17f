"""One complete short training run of a plan's model or of a proxy: a tuning trial, a transfer-check run, a
calibration run.

The run trains with the runner's own loop (`oneday.runner.loop.train`) for `TrainSpec.max_steps` steps with its
own full schedule (warmup, stable, cooldown) keyed to those steps, never a prefix of a long run: losses read in
the constant phase of a warmup-stable-decay schedule rank learning rates wrongly (Hägele et al. 2024). Step-keyed
runs also make trials comparable when other work on the machine changes their speed. A run that diverges
(non-finite losses, or a loss above the cap) ends early and reports the cap (`capped_loss`), never NaN.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oneday.logs import quieted
from oneday.models.spec import ModelSpec
from oneday.plan import Plan, TrainSpec

log = logging.getLogger(__name__)


def capped_loss(vocab_size: int) -> float:
    """The value a diverged trial reports: ln(vocab) + 1 nats, one nat worse than a uniform prediction.

    Reporting NaN would mark the trial FAIL and teach the sampler nothing; a large finite value tells it the
    region is bad, without a value so large that it flattens the sampler's view of the good region.
    """
    return math.log(vocab_size) + 1.0


@dataclass(frozen=True)
class RunData:
    """The token arrays every short run of a plan trains and evaluates on."""

    train: Any
    val: Any
    val_bytes_per_token: float
    eot_id: int | None
    vocab_size: int


def load_run_data(plan: Plan) -> RunData:
    """The plan's prepared data (its key checked; prepared again when the cache entry is missing)."""
    from oneday.data.plan_data import load_plan_data

    data, _seconds = load_plan_data(plan.data)
    return RunData(train=data.train_array(), val=data.val_array(), val_bytes_per_token=data.val_bytes_per_token(),
                   eot_id=data.eot_id, vocab_size=data.vocab_size)


@dataclass(frozen=True)
class RunOutcome:
    """What one short run did. `value(cap)` is what a trial reports: the final validation loss, or `cap`
    when the run diverged (never NaN)."""

    final_loss: float | None
    diverged: bool
    stopped: bool  # ended early by the caller's stop event (pruning, interruption)
    steps: int
    tokens: int
    wall_seconds: float
    train_seconds: float
    warmup_seconds: float
    skipped_steps: int
    evals: tuple[tuple[int, float], ...] = ()
    reason: str = ""

    def value(self, cap: float) -> float:
        if self.diverged or self.final_loss is None or not math.isfinite(self.final_loss):
            return cap
        return min(self.final_loss, cap)

    def step_seconds(self) -> float | None:
        """Mean seconds of a timed step (the first step of a run is warm-up and not timed)."""
        timed = self.steps - 1
        return self.train_seconds / timed if timed > 0 and self.train_seconds > 0 else None


class _Watch:
    """Observer around the caller's: ends the run (sets `stop`) as soon as it diverges: a training window
    whose losses were all non-finite, or a train/val loss above the cap (worse than uniform by a nat)."""

    def __init__(self, inner: Any, *, cap: float, stop: threading.Event) -> None:
        self.inner = inner
        self.cap = cap
        self.stop = stop
        self.diverged = False
        self.reason = ""

    def _diverge(self, why: str) -> None:
        if not self.diverged:
            self.diverged, self.reason = True, why
            self.stop.set()

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        if self.inner is not None and hasattr(self.inner, "on_start"):
            self.inner.on_start(step=step, tokens=tokens, resumed=resumed)

    def on_step(self, record: Any) -> None:
        if not math.isfinite(record.loss):
            self._diverge(f"non-finite training loss by step {record.step}")
        elif record.loss > self.cap:
            self._diverge(f"training loss {record.loss:.2f} above {self.cap:.2f} at step {record.step}")
        if self.inner is not None and hasattr(self.inner, "on_step"):
            self.inner.on_step(record)

    def on_eval(self, record: Any) -> None:
        if not math.isfinite(record.val_loss) or record.val_loss > self.cap:
            self._diverge(f"validation loss {record.val_loss:.3g} at step {record.step}")
        if self.inner is not None and hasattr(self.inner, "on_eval") and not self.diverged:
            self.inner.on_eval(record)

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        if self.inner is not None and hasattr(self.inner, "on_event"):
            self.inner.on_event(kind, message, step=step)


def short_run(
    model_spec: ModelSpec,
    train_spec: TrainSpec,
    data: RunData,
    *,
    cap: float,
    observer: Any = None,
    stop: threading.Event | None = None,
    peak_flops: float = 1e12,
    clock: Callable[[], float] = time.monotonic,
) -> RunOutcome:
    """Build `model_spec` and train it for `train_spec.max_steps` steps with the runner's loop; return what
    happened. Divergence (non-finite or above-`cap` losses, or the loop's `DivergedError`) ends the run early
    and is reported as `diverged`, not raised. Setting `stop` ends it early too (`stopped`)."""
    import torch

    from oneday.models.build import build_model, param_groups
    from oneday.runner.checkpoint import CheckpointStore
    from oneday.runner.loop import DivergedError, train
    from oneday.runner.step import keep_freed_memory

    if train_spec.max_steps is None:
        raise ValueError("short_run needs a step-keyed TrainSpec (max_steps)")
    started = clock()
    own_stop = threading.Event()
    watch = _Watch(observer, cap=cap, stop=own_stop)

    def relay() -> None:  # the caller's stop (pruning, Ctrl-C) also ends the run
        if stop is not None:
            while not own_stop.is_set():
                if stop.wait(0.05):
                    own_stop.set()
                    return

    relay_thread = threading.Thread(target=relay, name="oneday-trial-stop", daemon=True)
    relay_thread.start()
    device = train_spec.device
    if device == "cpu":
        keep_freed_memory()  # as the probe timed the step (runner.step)
        if train_spec.threads:
            torch.set_num_threads(train_spec.threads)
    torch.manual_seed(train_spec.seed)
    model = build_model(model_spec, seed=train_spec.seed, eos_token_id=data.eot_id, device=device)
    groups = param_groups(model, model_spec, lr=train_spec.lr, weight_decay=train_spec.weight_decay)
    try:
        # The loop warns at every skipped step; in a trial a diverging LR is an expected outcome that the trial
        # reports itself, so the loop is kept down to errors while it runs.
        with tempfile.TemporaryDirectory(prefix="oneday-trial-") as tmp, quieted("oneday.runner.loop", logging.ERROR):
            store = CheckpointStore(tmp, keep=1)
            try:
                result = train(
                    model=model, param_groups=groups, spec=train_spec, train_tokens=data.train, val_tokens=data.val,
                    val_bytes_per_token=data.val_bytes_per_token, checkpoints=store, deadline=clock() + 1e9,
                    flops_per_token=model_spec.flops_per_token(), peak_flops=peak_flops, clock=clock,
                    observer=watch, device=device, stop=own_stop, log_every=5,
                )
            except DivergedError as exc:
                return RunOutcome(final_loss=None, diverged=True, stopped=False, steps=0, tokens=0,
                                  wall_seconds=clock() - started, train_seconds=0.0, warmup_seconds=0.0,
                                  skipped_steps=0, reason=str(exc))
    finally:
        own_stop.set()
        relay_thread.join(1.0)
    stopped_by_caller = result.interrupted and not watch.diverged
    skipped_most = result.steps > 0 and result.skipped_steps * 2 > result.steps
    diverged = watch.diverged or skipped_most or (
        result.final_val_loss is not None and not math.isfinite(result.final_val_loss))
    reason = watch.reason or (f"{result.skipped_steps} of {result.steps} steps skipped (non-finite)"
                              if skipped_most else "")
    return RunOutcome(
        final_loss=None if result.final_val_loss is None else float(result.final_val_loss),
        diverged=diverged,
        stopped=stopped_by_caller,
        steps=result.steps,
        tokens=result.tokens,
        wall_seconds=clock() - started,
        train_seconds=result.train_seconds,
        warmup_seconds=result.warmup_seconds,
        skipped_steps=result.skipped_steps,
        reason=reason,
    )


__all__ = ["RunData", "RunOutcome", "capped_loss", "load_run_data", "short_run"]
