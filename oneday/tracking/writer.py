"""`MlflowTracker`: one run logged to MLflow from a background thread, so tracking never slows training.

The training thread only puts items on a queue; a daemon thread creates the experiment and run, logs the
flattened plan as params (in batches of at most 100, values cut to 6000 characters: MLflow's limits), then
sends metrics with `MlflowClient.log_batch` every few seconds (at most 1000 per batch), samples system metrics
every ~10 s (`oneday.tracking.system`), sets tags and uploads artifacts. mlflow is imported inside that
thread: ~2.5 s of import that does not hold up training.

A store that cannot be reached, or fails part way, never stops or slows training: the first failure logs ONE
warning, the tracker drops what follows, and `metrics.jsonl` (`oneday.tracking.recorder`) keeps everything.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneday.errors import first_line
from oneday.formats import finite_or_none
from oneday.tracking.store import open_experiment
from oneday.tracking.system import SystemSampler

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH


@dataclass(frozen=True)
class _Metrics:
    values: Mapping[str, float]
    step: int
    timestamp_ms: int


@dataclass(frozen=True)
class _Artifact:
    path: str
    artifact_path: str | None
    directory: bool


@dataclass(frozen=True)
class _Tags:
    tags: Mapping[str, str]


@dataclass(frozen=True)
class _Close:
    status: str


class MlflowTracker:
    """Logs one run to MLflow from a daemon thread; every public method returns at once.

    `resume_run_id`: continue that run (a resumed training session) if it exists in this store and
    experiment; otherwise a new run is created. `run_id` is known once the worker has set the run up
    (`wait_ready`; `on_ready(run_id)` is called from the worker then). After the first failure the tracker
    is `failed` and drops everything else.
    """

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        run_name: str,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
        gpu: bool = False,
        gpu_indices: Iterable[int] | None = None,
        system_every: float = 10.0,
        flush_every: float = 3.0,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self._params = dict(params or {})
        self._tags = dict(tags or {})
        self._resume_run_id = resume_run_id
        self._gpu = gpu
        self._gpu_indices = list(gpu_indices) if gpu_indices is not None else None
        self._system_every = system_every
        self._flush_every = flush_every
        self._on_ready = on_ready
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._work, name="oneday-mlflow", daemon=True)
        self._client: Any = None
        self._last_step = 0
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self.error: str | None = None

    # -- training-thread side ----------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self.error is not None

    def start(self) -> MlflowTracker:
        self._thread.start()
        return self

    def log_metrics(self, values: Mapping[str, Any], *, step: int, timestamp: float | None = None) -> None:
        clean = {k: v for k, v in ((k, finite_or_none(v)) for k, v in values.items()) if v is not None}
        if clean and not self.failed:
            ts = int((time.time() if timestamp is None else timestamp) * 1000)
            self._queue.put(_Metrics(clean, int(step), ts))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.failed:
            self._queue.put(_Tags({k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.failed:
            self._queue.put(_Artifact(str(path), artifact_path, directory=False))

    def log_artifacts(self, directory: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        if not self.failed:
            self._queue.put(_Artifact(str(directory), artifact_path, directory=True))

    def wait_ready(self, timeout: float | None = None) -> str | None:
        """Wait until the run exists (or setting it up failed); the run id or None."""
        self._ready.wait(timeout)
        return self.run_id

    def close(self, *, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Send what is queued, end the run with `status`, wait up to `timeout` s. True if all was sent."""
        if not self._thread.is_alive():
            return not self.failed
        self._queue.put(_Close(status))
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._warn(f"MLflow did not finish within {timeout:.0f} s; the rest is left unsent")
            return False
        return not self.failed

    # -- worker side -------------------------------------------------------------------------------------
    def _warn(self, message: str) -> None:
        if self.error is None:
            self.error = message
            log.warning("%s; training goes on, metrics.jsonl in the run folder has everything", message)

    def _fail(self, doing: str, exc: BaseException) -> None:
        self._warn(f"MLflow tracking at {self.uri} failed while {doing}: {first_line(exc)}")

    def _setup(self) -> None:
        from mlflow.entities import Param, RunTag

        client, experiment_id = open_experiment(self.uri, self.experiment)
        run_id = None
        if self._resume_run_id:
            try:
                existing = client.get_run(self._resume_run_id)
                if existing.info.experiment_id == experiment_id and existing.info.lifecycle_stage == "active":
                    run_id = existing.info.run_id
                    client.update_run(run_id, status="RUNNING")
                    self.resumed = True
            except Exception:
                run_id = None
        if run_id is None:
            run = client.create_run(experiment_id, run_name=self.run_name, tags=self._tags)
            run_id = run.info.run_id
            params = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in sorted(self._params.items())]
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
        else:
            tags = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in self._tags.items()]
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
        self._client = client
        self.experiment_id = experiment_id
        self.run_id = run_id

    def _flush(self, buffer: list[Any]) -> None:
        if not buffer:
            return
        if self.failed:
            buffer.clear()
            return
        from mlflow.entities import Metric

        metrics = [Metric(k, v, m.timestamp_ms, m.step) for m in buffer for k, v in m.values.items()]
        buffer.clear()
        try:
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH], synchronous=True)
        except Exception as exc:
            self._fail("logging metrics", exc)

    def _work(self) -> None:
        try:
            self._setup()
        except Exception as exc:
            self._fail("setting up the run", exc)
        finally:
            self._ready.set()
        if self.run_id is not None and self._on_ready is not None:
            try:
                self._on_ready(self.run_id)
            except Exception as exc:  # a callback must not end tracking
                log.debug("on_ready: %s", exc)
        sampler = SystemSampler(gpu=self._gpu, gpu_indices=self._gpu_indices) if not self.failed else None
        buffer: list[_Metrics] = []
        pending = 0
        now = time.monotonic()
        next_flush = now + self._flush_every
        next_system = now + min(self._system_every, 2.0)
        try:
            while True:
                timeout = max(0.0, min(next_flush, next_system) - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if self.failed:
                    # Nothing more is sent: wait (blocked, not polling) for the end, so a dead store costs
                    # training nothing.
                    while not isinstance(item, _Close):
                        item = self._queue.get()
                    return
                if isinstance(item, _Metrics):
                    buffer.append(item)
                    self._last_step = max(self._last_step, item.step)
                    pending += len(item.values)
                    if pending >= MAX_METRICS_PER_BATCH:
                        self._flush(buffer)
                        pending = 0
                elif isinstance(item, _Tags):
                    self._send_tags(item)
                elif isinstance(item, _Artifact):
                    self._flush(buffer)
                    pending = 0
                    self._send_artifact(item)
                elif isinstance(item, _Close):
                    if sampler is not None:
                        self._add_system(sampler, buffer)
                    self._flush(buffer)
                    if not self.failed:
                        try:
                            self._client.set_terminated(self.run_id, status=item.status)
                        except Exception as exc:
                            self._fail("ending the run", exc)
                    return
                now = time.monotonic()
                if sampler is not None and now >= next_system:
                    self._add_system(sampler, buffer)
                    next_system = now + self._system_every
                if now >= next_flush:
                    self._flush(buffer)
                    pending = 0
                    next_flush = now + self._flush_every
        finally:
            if sampler is not None:
                sampler.close()

    def _add_system(self, sampler: SystemSampler, buffer: list[_Metrics]) -> None:
        try:
            values = sampler.sample()
        except Exception as exc:  # sampling must never end tracking
            log.debug("system metrics: %s", exc)
            return
        if values:
            buffer.append(_Metrics(values, self._last_step, int(time.time() * 1000)))

    def _send_tags(self, item: _Tags) -> None:
        from mlflow.entities import RunTag

        try:
            tags = [RunTag(k, v) for k, v in item.tags.items()]
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=tags[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
        except Exception as exc:
            self._fail("setting tags", exc)

    def _send_artifact(self, item: _Artifact) -> None:
        try:
            if item.directory:
                self._client.log_artifacts(self.run_id, item.path, item.artifact_path)
            else:
                self._client.log_artifact(self.run_id, item.path, item.artifact_path)
        except Exception as exc:
            self._fail(f"uploading {Path(item.path).name}", exc)


__all__ = ["MAX_PARAMS_PER_BATCH", "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "MlflowTracker"]
