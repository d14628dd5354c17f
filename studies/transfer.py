"""From the best proxy trial to the tuned plan: LR transfer, the transfer check, and the record of it all.

The transfer (documented in the tuned plan's `provenance.tuning`):

1. Width, by μP. The proxy was trained under μP with `mup_base_width` = its own width, so its best base LR
   η* is a base LR for any μP model with that base width. The tuned plan sets the target model to
   `parametrization="mup"` and `mup_base_width` = the proxy's width; `param_groups` then gives the target's
   hidden matrices η/width_mult (width_mult = d_target / d_proxy), embeddings, norms and the (zero-initialized,
   1/width_mult-scaled) head the base LR (Yang et al. 2022, Tensor Programs V).
2. Token horizon. The proxy trained D_proxy tokens, the target plans D_target; the optimal LR falls with the
   horizon as D^−0.32 (Bjorck et al., ICLR 2025), so η_target = η* · (D_target / D_proxy)^−0.32. The batch is
   the plan's in both, so no batch correction is applied.
3. Schedule. Warmup and cooldown fractions are searched, and go into the plan, only when a trial is not much
   shorter in steps than the target's run (`tune.schedule_rule`); otherwise the trials run the planner's
   fractions and the plan keeps them: measured here, fractions found on a 34-step proxy (short warmup, long
   cooldown) cost the 825-step target 2.7% of its loss, while the tuned LR with the planner's schedule matched
   the best of an LR grid. β₂ and weight decay, when searched, transfer as found.
4. The proxy optimum: with the LR as the only searched parameter, the vertex of a parabola in log LR through
   the best trials (`fitted_lr`), else the best trial's.

The transfer check: three short runs at a width between the proxy's and the target's (the widest multiple of
the head size up to 2× the proxy that fits the check's share of the tuning budget, `proxy.check_width`,
decided and measured when the study is created), under μP with the proxy's base width, at the proxy's
horizon (so only the width changes, which is what μP claims to transfer), with η*/2, η*, 2η* and the best
schedule. If η* is not the best of the three the plan records it and a warning says which was; the plan
keeps η* (three noisy points are a check, not a better estimate).

Every trial diverging means no LR in the searched range trains this proxy: the plan keeps the planner's
defaults (its model is left as it was) and says so; no NaN is ever written (the study's values are capped).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from oneday import __version__
from oneday.errors import UserError
from oneday.formats import jsonable
from oneday.plan import Plan, save_plan
from oneday.studies.proxy import CHECK_MULTIPLIERS, TrialParams, check_model
from oneday.studies.results import TransferCheck, TrialResult, TuneResult
from oneday.studies.short_run import RunData, short_run
from oneday.studies.study import StudySettings
from oneday.tracking.plots import plot_history, plot_lr_vs_loss
from oneday.tracking.study import TAG_STAGE, TAG_TRIAL_STATE, StudyTracker

log = logging.getLogger(__name__)

MAX_PLAN_LR = 0.5
FIT_MIN_TRIALS = 5


def transfer_check(
    plan: Plan,
    settings: StudySettings,
    params: TrialParams,
    data: RunData,
    *,
    width: int,
    tracker: StudyTracker | None = None,
    parent_run_id: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TransferCheck:
    """Train the check model (μP, base width = the proxy's) at η*/2, η*, 2η* for the proxy's steps."""
    proxy = settings.proxy
    model = check_model(plan.model, proxy, width)
    scale = model.flops_per_token() / proxy.model.flops_per_token()
    started = clock()
    losses, diverged, lrs = [], [], []
    for multiplier in CHECK_MULTIPLIERS:
        scaled = params.scaled(multiplier)
        spec = proxy.train_spec(plan.train, scaled, step_seconds=proxy.step_seconds * scale)
        run_id = None
        if tracker is not None:
            run_id = tracker.start_child(
                parent_run_id=parent_run_id, run_name=f"transfer-check-{multiplier:g}x",
                params={**{f"train.{k}": v for k, v in scaled.to_dict().items()}, "model.d_model": width,
                        "model.mup_base_width": proxy.model.d_model, "train.max_steps": proxy.steps,
                        "check.multiplier": multiplier},
                tags={TAG_STAGE: "transfer-check"})
        outcome = short_run(model, spec, data, cap=settings.cap, peak_flops=plan.hardware.peak_flops, clock=clock)
        value = outcome.value(settings.cap)
        losses.append(value)
        diverged.append(outcome.diverged)
        lrs.append(scaled.lr)
        log.info("transfer check at width %d: %.3g × η* (LR %.3g) -> %.4f%s", width, multiplier, scaled.lr, value,
                 " (diverged)" if outcome.diverged else "")
        if tracker is not None:
            tracker.log(run_id, metrics=[("val/loss", value, outcome.steps)],
                        tags={TAG_TRIAL_STATE: "diverged" if outcome.diverged else "complete"})
            tracker.end(run_id, status="FAILED" if outcome.diverged else "FINISHED")
    return TransferCheck(width=width, steps=proxy.steps, multipliers=CHECK_MULTIPLIERS, lrs=tuple(lrs),
                         losses=tuple(losses), diverged=tuple(diverged), seconds=clock() - started)


def fitted_lr(trials: list[TrialResult]) -> tuple[float | None, dict[str, Any]]:
    """A noise-robust proxy optimum: the vertex of a parabola in log LR through the best half (at least
    `FIT_MIN_TRIALS`) of the complete, non-diverged trials; None (with the reason) when there are too few, the
    parabola opens downwards, or its vertex lies outside the LRs it was fitted on. Single short proxy runs are
    noisy (a 1-head, 30-step proxy scatters by ~0.05 nats between neighbouring LRs), the loss is smooth in
    log LR near its minimum, and LR sweeps in the scaling literature read the optimum off such a fit rather
    than off the single best run."""
    points = sorted((math.log(t.params.lr), t.value) for t in trials
                    if t.params is not None and t.value is not None and t.state == "complete")
    if len(points) < FIT_MIN_TRIALS:
        return None, {"used": False, "reason": f"{len(points)} complete trials, a fit needs {FIT_MIN_TRIALS}"}
    best = sorted(points, key=lambda p: p[1])[: max(FIT_MIN_TRIALS, len(points) // 2)]
    xs = [x for x, _ in best]
    ys = [y for _, y in best]
    if max(xs) - min(xs) < 1e-6:
        return None, {"used": False, "reason": "the best trials share one LR"}
    a, b, c = np.polyfit(np.array(xs), np.array(ys), 2)
    if not a > 0:
        return None, {"used": False, "reason": "the loss is not convex in log LR over the best trials"}
    vertex = -b / (2 * a)
    if not min(xs) <= vertex <= max(xs):
        return None, {"used": False, "reason": "the fitted minimum lies outside the LRs fitted on"}
    lr = math.exp(vertex)
    return lr, {"used": True, "lr": lr, "trials": len(best), "predicted_loss": float(c - b * b / (4 * a)),
                "lr_range": [math.exp(min(xs)), math.exp(max(xs))]}


def tuned_plan(plan: Plan, settings: StudySettings, chosen: TrialParams, *, tuning: dict[str, Any]) -> Plan:
    """The plan with the tuned LR (μP base width = the proxy's, horizon-corrected) and the trials' warmup and
    cooldown (the planner's own when the study did not search them; β₂ and weight decay when searched)."""
    proxy = settings.proxy
    lr = min(MAX_PLAN_LR, chosen.lr * proxy.horizon_correction())
    model = replace(plan.model, parametrization="mup", mup_base_width=proxy.model.d_model)
    train = replace(chosen, lr=lr).apply(plan.train)
    name = plan.name if plan.name.endswith("-tuned") else f"{plan.name}-tuned"
    kept = "" if settings.space.schedule else " (the planner's)"
    reason = (
        f"Tuned by `oneday tune` (study {tuning.get('study')}): LR {lr:.3g} = proxy optimum {chosen.lr:.3g} × "
        f"horizon correction {proxy.horizon_correction():.3f} ((D_target/D_proxy)^−0.32, Bjorck et al. 2025); "
        f"μP with base width {proxy.model.d_model} (width_mult {model.width_mult():.3g}: hidden matrices at "
        f"LR/{model.width_mult():.3g}); warmup {train.warmup_fraction:.3f}, cooldown {train.cooldown_fraction:.3f}"
        f"{kept}."
    )
    return replace(plan, name=name, model=model, train=train,
                   provenance=replace(plan.provenance, tuning=jsonable(tuning, digits=8)),
                   reasons=(*plan.reasons, reason))


def _untuned_plan(plan: Plan, *, tuning: dict[str, Any]) -> Plan:
    reason = f"`oneday tune` kept the planner's defaults: {tuning.get('result_note', '')}"
    return replace(plan, provenance=replace(plan.provenance, tuning=jsonable(tuning, digits=8)),
                   reasons=(*plan.reasons, reason))


def _plot(trials: list[TrialResult], folder: Path, *, chosen_lr: float | None, default_lr: float,
          title: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        paths.append(plot_history([(t.number, t.value, t.state) for t in trials if t.value is not None],
                                  folder / "optimization_history.png", title=f"{title}: optimization history"))
        paths.append(plot_lr_vs_loss([(t.params.lr, t.value, t.state) for t in trials
                                      if t.value is not None and t.params is not None],
                                     folder / "lr_vs_loss.png", chosen_lr=chosen_lr, default_lr=default_lr,
                                     title=f"{title}: proxy LR vs validation loss"))
    except Exception as exc:  # a plot is not worth failing a finished study for
        log.warning("could not draw the study's plots: %s", exc)
    return paths


def finish_study(
    study: optuna.Study,
    plan: Plan,
    settings: StudySettings,
    data: RunData,
    *,
    out: Path,
    storage: str,
    study_name: str,
    tracker: StudyTracker | None,
    parent_run_id: str | None,
    command: str,
    started: float,
    stage: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> TuneResult:
    """Choose, check, write the tuned plan and its plots, and close the study's MLflow run."""
    frozen = study.get_trials(deepcopy=False)
    trials = [TrialResult.from_frozen(t) for t in frozen if t.state != TrialState.WAITING]
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    good = [t for t in trials if t.state == "complete" and t.value is not None and t.params is not None]
    diverged = [t for t in trials if t.state == "diverged"]
    proxy = settings.proxy
    default_lr = plan.train.lr
    warnings: list[str] = []
    if not good and not diverged:
        errors = [t.note for t in trials if t.state == "failed" and t.note]
        first = f" (first error: {errors[0]})" if errors else ""
        raise UserError(f"study {study_name}: no trial finished{first}; nothing to transfer")

    hc = proxy.horizon_correction()
    tuning: dict[str, Any] = {
        "tool": f"oneday {__version__} tune, optuna {optuna.__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "study": study_name,
        "storage": storage,
        "sampler": "TPE (multivariate, constant liar), seed " + str(settings.seed),
        "pruner": settings.pruner().describe(),
        "trials": {"total": len(trials), **counts},
        "budget_seconds": round(settings.budget_seconds, 1),
        "proxy": {
            "n_layer": proxy.model.n_layer, "d_model": proxy.model.d_model, "n_head": proxy.model.n_head,
            "d_ff": proxy.model.d_ff, "params_scaling": proxy.params(), "steps": proxy.steps,
            "tokens": proxy.tokens(), "batch_tokens": proxy.batch_tokens(),
            "tokens_per_param": proxy.tokens_per_param(), "seconds_per_trial": proxy.trial_seconds(),
            "notes": list(proxy.notes),
        },
        "search_space": settings.space.to_dict(),
        "capped_loss": settings.cap,
        "default": {"lr": default_lr, "proxy_lr": settings.default_params.lr,
                    "warmup_fraction": plan.train.warmup_fraction, "cooldown_fraction": plan.train.cooldown_fraction},
    }
    if tracker is not None and parent_run_id is not None:
        tuning["mlflow"] = {"tracking_uri": tracker.uri, "parent_run_id": parent_run_id}

    best: TrialResult | None = None
    check = None
    if not good:
        note = (f"all {len(diverged)} finished trials diverged (loss capped at {settings.cap:.2f}); no LR in "
                f"[{settings.space.lr_low:.3g}, {settings.space.lr_high:.3g}] trains the proxy")
        warnings.append(note + "; kept the planner's default LR")
        log.warning("%s; keeping the planner's default LR %.3g", note, default_lr)
        tuning.update({"result": "all-diverged", "result_note": note, "best_value": None, "best_params": None})
        new_plan = _untuned_plan(plan, tuning=tuning)
        tuned_lr = default_lr
    else:
        best = min(good, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
        assert best.params is not None
        # With the LR as the only searched parameter, read the optimum off a parabola through the best trials.
        space = settings.space
        if space.schedule or space.one_minus_beta2 or space.weight_decay:
            fit_lr, fit = None, {"used": False, "reason": "several parameters searched: the best trial is taken"}
        else:
            fit_lr, fit = fitted_lr(trials)
        chosen = replace(best.params, lr=fit_lr) if fit_lr is not None else best.params
        width = settings.check_width
        if width is not None:
            stage(f"transfer check at width {width}: η*/2, η*, 2η* for {proxy.steps} steps each")
            check = transfer_check(plan, settings, chosen, data, width=width, tracker=tracker,
                                   parent_run_id=parent_run_id, clock=clock)
            if not check.ok():
                text = (f"transfer check at width {width}: {check.best_multiplier():g}×η* gave a lower loss than η* "
                        f"({min(check.losses):.4f} vs {check.losses[1]:.4f}); the plan keeps η*")
                warnings.append(text)
                log.warning("%s", text)
        transfer_schedule, schedule_reason = space.schedule, settings.schedule_note
        tuned_lr = min(MAX_PLAN_LR, chosen.lr * hc)
        target_wm = plan.model.d_model / proxy.model.d_model
        tuning.update({
            "result": "tuned",
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params.to_dict(),
            "lr": {"proxy": chosen.lr, "best_trial_lr": best.params.lr, "fit": fit, "horizon_correction": hc,
                   "batch_correction": 1.0, "tuned": tuned_lr, "default": default_lr,
                   "tuned_over_default": tuned_lr / default_lr},
            "mup": {"base_width": proxy.model.d_model, "target_width": plan.model.d_model, "width_mult": target_wm,
                    "hidden_lr": tuned_lr / target_wm},
            "corrections": [
                f"μP width transfer: target made μP with base width {proxy.model.d_model} (width_mult "
                f"{target_wm:.4g}); hidden-matrix LR = LR / width_mult, embeddings/norms/head at the base LR",
                f"token horizon: × (D_target/D_proxy)^−0.32 = ({proxy.target_tokens:,}/{proxy.tokens():,})^−0.32 "
                f"= {hc:.4f} (Bjorck et al., ICLR 2025)",
                "batch: the plan's global batch in proxy and target, no correction",
                f"schedule: {'the proxy' if transfer_schedule else 'the planner'}'s warmup and cooldown "
                f"fractions ({schedule_reason})",
            ],
            "schedule": {"searched_and_transferred": transfer_schedule, "reason": schedule_reason,
                         "proxy_steps": proxy.steps, "target_steps": plan.train.planned_steps},
            "transfer_check": check.to_dict() if check is not None else {"skipped": "the proxy has the target's width"},
        })
        new_plan = tuned_plan(plan, settings, chosen, tuning=tuning)
    seconds = clock() - started
    new_plan = replace(new_plan, provenance=replace(new_plan.provenance, tuning=jsonable(
        {**new_plan.provenance.tuning, "warnings": warnings, "seconds": round(seconds, 1),
         "budget_fraction": seconds / plan.train.budget_seconds}, digits=8)))  # type: ignore[arg-type]
    save_plan(new_plan, out)
    stage(f"wrote {out}")
    plots = _plot(trials, out.with_name(f"{out.stem}.plots"), chosen_lr=tuning.get("lr", {}).get("proxy"),
                  default_lr=settings.default_params.lr, title=study_name)
    if tracker is not None and parent_run_id is not None:
        metrics: list[tuple[str, float, int]] = [("tune/trials_" + k, float(v), 0) for k, v in counts.items()]
        metrics += [("tune/seconds", seconds, 0), ("tune/tuned_lr", tuned_lr, 0), ("tune/default_lr", default_lr, 0)]
        if best is not None and best.params is not None:
            metrics += [("best/value", best.value or math.nan, 0)]
            metrics += [(f"best/{k}", v, 0) for k, v in best.params.to_dict().items()]
        if check is not None:
            metrics += [(f"transfer/loss_{m:g}x", loss, 0) for m, loss in zip(check.multipliers, check.losses,
                                                                            strict=True)]
        tracker.log(parent_run_id, metrics=metrics, tags={
            "oneday.tune.result": tuning["result"],
            "oneday.tune.best_params": str(best.params.to_dict() if best and best.params else None),
            "oneday.tune.transfer_ok": str(check.ok() if check is not None else None).lower(),
        })
        for path in plots:
            tracker.artifact(parent_run_id, path)
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "plan.tuned.json"
            copy.write_text(new_plan.to_json(), encoding="utf-8")
            tracker.artifact(parent_run_id, copy)
        tracker.end(parent_run_id, status="FINISHED")
    return TuneResult(
        study=study_name, storage=storage, proxy=proxy, trials=tuple(trials), best=best, default_lr=default_lr,
        tuned_lr=tuned_lr, all_diverged=not good, transfer=check, out=out, plan=new_plan, seconds=seconds,
        budget_seconds=plan.train.budget_seconds, warnings=tuple(warnings),
        mlflow_run_id=parent_run_id if tracker is not None and not tracker.failed else None,
    )


__all__ = ["finish_study", "fitted_lr", "transfer_check", "tuned_plan"]
