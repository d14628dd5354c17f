"""`oneday tune PLAN --calibrate`: fit the loss law's E, A, B to this data and tokenizer
(docs/design.md, Calibration).

The planner predicts a final loss with a published law (Epoch AI 2024) whose absolute values belong to its
own data and tokenizer. Calibration trains short runs of the plan's model family at two or three widths
(each the previous one doubled, the widest chosen so the runs fit the calibration budget, by default
`CALIBRATION_SHARE` of the plan's budget) and two token horizons each (a quarter of the plan's tokens per
parameter and the full ratio, at least `min_trial_steps` steps), reads each run's final validation loss, and
fits L = E + A/N^α + B/D^β with α, β fixed at the Epoch values (`planner.laws.fit_law_eab`: non-negative
least squares). `oneday plan ... --calibration FILE` then predicts with the fitted law.

Every run has the plan's depth, head size, sequence length, batch and schedule shape, under μP with the plan's
base width (its `mup_base_width` when it is already μP, its width otherwise), and the plan's LR moved to the
run's horizon by (D/D_plan)^−0.32 (Bjorck et al. 2025): the plan's LR, tuned or not, is the best guess of a
good LR at every size, so the losses are those of reasonably tuned runs, as the law assumes. A diverged
run is left out of the fit (with a warning); at least three points are needed.

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
from oneday.planner.calibration import save_cached_calibration
from oneday.planner.laws import EPOCH_2024, LossLaw, fit_law_eab, lr_horizon_correction
from oneday.studies.proxy import (
    ProxySpec,
    TrialParams,
    measure_step,
    min_trial_steps,
    proxy_model,
    tokens_per_param,
    warm_up,
)
from oneday.studies.short_run import capped_loss, load_run_data, short_run

log = logging.getLogger(__name__)

CALIBRATION_SHARE = 0.1
HORIZON_FRACTIONS = (0.25, 1.0)
MAX_SIZES = 3
FORMAT_VERSION = 1


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
    return replace(proxy_model(plan.model, width), mup_base_width=_base_width(plan))


def _sizes(plan: Plan, widest: int) -> list[int]:
    h = plan.model.head_dim
    widths = []
    w = widest
    while w >= h and len(widths) < MAX_SIZES:
        rounded = max(h, round(w / h) * h)
        if rounded not in widths:
            widths.append(rounded)
        w //= 2
    return sorted(widths)


def _steps(plan: Plan, model: ModelSpec, fraction: float) -> int:
    tokens = fraction * tokens_per_param(plan) * model.params_scaling()
    return max(min_trial_steps(plan), round(tokens / plan.train.tokens_per_step()))


def _runs_for(plan: Plan, widths: list[int]) -> list[tuple[ModelSpec, int]]:
    """(model, steps) of every run: each width at each horizon; the horizons of one width stay
    `HORIZON_FRACTIONS` apart even where the minimum step count lifts the short one."""
    runs = []
    ratio = HORIZON_FRACTIONS[-1] / HORIZON_FRACTIONS[0]
    for w in widths:
        model = _model(plan, w)
        short = _steps(plan, model, HORIZON_FRACTIONS[0])
        runs.append((model, short))
        runs.append((model, max(round(ratio * short), _steps(plan, model, HORIZON_FRACTIONS[-1]))))
    return runs


def calibrate_plan(
    plan_path: str | os.PathLike[str],
    *,
    hours: float | None = None,
    out: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    on_run: Callable[[CalibrationRun], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CalibrationResult:
    """Run the calibration (module docstring) and write the calibration file (default `<plan>.calibration.json`)."""

    started = clock()
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise UserError(f"--hours: must be a positive number, got {hours:g}")
    path = Path(plan_path).expanduser()
    plan = load_plan(path)
    out_path = check_output_path(out if out is not None else path.with_name(f"{path.stem}.calibration.json"))
    if plan.model.n_head < 2:
        raise UserError(f"{path}: calibration needs at least two model sizes of the same head size; this plan's "
                        f"model has a single head of {plan.model.head_dim}")
    data = load_run_data(plan)
    budget = hours * 3600.0 if hours is not None else CALIBRATION_SHARE * plan.train.budget_seconds

    # -- sizing: time the narrowest width, estimate the others by FLOPs per token --------------------------
    h = plan.model.head_dim
    candidates = [k * h for k in range(2, plan.model.n_head + 1)]
    narrow = _model(plan, h)
    warm_up(plan, data, threads=plan.train.threads)
    timing = measure_step(narrow, plan, data, eval_tokens=min(plan.train.eval_tokens, 8 * plan.model.seq_len),
                          threads=plan.train.threads, clock=clock)

    def cost(widths: list[int]) -> float:
        total = 0.0
        for model, steps in _runs_for(plan, widths):
            total += timing.overhead_seconds + steps * timing.step_seconds * (
                model.flops_per_token() / narrow.flops_per_token())
        return total

    fitting = [w for w in candidates if cost(_sizes(plan, w)) <= budget]
    if not fitting:
        need = cost(_sizes(plan, candidates[0]))
        raise UserError(f"calibration budget too small: {budget:.0f} s, the smallest calibration "
                        f"({len(_sizes(plan, candidates[0])) * len(HORIZON_FRACTIONS)} runs of widths "
                        f"{_sizes(plan, candidates[0])}) needs ~{need:.0f} s; give more --hours")
    widths = _sizes(plan, fitting[-1])
    log.info("calibration: widths %s × horizons %s of the plan's tokens/parameter, ~%.0f s of %.0f s",
             widths, HORIZON_FRACTIONS, cost(widths), budget)

    # -- the runs ----------------------------------------------------------------------------------------------
    cap = capped_loss(plan.model.vocab_size)
    runs: list[CalibrationRun] = []
    tracker_run = _start_tracking(plan, tracking_uri=tracking_uri)
    for model, steps in _runs_for(plan, widths):
        proxy = ProxySpec(
            model=model, micro_batch=plan.train.micro_batch, grad_accum=plan.train.grad_accum, steps=steps,
            eval_tokens=min(plan.train.eval_tokens, max(8 * model.seq_len, steps * plan.train.tokens_per_step() // 10)),
            step_seconds=timing.step_seconds * model.flops_per_token() / narrow.flops_per_token(),
            overhead_seconds=timing.overhead_seconds, target_d_model=plan.model.d_model,
            target_params=plan.model.params_scaling(), target_tokens=plan.train.planned_tokens,
        )
        lr = min(0.5, plan.train.lr * lr_horizon_correction(float(plan.train.planned_tokens), float(proxy.tokens())))
        params = TrialParams(lr=lr, warmup_fraction=plan.train.warmup_fraction,
                             cooldown_fraction=plan.train.cooldown_fraction)
        outcome = short_run(model, proxy.train_spec(plan.train, params), data, cap=cap,
                            peak_flops=plan.hardware.peak_flops, clock=clock)
        run = CalibrationRun(d_model=model.d_model, params=model.params_scaling(), tokens=proxy.tokens(), steps=steps,
                             lr=lr, loss=None if outcome.diverged else outcome.value(cap),
                             seconds=outcome.wall_seconds)
        if run.loss is None:
            log.warning("calibration run %d wide, %d tokens diverged (%s); left out of the fit", model.d_model,
                        proxy.tokens(), outcome.reason)
        runs.append(run)
        if on_run is not None:
            on_run(run)
    points = [p for r in runs if (p := r.point()) is not None]
    if len(points) < 3:
        raise UserError(f"calibration: only {len(points)} of {len(runs)} runs finished without diverging; "
                        "need 3 to fit E, A, B (lower train.lr in the plan)")
    law = fit_law_eab(points)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    source = (f"fitted on {len(points)} runs of {plan.data.source} (vocab {plan.data.vocab_size}), widths "
              f"{widths}, by oneday tune --calibrate, {created[:10]}")
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
