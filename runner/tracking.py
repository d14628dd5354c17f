"""Run tracking: MLflow from a background thread, `metrics.jsonl` on disk, system metrics, the loss plot.

Two sinks, fed by `RunRecorder` (an `Observer` of the training loop):

- `metrics.jsonl` in the run folder: one JSON object per logged step, evaluation and event, written and
  flushed on the training thread as it happens. It is always written, whatever happens to MLflow, and it is
  what the loss plot is drawn from.
- MLflow (`MlflowTracker`): the training thread only puts items on a queue; a daemon thread creates the
  experiment and run, logs the flattened plan as params (in batches of at most 100, values cut to 6000
  characters: MLflow's limits), then sends metrics with `MlflowClient.log_batch` every few seconds (at most
  1000 per batch), samples system metrics every ~10 s (NVML on a GPU; process RSS and CPU on the CPU:
  MLflow's own system-metrics monitor needs psutil, which is not a dependency), and uploads artifacts.

A tracking store that cannot be reached, or fails part way, never stops or slows training: the first failure
logs ONE warning, the tracker drops what follows, and `metrics.jsonl` keeps everything. For an HTTP store
the worker first checks that the port accepts a connection (a few seconds at most), and MLflow's HTTP
retries are capped (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`/`_TIMEOUT`, unless the user set them), so a store that
goes away mid-run costs one bounded wait in the background thread, not minutes of retries.

Metric names (stable; the comparison views key on them): train/loss, val/loss, val/bpb, lr, tokens,
tokens_per_s, mfu, grad_norm, budget_fraction, epoch, predicted/loss, predicted/tokens, gap/loss,
gap/tokens, and system/* (system/gpu_0_utilization_percentage, system/gpu_0_memory_usage_megabytes,
system/gpu_0_power_usage_watts, system/process_rss_megabytes, system/process_cpu_percentage). The step of
every metric is the optimizer step; each carries a wall-clock timestamp, so MLflow's time axis works too.

mlflow and matplotlib are imported lazily (mlflow inside the worker thread: ~2.5 s of import that does not
hold up training).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from oneday import tracking_names as names

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH

# Names (URI, experiment, run name, tags, metrics) live in `oneday.tracking_names`, shared with `tune` and
# `compare`; re-exported here for the runner's callers.
resolve_tracking_uri = names.resolve_tracking_uri
default_experiment = names.default_experiment
STEP_METRICS = names.STEP_METRICS
EVAL_METRICS = names.EVAL_METRICS


# --------------------------------------------------------------------------------------------------------
# metrics.jsonl


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


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """NaN/inf become None (JSON has no NaN), numpy/torch scalars become floats."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    try:
        return _jsonable(float(value))
    except (TypeError, ValueError):
        return str(value)


def _record_dict(record: Any) -> dict[str, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    try:
        return asdict(record)
    except TypeError:
        return {k: v for k, v in vars(record).items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------------------
# System metrics


class SystemSampler:
    """GPU utilization/memory/power through NVML when `gpu`; process RSS and CPU share otherwise (or also).

    NVML is optional: with no driver `nvmlInit()` raises `NVMLError_LibraryNotFound`, and GPU sampling is off.
    """

    def __init__(self, *, gpu: bool, gpu_indices: Iterable[int] | None = None) -> None:
        self._handles: list[tuple[int, Any]] = []
        self._nvml: Any = None
        if gpu:
            try:
                import pynvml

                pynvml.nvmlInit()
                count = pynvml.nvmlDeviceGetCount()
                indices = list(gpu_indices) if gpu_indices is not None else list(range(count))
                self._handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices if i < count]
                self._nvml = pynvml
            except Exception as exc:  # no driver, no library: just no GPU metrics
                log.debug("NVML unavailable, no GPU system metrics: %s", exc)
        self._last_cpu: tuple[float, float] | None = None

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for index, handle in self._handles:
            nv = self._nvml
            prefix = f"system/gpu_{index}_"
            with contextlib.suppress(Exception):
                out[prefix + "utilization_percentage"] = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            with contextlib.suppress(Exception):
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                out[prefix + "memory_usage_megabytes"] = mem.used / 2**20
                out[prefix + "memory_usage_percentage"] = 100.0 * mem.used / max(mem.total, 1)
            with contextlib.suppress(Exception):
                out[prefix + "power_usage_watts"] = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
        rss = process_rss_bytes()
        if rss is not None:
            out["system/process_rss_megabytes"] = rss / 2**20
        times = os.times()
        now = time.monotonic()
        cpu = times.user + times.system
        if self._last_cpu is not None:
            wall = now - self._last_cpu[0]
            if wall > 0:
                out["system/process_cpu_percentage"] = 100.0 * (cpu - self._last_cpu[1]) / wall
        self._last_cpu = (now, cpu)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# --------------------------------------------------------------------------------------------------------
# MLflow


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


def unreachable_reason(uri: str, timeout: float = 3.0) -> str | None:
    """None when the store looks reachable; else why not. Only HTTP(S) stores are probed."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or "localhost"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return None
        except OSError as exc:
            return f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    db = names.sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        return f"the folder {db.parent} does not exist"
    return None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (`<db folder>/mlruns/<experiment>`), not into
    whatever folder the process happens to run in; other stores choose their own."""
    db = names.sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "experiment"
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:6]
    return (db.parent / "mlruns" / f"{slug}-{digest}").as_uri()


def open_experiment(uri: str, experiment: str) -> tuple[Any, str]:
    """(an `MlflowClient` for `uri`, the id of `experiment`), the experiment created, or restored when deleted.
    An unreachable store raises ConnectionError at once; HTTP retries are bounded, so a server that goes away
    mid-run does not hold the caller for minutes. Another process creating the experiment first is fine."""
    reason = unreachable_reason(uri)
    if reason is not None:
        raise ConnectionError(reason)
    if urlparse(uri).scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client, client.create_experiment(experiment,
                                                    artifact_location=_artifact_location(uri, experiment))
        except Exception:  # another process created it first
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    elif found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return client, found.experiment_id


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
        self.metrics_sent = 0

    # -- training-thread side ----------------------------------------------------------------------------
    @property
    def failed(self) -> bool:
        return self.error is not None

    def start(self) -> MlflowTracker:
        self._thread.start()
        return self

    def log_metrics(self, values: Mapping[str, Any], *, step: int, timestamp: float | None = None) -> None:
        clean = {k: v for k, v in ((k, _finite(v)) for k, v in values.items()) if v is not None}
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
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        self._warn(f"MLflow tracking at {self.uri} failed while {doing}: {text[:300]}")

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
            self.metrics_sent += len(metrics)
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
                    if isinstance(item, _Close):
                        return
                    continue
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


# --------------------------------------------------------------------------------------------------------
# The observer that feeds both sinks





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
        self.start_step: int | None = None
        self.resumed = False

    def write(self, record: Mapping[str, Any]) -> None:
        with self._lock:
            if self._handle is None:
                return
            try:
                self._handle.write(json.dumps(_jsonable(record), separators=(",", ":")) + "\n")
                self._handle.flush()
            except OSError as exc:  # a full disk must not end training; say it once
                log.warning("cannot write %s (%s); local metrics stop here", self.metrics_path, exc)
                with contextlib.suppress(OSError):
                    self._handle.close()
                self._handle = None

    # -- Observer ----------------------------------------------------------------------------------------
    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self.start_step = step
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
            metrics = {name: data.get(key) for key, name in STEP_METRICS.items() if key in data}
            if not self._predicted_logged:
                self._predicted_logged = True
                metrics.update(self._predicted())
            self.tracker.log_metrics(metrics, step=self.last_step, timestamp=now)

    def on_eval(self, record: Any) -> None:
        data = _record_dict(record)
        now = self._time()
        self.write({"kind": "eval", **data, "time": now})
        if self.tracker is not None:
            metrics = {name: data.get(key) for key, name in EVAL_METRICS.items()}
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


class FanOut:
    """Calls several observers in turn; one that raises is logged and dropped, training goes on."""

    def __init__(self, *observers: Any) -> None:
        self._observers = [o for o in observers if o is not None]

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        for observer in list(self._observers):
            method = getattr(observer, name, None)
            if method is None:
                continue
            try:
                method(*args, **kwargs)
            except Exception:
                log.exception("observer %s.%s failed; it gets no more records", type(observer).__name__, name)
                self._observers.remove(observer)

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self._call("on_start", step=step, tokens=tokens, resumed=resumed)

    def on_step(self, record: Any) -> None:
        self._call("on_step", record)

    def on_eval(self, record: Any) -> None:
        self._call("on_eval", record)

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        self._call("on_event", kind, message, step=step)


# --------------------------------------------------------------------------------------------------------
# Plot


def plot_loss_curve(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    predicted_loss: float | None = None,
    band: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """Train and validation loss against tokens, with the plan's predicted final loss (a dashed line) and its
    band (shaded). Drawn with matplotlib's Agg canvas (no display, no pyplot state). A step logged twice (a
    resumed run repeats the steps after its last checkpoint) is drawn once, with its latest value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train: dict[int, tuple[float, float]] = {}
    val: dict[int, tuple[float, float]] = {}
    for record in records:
        kind = record.get("kind")
        tokens = _finite(record.get("tokens"))
        step = record.get("step")
        if tokens is None or not isinstance(step, int):
            continue
        if kind == "step" and (loss := _finite(record.get("loss"))) is not None:
            train[step] = (tokens, loss)
        elif kind == "eval" and (loss := _finite(record.get("val_loss"))) is not None:
            val[step] = (tokens, loss)
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    if train:
        xs, ys = zip(*(train[s] for s in sorted(train)), strict=True)
        ax.plot(xs, ys, label="train loss", color="tab:blue", linewidth=1.2, alpha=0.8)
    if val:
        xs, ys = zip(*(val[s] for s in sorted(val)), strict=True)
        ax.plot(xs, ys, "o-", label="val loss", color="tab:orange", linewidth=1.5, markersize=4)
    if band is not None and all(_finite(b) is not None for b in band):
        ax.axhspan(min(band), max(band), color="tab:green", alpha=0.12, label="predicted band")
    if predicted_loss is not None:
        ax.axhline(predicted_loss, color="tab:green", linestyle="--", label=f"predicted {predicted_loss:.3f}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, format="png")
    return out


__all__ = [
    "EVAL_METRICS",
    "STEP_METRICS",
    "FanOut",
    "MlflowTracker",
    "RunRecorder",
    "SystemSampler",
    "default_experiment",
    "open_experiment",
    "plot_loss_curve",
    "process_rss_bytes",
    "read_metrics",
    "resolve_tracking_uri",
    "unreachable_reason",
]
