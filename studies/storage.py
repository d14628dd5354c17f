"""Where a study lives, and which of its trials belong to processes that died.

By default a journal file beside the plan (`<plan>.tune.journal`, Optuna's `JournalFileBackend`: appends under a
file lock, so several local processes share it safely). `--storage` takes an RDB URL (`postgresql://…`,
`mysql://…`, `sqlite:///…`) or a journal file path; an RDB storage also runs Optuna's heartbeat: each running trial
writes a heartbeat every `$ONEDAY_TUNE_HEARTBEAT` seconds (default 60) and one silent for three times that is
stale. A trial whose process died (killed, power loss, a machine gone) stays RUNNING in the storage until
`fail_dead_trials` marks it FAIL: on this host at once (host, pid and process start time are trial attributes),
on other machines once its heartbeat is stale (`optuna.storages.fail_stale_trials`). It runs before every trial
and while `oneday tune` waits for its workers. `postgresql://` URLs need the `postgres` extra: SQLAlchemy 2.1
takes psycopg (3) for them (`postgresql+psycopg2://` names the older driver).

A storage that does not exist yet (a journal or SQLite file) is only opened, and so created, once a study is
about to be written into it (`storage_exists`): a refusal before that leaves no empty file behind.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from oneday.errors import UserError, first_line
from oneday.processes import pid_alive

log = logging.getLogger(__name__)

HEARTBEAT_ENV = "ONEDAY_TUNE_HEARTBEAT"
HEARTBEAT_SECONDS = 60
STALE_HEARTBEATS = 3  # a trial silent for this many heartbeats is stale (Optuna's grace_period)
HOST = socket.gethostname()


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


def _local_file(storage: str) -> Path | None:
    """The file that opening `storage` creates when it is missing: the journal file, or an SQLite URL's
    database file; None for a server (or in-memory) database."""
    if not _is_url(storage):
        return Path(storage).expanduser()
    if not storage.startswith("sqlite:"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(storage).database
    except Exception:
        return None  # a bad URL: opening it gives the one-line error
    return Path(database).expanduser() if database and database != ":memory:" else None


def storage_exists(storage: str) -> bool:
    """Whether `storage` may already hold studies: False for a journal or SQLite file that does not exist yet
    (opening it would create it), True otherwise."""
    path = _local_file(storage)
    return path is None or path.exists()


def check_storage(storage: str) -> None:
    """A `UserError` (one line) for a journal file that cannot be made, found without creating anything: its
    folder does not exist, or it is a folder."""
    if _is_url(storage):
        return
    shown = describe_storage(storage)
    path = Path(storage).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"--storage {shown}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"--storage {shown}: is a folder; give a journal file name or an RDB URL")


def heartbeat_seconds() -> int:
    """`$ONEDAY_TUNE_HEARTBEAT` (whole seconds, at least 1), else 60; a `UserError` for anything else."""
    raw = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not raw:
        return HEARTBEAT_SECONDS
    try:
        seconds = int(raw)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise UserError(f"${HEARTBEAT_ENV}={raw!r}: must be a whole number of seconds, at least 1")
    return seconds


def open_storage(storage: str) -> BaseStorage:
    """An Optuna storage for `storage` (RDB URL or journal file path), created when it does not exist; a
    `UserError` (one line) when it cannot be opened: no driver, no server, a bad URL, a folder that does not
    exist."""
    shown = describe_storage(storage)
    if not _is_url(storage):
        check_storage(storage)
        path = Path(storage).expanduser()
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise UserError(f"--storage {shown}: cannot open the journal file ({exc.strerror or exc})") from None
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if storage.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 5}
    heartbeat = heartbeat_seconds()
    try:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(storage, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                              grace_period=STALE_HEARTBEATS * heartbeat)
    except ModuleNotFoundError as exc:
        raise UserError(f"--storage {shown}: the database driver is not installed ({exc}); install it, e.g. "
                        "`pip install 'oneday[postgres]'` for PostgreSQL") from None
    except Exception as exc:
        raise UserError(f"--storage {shown}: cannot open the study storage ({first_line(exc)})") from None


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials whose process is gone as FAIL: on this host by pid, elsewhere by a stale heartbeat
    (RDB storages); their numbers."""
    failed = _fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        pid = attrs.get("pid")
        if attrs.get("host") != HOST or not isinstance(pid, int) or pid == os.getpid():
            continue
        ticks = attrs.get("pid_start")
        if pid_alive(pid, int(ticks) if ticks is not None else None):
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


def _fail_stale_trials(study: optuna.Study) -> list[int]:
    """Optuna's own heartbeat check (a no-op without a heartbeat); the numbers of the running trials it failed
    (a finished trial takes no attributes, so these carry no `error`)."""
    running = {t._trial_id: t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    now = {t._trial_id: t.state for t in study.get_trials(deepcopy=False)}
    return [number for trial_id, number in running.items() if now.get(trial_id) == TrialState.FAIL]


__all__ = ["HEARTBEAT_ENV", "HOST", "check_storage", "default_storage", "describe_storage", "fail_dead_trials",
           "heartbeat_seconds", "open_storage", "storage_exists"]
