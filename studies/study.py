"""A study's settings, decided once when it is created and stored in it, and the sampler and pruner it runs with.

Budget. `--trials N`: N trials that finish (complete or pruned) in the study in total; a restarted `oneday tune`
runs only the missing ones. Each trial is sized (`proxy.size_proxy`) to a slice of the tuning budget: by default
`DEFAULT_TUNE_SHARE` (20%) of the plan's budget, `--hours` when given; `CHECK_SHARE` (20%) of it is kept for the
transfer check. `--trials N` without `--hours` asks for N trials: the budget is what they cost (logged against
the plan's budget), and when the default slice cannot pay for one, each is the shortest trial on the narrowest
proxy; with `--hours` too, a budget that cannot pay for them is an error naming both. Without `--trials` the
number of trials is what fits the budget: the proxy is sized for `DEFAULT_TRIALS` slices; when not even the
narrowest proxy fits one, the narrowest is used with its steps cut to fit a quarter of the budget (or all of it);
then as many trials as fit, at most `MAX_AUTO_TRIALS`. A budget that cannot pay for one trial of
`MIN_TRIAL_STEPS` steps is an error; one that pays for fewer than `FEW_TRIALS` draws a warning naming the
`--hours` that would give twice as many. The proxy and the number of trials are decided
once, when the study is created, and stored in it (user attribute `oneday`); `--trials` on a later start changes
the number.

Sampler: TPE (Bergstra et al. 2011), seeded; multivariate (Optuna 5's default for one objective) with the
constant liar (running trials of other workers count as bad guesses, so workers spread out). Its random start-up
is a third of the planned trials (3–10) instead of Optuna's 10: studies here are small. The seed is offset by the
number of trials already in the study (a restart does not replay the same random points) and, in a worker, by
its process id (two workers do not propose the same point). The first trial is the planner's own choice,
enqueued: its LR divided by the horizon correction (so that choosing it gives back exactly the planner's LR for
the target), its warmup and cooldown.

Pruning on the intermediate validation loss: `pruning.TolerantHalvingPruner` (successive halving at ~45% of a
trial, η = 2, 2% tolerance).

The study is created once, before any trial runs (`create_study(load_if_exists=True)`); workers only load it
and wait for it when it does not exist yet, so no two processes race to create the same new study ("UNIQUE
constraint failed"). A storage that does not exist yet is only created after the budget has been found to pay
for the trials: a refusal leaves no empty journal behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import optuna
from optuna.storages import BaseStorage

from oneday.errors import UserError
from oneday.formats import human_seconds
from oneday.plan import Plan
from oneday.studies.proxy import (
    BudgetTooSmallError,
    ProxySpec,
    TrialParams,
    check_model,
    check_seconds,
    check_width,
    measure_step,
    proxy_steps,
    proxy_widths,
    size_proxy,
)
from oneday.studies.pruning import TolerantHalvingPruner
from oneday.studies.short_run import RunData, capped_loss
from oneday.studies.space import SearchSpace, schedule_rule
from oneday.studies.storage import check_storage, open_storage, storage_exists

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 16
MAX_TRIALS = 200
MAX_AUTO_TRIALS = 64
FEW_TRIALS = 6
DEFAULT_TUNE_SHARE = 0.2
CHECK_SHARE = 0.2
PRUNE_AT = 0.45
ATTR = "oneday"
STUDY_FORMAT = 1


def default_study_name(plan: Plan) -> str:
    """`<plan name>-<8 hex digits of the plan's hash>`: a changed plan gets a new study."""
    return f"{plan.name}-{plan.digest()[:8]}"


@contextlib.contextmanager
def optuna_quiet() -> Iterator[None]:
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@dataclass(frozen=True)
class StudySettings:
    """Decided once when the study is created and stored in it (user attribute `oneday`)."""

    plan_hash: str
    plan_name: str
    proxy: ProxySpec
    space: SearchSpace
    n_trials: int
    budget_seconds: float
    seed: int
    default_params: TrialParams
    cap: float
    created: str
    check_width: int | None = None
    check_seconds: float = 0.0  # measured estimate of the transfer check's three runs
    schedule_note: str = ""  # why the schedule is (not) searched and transferred
    format: int = STUDY_FORMAT

    def pruner(self) -> TolerantHalvingPruner:
        return TolerantHalvingPruner(min_resource=max(1, math.ceil(PRUNE_AT * self.proxy.steps)))

    def check_reserve(self, budget_seconds: float) -> float:
        """Seconds kept for the transfer check out of `budget_seconds`: its share, or its measured cost (with
        a 10% margin) when that is more."""
        return max(CHECK_SHARE * budget_seconds, 1.1 * self.check_seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "plan_hash": self.plan_hash, "plan_name": self.plan_name,
                "proxy": self.proxy.to_dict(), "space": self.space.to_dict(), "n_trials": self.n_trials,
                "budget_seconds": self.budget_seconds, "seed": self.seed,
                "default_params": self.default_params.to_dict(), "cap": self.cap, "created": self.created,
                "check_width": self.check_width, "check_seconds": self.check_seconds,
                "schedule_note": self.schedule_note}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StudySettings:
        if raw.get("format") != STUDY_FORMAT:
            raise UserError(f"this study was made by another oneday (study format {raw.get('format')!r}, "
                            f"this one uses {STUDY_FORMAT}); start a new one with --study NAME")
        return cls(plan_hash=raw["plan_hash"], plan_name=raw["plan_name"], proxy=ProxySpec.from_dict(raw["proxy"]),
                   space=SearchSpace.from_dict(raw["space"]), n_trials=int(raw["n_trials"]),
                   budget_seconds=float(raw["budget_seconds"]), seed=int(raw["seed"]),
                   default_params=TrialParams.from_dict(raw["default_params"]), cap=float(raw["cap"]),
                   created=raw["created"], check_width=raw.get("check_width"),
                   check_seconds=float(raw.get("check_seconds") or 0.0), schedule_note=raw.get("schedule_note", ""))


def sampler_for(settings: StudySettings, study: optuna.Study | None, *, worker: bool) -> optuna.samplers.TPESampler:
    existing = len(study.get_trials(deepcopy=False)) if study is not None else 0
    seed = settings.seed + existing + (os.getpid() % 100_000) * 1000 * worker
    startup = min(10, max(3, settings.n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def _trials_cost_note(n_trials: int, *, budget_seconds: float, plan: Plan) -> str:
    """What --trials without --hours costs, against the plan's budget: `4 trials need ~12m (measuring and
    transfer check included), 20% of the plan's 1h budget`."""
    share = budget_seconds / plan.train.budget_seconds
    over = f"; more than the default {DEFAULT_TUNE_SHARE:.0%}" if share > DEFAULT_TUNE_SHARE else ""
    return (f"{n_trials} trial{'' if n_trials == 1 else 's'} need{'s' if n_trials == 1 else ''} "
            f"~{human_seconds(budget_seconds)} (measuring and transfer check included), {share:.0%} of the plan's "
            f"{human_seconds(plan.train.budget_seconds)} budget{over}")


def _round_up(value: float) -> float:
    """`value` rounded up to two significant digits (a least budget must not be shown below itself)."""
    if value <= 0:
        return value
    unit = 10.0 ** (math.floor(math.log10(value)) - 1)
    return math.ceil(value / unit - 1e-9) * unit


def check_budget_args(*, trials: int | None, hours: float | None) -> None:
    if trials is not None and trials < 1:
        raise UserError(f"--trials: must be at least 1, got {trials}")
    if trials is not None and trials > MAX_TRIALS:
        raise UserError(f"--trials: at most {MAX_TRIALS}, got {trials}")
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise UserError(f"--hours: must be a positive number, got {hours:g}")


def _budget_for(n_trials: int, *, trial_seconds: float, check_reserve: float, spent: float) -> float:
    """The tuning budget (seconds, as --hours would give it) that pays for the measuring already `spent`, the
    transfer check and `n_trials` trials: the check keeps its share of the budget, or its reserve when that is
    more."""
    trials_seconds = spent + n_trials * trial_seconds
    return max(trials_seconds / (1.0 - CHECK_SHARE), trials_seconds + check_reserve)


def _decide(plan: Plan, data: RunData, *, trials: int | None, hours: float | None, seed: int, beta2: bool,
            weight_decay: bool, schedule: str, clock: Callable[[], float]) -> StudySettings:
    """Size the proxy and the number of trials for a new study (module docstring, "Budget")."""
    started = clock()
    # --trials without --hours asks for that many trials: the budget becomes what they cost (sized below).
    sized_to_trials = trials is not None and hours is None
    budget = hours * 3600.0 if hours is not None else DEFAULT_TUNE_SHARE * plan.train.budget_seconds
    trial_budget = budget * (1.0 - CHECK_SHARE)
    where = f"--hours {hours:g} ({budget:.3g} s)" if hours is not None else (
        f"the default tuning budget, {DEFAULT_TUNE_SHARE:.0%} of the plan's {plan.train.budget_seconds:.0f} s "
        f"({budget:.0f} s),")
    # With --trials the slice is the budget / trials. Without, the proxy is sized for DEFAULT_TRIALS slices;
    # when even the narrowest proxy does not fit one, it is kept narrowest (more trials beat a wider proxy:
    # TPE needs points) with its steps cut to fit a quarter of the budget, or the whole budget.
    narrowest = proxy_widths(plan.model)[0]
    attempts = [(trials, None)] if trials is not None else [
        (DEFAULT_TRIALS, None), (max(1, DEFAULT_TRIALS // 4), narrowest), (1, narrowest)]
    timings: dict[int, Any] = {}
    proxy = None
    for planned, max_width in attempts:
        slice_seconds = trial_budget / planned
        try:
            proxy = size_proxy(plan, data, slice_seconds=slice_seconds, threads=plan.train.threads,
                               max_width=max_width, timings=timings, clock=clock)
            break
        except BudgetTooSmallError as exc:
            if sized_to_trials:
                # The default slice cannot pay for one of the trials asked for: each gets the shortest trial on
                # the narrowest proxy, the cheapest that may rank learning rates, and the budget grows to match.
                slice_seconds = exc.trial_seconds
                proxy = size_proxy(plan, data, slice_seconds=slice_seconds, threads=plan.train.threads,
                                   max_width=narrowest, timings=timings, clock=clock)
                break
            if planned == attempts[-1][0]:
                what = "one trial" if trials is None else f"--trials {trials}"
                if trials is None:
                    hint = "give more --hours"
                else:
                    least = _budget_for(trials, trial_seconds=exc.trial_seconds, check_reserve=0.0,
                                        spent=clock() - started)
                    hint = f"give fewer --trials, or at least --hours {_round_up(least / 3600.0):.2g} for {trials}"
                raise UserError(f"{where} is too small for {what} ({trial_budget:.3g} s after the transfer "
                                f"check's {CHECK_SHARE:.0%}): {exc}; {hint}") from None
    assert proxy is not None
    # The transfer check's width, and its cost measured (small widths cost far less than FLOPs say).
    width = check_width(proxy, plan.model, budget_seconds=CHECK_SHARE * budget)
    check_cost = 0.0
    if width is not None:
        timing = timings.get(width) or measure_step(check_model(plan.model, proxy, width), plan, data,
                                                    eval_tokens=proxy.eval_tokens, threads=plan.train.threads,
                                                    clock=clock)
        check_cost = check_seconds(proxy, timing)
    check_reserve = 1.1 * check_cost
    trial_budget = budget - max(CHECK_SHARE * budget, check_reserve)
    per_trial = proxy.trial_seconds()
    if trials is None:
        spent = clock() - started  # the measuring came out of the budget

        def hours_for(n: int) -> float:
            """About the --hours that pay for the measuring, the transfer check and n trials, at the proxy's
            full horizon (a bigger budget no longer cuts its steps; trials and check scale with them)."""
            scale = proxy_steps(plan, proxy.model) / proxy.steps
            return _budget_for(n, trial_seconds=scale * per_trial, check_reserve=scale * check_reserve,
                               spent=spent) / 3600.0

        fits = int((trial_budget - spent) // per_trial)
        check_note = f"the transfer check's {max(CHECK_SHARE * budget, check_reserve):.3g} s"
        if fits < 1:
            raise UserError(
                f"{where} is too small for one trial ({trial_budget - spent:.3g} s left after measuring and "
                f"{check_note}): a trial on the narrowest proxy ({proxy.label()}, {proxy.steps} steps) takes "
                f"{per_trial:.1f} s; about --hours {hours_for(2 * FEW_TRIALS):.2g} would give {2 * FEW_TRIALS}")
        n_trials = min(MAX_AUTO_TRIALS, fits)
        if n_trials < FEW_TRIALS:
            log.warning("%s pays for only %d trial%s of %s (%d steps, ~%.1f s each) after measuring and %s: too "
                        "few to search; about --hours %.2g would give %d", where, n_trials,
                        "" if n_trials == 1 else "s", proxy.label(), proxy.steps, per_trial, check_note,
                        hours_for(2 * FEW_TRIALS), 2 * FEW_TRIALS)
    else:
        n_trials = trials
    if sized_to_trials:
        budget = _budget_for(n_trials, trial_seconds=per_trial, check_reserve=check_reserve, spent=clock() - started)
        log.log(logging.WARNING if budget > DEFAULT_TUNE_SHARE * plan.train.budget_seconds else logging.INFO,
                "%s", _trials_cost_note(n_trials, budget_seconds=budget, plan=plan))
    if per_trial > 1.5 * slice_seconds:
        log.warning("a trial takes ~%.0f s, more than its slice of %.0f s: the tuning will overrun its budget",
                    per_trial, slice_seconds)
    proxy_hc = proxy.horizon_correction()
    default = TrialParams(lr=plan.train.lr / proxy_hc, warmup_fraction=plan.train.warmup_fraction,
                          cooldown_fraction=plan.train.cooldown_fraction,
                          beta2=plan.train.beta2 if beta2 else None,
                          weight_decay=plan.train.weight_decay if weight_decay else None)
    search_schedule, schedule_note = schedule_rule(proxy.steps, plan.train.planned_steps, schedule)
    space = SearchSpace.around(default, schedule=search_schedule, beta2=beta2, weight_decay=weight_decay)
    return StudySettings(
        plan_hash=plan.digest(), plan_name=plan.name, proxy=proxy, space=space, n_trials=n_trials,
        budget_seconds=budget, seed=seed, default_params=default, cap=capped_loss(plan.model.vocab_size),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), check_width=width,
        check_seconds=check_cost, schedule_note=schedule_note,
    )


def load_study(storage: BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def settings_of(study: optuna.Study, plan: Plan, *, name: str) -> StudySettings:
    raw = study.user_attrs.get(ATTR)
    if raw is None:
        raise UserError(f"study {name} was not made by `oneday tune` (it has no oneday settings); "
                        "use another --study name")
    settings = StudySettings.from_dict(raw)
    if settings.plan_hash != plan.digest():
        raise UserError(f"study {name} was made for another plan ({settings.plan_name}, hash {settings.plan_hash}); "
                        "tune this plan under another --study name")
    return settings


def open_study(
    plan: Plan,
    data: RunData,
    *,
    storage: str,
    name: str,
    trials: int | None,
    hours: float | None,
    seed: int,
    beta2: bool = False,
    weight_decay: bool = False,
    schedule: str = "auto",
    on_sizing: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[optuna.Study, StudySettings, bool]:
    """Load the study from `storage` (an RDB URL or a journal file), or size the proxy and create it (once,
    before any trial): (study, settings, created). `on_sizing` is called before a new study's proxy is measured.
    The planner's default is enqueued as the first trial of a new study. A storage that does not exist yet is
    only created once the budget is known to pay for the trials: a refusal leaves nothing behind."""
    check_storage(storage)
    backend = open_storage(storage) if storage_exists(storage) else None
    study = load_study(backend, name) if backend is not None else None
    created = False
    if study is None or ATTR not in study.user_attrs:
        if on_sizing is not None:
            on_sizing()
        settings = _decide(plan, data, trials=trials, hours=hours, seed=seed, beta2=beta2,
                           weight_decay=weight_decay, schedule=schedule, clock=clock)
        if backend is None:
            backend = open_storage(storage)
        with optuna_quiet():
            study = optuna.create_study(storage=backend, study_name=name, direction="minimize", load_if_exists=True,
                                        sampler=sampler_for(settings, None, worker=False), pruner=settings.pruner())
        if ATTR not in study.user_attrs:  # another creator may have won the race: keep its settings
            study.set_user_attr(ATTR, settings.to_dict())
            study.enqueue_trial(settings.space.enqueue_params(settings.default_params),
                                user_attrs={"note": "planner default"}, skip_if_exists=True)
            created = True
        study = optuna.load_study(study_name=name, storage=backend)
    settings = settings_of(study, plan, name=name)
    if not created and trials is not None and trials != settings.n_trials:
        if trials > settings.n_trials:
            log.info("study %s: raising its number of trials from %d to %d", name, settings.n_trials, trials)
        settings = replace(settings, n_trials=trials)
        study.set_user_attr(ATTR, settings.to_dict())
    study.sampler = sampler_for(settings, study, worker=False)
    study.pruner = settings.pruner()
    return study, settings, created


__all__ = ["ATTR", "DEFAULT_TRIALS", "StudySettings", "check_budget_args", "default_study_name", "load_study",
           "open_study", "optuna_quiet", "sampler_for", "settings_of"]
