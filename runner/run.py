"""`run_plan`: execute a plan to its deadline — run folder, data, device, model, loop, outputs, MLflow.

Run folder (default `runs/<plan name>/`):

    plan.json      a copy of the plan that was run
    run.json       the plan hash, the MLflow run, and the wall time charged at each checkpoint
    checkpoints/   the loop's checkpoints (it resumes from them by itself)
    metrics.jsonl  every logged step, evaluation and event (always written, flushed as it goes)
    summary.json   planned vs achieved (`RunSummary`)
    loss.png       train/val loss vs tokens with the predicted final loss and its band
    final/         the model (`save_pretrained`, safetensors) and tokenizer: loads with
                   `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`

Rerunning the same command on the same plan resumes; a folder that holds a different plan is refused
unless `force` (the old run is then moved aside, never deleted).

The deadline. For `oneday run` the budget is wall time from process start to exit: the command passes
`process_start_time()`, read from the kernel (`/proc/self/stat` start time against `CLOCK_BOOTTIME`, ~10 ms
resolution), so interpreter start-up and the torch/transformers imports count against the budget just as a
stopwatch around the command counts them (and the command ends with `os._exit` after its last output,
skipping 2–4 s of interpreter teardown). A library caller that does not pass `process_start` (a notebook,
a tuner running many trials in one process) gets the budget counted from the call. Then

    deadline = process_start + budget_seconds − prior_wall + data_prep_seconds − final_reserve

- `prior_wall` (resumed runs only): wall time that earlier sessions had charged when they wrote the
  checkpoint this session resumes from (`run.json` records it at every checkpoint). Time an earlier session
  spent after its last checkpoint is lost work and is not charged again, so a run killed and resumed ends
  within budget + one checkpoint interval (the acceptance bound). The checkpoint's own `wall_elapsed`
  counts only time inside `train()` (no process start-up), so it is the fallback, plus the start-up times
  run.json recorded, for a session killed between writing a checkpoint and the ledger;
- `data_prep_seconds`: one-off data preparation done by this call when the plan's cache was missing;
- `final_reserve`: what happens after the loop returns — saving the final model and tokenizer, the
  summary and plot, uploading the artifacts to MLflow, and interpreter exit. Estimated from the model's
  size (two writes of the fp32 weights at a conservative disk speed) plus a fixed part measured on these
  machines. The loop itself fits its final evaluation before `deadline`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday import __version__, signals
from oneday.errors import UserError
from oneday.formats import finite_or_none
from oneday.paths import write_atomic
from oneday.plan import Plan, TrainSpec
from oneday.runner import costs
from oneday.runner.records import FanOut
from oneday.runner.summary import RunSummary, load_summary
from oneday.tracking import names
from oneday.tracking.plots import plot_loss_curve
from oneday.tracking.recorder import RunRecorder, read_metrics
from oneday.tracking.store import resolve_tracking_uri
from oneday.tracking.writer import MlflowTracker

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------------
# Time


def process_start_time(clock: Callable[[], float] = time.monotonic) -> float:
    """The value `clock` had when this process started (Linux: `/proc/self/stat` field 22 vs CLOCK_BOOTTIME).

    Falls back to the time `oneday.runner.run` was imported when /proc is not there. Only meaningful for a
    clock that ticks in real seconds (time.monotonic, time.time).
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 10 * 365 * 86400:
            return clock() - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return clock() - (time.monotonic() - _IMPORTED_AT)


_IMPORTED_AT = time.monotonic()


# --------------------------------------------------------------------------------------------------------
# Run folder


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


class _RunState:
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


class _WallLedger:
    """Observer: on each checkpoint event, stores the wall time charged so far in run.json."""

    def __init__(self, state: _RunState, charged: Callable[[], float]) -> None:
        self._state = state
        self._charged = charged

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        if kind == "checkpoint":
            self._state.record_checkpoint(step, self._charged())


class _ResumeLog:
    """Says "resuming from step N" (the loop logs every other event itself)."""

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        if resumed:
            log.info("resuming from step %d (%s tokens)", step, f"{tokens:,}")


# --------------------------------------------------------------------------------------------------------
# Session facts handed to an observer that wants them (the CLI's progress bar)


@dataclass(frozen=True)
class SessionInfo:
    plan_name: str
    run_dir: Path
    budget_seconds: float
    budget_start: float  # clock value at which the budget (as charged to this session) began
    deadline: float  # clock value by which training + final eval end
    prior_wall_seconds: float
    clock: Callable[[], float]
    device: str
    planned_tokens: int
    resumed_from_step: int | None

    def elapsed(self) -> float:
        """Wall seconds charged to the budget so far (earlier sessions included)."""
        return self.clock() - self.budget_start


# --------------------------------------------------------------------------------------------------------
# Data, device, model


def _load_data(plan: Plan, *, progress: Any = None, clock: Callable[[], float] = time.monotonic) -> tuple[Any, float]:
    """The prepared data of the plan, re-preparing a missing cache entry; (data, seconds spent preparing)."""
    from oneday.data.prepare import load_prepared, prepare_data

    info = plan.data
    try:
        data = load_prepared(info.path)
    except (UserError, OSError, ValueError) as exc:
        data, reason = None, (str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if data is not None:
        if data.key != info.key:
            raise UserError(
                f"data: {info.path} holds data with key {data.key}, but the plan was made for {info.key}; "
                "make a new plan for this data"
            )
        return data, 0.0
    if not info.spec:
        raise UserError(
            f"data: the prepared data at {info.path} cannot be read ({reason}), and the plan does not say "
            "how it was made; prepare it with `oneday data prepare --data ...` and make a new plan"
        )
    log.warning("prepared data at %s is missing (%s); preparing %s again", info.path, reason, info.spec)
    started = clock()
    try:
        data = prepare_data(
            info.spec, tokenizer=info.tokenizer_spec, vocab_size=info.vocab_size,
            text_column=info.text_column, cache_dir=_cache_root(info.path), progress=progress,
        )
    except UserError as exc:
        raise UserError(
            f"data: {info.path} is missing and preparing {info.spec} again failed ({exc}); "
            f"prepare it with `oneday data prepare --data {info.spec}` and make a new plan"
        ) from None
    seconds = clock() - started
    if data.key != info.key:
        raise UserError(
            f"data: {info.path} is missing, and preparing {info.spec} again gave different data "
            f"(key {data.key}, the plan has {info.key}); the source or tokenizer changed: run "
            f"`oneday data prepare --data {info.spec}` and make a new plan"
        )
    log.info("prepared %s again in %.1f s (not charged to the budget)", info.spec, seconds)
    return data, seconds


def _cache_root(data_path: str) -> Path | None:
    """The cache folder that `data_path` lives in, if it follows `<cache>/data/<key>`; else None."""
    path = Path(data_path)
    if path.parent.name == "data":
        return path.parent.parent
    return None


def _resolve_device(plan: Plan, requested: str | None, spec: TrainSpec) -> tuple[str, TrainSpec, list[str]]:
    import torch

    notes: list[str] = []
    has_cuda = torch.cuda.is_available()
    want = requested or plan.train.device
    if want not in ("cpu", "cuda"):
        raise UserError(f"--device: must be cpu or cuda, got {want!r}")
    if want == "cuda" and not has_cuda:
        if requested == "cuda" or plan.train.device != "cuda":
            raise UserError("--device cuda: this machine has no GPU that torch can use")
        raise UserError(
            f"this plan was made for cuda ({plan.hardware.name}); this machine has no GPU; "
            "pass --device cpu to run it on the CPU anyway"
        )
    if want == "cpu" and plan.train.device == "cuda":
        spec = replace(spec, device="cpu", precision="fp32", compile=False)
        note = f"plan made for cuda ({plan.hardware.name}) run on the CPU: fp32, no compile"
        notes.append(note)
        log.warning("%s; the planned tokens and loss will not be reached", note)
    elif want == "cuda" and plan.train.device == "cpu":
        spec = replace(spec, device="cuda")
        notes.append("plan made for the CPU run on cuda")
    return want, spec, notes


def _cpu_peak_flops(threads: int) -> float:
    """A quick measured fp32 matmul rate on this CPU (used only when a CUDA plan is run on the CPU)."""
    import torch

    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < 0.25:
        torch.mm(a, b)
        reps += 1
    return max(2.0 * n**3 * reps / (time.perf_counter() - started), 1e9)


# --------------------------------------------------------------------------------------------------------
# Signals


def _stop_on_signals(stop: threading.Event) -> contextlib.AbstractContextManager[bool]:
    """SIGINT/SIGTERM set `stop` (the loop saves a checkpoint and returns); a second SIGINT raises
    KeyboardInterrupt. Handlers are restored afterwards. Only in the main thread."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()
        log.warning("%s: saving a checkpoint and stopping (Ctrl-C again to abort without saving)",
                    signal.Signals(signum).name)

    return signals.handling((signal.SIGINT, signal.SIGTERM), handler)


# --------------------------------------------------------------------------------------------------------
# Final outputs


def save_final(model: Any, *, tokenizer_dir: str | os.PathLike[str], out: Path, eot_id: int | None) -> Path:
    """`save_pretrained` the (uncompiled) model and the prepared tokenizer into `out`, replacing it whole.

    The generation config gets eos/pad = the end-of-text id, so `generate` stops there and does not warn.
    """
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module = getattr(model, "module", model)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    if eot_id is not None:
        module.config.eos_token_id = eot_id
        module.generation_config.eos_token_id = eot_id
        module.generation_config.pad_token_id = eot_id
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on the console
    try:
        module.save_pretrained(tmp, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if eot_id is not None:
        eot = tokenizer.convert_ids_to_tokens(eot_id)
        if tokenizer.eos_token is None and eot is not None:
            tokenizer.eos_token = eot
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _event_dicts(events: Any) -> tuple[dict[str, Any], ...]:
    out = []
    for event in events or ():
        if isinstance(event, dict):
            out.append(dict(event))
        elif hasattr(event, "__dataclass_fields__"):
            from dataclasses import asdict

            out.append(asdict(event))
        elif isinstance(event, (tuple, list)):
            keys = ("kind", "message", "step")
            out.append({k: v for k, v in zip(keys, event, strict=False)})
        else:
            out.append({"message": str(event)})
    return tuple(out)


# --------------------------------------------------------------------------------------------------------
# The run


def run_plan(
    plan: Plan,
    *,
    run_dir: Path | None = None,
    device: str | None = None,
    threads: int | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    force: bool = False,
    observer: Any = None,
    clock: Callable[[], float] = time.monotonic,
    process_start: float | None = None,
    progress: Any = None,
) -> RunSummary:
    """Train `plan` to its deadline and write the run folder; returns the summary (also `summary.json`).

    `process_start`: the `clock` value at which the budget began (the CLI passes `process_start_time()`); by
    default the time of this call (see the module docstring for the deadline). `observer` gets the loop's
    records (and, if it has `on_session`, a `SessionInfo` first). Under torchrun only rank 0 writes outputs
    and talks to MLflow. User-caused problems raise `UserError` before any training starts. SIGINT/SIGTERM
    during training: the loop saves a checkpoint and returns; the summary then says `interrupted`.
    """
    from oneday.runner.distributed import init_distributed

    if process_start is None:
        process_start = clock()
    dist = init_distributed()
    rank0 = dist is None or dist.rank == 0
    paths = RunPaths(Path(run_dir) if run_dir is not None else Path("runs") / plan.name)
    digest = plan.digest()
    spec = plan.train
    notes: list[str] = []

    # -- device, threads --------------------------------------------------------------------------------
    dev, spec, device_notes = _resolve_device(plan, device, spec)
    notes += device_notes
    if threads is not None and threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")

    # -- folder -----------------------------------------------------------------------------------------
    if rank0:
        note = prepare_run_dir(paths, plan, force=force, digest=digest)
        if note:
            notes.append(note)
    if dist is not None:
        import torch.distributed

        torch.distributed.barrier()
    state = _RunState(paths.state, digest)

    import torch

    n_threads = threads or spec.threads or plan.hardware.threads
    if dev == "cpu":
        torch.set_num_threads(int(n_threads))
        spec = replace(spec, threads=int(n_threads))
    if dist is not None and dev == "cuda":
        torch.cuda.set_device(dist.local_rank)
        device_str = f"cuda:{dist.local_rank}"
    else:
        device_str = dev

    # -- tracking (starts early: MLflow's import and set-up overlap with data and model) ----------------
    uri = resolve_tracking_uri(tracking_uri)
    experiment_name = experiment or names.experiment_name(plan)
    tracker = None
    if rank0:
        device_tag = f"{dev} ({plan.hardware.name})" if dev == plan.hardware.device else dev
        tags = names.run_tags(kind=names.KIND_RUN, plan_hash=digest, plan_name=plan.name, version=__version__,
                              device=device_tag)
        tags[names.TAG_RUN_DIR] = str(paths.root.resolve())
        mlflow_state = state.data["mlflow"]
        resume_id = mlflow_state.get("run_id") if mlflow_state.get("uri") == uri else None
        tracker = MlflowTracker(
            uri=uri, experiment=experiment_name,
            run_name=names.run_name(plan),
            params=plan.flat_params(), tags=tags, resume_run_id=resume_id,
            gpu=dev == "cuda", gpu_indices=[dist.local_rank] if dist is not None and dev == "cuda" else None,
            on_ready=lambda run_id: state.record_mlflow(uri=uri, experiment=experiment_name, run_id=run_id),
        ).start()
        # The loss plot is drawn after the deadline; import matplotlib (~1.5 s) now, off the main thread.
        threading.Thread(target=_preimport_plotting, name="oneday-preimport", daemon=True).start()

    try:
        return _train_and_finish(
            plan, spec=spec, paths=paths, state=state, digest=digest, dist=dist, rank0=rank0, dev=dev,
            device_str=device_str, tracker=tracker, uri=uri, experiment_name=experiment_name, notes=notes,
            observer=observer, clock=clock, process_start=process_start, progress=progress,
        )
    except BaseException:
        if tracker is not None:
            tracker.close(status="FAILED", timeout=5.0)
        raise


def _preimport_plotting() -> None:
    with contextlib.suppress(Exception):
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401


def _train_and_finish(
    plan: Plan,
    *,
    spec: TrainSpec,
    paths: RunPaths,
    state: _RunState,
    digest: str,
    dist: Any,
    rank0: bool,
    dev: str,
    device_str: str,
    tracker: MlflowTracker | None,
    uri: str,
    experiment_name: str,
    notes: list[str],
    observer: Any,
    clock: Callable[[], float],
    process_start: float,
    progress: Any,
) -> RunSummary:
    import torch

    from oneday.models.build import build_model, param_groups
    from oneday.runner.checkpoint import CheckpointStore
    from oneday.runner.loop import train

    # -- data -------------------------------------------------------------------------------------------
    if dist is None:
        data, prep_seconds = _load_data(plan, progress=progress, clock=clock)
    else:  # rank 0 prepares a missing cache entry; the others wait for it, then read it
        import torch.distributed

        if rank0:
            data, prep_seconds = _load_data(plan, progress=progress, clock=clock)
        torch.distributed.barrier()
        if not rank0:
            data, prep_seconds = _load_data(plan, clock=clock)
    train_tokens, val_tokens = data.train_array(), data.val_array()
    val_bytes_per_token = data.val_bytes_per_token()

    # -- model ------------------------------------------------------------------------------------------
    torch.manual_seed(spec.seed)
    model = build_model(plan.model, seed=spec.seed, eos_token_id=data.eot_id, device=device_str)
    groups = param_groups(model, plan.model, lr=spec.lr, weight_decay=spec.weight_decay)
    param_count = sum(p.numel() for p in model.parameters())
    peak = plan.hardware.peak_flops if dev == plan.hardware.device else None
    if peak is None:
        peak = _cpu_peak_flops(spec.threads or 1) if dev == "cpu" else plan.hardware.peak_flops
    flops_per_token = plan.model.flops_per_token()

    # -- resume point and the deadline ------------------------------------------------------------------
    store = CheckpointStore(paths.checkpoints, keep=spec.keep_checkpoints)
    prior_wall, resume_step = _prior_wall(store, state)
    reserve = costs.final_save_seconds(param_count)
    budget_start = process_start + prep_seconds - prior_wall
    deadline = budget_start + spec.budget_seconds - reserve
    session_started = process_start
    if deadline <= clock():
        log.warning("the budget is already spent (%.0f s charged of %.0f s, %.1f s kept for the final save); "
                    "only the final checkpoint and evaluation run", clock() - budget_start, spec.budget_seconds,
                    reserve)

    def charged() -> float:
        return clock() - budget_start

    info = SessionInfo(
        plan_name=plan.name, run_dir=paths.root, budget_seconds=spec.budget_seconds, budget_start=budget_start,
        deadline=deadline, prior_wall_seconds=prior_wall, clock=clock, device=dev,
        planned_tokens=spec.planned_tokens, resumed_from_step=resume_step,
    )
    if rank0 and observer is not None and hasattr(observer, "on_session"):
        observer.on_session(info)

    recorder = None
    if rank0:
        recorder = RunRecorder(paths.metrics, tracker=tracker, predicted_loss=plan.prediction.loss,
                               predicted_tokens=float(plan.prediction.tokens))
        state.data["sessions"].append({
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": dev,
            "prior_wall_seconds": round(prior_wall, 3), "resume_step": resume_step,
            "startup_seconds": round(clock() - process_start - prep_seconds, 3),
        })
        state.save()
    chain = FanOut(recorder, _WallLedger(state, charged) if rank0 else None, _ResumeLog() if rank0 else None,
                   observer)

    if rank0:
        log.info("training %s on %s until %.0f s of the %.0f s budget (%.1f s kept for the final save)",
                 plan.name, device_str if dist is None else f"{dist.world_size} × {dev}",
                 deadline - budget_start, spec.budget_seconds, reserve)
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            result = train(
                model=model, param_groups=groups, spec=spec, train_tokens=train_tokens, val_tokens=val_tokens,
                val_bytes_per_token=val_bytes_per_token, checkpoints=store, deadline=deadline,
                flops_per_token=flops_per_token, peak_flops=peak, clock=clock, observer=chain, device=device_str,
                stop=stop, dist=dist, plan_hash=digest,
            )
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise

    if not rank0:
        return _summary(plan, spec=spec, result=result, paths=paths, digest=digest, dev=dev,
                        prep_seconds=prep_seconds, wall=charged(), session_wall=clock() - session_started,
                        run_id=None, tracking_error=None, uri=uri, experiment_name=experiment_name, notes=notes)

    # -- final outputs (rank 0) -------------------------------------------------------------------------
    t_end = clock()
    save_final(model, tokenizer_dir=data.tokenizer_dir, out=paths.final, eot_id=data.eot_id)
    t_saved = clock()
    assert recorder is not None and tracker is not None
    recorder.finish(step=result.steps, tokens=result.tokens, final_loss=finite_or_none(result.final_val_loss))
    run_id = tracker.wait_ready(timeout=5.0)
    summary = _summary(plan, spec=spec, result=result, paths=paths, digest=digest, dev=dev,
                       prep_seconds=prep_seconds, wall=charged(), session_wall=clock() - session_started,
                       run_id=run_id, tracking_error=tracker.error, uri=uri, experiment_name=experiment_name,
                       notes=notes)
    write_atomic(paths.summary, summary.to_json())
    try:
        plot_loss_curve(read_metrics(paths.metrics), paths.plot, predicted_loss=plan.prediction.loss,
                        band=plan.prediction.loss_band, title=f"{plan.name}: loss vs tokens")
    except Exception as exc:  # a plot is not worth failing a finished run for
        log.warning("could not draw %s: %s", paths.plot, exc)
    for artifact in (paths.plan, paths.summary, paths.plot, paths.metrics):
        if artifact.exists():
            tracker.log_artifact(artifact)
    tracker.log_artifacts(paths.final, "model")
    tracker.set_tags({names.TAG_INTERRUPTED: str(bool(result.interrupted)).lower()})
    status = "KILLED" if result.interrupted else "FINISHED"
    t_outputs = clock()
    tracker.close(status=status, timeout=max(30.0, deadline + costs.final_save_seconds(param_count) - clock()))
    log.debug("after the loop: final save %.2f s, summary and plot %.2f s, MLflow %.2f s (reserved %.2f s); "
              "charged %.2f s of %.0f s", t_saved - t_end, t_outputs - t_saved, clock() - t_outputs, reserve,
              charged(), spec.budget_seconds)
    if tracker.error and not summary.tracking_error:
        summary = replace(summary, tracking_error=tracker.error)
        write_atomic(paths.summary, summary.to_json())
    return summary


def _peek_latest(store: Any) -> dict[str, Any] | None:
    """The loop's state of the newest checkpoint that looks whole (manifest sizes match, state.pt loads),
    read without loading weights or optimizer (the loop loads the checkpoint itself). When the weights of
    that checkpoint turn out corrupt the loop falls back to an older one; the wall time charged is then
    that of the newer one, i.e. the deadline errs early, never late."""
    import torch

    for path in reversed(store.folders()):
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            for name, size in manifest["sizes"].items():
                if (path / name).stat().st_size != size:
                    raise ValueError(f"{name} truncated")
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "step" in state:
                return state
        except Exception as exc:
            log.debug("checkpoint %s does not look whole: %s", path, exc)
    return None


def _prior_wall(store: Any, state: _RunState) -> tuple[float, int | None]:
    """(wall seconds charged before the checkpoint this session resumes from, its step), or (0, None).

    From run.json's ledger (charged time, process start-up included). If a session died between writing a
    checkpoint and the ledger, the checkpoint's own `wall_elapsed` (time inside `train()`, start-up not
    included) plus the start-up overhead earlier sessions recorded stands in.
    """
    latest = _peek_latest(store)
    if latest is None:
        return 0.0, None
    step = _field(latest, "step")
    wall = state.wall_at(int(step)) if step is not None else None
    if wall is None:
        inside = _field(latest, "wall_elapsed")
        if inside is not None:
            overhead = sum(float(s.get("startup_seconds") or 0.0) for s in state.data["sessions"])
            wall = float(inside) + overhead
    if wall is None:
        entry = state.latest_wall()
        wall = entry[1] if entry is not None else 0.0
    return float(wall), (int(step) if step is not None else None)


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None:
        meta = getattr(obj, "meta", None) or getattr(obj, "state", None)
        if isinstance(meta, dict):
            value = meta.get(name)
    return value


def _summary(
    plan: Plan,
    *,
    spec: TrainSpec,
    result: Any,
    paths: RunPaths,
    digest: str,
    dev: str,
    prep_seconds: float,
    wall: float,
    session_wall: float,
    run_id: str | None,
    tracking_error: str | None,
    uri: str,
    experiment_name: str,
    notes: list[str],
) -> RunSummary:
    pred = plan.prediction
    return RunSummary(
        plan_name=plan.name, plan_hash=digest, run_dir=str(paths.root), device=dev,
        budget_seconds=spec.budget_seconds, planned_train_seconds=spec.train_seconds,
        planned_tokens=spec.planned_tokens, planned_steps=spec.planned_steps, predicted_tokens=pred.tokens,
        predicted_loss=pred.loss, predicted_loss_band=tuple(pred.loss_band),
        predicted_tokens_per_s=pred.tokens_per_s, predicted_mfu=pred.mfu,
        steps=int(result.steps), tokens=int(result.tokens), train_seconds=float(result.train_seconds),
        wall_seconds=round(wall, 3), session_wall_seconds=round(session_wall, 3),
        final_val_loss=finite_or_none(result.final_val_loss), final_val_bpb=finite_or_none(result.final_val_bpb),
        mean_tokens_per_s=float(result.mean_tokens_per_s), mfu=float(result.mfu),
        final_lr=finite_or_none(result.final_lr), skipped_steps=int(result.skipped_steps),
        rollbacks=int(result.rollbacks), resumes=int(result.resumes), interrupted=bool(result.interrupted),
        finished=not result.interrupted, events=_event_dicts(result.events), data_prep_seconds=round(prep_seconds, 3),
        model_dir=str(paths.final) if paths.final.exists() else None, mlflow_run_id=run_id,
        mlflow_experiment=experiment_name, tracking_uri=uri, tracking_error=tracking_error,
        oneday_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------------------
# Sampling


def sample_run(
    run_dir: str | os.PathLike[str],
    *,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Generate text from `run_dir/final` (or a folder holding the model directly). Returns prompt + text."""
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"{root}: no such run folder")
    final = root / "final" if (root / "final").is_dir() else root
    if not (final / "config.json").exists():
        raise UserError(f"{root}: holds no final model (the run has not finished; rerun `oneday run` to finish it)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature: must be >= 0, got {temperature}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar before the text
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(final))
        model = AutoModelForCausalLM.from_pretrained(str(final)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UserError(f"{final}: cannot load the model ({str(exc).splitlines()[0]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else None
    if ids is None or ids.shape[1] == 0:
        start = model.generation_config.eos_token_id
        if isinstance(start, list):
            start = start[0]
        ids = torch.tensor([[start if start is not None else 0]])
        skip = 1
    else:
        skip = 0
    ids = ids.to(device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "attention_mask": torch.ones_like(ids)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return tokenizer.decode(out[0][skip:], skip_special_tokens=True)


__all__ = [
    "RunPaths",
    "SessionInfo",
    "prepare_run_dir",
    "process_start_time",
    "run_plan",
    "sample_run",
    "save_final",
]
