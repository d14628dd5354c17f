"""`oneday tune`: an Optuna study of the LR and schedule on μP proxies, carried to the planned run
(docs/design.md, Tuning).

`tune_plan(PLAN)` does everything: opens (or creates) the study, runs trials until the budget is spent, checks
the transfer and writes `plan.tuned.json`; `run_worker(PLAN)` only runs trials of an existing study (`oneday tune
--worker`, on as many processes or machines as share the storage); `prepare_study` creates a study for workers
without running a trial. `--hours` is also this command's deadline: no trial starts that would not end before it.
Two workers can both start the last missing trial: a study may end with one trial more per extra worker.

The rooms: `space` (what is searched), `study` (the settings, budget, sampler, pruner), `storage` (where the study
lives, dead trials), `trials` (the objective), `proxy` and `short_run` (the proxy and one run on it),
`transfer` (from the proxy to the plan), `results`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from oneday.errors import UserError
from oneday.paths import check_output_path
from oneday.plan import Plan, load_plan
from oneday.studies.results import TrialResult, TuneResult
from oneday.studies.short_run import RunData, load_run_data
from oneday.studies.space import schedule_rule
from oneday.studies.storage import (
    HOST,
    check_storage,
    default_storage,
    describe_storage,
    fail_dead_trials,
    open_storage,
    storage_exists,
)
from oneday.studies.study import (
    ATTR,
    StudySettings,
    check_budget_args,
    default_study_name,
    load_study,
    open_study,
    sampler_for,
    settings_of,
)
from oneday.studies.transfer import finish_study
from oneday.studies.trials import TrialCallback, TrialContext, run_trials
from oneday.tracking.study import StudyTracker

log = logging.getLogger(__name__)


WORKER_WAIT_SECONDS = 600.0
FINISH_SECONDS = 2.0
MLFLOW_ATTR = "oneday_mlflow"


def _worker_id() -> str:
    """How trials name the process that ran them."""
    return f"{HOST}:{os.getpid()}"


def _tracker(plan: Plan, *, tracking_uri: str | None, study_name: str) -> StudyTracker:
    from oneday.tracking.names import experiment_name
    from oneday.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    return StudyTracker(uri, experiment_name(plan), plan_hash=plan.digest(), plan_name=plan.name,
                        device=plan.train.device, study=study_name)


def _parent_run(study: optuna.Study, tracker: StudyTracker, plan: Plan, *, create: bool) -> str | None:
    stored = study.user_attrs.get(MLFLOW_ATTR) or {}
    resume = stored.get("run_id") if stored.get("uri") == tracker.uri else None
    if not create:
        return resume
    params = {**plan.flat_params(), "tune.study": tracker.study}
    run_id = tracker.start_parent(run_name=f"tune-{plan.name}", params=params, resume_run_id=resume)
    if run_id is not None and run_id != resume:
        study.set_user_attr(MLFLOW_ATTR, {"uri": tracker.uri, "run_id": run_id})
    return run_id


def _plan_and_data(plan_path: str | os.PathLike[str]) -> tuple[Path, Plan, RunData]:
    path = Path(plan_path).expanduser()
    plan = load_plan(path)
    if plan.train.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{path}: this plan was made for cuda ({plan.hardware.name}) and this machine has no "
                            "GPU that torch can use; tune on the machine that will run the plan")
    return path, plan, load_run_data(plan)


def run_worker(
    plan_path: str | os.PathLike[str],
    *,
    storage: str | None = None,
    study_name: str | None = None,
    tracking_uri: str | None = None,
    hours: float | None = None,
    wait_seconds: float = WORKER_WAIT_SECONDS,
    on_trial: TrialCallback | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[TrialResult]:
    """Run trials of an existing study (waiting up to `wait_seconds` for it to be created) until it holds its
    number of trials or `hours` pass; no transfer check, no output plan. The trials this worker ran."""
    started = clock()
    check_budget_args(trials=None, hours=hours)
    path, plan, data = _plan_and_data(plan_path)
    storage_url = storage or default_storage(path)
    check_storage(storage_url)
    name = study_name or default_study_name(plan)
    # A journal that does not exist yet is left for `oneday tune` to create: a worker that gives up waiting
    # leaves no empty file behind.
    backend = open_storage(storage_url) if storage_exists(storage_url) else None
    study = load_study(backend, name) if backend is not None else None
    while study is None or ATTR not in study.user_attrs:
        if clock() - started > wait_seconds:
            raise UserError(f"no study {name} in {describe_storage(storage_url)} after {wait_seconds:.0f} s; start "
                            "`oneday tune` (without --worker) first: it creates the study")
        log.info("waiting for study %s to be created in %s", name, describe_storage(storage_url))
        time.sleep(min(2.0, max(0.1, wait_seconds / 10)))
        if backend is None and storage_exists(storage_url):
            backend = open_storage(storage_url)
        study = load_study(backend, name) if backend is not None else None
    settings = settings_of(study, plan, name=name)
    study.sampler = sampler_for(settings, study, worker=True)
    study.pruner = settings.pruner()
    tracker = _tracker(plan, tracking_uri=tracking_uri, study_name=name)
    ctx = TrialContext(plan=plan, settings=settings, data=data, tracker=tracker,
                   parent_run_id=_parent_run(study, tracker, plan, create=False),
                   worker_id=_worker_id(), on_trial=on_trial, clock=clock)
    deadline = started + hours * 3600.0 if hours is not None else None
    run_trials(study, ctx, deadline=deadline)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [TrialResult.from_frozen(trials[n]) for n in ctx.numbers if n in trials]


def tune_plan(
    plan_path: str | os.PathLike[str],
    *,
    trials: int | None = None,
    hours: float | None = None,
    out: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    beta2: bool = False,
    weight_decay: bool = False,
    command: str = "",
    schedule: str = "auto",
    on_trial: TrialCallback | None = None,
    on_stage: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TuneResult:
    """Tune `plan_path` (module docstring) and write the tuned plan to `out` (default `<plan>.tuned.json`).

    `schedule`: whether warmup/cooldown are searched and put into the plan ("auto": only when the proxy's
    trials are not much shorter in steps than the target's run; "transfer"; "keep"; see `schedule_rule`).
    It is decided when the study is created.
    `on_trial` gets a `TrialResult` when a trial starts (state "running") and when it ends; `on_stage` a
    line when a stage starts (measuring, trials, waiting for workers, transfer check). Every problem the user
    can fix is a `UserError` raised before trials start.
    """

    started = clock()
    stage = on_stage or (lambda text: log.info("%s", text))
    check_budget_args(trials=trials, hours=hours)
    schedule_rule(1, 1, schedule)  # a bad mode is an error before anything runs
    path, plan, data = _plan_and_data(plan_path)
    out_path = check_output_path(out if out is not None else path.with_name(f"{path.stem}.tuned.json"))
    storage_url = storage or default_storage(path)
    name = study_name or default_study_name(plan)
    stage(f"study {name} in {describe_storage(storage_url)}")
    study, settings, created = open_study(
        plan, data, storage=storage_url, name=name, trials=trials, hours=hours, seed=seed, beta2=beta2,
        weight_decay=weight_decay, schedule=schedule,
        on_sizing=lambda: stage("measuring proxy step times to size the trials"), clock=clock)
    proxy = settings.proxy
    stage(f"{'created' if created else 'continuing'} study {name}: {settings.n_trials} trials on a proxy "
          f"{proxy.label()}, {proxy.steps} steps ({proxy.tokens():,} tokens) each, ~{proxy.trial_seconds():.1f} s "
          "a trial")
    tracker = _tracker(plan, tracking_uri=tracking_uri, study_name=name)
    parent = _parent_run(study, tracker, plan, create=True)
    ctx = TrialContext(plan=plan, settings=settings, data=data, tracker=tracker, parent_run_id=parent,
                   worker_id=_worker_id(), on_trial=on_trial, clock=clock)
    # --hours is this command's deadline: trials stop in time for the transfer check (its share of the budget,
    # or its estimated cost when that is more) and the writing of the outputs.
    deadline = None
    if hours is not None:
        deadline = started + hours * 3600.0 - settings.check_reserve(hours * 3600.0) - FINISH_SECONDS
    completed = False
    try:
        run_trials(study, ctx, deadline=deadline)
        if _wait_for_workers(study, settings, stage=stage, clock=clock):
            run_trials(study, ctx, deadline=deadline)  # a worker died while we waited: its trial is run here
        result = finish_study(
            study, plan, settings, data, out=out_path, storage=describe_storage(storage_url), study_name=name,
            tracker=tracker, parent_run_id=parent, command=command, started=started, stage=stage, clock=clock)
        completed = True
        return result
    finally:
        if not completed and parent is not None:
            tracker.end(parent, status="KILLED")


def prepare_study(
    plan_path: str | os.PathLike[str],
    *,
    trials: int | None = None,
    hours: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    tracking_uri: str | None = None,
    seed: int = 0,
    beta2: bool = False,
    weight_decay: bool = False,
    schedule: str = "auto",
    clock: Callable[[], float] = time.monotonic,
) -> tuple[str, StudySettings]:
    """Create the study (sizing its proxy) and its MLflow parent run without running a trial, so that workers
    can start on it; (study name, settings). `tune_plan` on the same study later runs, checks and writes."""
    check_budget_args(trials=trials, hours=hours)
    path, plan, data = _plan_and_data(plan_path)
    name = study_name or default_study_name(plan)
    study, settings, _created = open_study(plan, data, storage=storage or default_storage(path), name=name,
                                           trials=trials, hours=hours, seed=seed, beta2=beta2,
                                           weight_decay=weight_decay, schedule=schedule, clock=clock)
    tracker = _tracker(plan, tracking_uri=tracking_uri, study_name=name)
    _parent_run(study, tracker, plan, create=True)
    return name, settings


def _wait_for_workers(study: optuna.Study, settings: StudySettings, *, stage: Callable[[str], None],
                      clock: Callable[[], float]) -> bool:
    """Wait (bounded) for trials other workers are still running, so the choice sees them. True when one of
    them was failed meanwhile (its process died here, or its heartbeat went stale on another machine)."""
    limit = clock() + 2 * settings.proxy.trial_seconds() + 30.0
    said = False
    died = False
    while clock() < limit:
        died = bool(fail_dead_trials(study)) or died
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return died
        if not said:
            stage(f"waiting for {len(running)} trial(s) of other workers to finish")
            said = True
        time.sleep(1.0)
    log.warning("going on without the trials still running in other workers")
    return died


__all__ = ["prepare_study", "run_worker", "tune_plan"]
