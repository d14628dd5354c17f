"""Running trials: the objective (one complete short run on the proxy), reporting to the pruner, failures.

- Pruning: each intermediate validation loss is reported to the trial from the loop's `on_eval`; when the
  pruner says so, the run is ended with the loop's stop event and the trial is PRUNED.
- A diverged trial (non-finite losses, a loss above `capped_loss` = ln(vocab) + 1, or the loop's
  `DivergedError`) completes with that capped value, never NaN: NaN would mark it FAIL and TPE would learn
  nothing from it. It is marked `diverged` (a user attribute).
- A trial that raises is marked FAIL and the study goes on (at most `max(3, n/2)` failures a process).
- Each trial is an MLflow child run of the study's run, with its curves (`oneday.tracking.study`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState

from oneday import signals
from oneday.errors import first_line
from oneday.plan import Plan
from oneday.processes import start_ticks
from oneday.runner.records import FanOut
from oneday.studies.proxy import TrialParams
from oneday.studies.results import TrialResult
from oneday.studies.short_run import RunData, short_run
from oneday.studies.storage import HOST, fail_dead_trials
from oneday.studies.study import StudySettings, optuna_quiet
from oneday.tracking.study import STATUS_OF_STATE, TAG_TRIAL_NUMBER, TAG_TRIAL_STATE, StudyTracker, TrialCurve

log = logging.getLogger(__name__)

TrialCallback = Callable[["TrialResult"], None]


class _Reporter:
    """Reports each intermediate validation loss to the trial and stops the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial, *, cap: float, stop: threading.Event) -> None:
        self.trial = trial
        self.cap = cap
        self.stop = stop
        self.pruned_at: int | None = None

    def on_eval(self, record: Any) -> None:
        if record.final or self.pruned_at is not None:
            return
        value = record.val_loss if math.isfinite(record.val_loss) else self.cap
        self.trial.report(min(value, self.cap), step=int(record.step))
        if self.trial.should_prune():
            self.pruned_at = int(record.step)
            self.stop.set()


@dataclass
class TrialContext:
    plan: Plan
    settings: StudySettings
    data: RunData
    tracker: StudyTracker | None
    parent_run_id: str | None
    worker_id: str
    on_trial: TrialCallback | None
    clock: Callable[[], float]
    failures: int = 0
    numbers: list[int] = field(default_factory=list)


def _trial_params_for_mlflow(params: TrialParams, settings: StudySettings, number: int) -> dict[str, Any]:
    proxy = settings.proxy
    out: dict[str, Any] = {f"train.{k}": v for k, v in params.to_dict().items()}
    out.update({
        "trial.number": number, "model.n_layer": proxy.model.n_layer, "model.d_model": proxy.model.d_model,
        "model.n_head": proxy.model.n_head, "model.d_ff": proxy.model.d_ff,
        "model.params_scaling": proxy.params(), "model.parametrization": "mup",
        "model.mup_base_width": proxy.model.mup_base_width, "train.max_steps": proxy.steps,
        "train.tokens": proxy.tokens(), "train.tokens_per_step": proxy.batch_tokens(),
    })
    return out


def _objective(ctx: TrialContext) -> Callable[[optuna.Trial], float]:
    settings = ctx.settings

    def objective(trial: optuna.Trial) -> float:
        params = settings.space.suggest(trial)
        trial.set_user_attr("params", params.to_dict())
        pid = os.getpid()
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", pid)
        trial.set_user_attr("pid_start", start_ticks(pid))
        trial.set_user_attr("worker", ctx.worker_id)
        ctx.numbers.append(trial.number)
        if ctx.on_trial is not None:
            ctx.on_trial(TrialResult(number=trial.number, state="running", params=params, worker=ctx.worker_id))
        run_id = None
        if ctx.tracker is not None:
            run_id = ctx.tracker.start_child(
                parent_run_id=ctx.parent_run_id, run_name=f"trial-{trial.number:03d}",
                params=_trial_params_for_mlflow(params, settings, trial.number),
                tags={TAG_TRIAL_NUMBER: trial.number, TAG_TRIAL_STATE: "running"})
        curve = TrialCurve(ctx.tracker, run_id)
        stop = threading.Event()
        reporter = _Reporter(trial, cap=settings.cap, stop=stop)
        state = "failed"
        try:
            spec = settings.proxy.train_spec(ctx.plan.train, params)
            outcome = short_run(settings.proxy.model, spec, ctx.data, cap=settings.cap,
                                observer=FanOut(curve, reporter), stop=stop,
                                peak_flops=ctx.plan.hardware.peak_flops, clock=ctx.clock)
            trial.set_user_attr("steps", outcome.steps)
            trial.set_user_attr("wall_seconds", round(outcome.wall_seconds, 3))
            if reporter.pruned_at is not None and not outcome.diverged:
                state = "pruned"
                raise optuna.TrialPruned(f"pruned at step {reporter.pruned_at}")
            value = outcome.value(settings.cap)
            if outcome.diverged:
                state = "diverged"
                trial.set_user_attr("diverged", True)
                trial.set_user_attr("note", f"diverged: {outcome.reason}"[:500])
            else:
                state = "complete"
            curve.flush()
            if ctx.tracker is not None:
                ctx.tracker.log(run_id, metrics=[("val/loss_final", value, outcome.steps)])
            return value
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            ctx.failures += 1
            text = first_line(exc)
            trial.set_user_attr("error", f"{type(exc).__name__}: {text}"[:500])
            log.warning("trial %d failed: %s: %s", trial.number, type(exc).__name__, text)
            raise
        finally:
            curve.flush()
            if ctx.tracker is not None:
                ctx.tracker.log(run_id, tags={TAG_TRIAL_STATE: state})
                ctx.tracker.end(run_id, status=STATUS_OF_STATE.get(state, "FAILED"))

    return objective


def _count(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state] += 1
    return counts


def run_trials(
    study: optuna.Study,
    ctx: TrialContext,
    *,
    deadline: float | None,
) -> None:
    """Run trials one at a time until the study holds `n_trials` finished (complete or pruned) trials, the
    deadline would be passed by another trial (a study with no finished trial yet always gets one), or this
    process has seen max(3, n_trials / 2) failures."""
    settings = ctx.settings
    objective = _objective(ctx)
    limit = max(3, settings.n_trials // 2)
    per_trial = settings.proxy.trial_seconds()
    # SIGTERM unwinds like Ctrl-C, so the running trial is marked FAIL, not left RUNNING.
    with optuna_quiet(), signals.handling((signal.SIGTERM,), signals.raise_interrupt):
        while True:
            fail_dead_trials(study)
            counts = _count(study)
            finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
            if finished + counts[TrialState.RUNNING] >= settings.n_trials:
                break
            if ctx.failures >= limit:
                log.warning("stopping: %d trials failed in this process", ctx.failures)
                break
            if deadline is not None and finished > 0 and ctx.clock() + per_trial > deadline:
                log.info("stopping: another trial (~%.0f s) would not end before the deadline", per_trial)
                break
            before = len(ctx.numbers)
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            if ctx.on_trial is not None and len(ctx.numbers) > before:
                number = ctx.numbers[-1]
                frozen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
                if frozen is not None:
                    ctx.on_trial(TrialResult.from_frozen(frozen))


__all__ = ["TrialCallback", "TrialContext", "run_trials"]
