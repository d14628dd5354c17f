"""The training loop's observer that keeps every record: `metrics.jsonl` in the run folder, and MLflow.

`metrics.jsonl` holds one JSON object per logged step, evaluation and event, written and flushed on the
training thread as it happens. It is always written, whatever happens to MLflow, and it is what the loss plot is
drawn from. The same records go to an `MlflowTracker` (which only queues them: the training thread never
waits on MLflow), under the names of `oneday.tracking.names`; the step of every metric is the optimizer step
and each carries a wall-clock timestamp, so MLflow's step and time axes both work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from oneday.formats import jsonable
from oneday.tracking import names
from oneday.tracking.writer import MlflowTracker

log = logging.getLogger(__name__)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`; a torn last line (a killed process) is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    records.append(record)
    except FileNotFoundError:
        return []
    return records


def _record_dict(record: Any) -> dict[str, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    try:
        return asdict(record)
    except TypeError:
        return {k: v for k, v in vars(record).items() if not k.startswith("_")}


class RunRecorder:
    """An `Observer` of the training loop: appends every record to `metrics.jsonl` (flushed at once) and
    hands the metrics to an `MlflowTracker` (may be None). `predicted_loss`/`predicted_tokens` are logged
    as constant lines at the first step and, by `finish`, at the last one."""

    def __init__(
        self,
        metrics_path: Path,
        *,
        tracker: MlflowTracker | None = None,
        predicted_loss: float | None = None,
        predicted_tokens: float | None = None,
        wall_clock: Any = time.time,
    ) -> None:
        self.metrics_path = metrics_path
        self.tracker = tracker
        self.predicted_loss = predicted_loss
        self.predicted_tokens = predicted_tokens
        self._time = wall_clock
        self._handle: TextIO | None = open(metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._predicted_logged = False
        self.last_step = 0
        self.last_tokens = 0
        self.resumed = False

    def write(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            if self._handle is None:
                return
            try:
                self._handle.write(json.dumps(jsonable(record), separators=(",", ":")) + "\n")
                self._handle.flush()
            except OSError as exc:  # a full disk must not end training; say it once
                log.warning("cannot write %s (%s); local metrics stop here", self.metrics_path, exc)
                with contextlib.suppress(OSError):
                    self._handle.close()
                self._handle = None

    # -- Observer ----------------------------------------------------------------------------------------
    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self.resumed = resumed
        self.last_step, self.last_tokens = step, tokens
        self.write({"kind": "event", "event": "resume" if resumed else "start", "step": step, "tokens": tokens,
                    "resumed": resumed, "time": self._time(),
                    "message": f"resuming from step {step}" if resumed else "starting"})

    def on_step(self, record: Any) -> None:
        data = _record_dict(record)
        now = self._time()
        self.last_step = int(data.get("step", self.last_step))
        self.last_tokens = int(data.get("tokens", self.last_tokens))
        self.write({"kind": "step", **data, "time": now})
        if self.tracker is not None:
            metrics = {name: data.get(key) for key, name in names.STEP_METRICS.items() if key in data}
            if not self._predicted_logged:
                self._predicted_logged = True
                metrics.update(self._predicted())
            self.tracker.log_metrics(metrics, step=self.last_step, timestamp=now)

    def on_eval(self, record: Any) -> None:
        data = _record_dict(record)
        now = self._time()
        self.write({"kind": "eval", **data, "time": now})
        if self.tracker is not None:
            metrics = {name: data[key] for key, name in names.EVAL_METRICS.items() if data.get(key) is not None}
            self.tracker.log_metrics(metrics, step=int(data.get("step", self.last_step)), timestamp=now)

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        self.write({"kind": "event", "event": kind, "message": message, "step": step, "time": self._time()})

    # -- end ---------------------------------------------------------------------------------------------
    def _predicted(self) -> dict[str, float]:
        out = {}
        if self.predicted_loss is not None:
            out[names.METRIC_PREDICTED_LOSS] = self.predicted_loss
        if self.predicted_tokens is not None:
            out[names.METRIC_PREDICTED_TOKENS] = self.predicted_tokens
        return out

    def finish(self, *, step: int, tokens: int, final_loss: float | None) -> None:
        """Log the predicted lines at the last step and the gaps (achieved − predicted); close the file."""
        metrics: dict[str, Any] = self._predicted()
        if final_loss is not None and self.predicted_loss is not None:
            metrics[names.METRIC_GAP_LOSS] = final_loss - self.predicted_loss
        if self.predicted_tokens is not None:
            metrics[names.METRIC_GAP_TOKENS] = tokens - self.predicted_tokens
        metrics[names.METRIC_TOKENS] = tokens
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                with contextlib.suppress(OSError):
                    self._handle.close()
                self._handle = None


__all__ = ["RunRecorder", "read_metrics"]
