"""`RunSummary`: what a run planned and what it achieved, written as `summary.json` in the run folder.

Pure Python (no torch): the CLI, `oneday compare` and the calibration code read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneday.errors import UserError
from oneday.formats import finite_or_none, jsonable

SUMMARY_VERSION = 1


@dataclass(frozen=True)
class RunSummary:
    """Planned vs achieved for one run (all sessions of it, when it was resumed).

    Times: `train_seconds` is time spent in training steps (the loop's clock, continued across resumes);
    `wall_seconds` is wall time charged to the budget up to when this summary was written — process start
    to now for this session, plus what earlier sessions had spent up to the checkpoint this one resumed from
    (one-off data preparation excluded). `interrupted` runs (Ctrl-C) have a checkpoint to resume from and
    `finished` False.
    """

    plan_name: str
    plan_hash: str
    run_dir: str
    device: str
    # planned
    budget_seconds: float
    planned_train_seconds: float
    planned_tokens: int
    planned_steps: int
    predicted_tokens: int
    predicted_loss: float
    predicted_loss_band: tuple[float, float]
    predicted_tokens_per_s: float
    predicted_mfu: float
    # achieved
    steps: int
    tokens: int
    train_seconds: float
    wall_seconds: float
    session_wall_seconds: float
    final_val_loss: float | None
    final_val_bpb: float | None
    mean_tokens_per_s: float
    mfu: float
    final_lr: float | None
    skipped_steps: int
    rollbacks: int
    resumes: int
    interrupted: bool
    finished: bool
    events: tuple[dict[str, Any], ...] = ()
    micro_batch_changes: tuple[str, ...] = ()  # out-of-memory retries: "oom: micro-batch 32→16, accumulation 2→4"
    data_prep_seconds: float = 0.0
    model_dir: str | None = None
    mlflow_run_id: str | None = None
    mlflow_experiment: str | None = None
    tracking_uri: str | None = None
    tracking_error: str | None = None
    oneday_version: str = ""
    created: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    summary_version: int = SUMMARY_VERSION
    predicted_basis: str = "law"
    """`Prediction.basis`: "bound" means `predicted_loss` is an upper bound (the unigram entropy), not a
    prediction; the band is what the plan stands behind."""

    def predicted_loss_text(self) -> str:
        """The planned val loss as the table shows it: the figure (or "< bound") and its band."""
        low, high = sorted(self.predicted_loss_band)
        figure = f"< {self.predicted_loss:.3f}" if self.predicted_basis == "bound" else f"{self.predicted_loss:.3f}"
        return f"{figure} ({low:.3f}–{high:.3f})"

    # -- derived ----------------------------------------------------------------------------------------
    def loss_gap(self) -> float | None:
        """Achieved minus predicted final loss (negative: better than predicted)."""
        return None if self.final_val_loss is None else self.final_val_loss - self.predicted_loss

    def within_band(self) -> bool | None:
        if self.final_val_loss is None:
            return None
        low, high = sorted(self.predicted_loss_band)
        return low <= self.final_val_loss <= high

    def tokens_gap(self) -> int:
        """Achieved minus predicted tokens."""
        return self.tokens - self.predicted_tokens

    def tokens_ratio(self) -> float:
        return self.tokens / self.predicted_tokens if self.predicted_tokens else float("nan")

    def throughput_ratio(self) -> float:
        return self.mean_tokens_per_s / self.predicted_tokens_per_s if self.predicted_tokens_per_s else float("nan")

    def budget_used(self) -> float:
        """Wall seconds charged / budget seconds."""
        return self.wall_seconds / self.budget_seconds

    # -- serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["predicted_loss_band"] = list(self.predicted_loss_band)
        raw["events"] = list(self.events)
        raw["notes"] = list(self.notes)
        raw["micro_batch_changes"] = list(self.micro_batch_changes)
        raw["derived"] = {
            "loss_gap": self.loss_gap(),
            "within_band": self.within_band(),
            "tokens_gap": self.tokens_gap(),
            "tokens_ratio": finite_or_none(self.tokens_ratio()),
            "throughput_ratio": finite_or_none(self.throughput_ratio()),
            "budget_used": finite_or_none(self.budget_used()),
        }
        return jsonable(raw)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSummary:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names}
        kwargs["predicted_loss_band"] = tuple(kwargs.get("predicted_loss_band") or (math.nan, math.nan))
        kwargs["events"] = tuple(kwargs.get("events") or ())
        kwargs["notes"] = tuple(kwargs.get("notes") or ())
        kwargs["micro_batch_changes"] = tuple(kwargs.get("micro_batch_changes") or ())
        return cls(**kwargs)


def load_summary(path: str | os.PathLike[str]) -> RunSummary:
    """Read `summary.json` (a file, or a run folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return RunSummary.from_dict(raw)
    except FileNotFoundError:
        raise UserError(f"{path}: no summary (the run has not finished)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: cannot read the run summary ({exc})") from None


__all__ = ["SUMMARY_VERSION", "RunSummary", "load_summary"]
