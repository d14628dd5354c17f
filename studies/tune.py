"""`oneday tune`: an Optuna study of the LR and schedule on μP proxies, carried to the planned run (DESIGN §5).

`tune_plan(PLAN)` does everything: opens (or creates) the study, runs trials until the budget is spent,
checks the transfer and writes `plan.tuned.json`; `run_worker(PLAN)` only runs trials of an existing study
(`oneday tune --worker`, on as many processes or machines as share the storage).

The study
---------
- Sampler: TPE (Bergstra et al. 2011), seeded; multivariate (Optuna 5's default for one objective) with
  the constant liar (running trials of other workers count as bad guesses, so workers spread out). Its random
  start-up is a third of the planned trials (3–10) instead of Optuna's 10: studies here are small. The seed is
  offset by the number of trials already in the study (a restart does not replay the same random points) and,
  in a worker, by its process id (two workers do not propose the same point).
- Search space (`SearchSpace`): the proxy's base LR log-uniform over ×/÷`LR_SPAN` around the planner's default
  (moved to the proxy's horizon, below); warmup fraction uniform in [0, 0.2] and cooldown fraction in
  [0.1, 0.6] when the schedule transfers (`schedule_rule`: a trial runs at least half the target's steps, or
  `--schedule transfer`), else the trials run the planner's warmup and cooldown and only the LR is searched;
  optionally 1−β₂ (log-uniform in [0.001, 0.1]) and weight decay (log-uniform in [0.001, 0.3]).
- The first trial is the planner's own choice, enqueued: its LR divided by the horizon correction (so that
  choosing it gives back exactly the planner's LR for the target), its warmup and cooldown.
- Pruning on the intermediate validation loss: `pruning.TolerantHalvingPruner` (successive halving at ~45%
  of a trial, η = 2, 2% tolerance), reported from the loop's `on_eval` through the trial; a pruned trial's run
  is ended with the loop's stop event.
- A diverged trial (non-finite losses, a loss above `capped_loss` = ln(vocab) + 1, or the loop's
  `DivergedError`) completes with that capped value, never NaN: NaN would mark it FAIL and TPE would learn
  nothing from it. It is marked `diverged` (a user attribute).
- A trial that raises is marked FAIL and the study goes on (at most `max(3, n/2)` failures a process). A
  trial whose process died (killed, power loss) stays RUNNING in the storage; every start marks the RUNNING
  trials of dead processes on this host as FAIL (host, pid and process start time are trial attributes);
  an RDB storage also runs Optuna's heartbeat (60 s, stale after 180 s), which covers other machines.

Budget
------
`--trials N`: N trials that finish (complete or pruned) in the study in total; a restarted `oneday tune`
runs only the missing ones. Each trial is sized (`proxy.size_proxy`) to a slice of the tuning budget: by
default `DEFAULT_TUNE_SHARE` (20%) of the plan's budget, `--hours` when given; `CHECK_SHARE` (20%) of it is
kept for the transfer check. Without `--trials` the number of trials is what fits the budget: the proxy is
sized for `DEFAULT_TRIALS` slices; when not even the narrowest proxy fits one, the narrowest is used with its
steps cut to fit a quarter of the budget (or all of it); then as many trials as fit, at most
`MAX_AUTO_TRIALS`. `--hours` is also this command's deadline: no trial starts that would not end before it.
A budget that cannot pay for one trial of `MIN_TRIAL_STEPS` steps is an error; one that pays for fewer than
`FEW_TRIALS` draws a warning naming the `--hours` that would give twice as many. The proxy and the number of
trials are decided once, when the study is created, and stored in it; `--trials` on a later start changes
the number.

Storage
-------
By default a journal file beside the plan (`<plan>.tune.journal`, Optuna's `JournalFileBackend`: appends
under a file lock, so several local processes share it safely). `--storage` takes an RDB URL
(`postgresql://…`, `mysql://…`, `sqlite:///…`) or a journal file path. The study is created once, before any
trial runs (`create_study(load_if_exists=True)`); workers only load it and wait for it when it does not exist
yet, so no two processes race to create the same new study ("UNIQUE constraint failed"). Two workers can
still both start the last missing trial: a study may end with one trial more per extra worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from oneday import signals
from oneday.errors import UserError
from oneday.paths import check_output_path
from oneday.plan import Plan, load_plan
from oneday.runner.records import FanOut
from oneday.studies.proxy import (
    BudgetTooSmallError,
    ProxySpec,
    RunData,
    TrialParams,
    capped_loss,
    check_model,
    check_seconds,
    check_width,
    load_run_data,
    measure_step,
    proxy_steps,
    proxy_widths,
    short_run,
    size_proxy,
)
from oneday.studies.pruning import TolerantHalvingPruner
from oneday.tracking.study import (
    STATUS_OF_STATE,
    TAG_TRIAL_NUMBER,
    TAG_TRIAL_STATE,
    StudyTracker,
    TrialCurve,
)

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 16
MAX_TRIALS = 200
MAX_AUTO_TRIALS = 64
FEW_TRIALS = 6
"""Fewer trials than this, fitted to the budget, leave TPE little to search with: the command warns."""
DEFAULT_TUNE_SHARE = 0.2
CHECK_SHARE = 0.2
LR_SPAN = 5.0
PRUNE_AT = 0.45
WORKER_WAIT_SECONDS = 600.0
FINISH_SECONDS = 2.0
"""Writing the tuned plan, its plots and closing the MLflow run."""
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
ATTR = "oneday"
MLFLOW_ATTR = "oneday_mlflow"
STUDY_FORMAT = 1

TrialCallback = Callable[["TrialResult"], None]


# ------------------------------------------------------------------------------------------------------------
# Search space


SCHEDULE_MIN_STEP_RATIO = 0.5


def schedule_rule(proxy_steps: int, target_steps: int, mode: str = "auto") -> tuple[bool, str]:
    """Whether the warmup/cooldown fractions are searched on the proxy and put into the plan, and why.

    "transfer"/"keep" force it; "auto" does it only when a trial runs at least `SCHEDULE_MIN_STEP_RATIO` of
    the target's steps. Schedule fractions found on a much shorter run do not carry over: a short run wants a
    short warmup and a long cooldown (a warmup of a few steps wastes less of it, annealing is a larger part of
    its gain), and the target then spends too long cooling down. Measured (bench/tune_transfer.py, a 34-step
    proxy, an 825-step target): the tuned LR with the proxy's best schedule (warmup 0.036, cooldown 0.447)
    reached 3.327 nats, with the planner's (0.1, 0.2) 3.240 (the LR grid's best: 3.241); the cooldown alone
    cost 1.9%. When the schedule is not transferred it is not searched either: the LR is then tuned under the
    schedule the plan will run (an LR tuned with a long cooldown is a different LR).
    """
    if mode not in ("auto", "transfer", "keep"):
        raise UserError(f"--schedule: must be auto, transfer or keep, got {mode!r}")
    ratio = proxy_steps / max(1, target_steps)
    if mode == "transfer":
        return True, "asked for (--schedule transfer)"
    if mode == "keep":
        return False, "asked for (--schedule keep): the planner's warmup and cooldown, LR tuned under them"
    if ratio >= SCHEDULE_MIN_STEP_RATIO:
        return True, f"a trial runs {ratio:.0%} of the target's steps"
    return False, (f"a trial runs {proxy_steps} steps, {ratio:.1%} of the target's {target_steps}: schedule "
                   "fractions found on so short a run do not carry over (they favour a short warmup and a long "
                   "cooldown), so the planner's warmup and cooldown are kept and the LR is tuned under them")


@dataclass(frozen=True)
class SearchSpace:
    """The ranges a study samples; stored in the study so every worker samples the same distributions.
    `warmup`/`cooldown` None: not searched, the trials run `fixed_warmup`/`fixed_cooldown` (the planner's)."""

    lr_low: float
    lr_high: float
    fixed_warmup: float
    fixed_cooldown: float
    warmup: tuple[float, float] | None = (0.0, 0.2)
    cooldown: tuple[float, float] | None = (0.1, 0.6)
    one_minus_beta2: tuple[float, float] | None = None
    weight_decay: tuple[float, float] | None = None

    @classmethod
    def around(cls, default: TrialParams, *, schedule: bool = True, beta2: bool = False,
               weight_decay: bool = False) -> SearchSpace:
        low = max(1e-6, default.lr / LR_SPAN)
        high = min(0.5, default.lr * LR_SPAN)
        space = cls(lr_low=low, lr_high=max(high, low * 1.01), fixed_warmup=default.warmup_fraction,
                    fixed_cooldown=default.cooldown_fraction, one_minus_beta2=(1e-3, 0.1) if beta2 else None,
                    weight_decay=(1e-3, 0.3) if weight_decay else None)
        return space if schedule else replace(space, warmup=None, cooldown=None)

    @property
    def schedule(self) -> bool:
        return self.warmup is not None

    def suggest(self, trial: optuna.Trial) -> TrialParams:
        lr = trial.suggest_float("lr", self.lr_low, self.lr_high, log=True)
        warmup = trial.suggest_float("warmup_fraction", *self.warmup) if self.warmup else self.fixed_warmup
        cooldown = trial.suggest_float("cooldown_fraction", *self.cooldown) if self.cooldown else self.fixed_cooldown
        beta2 = None
        if self.one_minus_beta2 is not None:
            beta2 = 1.0 - trial.suggest_float("one_minus_beta2", *self.one_minus_beta2, log=True)
        wd = None
        if self.weight_decay is not None:
            wd = trial.suggest_float("weight_decay", *self.weight_decay, log=True)
        return TrialParams(lr=lr, warmup_fraction=warmup, cooldown_fraction=cooldown, beta2=beta2, weight_decay=wd)

    def enqueue_params(self, params: TrialParams) -> dict[str, float]:
        """`params` as Optuna parameters, clipped into the ranges (for `enqueue_trial`)."""
        def clip(x: float, lo_hi: tuple[float, float]) -> float:
            return min(max(x, lo_hi[0]), lo_hi[1])

        out = {"lr": clip(params.lr, (self.lr_low, self.lr_high))}
        if self.warmup is not None:
            out["warmup_fraction"] = clip(params.warmup_fraction, self.warmup)
        if self.cooldown is not None:
            out["cooldown_fraction"] = clip(params.cooldown_fraction, self.cooldown)
        if self.one_minus_beta2 is not None and params.beta2 is not None:
            out["one_minus_beta2"] = clip(1.0 - params.beta2, self.one_minus_beta2)
        if self.weight_decay is not None and params.weight_decay is not None:
            out["weight_decay"] = clip(params.weight_decay, self.weight_decay)
        return out

    def params_of(self, raw: dict[str, Any]) -> TrialParams:
        """TrialParams from a trial's Optuna parameters (fixed values for what is not searched)."""
        beta2 = 1.0 - raw["one_minus_beta2"] if "one_minus_beta2" in raw else None
        return TrialParams(lr=raw["lr"], warmup_fraction=raw.get("warmup_fraction", self.fixed_warmup),
                           cooldown_fraction=raw.get("cooldown_fraction", self.fixed_cooldown), beta2=beta2,
                           weight_decay=raw.get("weight_decay"))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchSpace:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


# ------------------------------------------------------------------------------------------------------------
# Results


STATE_NAMES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
               TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


@dataclass(frozen=True)
class TrialResult:
    """One trial as the console and the result show it. `value`: the final validation loss (the cap when it
    diverged), or the last reported one of a pruned trial; None when failed or running."""

    number: int
    state: str  # running, complete, pruned, failed, diverged, waiting
    params: TrialParams | None
    value: float | None = None
    step: int | None = None
    seconds: float | None = None
    worker: str = ""
    note: str = ""

    @classmethod
    def from_frozen(cls, trial: FrozenTrial) -> TrialResult:
        state = STATE_NAMES.get(trial.state, trial.state.name.lower())
        if trial.state == TrialState.COMPLETE and trial.user_attrs.get("diverged"):
            state = "diverged"
        value = trial.value
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        seconds = None
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        raw = trial.user_attrs.get("params")
        params = TrialParams.from_dict(raw) if isinstance(raw, dict) and "lr" in raw else None
        note = str(trial.user_attrs.get("note") or trial.user_attrs.get("error") or "")
        return cls(number=trial.number, state=state, params=params,
                   value=value if value is not None and math.isfinite(value) else None,
                   step=trial.last_step, seconds=seconds, worker=str(trial.user_attrs.get("worker", "")), note=note)


@dataclass(frozen=True)
class TransferCheck:
    """Short runs at a width between the proxy and the target, at the proxy's horizon, with η*/2, η*, 2η*."""

    width: int
    steps: int
    multipliers: tuple[float, ...]
    lrs: tuple[float, ...]
    losses: tuple[float, ...]  # capped: a diverged run shows the cap
    diverged: tuple[bool, ...]
    seconds: float

    def best_multiplier(self) -> float:
        return self.multipliers[min(range(len(self.losses)), key=lambda i: self.losses[i])]

    def ok(self) -> bool:
        """η* (multiplier 1) is the best of the three."""
        return self.best_multiplier() == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width, "steps": self.steps, "seconds": round(self.seconds, 2),
            "runs": [{"multiplier": m, "lr": lr, "loss": round(loss, 5), "diverged": d}
                     for m, lr, loss, d in zip(self.multipliers, self.lrs, self.losses, self.diverged, strict=True)],
            "best_multiplier": self.best_multiplier(), "ok": self.ok(),
        }


@dataclass(frozen=True)
class TuneResult:
    """What `tune_plan` did and decided."""

    study: str
    storage: str
    proxy: ProxySpec
    trials: tuple[TrialResult, ...]
    best: TrialResult | None
    default_lr: float
    tuned_lr: float
    all_diverged: bool
    transfer: TransferCheck | None
    out: Path | None
    plan: Plan | None
    seconds: float
    budget_seconds: float
    warnings: tuple[str, ...] = ()
    mlflow_run_id: str | None = None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.state] = out.get(t.state, 0) + 1
        return out

    def cost_fraction(self) -> float:
        """Wall time of this tuning over the plan's budget."""
        return self.seconds / self.budget_seconds if self.budget_seconds > 0 else math.nan


# ------------------------------------------------------------------------------------------------------------
# Storage


def default_storage(plan_path: Path) -> str:
    """The journal file beside the plan: `plan.json` -> `plan.tune.journal`."""
    return str(plan_path.with_name(f"{plan_path.stem}.tune.journal").resolve())


def _is_url(storage: str) -> bool:
    return "://" in storage


def describe_storage(storage: str) -> str:
    """The storage as recorded in a plan: a URL with its password hidden, or the journal file's path."""
    if not _is_url(storage):
        return str(Path(storage).expanduser().resolve())
    try:
        from sqlalchemy.engine import make_url

        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("@")[-1] if "@" in storage else storage


def open_storage(storage: str) -> BaseStorage:
    """An Optuna storage for `storage` (RDB URL or journal file path); a `UserError` (one line) when it
    cannot be opened: no driver, no server, a bad URL, a folder that does not exist."""
    shown = describe_storage(storage)
    if not _is_url(storage):
        path = Path(storage).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"--storage {shown}: the folder {path.parent} does not exist")
        if path.is_dir():
            raise UserError(f"--storage {shown}: is a folder; give a journal file name or an RDB URL")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise UserError(f"--storage {shown}: cannot open the journal file ({exc.strerror or exc})") from None
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if storage.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    try:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS,
                              grace_period=GRACE_SECONDS)
    except ModuleNotFoundError as exc:
        raise UserError(f"--storage {shown}: the database driver is not installed ({exc}); install it, e.g. "
                        "`pip install psycopg2-binary` for PostgreSQL") from None
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--storage {shown}: cannot open the study storage ({text[:300]})") from None


def default_study_name(plan: Plan) -> str:
    """`<plan name>-<8 hex digits of the plan's hash>`: a changed plan gets a new study."""
    return f"{plan.name}-{plan.digest()[:8]}"


# ------------------------------------------------------------------------------------------------------------
# Processes


def _start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if ticks is not None:
        now = _start_ticks(pid)
        if now is not None and now != ticks:
            return False  # the pid was reused by another process
    return True


HOST = socket.gethostname()


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials whose process (on this host) is gone as FAIL; their numbers."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        pid = attrs.get("pid")
        if attrs.get("host") != HOST or not isinstance(pid, int) or pid == os.getpid():
            continue
        if _alive(pid, attrs.get("pid_start")):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "error", "its process died (killed or crashed)")
            if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
    if failed:
        log.warning("marked trial(s) %s as failed: their process is gone", ", ".join(map(str, failed)))
    return failed


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------------------
# The study's settings, stored in it


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


def _sampler(settings: StudySettings, study: optuna.Study | None, *, worker: bool) -> optuna.samplers.TPESampler:
    existing = len(study.get_trials(deepcopy=False)) if study is not None else 0
    seed = settings.seed + existing + (os.getpid() % 100_000) * 1000 * worker
    startup = min(10, max(3, settings.n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)


def check_budget_args(*, trials: int | None, hours: float | None) -> None:
    if trials is not None and trials < 1:
        raise UserError(f"--trials: must be at least 1, got {trials}")
    if trials is not None and trials > MAX_TRIALS:
        raise UserError(f"--trials: at most {MAX_TRIALS}, got {trials}")
    if hours is not None and not (hours > 0 and math.isfinite(hours)):
        raise UserError(f"--hours: must be a positive number, got {hours:g}")


def _decide(plan: Plan, data: RunData, *, trials: int | None, hours: float | None, seed: int, beta2: bool,
            weight_decay: bool, schedule: str, clock: Callable[[], float]) -> StudySettings:
    """Size the proxy and the number of trials for a new study (module docstring, "Budget")."""
    started = clock()
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
            if planned == attempts[-1][0]:
                what = "one trial" if planned == 1 else f"{planned} trials"
                hint = "give more --hours" if trials is None else "give fewer --trials or more --hours"
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
            check, trial = scale * check_reserve, scale * per_trial
            seconds = spent + check + n * trial
            return (seconds if CHECK_SHARE * seconds <= check else (spent + n * trial) / (1 - CHECK_SHARE)) / 3600.0

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


def _load(storage: BaseStorage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None


def _settings_of(study: optuna.Study, plan: Plan, *, name: str) -> StudySettings:
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
    storage: BaseStorage,
    name: str,
    trials: int | None,
    hours: float | None,
    seed: int,
    beta2: bool = False,
    weight_decay: bool = False,
    schedule: str = "auto",
    clock: Callable[[], float] = time.monotonic,
) -> tuple[optuna.Study, StudySettings, bool]:
    """Load the study, or size the proxy and create it (once, before any trial): (study, settings, created).
    The planner's default is enqueued as the first trial of a new study."""
    study = _load(storage, name)
    created = False
    if study is None or ATTR not in study.user_attrs:
        settings = _decide(plan, data, trials=trials, hours=hours, seed=seed, beta2=beta2,
                           weight_decay=weight_decay, schedule=schedule, clock=clock)
        with _optuna_quiet():
            study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True,
                                        sampler=_sampler(settings, None, worker=False), pruner=settings.pruner())
        if ATTR not in study.user_attrs:  # another creator may have won the race: keep its settings
            study.set_user_attr(ATTR, settings.to_dict())
            study.enqueue_trial(settings.space.enqueue_params(settings.default_params),
                                user_attrs={"note": "planner default"}, skip_if_exists=True)
            created = True
        study = optuna.load_study(study_name=name, storage=storage)
    settings = _settings_of(study, plan, name=name)
    if not created and trials is not None and trials != settings.n_trials:
        if trials > settings.n_trials:
            log.info("study %s: raising its number of trials from %d to %d", name, settings.n_trials, trials)
        settings = replace(settings, n_trials=trials)
        study.set_user_attr(ATTR, settings.to_dict())
    study.sampler = _sampler(settings, study, worker=False)
    study.pruner = settings.pruner()
    return study, settings, created


# ------------------------------------------------------------------------------------------------------------
# One trial


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
class _Context:
    plan: Plan
    settings: StudySettings
    data: RunData
    study_name: str
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


def _objective(ctx: _Context) -> Callable[[optuna.Trial], float]:
    settings = ctx.settings

    def objective(trial: optuna.Trial) -> float:
        params = settings.space.suggest(trial)
        trial.set_user_attr("params", params.to_dict())
        pid = os.getpid()
        trial.set_user_attr("host", HOST)
        trial.set_user_attr("pid", pid)
        trial.set_user_attr("pid_start", _start_ticks(pid))
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
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
    ctx: _Context,
    *,
    deadline: float | None,
    max_failures: int | None = None,
) -> None:
    """Run trials one at a time until the study holds `n_trials` finished (complete or pruned) trials, the
    deadline would be passed by another trial (a study with no finished trial yet always gets one), or this
    process has seen `max_failures` failures."""
    settings = ctx.settings
    objective = _objective(ctx)
    limit = max_failures if max_failures is not None else max(3, settings.n_trials // 2)
    per_trial = settings.proxy.trial_seconds()
    # SIGTERM unwinds like Ctrl-C, so the running trial is marked FAIL, not left RUNNING.
    with _optuna_quiet(), signals.handling((signal.SIGTERM,), signals.raise_interrupt):
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


# ------------------------------------------------------------------------------------------------------------
# Tracking set-up


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


# ------------------------------------------------------------------------------------------------------------
# Entry points


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
    backend = open_storage(storage_url)
    name = study_name or default_study_name(plan)
    study = _load(backend, name)
    while study is None or ATTR not in study.user_attrs:
        if clock() - started > wait_seconds:
            raise UserError(f"no study {name} in {describe_storage(storage_url)} after {wait_seconds:.0f} s; start "
                            "`oneday tune` (without --worker) first: it creates the study")
        log.info("waiting for study %s to be created in %s", name, describe_storage(storage_url))
        time.sleep(min(2.0, max(0.1, wait_seconds / 10)))
        study = _load(backend, name)
    settings = _settings_of(study, plan, name=name)
    study.sampler = _sampler(settings, study, worker=True)
    study.pruner = settings.pruner()
    tracker = _tracker(plan, tracking_uri=tracking_uri, study_name=name)
    ctx = _Context(plan=plan, settings=settings, data=data, study_name=name, tracker=tracker,
                   parent_run_id=_parent_run(study, tracker, plan, create=False),
                   worker_id=f"{HOST}:{os.getpid()}", on_trial=on_trial, clock=clock)
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
    from oneday.studies.transfer import finish_study

    started = clock()
    stage = on_stage or (lambda text: log.info("%s", text))
    check_budget_args(trials=trials, hours=hours)
    schedule_rule(1, 1, schedule)  # a bad mode is an error before anything runs
    path, plan, data = _plan_and_data(plan_path)
    out_path = check_output_path(out if out is not None else path.with_name(f"{path.stem}.tuned.json"))
    storage_url = storage or default_storage(path)
    backend = open_storage(storage_url)
    name = study_name or default_study_name(plan)
    stage(f"study {name} in {describe_storage(storage_url)}")
    if _load(backend, name) is None:
        stage("measuring proxy step times to size the trials")
    study, settings, created = open_study(plan, data, storage=backend, name=name, trials=trials, hours=hours,
                                          seed=seed, beta2=beta2, weight_decay=weight_decay, schedule=schedule,
                                          clock=clock)
    proxy = settings.proxy
    stage(f"{'created' if created else 'continuing'} study {name}: {settings.n_trials} trials on a proxy "
          f"{proxy.label()}, {proxy.steps} steps ({proxy.tokens():,} tokens) each, ~{proxy.trial_seconds():.1f} s "
          "a trial")
    tracker = _tracker(plan, tracking_uri=tracking_uri, study_name=name)
    parent = _parent_run(study, tracker, plan, create=True)
    ctx = _Context(plan=plan, settings=settings, data=data, study_name=name, tracker=tracker, parent_run_id=parent,
                   worker_id=f"{HOST}:{os.getpid()}", on_trial=on_trial, clock=clock)
    # --hours is this command's deadline: trials stop in time for the transfer check (its share of the budget,
    # or its estimated cost when that is more) and the writing of the outputs.
    deadline = None
    if hours is not None:
        deadline = started + hours * 3600.0 - settings.check_reserve(hours * 3600.0) - FINISH_SECONDS
    completed = False
    try:
        run_trials(study, ctx, deadline=deadline)
        _wait_for_workers(study, settings, stage=stage, clock=clock)
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
    backend = open_storage(storage or default_storage(path))
    name = study_name or default_study_name(plan)
    study, settings, _created = open_study(plan, data, storage=backend, name=name, trials=trials, hours=hours,
                                           seed=seed, beta2=beta2, weight_decay=weight_decay, schedule=schedule,
                                           clock=clock)
    tracker = _tracker(plan, tracking_uri=tracking_uri, study_name=name)
    _parent_run(study, tracker, plan, create=True)
    return name, settings


def _wait_for_workers(study: optuna.Study, settings: StudySettings, *, stage: Callable[[str], None],
                      clock: Callable[[], float]) -> None:
    """Wait (bounded) for trials other workers are still running, so the choice sees them."""
    limit = clock() + 2 * settings.proxy.trial_seconds() + 30.0
    said = False
    while clock() < limit:
        fail_dead_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not said:
            stage(f"waiting for {len(running)} trial(s) of other workers to finish")
            said = True
        time.sleep(1.0)
    log.warning("going on without the trials still running in other workers")


__all__ = [
    "DEFAULT_TRIALS",
    "SearchSpace",
    "StudySettings",
    "TransferCheck",
    "TrialResult",
    "TuneResult",
    "check_budget_args",
    "default_storage",
    "default_study_name",
    "describe_storage",
    "fail_dead_trials",
    "open_storage",
    "open_study",
    "prepare_study",
    "run_trials",
    "run_worker",
    "schedule_rule",
    "tune_plan",
]
