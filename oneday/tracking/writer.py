"""`MlflowTracker`: one run logged to MLflow from a background thread, so tracking never slows training.

The training thread only puts items on a queue; a daemon thread creates the experiment and run, logs the
flattened plan as params (in batches of at most 100, values cut to 6000 characters: MLflow's limits), then
sends metrics with `MlflowClient.log_batch` every few seconds (at most 1000 per batch), samples system metrics
every ~10 s (`oneday.tracking.system`), sets tags and uploads artifacts. mlflow is imported inside that
thread: ~2.5 s of import that does not hold up training. A new run gets MLflow's standard tags (user, source,
git commit: `standard_run_tags`) and, when given, the dataset as a run input (`log_inputs`: name, digest = the
prepared data's key, source; a record, no data uploaded). `log_model` logs the final model folder as an MLflow
LoggedModel with an MLmodel file (flavor `oneday`: a transformers `save_pretrained` folder), linked to the run
as its output, so `mlflow.register_model("models:/<model_id>", name)` can take it. (`mlflow.transformers.log_model`
is not used: with transformers 5 it fails on a local checkpoint, and it would load the model in the tracker.)

A store that cannot be reached, or fails part way, never stops or slows training: the first failure logs ONE
warning (MLflow's and urllib3's own log lines are silenced while the tracker runs), and `metrics.jsonl`
(`oneday.tracking.recorder`) keeps everything. The writer keeps what it could not send (metrics up to
`MAX_BUFFERED_METRICS` values, the oldest dropped first; tags and artifacts in order) and tries again after 5 s,
10 s, 20 s, … up to every 5 minutes, sleeping in between: a store that comes back gets the backlog, in order. An
HTTP server's port is also probed every `PROBE_SECONDS` (a refused connection costs nothing): a server that was
restarted gets the backlog within seconds of answering, not at the next backoff step.
`close(timeout=…)` bounds the end: what a dead or hung store has not taken by then is left unsent, so the run
ends on time; the MLflow run is ended with the caller's status (FINISHED, KILLED, FAILED) whenever the store
answers.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneday.errors import first_line
from oneday.formats import finite_or_none
from oneday.logs import quieted
from oneday.tracking.store import open_experiment, standard_run_tags, unreachable_reason
from oneday.tracking.system import SystemSampler

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_BUFFERED_METRICS = 500_000  # metric values kept for a store that is down (~100 MB at most)
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0
PROBE_SECONDS = 2.0  # how often the port of an HTTP store that is down is probed


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
class _Model:
    path: str
    name: str
    step: int


@dataclass(frozen=True)
class DatasetRecord:
    """What MLflow records of the training data (`mlflow.entities.Dataset`): no data is uploaded."""

    name: str
    digest: str
    source: str
    source_type: str = "oneday"
    context: str = "training"


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
    (`wait_ready`; `on_ready(run_id)` is called from the worker then). `error` is the store's current failure
    (None while it answers); `dropped` counts metric values given up because the backlog was full.
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
        dataset: DatasetRecord | None = None,
        gpu: bool = False,
        system_every: float = 10.0,
        flush_every: float = 3.0,
        retry_first: float = RETRY_FIRST_SECONDS,
        on_ready: Callable[[str], None] | None = None,
    ) -> None:
        self.uri = uri
        self.experiment = experiment
        self.run_name = run_name
        self._params = dict(params or {})
        self._tags = dict(tags or {})
        self._resume_run_id = resume_run_id
        self._dataset = dataset
        self._gpu = gpu
        self._system_every = system_every
        self._flush_every = flush_every
        self._retry_first = retry_first
        self._on_ready = on_ready
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._work, name="oneday-mlflow", daemon=True)
        self._client: Any = None
        self._last_step = 0
        self._metrics: deque[_Metrics] = deque()  # not yet sent, oldest first
        self._buffered_values = 0
        self._others: list[_Tags | _Artifact | _Model] = []  # not yet sent, in order
        self._retry_at: float | None = None  # set while the store is down
        self._probe_at: float | None = None  # the next probe of a down HTTP store's port
        self._http = uri.startswith(("http://", "https://"))
        self._backoff = retry_first
        self._warned = False
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.resumed = False
        self.error: str | None = None
        self.dropped = 0
        self.model_id: str | None = None

    # -- training-thread side ----------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self.error is not None

    def start(self) -> MlflowTracker:
        self._thread.start()
        return self

    def log_metrics(self, values: Mapping[str, Any], *, step: int, timestamp: float | None = None) -> None:
        clean = {k: v for k, v in ((k, finite_or_none(v)) for k, v in values.items()) if v is not None}
        if clean:
            ts = int((time.time() if timestamp is None else timestamp) * 1000)
            self._queue.put(_Metrics(clean, int(step), ts))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._queue.put(_Tags({k: str(v)[:MAX_TAG_VALUE] for k, v in tags.items()}))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._queue.put(_Artifact(str(path), artifact_path, directory=False))

    def log_artifacts(self, directory: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._queue.put(_Artifact(str(directory), artifact_path, directory=True))

    def log_model(self, directory: str | os.PathLike[str], *, name: str = "model", step: int = 0) -> None:
        """The final model folder as a LoggedModel of this run (module docstring); `model_id` once sent."""
        self._queue.put(_Model(str(directory), name, int(step)))

    def wait_ready(self, timeout: float | None = None) -> str | None:
        """Wait until the first attempt to set the run up has ended; the run id, or None if it failed."""
        self._ready.wait(timeout)
        return self.run_id

    def close(self, *, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Send what is left (one more try if the store is down), end the run with `status`; wait at most
        `timeout` s. True if everything was sent."""
        if not self._thread.is_alive():
            return not self.failed
        self._queue.put(_Close(status))
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            self._went_down("finishing", TimeoutError(f"no answer within {timeout:.0f} s; the rest is left unsent"))
            return False
        return not self.failed and not self.dropped

    # -- worker side -------------------------------------------------------------------------------------
    def _went_down(self, doing: str, exc: BaseException) -> None:
        """A call to the store failed: keep the backlog, retry later with backoff; warn once per outage."""
        self.error = f"MLflow tracking at {self.uri} failed while {doing}: {first_line(exc)}"
        now = time.monotonic()
        self._backoff = self._retry_first if self._retry_at is None else min(2 * self._backoff, RETRY_MAX_SECONDS)
        self._retry_at = now + self._backoff
        self._probe_at = now + PROBE_SECONDS if self._http else None
        if not self._warned:
            self._warned = True
            log.warning("%s; training goes on, metrics.jsonl in the run folder has everything, and the metrics are "
                        "sent when the store answers again", self.error)

    def _came_back(self, sent: int) -> None:
        if self._retry_at is not None:
            log.info("MLflow tracking at %s answers again: sent %d buffered metric values", self.uri, sent)
        self._retry_at, self._probe_at, self.error, self._warned = None, None, None, False

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
            tags = {**standard_run_tags(), **{k: str(v) for k, v in self._tags.items()}}
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            run_id = run.info.run_id
            params = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in sorted(self._params.items())]
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, params=params[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
            if self._dataset is not None:
                _log_dataset(client, run_id, self._dataset)
        else:
            tags = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in self._tags.items()]
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                client.log_batch(run_id, tags=tags[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
        self._client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        if self._on_ready is not None:
            try:
                self._on_ready(run_id)
            except Exception as exc:  # a callback must not end tracking
                log.debug("on_ready: %s", exc)

    def _buffer(self, item: _Metrics) -> None:
        self._metrics.append(item)
        self._buffered_values += len(item.values)
        self._last_step = max(self._last_step, item.step)
        while self._buffered_values > MAX_BUFFERED_METRICS and len(self._metrics) > 1:
            oldest = self._metrics.popleft()
            self._buffered_values -= len(oldest.values)
            self.dropped += len(oldest.values)

    def _send(self) -> None:
        """Set the run up if it is not yet, then send the backlog: metrics first, then tags and artifacts in
        order. Each part leaves the backlog only once the store took it; the first failure stops the attempt."""
        doing = "setting up the run"
        try:
            if self.run_id is None:
                self._setup()
            from mlflow.entities import Metric

            sent = 0
            doing = "logging metrics"
            while self._metrics:
                batch, values = [], 0
                while self._metrics and values + len(self._metrics[0].values) <= MAX_METRICS_PER_BATCH:
                    item = self._metrics.popleft()
                    batch.append(item)
                    values += len(item.values)
                if not batch:  # one record larger than a batch (never, with oneday's records)
                    batch.append(self._metrics.popleft())
                metrics = [Metric(k, v, m.timestamp_ms, m.step) for m in batch for k, v in m.values.items()]
                try:
                    self._client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                except BaseException:
                    self._metrics.extendleft(reversed(batch))
                    raise
                self._buffered_values -= len(metrics)
                sent += len(metrics)
                self.error = None  # it answers again: the rest of the backlog is on its way, not given up
            while self._others:
                item = self._others[0]
                doing = "setting tags" if isinstance(item, _Tags) else f"uploading {Path(item.path).name}"
                if isinstance(item, _Model):
                    doing = f"logging the model {Path(item.path).name}"
                self._send_other(item)
                self._others.pop(0)
        except Exception as exc:
            self._went_down(doing, exc)
        else:
            self._came_back(sent)
        finally:
            self._ready.set()

    def _send_other(self, item: _Tags | _Artifact | _Model) -> None:
        from mlflow.entities import RunTag

        if isinstance(item, _Model):
            self.model_id = _log_model(self._client, run_id=self.run_id, experiment_id=self.experiment_id,
                                       item=item, tags=self._tags)
        elif isinstance(item, _Tags):
            tags = [RunTag(k, v) for k, v in item.tags.items()]
            for i in range(0, len(tags), MAX_PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=tags[i : i + MAX_PARAMS_PER_BATCH], synchronous=True)
        elif item.directory:
            self._client.log_artifacts(self.run_id, item.path, item.artifact_path)
        else:
            self._client.log_artifact(self.run_id, item.path, item.artifact_path)

    def _work(self) -> None:
        # MLflow and urllib3 log their own retries and tracebacks; the one warning of `_went_down` says it all.
        with quieted("mlflow", logging.CRITICAL), quieted("urllib3", logging.CRITICAL):
            self._send()
            sampler = SystemSampler(gpu=self._gpu)
            try:
                closing = self._loop(sampler)
                self._add_system(sampler)
            finally:
                sampler.close()
            self._send()  # one last try, bounded by the caller's `close(timeout=…)`
            if self.run_id is not None and not self.failed:
                try:
                    self._client.set_terminated(self.run_id, status=closing.status)
                except Exception as exc:
                    self._went_down("ending the run", exc)

    def _loop(self, sampler: SystemSampler) -> _Close:
        """Take items until `_Close`: buffer them, sample the system, and send every `flush_every` seconds, or
        when the store is down, at its retry time. Sleeps on the queue in between (no polling)."""
        now = time.monotonic()
        next_flush = now + self._flush_every
        next_system = now + min(self._system_every, 2.0)
        while True:
            send_at = self._retry_at if self._retry_at is not None else next_flush
            if self._probe_at is not None:
                send_at = min(send_at, self._probe_at)
            try:
                item = self._queue.get(timeout=max(0.0, min(send_at, next_system) - time.monotonic()))
            except queue.Empty:
                item = None
            if isinstance(item, _Close):
                return item
            if isinstance(item, _Metrics):
                self._buffer(item)
            elif item is not None:
                self._others.append(item)
            now = time.monotonic()
            if now >= next_system:
                self._add_system(sampler)
                next_system = now + self._system_every
            if self._retry_at is not None:
                if now >= self._retry_at or self._answers_again(now):
                    self._send()
            elif (now >= next_flush or self._buffered_values >= MAX_METRICS_PER_BATCH
                  or isinstance(item, (_Artifact, _Model))):
                self._send()
                next_flush = now + self._flush_every

    def _answers_again(self, now: float) -> bool:
        """At probe time, whether the down HTTP store's port accepts a connection again (then: retry now)."""
        if self._probe_at is None or now < self._probe_at:
            return False
        self._probe_at = now + PROBE_SECONDS
        return unreachable_reason(self.uri, timeout=1.0) is None

    def _add_system(self, sampler: SystemSampler) -> None:
        try:
            values = sampler.sample()
        except Exception as exc:  # sampling must never end tracking
            log.debug("system metrics: %s", exc)
            return
        if values:
            self._buffer(_Metrics(values, self._last_step, int(time.time() * 1000)))


def _log_dataset(client: Any, run_id: str, record: DatasetRecord) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=record.name, digest=record.digest, source_type=record.source_type, source=record.source)
    client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, record.context)])])


def _log_model(client: Any, *, run_id: str | None, experiment_id: str | None, item: _Model,
               tags: Mapping[str, str]) -> str:
    """A LoggedModel of `run_id`: the folder's files and an MLmodel file; READY once uploaded. Its id."""
    import tempfile

    import mlflow
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    model = client.create_logged_model(experiment_id, name=item.name, source_run_id=run_id,
                                       tags={k: str(v) for k, v in tags.items()})
    try:
        import transformers

        versions = {"transformers_version": transformers.__version__}
    except ImportError:
        versions = {}
    description = Model(artifact_path=item.name, run_id=run_id, model_id=model.model_id, flavors={
        "oneday": {"format": "transformers save_pretrained", "task": "text-generation",
                   "load": "transformers.AutoModelForCausalLM.from_pretrained(<this folder>)",
                   "mlflow_version": mlflow.__version__, **versions}})
    client.log_model_artifacts(model.model_id, item.path)
    with tempfile.TemporaryDirectory(prefix="oneday-mlmodel-") as folder:
        mlmodel = Path(folder) / "MLmodel"
        description.save(str(mlmodel))
        client.log_model_artifact(model.model_id, str(mlmodel))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    if run_id is not None:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, item.step)])
    return model.model_id


__all__ = ["MAX_BUFFERED_METRICS", "MAX_PARAMS_PER_BATCH", "MAX_PARAM_VALUE", "MAX_TAG_VALUE", "DatasetRecord",
           "MlflowTracker"]
