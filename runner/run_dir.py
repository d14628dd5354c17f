"""The run folder, and `run.json`, its ledger of what each session charged to the budget.

Run folder (default `runs/<plan name>/`):

    plan.json      a copy of the plan that was run
    run.json       the plan's digest, the MLflow run, the sessions, and the wall time charged at each checkpoint
    checkpoints/   the loop's checkpoints (it resumes from them by itself)
    metrics.jsonl  every logged step, evaluation and event (always written, flushed as it goes)
    summary.json   planned vs achieved (`RunSummary`)
    loss.png       train/val loss vs tokens with the predicted final loss and its band
    final/         the model (`save_pretrained`, safetensors) and tokenizer: loads with
                   `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`

Rerunning the same command on the same plan resumes; a folder that holds a different plan is refused
unless `force` (the old run is then moved aside, never deleted). A non-empty folder that holds no oneday run
is refused too; with `force` oneday trains in it beside the files there, provided none of them has one of the
names above (oneday never deletes or overwrites what it did not write). A session holds `.oneday.lock` in the
folder (`RunLock`): a second `oneday run` on the same folder is refused with the holder's pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday.errors import UserError
from oneday.paths import write_atomic
from oneday.plan import Plan
from oneday.runner.summary import load_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def state(self) -> Path:
        return self.root / "run.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    def own_names(self) -> tuple[str, ...]:
        """The entries oneday writes in a run folder (temporary `.<name>.*.tmp` files and `final.*` aside)."""
        return tuple(p.name for p in (self.plan, self.state, self.checkpoints, self.metrics, self.summary,
                                      self.plot, self.final))


LOCK_NAME = ".oneday.lock"


class RunLock:
    """An exclusive `flock` on `<run folder>/.oneday.lock` for one session; the file holds the holder's pid.

    The kernel drops the lock when the holder dies (even by SIGKILL), so a crashed run never blocks a rerun;
    the lock file itself stays (it is oneday's, and removing it would race with the next holder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock (creating the run folder if needed), or refuse naming the holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path.parent}: cannot lock the run folder ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{self.path.parent} is in use by another oneday run (pid {holder}); wait for it to "
                                "end, stop it, or pass another --run-dir") from None
            raise UserError(f"{self.path.parent}: cannot lock the run folder ({exc.strerror})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _stored_hash(paths: RunPaths) -> str | None:
    state = _read_json(paths.state)
    if state and isinstance(state.get("plan_hash"), str):
        return state["plan_hash"]
    raw = _read_json(paths.plan)
    if raw is not None:
        try:
            return Plan.from_dict(raw).digest()
        except UserError:
            return "unreadable"
    return None


def _user_entries(paths: RunPaths) -> list[str]:
    """What the folder holds besides oneday's lock file, sorted."""
    return sorted(p.name for p in paths.root.iterdir() if p.name != LOCK_NAME)


def _earlier_run(paths: RunPaths, digest: str) -> tuple[str | None, bool]:
    """(the plan hash of the run the folder holds, whether it must be moved aside before this plan trains
    there: it is another plan's, or this plan's finished run)."""
    stored = _stored_hash(paths)
    if stored is not None and stored != digest:
        return stored, True
    finished = False
    if stored is not None and paths.summary.exists():
        with contextlib.suppress(UserError):
            summary = load_summary(paths.summary)
            finished = summary.finished and summary.plan_hash == digest
    return stored, finished


def check_run_dir(paths: RunPaths, *, digest: str, force: bool) -> None:
    """Refuse, before anything is written, a folder oneday must not train in: not a folder; non-empty without
    a oneday run in it, or holding another plan's run or this plan's finished run (each unless `force`);
    holding one of oneday's names that oneday did not write (even with `force`)."""
    root = paths.root
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder; pass another --run-dir")
    if not root.exists():
        base = next(p for p in (root.absolute(), *root.absolute().parents) if p.exists())
        if not base.is_dir():
            raise UserError(f"{root}: cannot create the run folder ({base} is not a folder)")
        if not os.access(base, os.W_OK | os.X_OK):
            raise UserError(f"{root}: cannot create the run folder ({base} is not writable)")
        return
    if not _user_entries(paths):
        return
    stored, move_aside = _earlier_run(paths, digest)
    if stored is None:
        entries = _user_entries(paths)
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        if not force:
            raise UserError(f"{root} is not empty and holds no oneday run ({shown}); pass a new or empty "
                            "--run-dir, or --force to train in it beside those files")
        clashes = [name for name in paths.own_names() if (root / name).exists()]
        if clashes:
            raise UserError(f"{root} holds {', '.join(clashes)} that oneday did not write; even with --force "
                            "oneday will not overwrite them: pass another --run-dir")
    elif move_aside and not force:
        if stored == digest:
            raise UserError(f"{root} already holds a finished run of this plan (summary.json); "
                            "pass --force to train it again from scratch, or another --run-dir")
        raise UserError(f"{root} holds a run of a different plan (hash {stored}, this plan {digest}); "
                        "pass --force to move it aside and start fresh, or another --run-dir")


def prepare_run_dir(paths: RunPaths, plan: Plan, *, force: bool, digest: str | None = None,
                    lock: RunLock | None = None) -> str | None:
    """Create or check the run folder. Returns a note when an earlier run was moved aside (`force`).

    `lock`: the session's lock on this folder, held by the caller; when the earlier run is moved aside, its lock
    file goes with it and the lock is taken again in the new folder."""
    digest = digest or plan.digest()
    root = paths.root
    check_run_dir(paths, digest=digest, force=force)
    note = None
    stored, move_aside = _earlier_run(paths, digest) if root.is_dir() else (None, False)
    if move_aside:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        aside = root.with_name(f"{root.name}.old-{stamp}")
        if lock is not None:
            lock.release()
        try:
            root.rename(aside)
        except OSError as exc:
            raise UserError(f"{root}: cannot move the earlier run aside ({exc.strerror})") from None
        note = f"moved the earlier run in {root} (plan {stored}) to {aside}"
        log.warning("%s", note)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{root}: cannot create the run folder ({exc.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"{root}: the run folder is not writable")
    if lock is not None and note is not None:
        lock.acquire()
    write_atomic(paths.plan, plan.to_json())  # first: from now on the folder is recognisably a oneday run
    try:
        paths.checkpoints.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{paths.checkpoints}: cannot create ({exc.strerror})") from None
    return note


def discard_new_run_dir(paths: RunPaths) -> None:
    """Undo a run folder this session created when its set-up fails before training: remove what set-up
    writes (the lock, plan.json, an empty checkpoints/) and the folder if nothing else is in it."""
    for path in (paths.lock, paths.plan, paths.state):
        path.unlink(missing_ok=True)
    for folder in (paths.checkpoints, paths.root):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


class RunLedger:
    """`run.json`: plan hash, MLflow run, and the wall time charged when each checkpoint was written."""

    def __init__(self, path: Path, digest: str) -> None:
        self.path = path
        raw = _read_json(path) or {}
        if raw.get("plan_hash") != digest:
            raw = {}
        self.data: dict[str, Any] = {
            "plan_hash": digest,
            "created": raw.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sessions": list(raw.get("sessions") or []),
            "wall_at_checkpoint": dict(raw.get("wall_at_checkpoint") or {}),
            "mlflow": dict(raw.get("mlflow") or {}),
        }
        self._lock = threading.RLock()

    def wall_at(self, step: int) -> float | None:
        value = self.data["wall_at_checkpoint"].get(str(step))
        return float(value) if isinstance(value, (int, float)) else None

    def latest_wall(self) -> tuple[int, float] | None:
        entries = [(int(k), float(v)) for k, v in self.data["wall_at_checkpoint"].items()]
        return max(entries) if entries else None

    def record_checkpoint(self, step: int, wall: float) -> None:
        with self._lock:
            table = self.data["wall_at_checkpoint"]
            table[str(step)] = round(wall, 3)
            # keep the table small: the last 64 checkpoints are more than any store keeps
            if len(table) > 64:
                for key in sorted(table, key=int)[:-64]:
                    del table[key]
        self.save()

    def record_alive(self, charged: float) -> None:
        """The current session has charged `charged` seconds so far: what a later session reports as lost
        if this one dies before its next checkpoint."""
        with self._lock:
            if self.data["sessions"]:
                self.data["sessions"][-1]["charged_seconds"] = round(charged, 3)
        self.save()

    def lost_seconds(self, resumed_wall: float) -> float:
        """Seconds the last recorded session charged beyond `resumed_wall` (the wall time at the checkpoint this
        session resumes from, 0 without one): work done after its last checkpoint, lost with it."""
        sessions = self.data["sessions"]
        last = float(sessions[-1].get("charged_seconds") or 0.0) if sessions else 0.0
        return max(0.0, last - resumed_wall)

    def record_mlflow(self, *, uri: str, experiment: str, run_id: str) -> None:
        """Remember the MLflow run as soon as it exists, so that a resumed session continues it."""
        with self._lock:
            self.data["mlflow"] = {"uri": uri, "experiment": experiment, "run_id": run_id}
        self.save()

    def save(self) -> None:
        """Write run.json atomically (called from the training thread and the MLflow worker)."""
        with self._lock:
            text = json.dumps(self.data, indent=2) + "\n"
            try:
                write_atomic(self.path, text)
            except UserError as exc:
                log.warning("%s", exc)


class WallLedger:
    """Observer: on each checkpoint event, stores the wall time charged so far in run.json; every
    `alive_every` seconds of logged steps, the session's charged time (so a kill's lost work can be told)."""

    def __init__(self, ledger: RunLedger, charged: Callable[[], float], *, alive_every: float = 10.0) -> None:
        self._ledger = ledger
        self._charged = charged
        self._alive_every = alive_every
        self._alive_at = charged()

    def on_step(self, record: Any) -> None:
        now = self._charged()
        if now - self._alive_at >= self._alive_every:
            self._alive_at = now
            self._ledger.record_alive(now)

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        if kind == "checkpoint":
            now = self._charged()
            self._ledger.record_checkpoint(step, now)
            self._alive_at = now
            self._ledger.record_alive(now)


__all__ = ["LOCK_NAME", "RunLedger", "RunLock", "RunPaths", "WallLedger", "check_run_dir", "discard_new_run_dir",
           "prepare_run_dir"]
