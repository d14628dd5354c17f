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
unless `force` (the old run is then moved aside, never deleted).
"""

from __future__ import annotations

import contextlib
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def _has_checkpoints(paths: RunPaths) -> bool:
    return paths.checkpoints.is_dir() and any(paths.checkpoints.iterdir())


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


def prepare_run_dir(paths: RunPaths, plan: Plan, *, force: bool, digest: str | None = None) -> str | None:
    """Create or check the run folder. Returns a note when an earlier run was moved aside (`force`)."""
    digest = digest or plan.digest()
    root = paths.root
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder; pass another --run-dir")
    note = None
    if root.is_dir() and any(root.iterdir()):
        stored = _stored_hash(paths)
        different = stored is not None and stored != digest
        finished = False
        if not different and paths.summary.exists():
            with contextlib.suppress(UserError):
                summary = load_summary(paths.summary)
                finished = summary.finished and summary.plan_hash == digest
        holds_run = different or (stored is None and (_has_checkpoints(paths) or paths.metrics.exists()))
        if (holds_run or finished) and not force:
            if finished:
                raise UserError(
                    f"{root} already holds a finished run of this plan (summary.json); "
                    "pass --force to train it again from scratch, or another --run-dir"
                )
            what = f"a run of a different plan (hash {stored}, this plan {digest})" if stored else "another run"
            raise UserError(f"{root} holds {what}; pass --force to move it aside and start fresh, or another --run-dir")
        if (holds_run or finished) and force:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            aside = root.with_name(f"{root.name}.old-{stamp}")
            try:
                root.rename(aside)
            except OSError as exc:
                raise UserError(f"{root}: cannot move the earlier run aside ({exc.strerror})") from None
            note = f"moved the earlier run in {root} (plan {stored or 'unknown'}) to {aside}"
            log.warning("%s", note)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{root}: cannot create the run folder ({exc.strerror})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UserError(f"{root}: the run folder is not writable")
    try:
        paths.checkpoints.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"{paths.checkpoints}: cannot create ({exc.strerror})") from None
    write_atomic(paths.plan, plan.to_json())
    return note


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
    """Observer: on each checkpoint event, stores the wall time charged so far in run.json."""

    def __init__(self, ledger: RunLedger, charged: Callable[[], float]) -> None:
        self._ledger = ledger
        self._charged = charged

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        if kind == "checkpoint":
            self._ledger.record_checkpoint(step, self._charged())


__all__ = ["RunLedger", "RunPaths", "WallLedger", "prepare_run_dir"]
