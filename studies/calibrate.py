"""`oneday tune PLAN --calibrate`: fit the loss law's E, A, B to this data and tokenizer
(docs/design.md, Calibration).

The planner predicts a final loss with a published law (Epoch AI 2024) whose absolute values belong to its
own data and tokenizer. Calibration trains the plan's recipe at two or three smaller widths (`calibration_widths`:
the plan's width halved, and halved again; the widest chosen so the runs fit the calibration budget, by default
`CALIBRATION_SHARE` of the plan's budget) and two token horizons each (a quarter of the plan's tokens per
parameter and the full ratio, at least `min_trial_steps` steps), reads each run's final validation loss, and
fits L = E + A/N^α + B/D^β with α, β fixed at the Epoch values (`planner.calibration.fit_law`: E bounded by the
data's unigram entropy, held when the points are few; a band from the fit's uncertainty). `oneday plan ...
--calibration FILE`, or any later plan on the same prepared data, then predicts with the fitted law.

Every run is the plan's model at a smaller width (its depth, sequence length, parametrization and schedule
shape; its head size, or one head below it) trained with the batch, LR, β₂, warmup and cooldown the planner's
own rule (`planner.decide.batch_and_lr`) gives that size and horizon: the fitted law describes the recipe that
will run, not a proxy's. The schedule is keyed to steps (a calibration run has no deadline of its own). A
diverged run is left out of the fit (with a warning); at least three points are needed, and the runs stop early
once the band at the plan's size is narrow enough (`DECISIVE_NATS`).

The file (the format `planner.make.load_calibration` reads):

    {"format_version": 1, "name": "epoch-2024-calibrated", "E": ..., "A": ..., "B": ...,
     "alpha": 0.3478, "beta": 0.3658, "source": "fitted on 6 runs of <data> (<date>) ...",
     "points": [[n, d, loss], ...], "created": "<UTC time>"}
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.paths import check_output_path, write_atomic
from oneday.plan import Plan, load_plan
from oneday.planner.calibration import LawFit, fit_law, save_cached_calibration
from oneday.planner.decide import BatchLR, batch_and_lr
from oneday.planner.laws import EPOCH_2024, LossLaw, unigram_entropy
from oneday.studies.proxy import (
    ProxySpec,
    TrialParams,
    measure_step,
    min_trial_steps,
    tokens_per_param,
    warm_up,
)
from oneday.studies.short_run import capped_loss, load_run_data, short_run

log = logging.getLogger(__name__)

CALIBRATION_SHARE = 0.1
HORIZON_FRACTIONS = (0.25, 1.0)
MAX_SIZES = 3
MIN_WIDTH = 16
FORMAT_VERSION = 1


class CalibrationBudgetError(UserError):
    """The calibration budget cannot pay for the smallest calibration; `need_seconds` is what that one costs."""

    def __init__(self, message: str, *, need_seconds: float) -> None:
        super().__init__(message)
        self.need_seconds = need_seconds


@dataclass(frozen=True)
class CalibrationRun:
    d_model: int
    params: int  # N (non-embedding + head)
    tokens: int  # D
    steps: int
    lr: float
    loss: float | None  # None when it diverged
    seconds: float

    def point(self) -> tuple[float, float, float] | None:
        return None if self.loss is None else (float(self.params), float(self.tokens), self.loss)


@dataclass(frozen=True)
class CalibrationResult:
    law: LossLaw
    runs: tuple[CalibrationRun, ...]
    out: Path
    seconds: float
    budget_seconds: float
    predicted_plan_loss: float
    default_plan_loss: float

    def residuals(self) -> list[float]:
        """Observed − fitted loss of each run that entered the fit."""
        return [r.loss - self.law.loss(r.params, r.tokens) for r in self.runs if r.loss is not None]

    def rmse(self) -> float:
        res = self.residuals()
        return math.sqrt(sum(x * x for x in res) / len(res)) if res else math.nan


def _base_width(plan: Plan) -> int:
    return plan.model.mup_base_width if plan.model.parametrization == "mup" else plan.model.d_model


def _model(plan: Plan, width: int) -> ModelSpec:
    """The plan's model at `width`: same depth, vocabulary, sequence length, d_ff proportion and parametrization
    (a μP plan keeps its base width, so its width multiplier scales as the run's would); the plan's head size,
    or one head as wide as the model below it (as the planner's ladder does)."""
    t = plan.model
    return replace(t, d_model=width, n_head=max(1, width // t.head_dim), d_ff=max(1, round(t.d_ff * width / t.d_model)),
                   mup_base_width=_base_width(plan))


def calibration_widths(plan: Plan) -> list[int]:
    """Every width a calibration run may have, narrowest first: the plan's width halved, and halved again, down
    to `MIN_WIDTH` -- a multiple of the head size at or above it, of 8 below it. Never the plan's own width: at the
    plan's tokens per parameter that run would cost as much as the plan. A narrow plan whose halvings give fewer
    than two widths also gets `MIN_WIDTH` and three quarters of its width (48 wide: 16, 24, 32; 32: 16, 24)."""
    d = plan.model.d_model
    h = plan.model.head_dim
    widths: set[int] = set()
    w = d / 2
    while w >= MIN_WIDTH:
        widths.add(int(w // h) * h if w >= h else max(MIN_WIDTH, int(w // 8) * 8))
        w /= 2
    if len(widths) < 2:
        widths |= {MIN_WIDTH, int(0.75 * d // 8) * 8}
    return sorted(w for w in widths if MIN_WIDTH <= w < d)


def _sizes(plan: Plan, widest: int) -> list[int]:
    """The widths of a calibration whose widest run is `widest`: it and up to `MAX_SIZES` − 1 narrower ones."""
    return [w for w in calibration_widths(plan) if w <= widest][-MAX_SIZES:]


@dataclass(frozen=True)
class RecipeRun:
    """One calibration run: the plan's model at a smaller width, trained on `tokens` with the batch, LR, β₂,
    warmup and cooldown the planner gives that size and horizon (`planner.decide.batch_and_lr`)."""

    model: ModelSpec
    tokens: int
    recipe: BatchLR

    def steps(self) -> int:
        return max(1, round(self.tokens / self.recipe.global_batch_tokens()))

    def params(self) -> TrialParams:
        r = self.recipe
        return TrialParams(lr=r.lr, warmup_fraction=r.warmup_fraction, cooldown_fraction=r.cooldown_fraction,
                           beta2=r.beta2, weight_decay=r.weight_decay)


def recipe_runs(plan: Plan, widths: list[int]) -> list[RecipeRun]:
    """Every run of a calibration at `widths`, narrowest first: each width at each of `HORIZON_FRACTIONS` of the
    plan's tokens per parameter (at least `min_trial_steps` sequences' worth), a factor 4 apart, each with the
    planner's own batch and LR rule for that size and horizon: the runs are the plan's recipe at smaller scale,
    so the law fitted on them predicts the run that will happen (docs/design.md, Calibration)."""
    runs = []
    ratio = HORIZON_FRACTIONS[-1] / HORIZON_FRACTIONS[0]
    for w in widths:
        model = _model(plan, w)
        floor = min_trial_steps(plan) * model.seq_len
        short = max(floor, round(HORIZON_FRACTIONS[0] * tokens_per_param(plan) * model.params_scaling()))
        for tokens in (short, max(round(ratio * short), round(tokens_per_param(plan) * model.params_scaling()))):
            recipe = batch_and_lr(spec=model, tokens=float(tokens), max_micro_batch=plan.train.micro_batch)
            runs.append(RecipeRun(model=model, tokens=int(tokens), recipe=recipe))
    return runs


def calibrate_plan(
    plan_path: str | os.PathLike[str],
    *,
    hours: float | None = None,
    out: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    on_run: Callable[[CalibrationRun], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    track: bool = True,
) -> CalibrationResult:
    """Run the calibration (module docstring) and write the calibration file (default `<plan>.calibration.json`);
    `track` False logs nothing to MLflow (`oneday plan` calibrating on its own writes only where it was told)."""

    started = clock()
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise UserError(f"--hours: must be a positive number, got {hours:g}")
    path = Path(plan_path).expanduser()
    plan = load_plan(path)
    out_path = check_output_path(out if out is not None else path.with_name(f"{path.stem}.calibration.json"))
    candidates = calibration_widths(plan)
    if len(candidates) < 2:
        raise UserError(f"{path}: calibration needs at least two model sizes narrower than the plan's and at least "
                        f"{MIN_WIDTH} wide; this plan's model is {plan.model.d_model} wide")
    data = load_run_data(plan)
    budget = hours * 3600.0 if hours is not None else CALIBRATION_SHARE * plan.train.budget_seconds

    # -- sizing: time the narrowest width, estimate the others by FLOPs per token --------------------------
    narrow = _model(plan, candidates[0])
    warm_up(plan, data, threads=plan.train.threads)
    timing = measure_step(narrow, plan, data, eval_tokens=min(plan.train.eval_tokens, 8 * plan.model.seq_len),
                          threads=plan.train.threads, clock=clock)

    per_token = timing.step_seconds / plan.train.tokens_per_step()  # of the narrowest width

    def cost(widths: list[int]) -> float:
        return sum(timing.overhead_seconds + r.tokens * per_token * r.model.flops_per_token() / narrow.flops_per_token()
                   for r in recipe_runs(plan, widths))

    fitting = [w for w in candidates[1:] if cost(_sizes(plan, w)) <= budget]
    if not fitting:
        need = cost(_sizes(plan, candidates[1]))
        raise CalibrationBudgetError(
            f"calibration budget too small: {budget:.0f} s, the smallest calibration "
            f"({len(_sizes(plan, candidates[1])) * len(HORIZON_FRACTIONS)} runs of widths "
            f"{_sizes(plan, candidates[1])}) needs ~{need:.0f} s; give more --hours", need_seconds=need)
    widths = _sizes(plan, fitting[-1])
    log.info("calibration: widths %s × horizons %s of the plan's tokens/parameter, ~%.0f s of %.0f s",
             widths, HORIZON_FRACTIONS, cost(widths), budget)

    # -- the runs ----------------------------------------------------------------------------------------------
    cap = capped_loss(plan.model.vocab_size)
    plan_point = (float(plan.model.params_scaling()), float(plan.train.planned_tokens))
    runs: list[CalibrationRun] = []
    tracker_run = _start_tracking(plan, tracking_uri=tracking_uri) if track else None
    entropy = _data_entropy(plan)
    fit: LawFit | None = None
    for i, spec in enumerate(recipe_runs(plan, widths)):
        model, steps = spec.model, spec.steps()
        batch_tokens = spec.recipe.global_batch_tokens()
        proxy = ProxySpec(
            model=model, micro_batch=spec.recipe.micro_batch, grad_accum=spec.recipe.grad_accum, steps=steps,
            eval_tokens=min(plan.train.eval_tokens, max(8 * model.seq_len, steps * batch_tokens // 10)),
            step_seconds=per_token * batch_tokens * model.flops_per_token() / narrow.flops_per_token(),
            overhead_seconds=timing.overhead_seconds, target_d_model=plan.model.d_model,
            target_params=plan.model.params_scaling(), target_tokens=plan.train.planned_tokens,
        )
        params = spec.params()
        outcome = short_run(model, proxy.train_spec(plan.train, params), data, cap=cap,
                            peak_flops=plan.hardware.peak_flops, clock=clock)
        run = CalibrationRun(d_model=model.d_model, params=model.params_scaling(), tokens=proxy.tokens(), steps=steps,
                             lr=params.lr, loss=None if outcome.diverged else outcome.value(cap),
                             seconds=outcome.wall_seconds)
        if run.loss is None:
            log.warning("calibration run %d wide, %d tokens diverged (%s); left out of the fit", model.d_model,
                        proxy.tokens(), outcome.reason)
        runs.append(run)
        if on_run is not None:
            on_run(run)
        points = [p for r in runs if (p := r.point()) is not None]
        if i % 2 == 1 and len(points) >= 4:  # a width done: is the plan's prediction pinned down already?
            fit = fit_law(points, max_e=entropy)
            if fit.decisive(*plan_point, tolerance=DECISIVE_NATS):
                low, high = fit.loss_band(*plan_point)
                log.info("calibration: the band at the plan is %.3f–%.3f after %d runs; stopping early",
                         low, high, len(runs))
                break
    points = [p for r in runs if (p := r.point()) is not None]
    if len(points) < 3:
        raise UserError(f"calibration: only {len(points)} of {len(runs)} runs finished without diverging; "
                        "need 3 to fit E, A, B (lower train.lr in the plan)")
    fit = fit_law(points, max_e=entropy)
    law = fit.law
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    source = (f"fitted on {len(points)} runs of {plan.data.source} (vocab {plan.data.vocab_size}), widths "
              f"{sorted({r.d_model for r in runs})}, the plan's recipe (its batch and LR rules) at each size and "
              f"horizon; {law.source}; by oneday tune --calibrate, {created[:10]}")
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "name": law.name, "E": law.E, "A": law.A, "B": law.B,
        "alpha": law.alpha, "beta": law.beta, "source": source,
        "points": [[n, d, loss] for n, d, loss in points], "created": created,
    }
    write_atomic(out_path, json.dumps(payload, indent=2) + "\n")
    # kept with the data too: a later `oneday plan` on the same data and tokenizer finds it (planner/calibration.py)
    save_cached_calibration(plan.data.path, payload)
    law = replace(law, source=source)
    result = CalibrationResult(
        law=law, runs=tuple(runs), out=out_path, seconds=clock() - started, budget_seconds=budget,
        predicted_plan_loss=law.loss(plan.model.params_scaling(), plan.train.planned_tokens),
        default_plan_loss=EPOCH_2024.loss(plan.model.params_scaling(), plan.train.planned_tokens),
    )
    _finish_tracking(tracker_run, result)
    return result


DECISIVE_NATS = 0.1
"""Calibration stops once the fit's 95% band at the plan's N and D is within ±0.1 nats (`LawFit.decisive`)."""


def _data_entropy(plan: Plan) -> float | None:
    """The unigram entropy of the plan's training tokens (`laws.unigram_entropy`): E cannot exceed it."""
    import numpy as np

    from oneday.data.prepare import load_prepared

    try:
        prepared = load_prepared(plan.data.path)
        return unigram_entropy(np.bincount(prepared.train_array(), minlength=prepared.vocab_size).tolist())
    except (OSError, ValueError, UserError) as exc:
        log.warning("calibration: no token counts (%s); E is not bounded by the data", exc)
        return None


def _start_tracking(plan: Plan, *, tracking_uri: str | None) -> tuple[Any, str | None] | None:
    from oneday.tracking.names import KIND_CALIBRATION, TAG_KIND, experiment_name
    from oneday.tracking.store import resolve_tracking_uri
    from oneday.tracking.study import StudyTracker

    tracker = StudyTracker(resolve_tracking_uri(tracking_uri), experiment_name(plan), plan_hash=plan.digest(),
                           plan_name=plan.name, device=plan.train.device, study="calibration")
    run_id = tracker.start_child(parent_run_id=None, run_name=f"calibrate-{plan.name}", params=plan.flat_params(),
                                 tags={TAG_KIND: KIND_CALIBRATION})
    return tracker, run_id


def _finish_tracking(handle: tuple[Any, str | None] | None, result: CalibrationResult) -> None:
    if handle is None:
        return
    tracker, run_id = handle
    metrics = [("calibration/loss", r.loss, i) for i, r in enumerate(result.runs) if r.loss is not None]
    metrics += [("calibration/E", result.law.E, 0), ("calibration/A", result.law.A, 0),
                ("calibration/B", result.law.B, 0), ("calibration/rmse", result.rmse(), 0),
                ("predicted/loss", result.predicted_plan_loss, 0)]
    tracker.log(run_id, metrics=metrics, tags={"oneday.calibration.file": str(result.out)})
    tracker.artifact(run_id, result.out)
    tracker.end(run_id, status="FINISHED")


__all__ = ["CALIBRATION_SHARE", "CalibrationResult", "CalibrationRun", "calibrate_plan"]
