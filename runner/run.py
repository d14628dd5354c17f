"""`run_plan`: train a plan to its deadline — set up, train, finish (docs/design.md, Training).

Set up: the device (the plan's, or `--device`); what must hold before anything is created (`preflight`: the
model fits the memory, the disk holds a checkpoint; `run_dir.check_run_dir`: the folder may be used); the data
(`oneday.data.plan_data`); only then the run folder, locked for the session, and its ledger (`run_dir`); MLflow
(its import and set-up overlap with building the model), the model, the resume point and the deadline
(`deadline`). Train: the loop (`loop.train`), observed by metrics.jsonl and MLflow (`oneday.tracking.recorder`),
the checkpoint ledger and the caller's observer; SIGINT/SIGTERM make the loop save a checkpoint and return
(outside the loop SIGTERM unwinds like Ctrl-C). Finish (rank 0): the final model and tokenizer, the summary,
the plot, the artifacts (`outputs`), and the summary again with the real wall time. Under torchrun every rank
trains and only rank 0 writes outputs and talks to MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday import __version__, signals
from oneday.errors import UserError
from oneday.evaluate.harness import EvalRequest
from oneday.formats import finite_or_none
from oneday.paths import write_atomic
from oneday.plan import Plan, TrainSpec
from oneday.runner import costs, preflight
from oneday.runner.deadline import prior_wall
from oneday.runner.outputs import build_summary, measured_as_planned, run_speed_note, save_final
from oneday.runner.records import FanOut
from oneday.runner.run_dir import (
    RunLedger,
    RunLock,
    RunPaths,
    WallLedger,
    check_run_dir,
    discard_new_run_dir,
    prepare_run_dir,
)
from oneday.runner.session import Session, SessionInfo
from oneday.runner.speed_watch import SpeedWatch
from oneday.runner.summary import RunSummary
from oneday.tracking import names
from oneday.tracking.nodes import start_node_metrics
from oneday.tracking.plots import plot_loss_curve
from oneday.tracking.recorder import RunRecorder, read_metrics
from oneday.tracking.store import resolve_tracking_uri
from oneday.tracking.writer import DatasetRecord, MlflowTracker

log = logging.getLogger(__name__)

MIN_CLOSE_SECONDS = 2.0
"""What the MLflow writer always gets to finish, even when the budget is spent: enough for a local store (a store
that never answered or is down gets half a second)."""


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
    eval_request: EvalRequest | None = None,
) -> RunSummary:
    """Train `plan` to its deadline and write the run folder; returns the summary (also `summary.json`).

    `process_start`: the `clock` value at which the budget began (the CLI passes
    `deadline.process_start_time()`); by default the time of this call. `observer` gets the loop's records (and,
    if it has `on_session`, a `SessionInfo` first). User-caused problems raise `UserError` before any training
    starts. SIGINT/SIGTERM during training: the loop saves a checkpoint and returns; the summary then says
    `interrupted`.

    `eval_request` (`oneday run --eval`): lm_eval benchmarks of the final model after the final save
    (`oneday.evaluate`), inside the budget when `costs.benchmark_seconds` fits its `MAX_BENCHMARK_SHARE` (the
    training stops that much earlier), else after the deadline; skipped when the run is interrupted.
    """
    with signals.handling((signal.SIGTERM,), signals.raise_interrupt):  # start-up and final save: like Ctrl-C
        return _run(plan, run_dir=run_dir, device=device, threads=threads, tracking_uri=tracking_uri,
                    experiment=experiment, force=force, observer=observer, clock=clock, process_start=process_start,
                    progress=progress, eval_request=eval_request)


def _run(plan: Plan, *, run_dir: Path | None, device: str | None, threads: int | None, tracking_uri: str | None,
         experiment: str | None, force: bool, observer: Any, clock: Callable[[], float], process_start: float | None,
         progress: Any, eval_request: EvalRequest | None = None) -> RunSummary:
    import torch

    from oneday.data.plan_data import load_plan_data
    from oneday.runner.distributed import (
        check_shared_run_dir,
        fit_to_world,
        in_turns,
        init_distributed,
        long_wait_group,
    )
    from oneday.runner.step import keep_freed_memory

    if process_start is None:
        process_start = clock()
    if threads is not None and threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")
    dist = init_distributed()
    rank0 = dist is None or dist.rank == 0
    paths = RunPaths(Path(run_dir) if run_dir is not None else Path("runs") / plan.name)
    digest = plan.digest()
    notes: list[str] = []

    # -- device and threads; then what must hold before anything is created -----------------------------
    if plan.provenance.what_if is not None or plan.data.assumed:  # before the device: the clearer refusal
        here = device or ("cuda" if torch.cuda.is_available() else "cpu")
        name, count = preflight.this_hardware(here)
        preflight.check_hardware(plan, device=here, name=name, count=count, force=force)
    dev, spec, device_notes = _resolve_device(plan, device, plan.train)
    notes += device_notes
    spec, world_note = fit_to_world(spec, dist.world_size if dist is not None else 1)  # the plan's global batch
    if world_note is not None:
        notes.append(world_note)
        if rank0:
            log.warning("%s", world_note)
    group = long_wait_group() if dist is not None else None  # start-up waits: hours, not NCCL's 10 minutes
    if dev == "cpu":
        spec = replace(spec, threads=int(threads or spec.threads or plan.hardware.threads))
        torch.set_num_threads(spec.threads or 1)
        keep_freed_memory()  # as the probe timed the step (runner.step)
    device_name = dev
    if dist is not None and dev == "cuda":
        torch.cuda.set_device(dist.local_rank)
        device_name = f"cuda:{dist.local_rank}"
    preflight.check_memory(plan, spec, device_memory_bytes=preflight.device_memory_bytes(dev, device_name))
    if rank0:
        check_run_dir(paths, digest=digest, force=force)
        preflight.check_disk(paths.root, params=plan.model.params_total(), keep=spec.keep_checkpoints)

    # -- data: rank 0 prepares a missing cache entry, then each node's first rank (a node that does not share
    #    rank 0's cache prepares its own), then the rest read it; the others wait on the long gloo group --------
    if dist is None:
        data, prep_seconds = load_plan_data(plan.data, progress=progress, clock=clock)
    else:
        data, prep_seconds = in_turns(
            dist, group, lambda: load_plan_data(plan.data, progress=progress if rank0 else None, clock=clock))

    # -- the run folder, locked for this session -----------------------------------------------------------
    lock = RunLock(paths.lock) if rank0 else None
    existed = paths.root.exists()
    try:
        if lock is not None:
            lock.acquire()
            note = prepare_run_dir(paths, plan, force=force, digest=digest, lock=lock)
            if note:
                notes.append(note)
        if dist is not None:  # every rank must see this folder and its checkpoints: they resume from them
            check_shared_run_dir(dist, group, root=paths.root, checkpoints=paths.checkpoints)
        session = Session(
            plan=plan, spec=spec, paths=paths, ledger=RunLedger(paths.state, digest), digest=digest, device=dev,
            device_name=device_name, dist=dist, tracking_uri=resolve_tracking_uri(tracking_uri),
            experiment=experiment or names.experiment_name(plan), notes=tuple(notes), clock=clock,
            process_start=process_start,
        )
    except BaseException:
        if lock is not None:
            lock.release()
            if not existed:
                discard_new_run_dir(paths)
        raise

    # -- tracking (starts early: MLflow's import and set-up overlap with building the model) ---------------
    try:
        tracker = _start_tracking(session) if rank0 else None
        node_metrics = None
        try:  # every other node's system metrics into rank 0's run (multi-node: the run id is broadcast)
            node_metrics = start_node_metrics(dist, group, tracker=tracker, uri=session.tracking_uri,
                                              gpu=dev == "cuda")
            return _train_and_finish(session, data=data, prep_seconds=prep_seconds, tracker=tracker,
                                     observer=observer, eval_request=eval_request)
        except BaseException as exc:
            if tracker is not None:
                tracker.close(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                              timeout=MIN_CLOSE_SECONDS)
            raise
        finally:
            if node_metrics is not None:
                node_metrics.stop()
    finally:
        if lock is not None:
            lock.release()


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


def _start_tracking(session: Session) -> MlflowTracker:
    """The run's MLflow tracker, started (a resumed session continues its MLflow run); matplotlib imported
    in the background meanwhile (~1.5 s the plot after the deadline would otherwise pay)."""
    plan, dev, ledger = session.plan, session.device, session.ledger
    device_tag = f"{dev} ({plan.hardware.name})" if dev == plan.hardware.device else dev
    tags = names.run_tags(kind=names.KIND_RUN, plan_hash=session.digest, plan_name=plan.name, version=__version__,
                          device=device_tag)
    tags[names.TAG_RUN_DIR] = str(session.paths.root.resolve())
    known = ledger.data["mlflow"]
    uri, experiment = session.tracking_uri, session.experiment
    tracker = MlflowTracker(
        uri=uri, experiment=experiment, run_name=names.run_name(plan), params=plan.flat_params(), tags=tags,
        resume_run_id=known.get("run_id") if known.get("uri") == uri else None,
        dataset=DatasetRecord(name=plan.data.spec or plan.data.source, digest=plan.data.key, source=plan.data.source),
        gpu=dev == "cuda",  # every GPU of rank 0's node (oneday.tracking.nodes: the other nodes)
        on_ready=lambda run_id: ledger.record_mlflow(uri=uri, experiment=experiment, run_id=run_id),
    ).start()
    threading.Thread(target=_preimport_plotting, name="oneday-preimport", daemon=True).start()
    return tracker


def _preimport_plotting() -> None:
    with contextlib.suppress(Exception):
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401


def _train_and_finish(session: Session, *, data: Any, prep_seconds: float, tracker: MlflowTracker | None,
                      observer: Any, eval_request: EvalRequest | None = None) -> RunSummary:
    import torch

    from oneday.models.build import build_model, param_groups
    from oneday.runner.checkpoint import CheckpointStore
    from oneday.runner.loop import train

    plan, spec, paths, ledger, clock, dist = session.plan, session.spec, session.paths, session.ledger, \
        session.clock, session.dist
    rank0 = session.rank0

    # -- model ------------------------------------------------------------------------------------------
    torch.manual_seed(spec.seed)
    model = build_model(plan.model, seed=spec.seed, eos_token_id=data.eot_id, device=session.device_name)
    groups = param_groups(model, plan.model, lr=spec.lr, weight_decay=spec.weight_decay)
    param_count = sum(p.numel() for p in model.parameters())
    peak = plan.hardware.peak_flops
    if session.device == "cpu" and plan.hardware.device != "cpu":
        from oneday.devices import measure_peak_flops

        peak = measure_peak_flops("cpu", "fp32", seconds=0.25)  # MFU against this CPU, not the planned GPU

    # -- resume point and the deadline (module `deadline`) ------------------------------------------------
    store = CheckpointStore(paths.checkpoints, keep=spec.keep_checkpoints)
    charged_before, resume_step = prior_wall(store, ledger)
    reserve = costs.final_save_seconds(param_count)
    bench_reserve = _benchmark_reserve(plan, eval_request) if rank0 else 0.0
    reserve += bench_reserve
    budget_start = session.process_start + prep_seconds - charged_before
    deadline = budget_start + spec.budget_seconds - reserve
    if deadline <= clock():
        log.warning("the budget is already spent (%.0f s charged of %.0f s, %.1f s kept for the final save); "
                    "only the final checkpoint and evaluation run", clock() - budget_start, spec.budget_seconds,
                    reserve)

    def charged() -> float:
        return clock() - budget_start

    lost = ledger.lost_seconds(charged_before) if rank0 else 0.0
    if lost >= 1.0:
        where = f"its last checkpoint (step {resume_step})" if resume_step is not None else "any checkpoint"
        log.warning("the earlier session trained about %.0f s past %s before it ended: that work is lost and "
                    "is trained again (the budget is not charged for it)", lost, where)

    recorder = None
    if rank0:
        if observer is not None and hasattr(observer, "on_session"):
            observer.on_session(SessionInfo(plan_name=plan.name, budget_seconds=spec.budget_seconds,
                                            budget_start=budget_start, clock=clock, resumed_from_step=resume_step))
        recorder = RunRecorder(paths.metrics, tracker=tracker, predicted_loss=plan.prediction.loss,
                               predicted_tokens=float(plan.prediction.tokens))
        ledger.data["sessions"].append({
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": session.device,
            "prior_wall_seconds": round(charged_before, 3), "resume_step": resume_step,
            "startup_seconds": round(clock() - session.process_start - prep_seconds, 3),
            **({"lost_seconds": round(lost, 3)} if lost >= 1.0 else {}),
        })
        ledger.save()
        log.info("training %s on %s until %.0f s of the %.0f s budget (%.1f s kept for the final save)",
                 plan.name, session.device_name if dist is None else f"{dist.world_size} × {session.device}",
                 deadline - budget_start, spec.budget_seconds, reserve)
    chain = FanOut(recorder, WallLedger(ledger, charged) if rank0 else None, _ResumeLog() if rank0 else None,
                   _speed_watch(session) if rank0 else None, observer)

    # -- train ------------------------------------------------------------------------------------------
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            result = train(
                model=model, param_groups=groups, spec=spec, train_tokens=data.train_array(),
                val_tokens=data.val_array(), val_bytes_per_token=data.val_bytes_per_token(), checkpoints=store,
                deadline=deadline, flops_per_token=plan.model.flops_per_token(), peak_flops=peak, clock=clock,
                observer=chain, device=session.device_name, stop=stop, dist=dist, plan_hash=session.digest,
            )
    except BaseException:
        if recorder is not None:
            recorder.close()
        raise
    if not rank0:
        return build_summary(session, result, prep_seconds=prep_seconds, wall=charged(), run_id=None,
                             tracking_error=None)

    # -- finish (rank 0): the final model, the summary, the plot, the artifacts ---------------------------
    assert recorder is not None and tracker is not None
    t_end = clock()
    save_final(model, tokenizer_dir=data.tokenizer_dir, out=paths.final, eot_id=data.eot_id)
    t_saved = clock()
    recorder.finish(step=result.steps, tokens=result.tokens, final_loss=finite_or_none(result.final_val_loss))
    summary = build_summary(session, result, prep_seconds=prep_seconds, wall=charged(), run_id=tracker.run_id,
                            tracking_error=tracker.error)
    write_atomic(paths.summary, summary.to_json())  # the copy MLflow gets; rewritten below with the final wall
    try:
        plot_loss_curve(read_metrics(paths.metrics), paths.plot, predicted_loss=plan.prediction.loss,
                        band=plan.prediction.loss_band, title=f"{plan.name}: loss vs tokens")
    except Exception as exc:  # a plot is not worth failing a finished run for
        log.warning("could not draw %s: %s", paths.plot, exc)
    for artifact in (paths.plan, paths.summary, paths.plot, paths.metrics):
        if artifact.exists():
            tracker.log_artifact(artifact)
    tracker.log_model(paths.final, step=result.steps)  # a LoggedModel with an MLmodel file: the registry takes it
    tracker.set_tags({names.TAG_INTERRUPTED: str(bool(result.interrupted)).lower()})
    t_outputs = clock()
    # MLflow gets what is left of the budget (a few seconds at least): a dead or hung store cannot hold the run
    # past it, and a healthy one still being set up after a short run gets the time to finish
    tracker.close(status="KILLED" if result.interrupted else "FINISHED",
                  timeout=max(MIN_CLOSE_SECONDS if tracker.run_id and not tracker.failed else 0.5,
                              deadline + reserve - clock()))
    log.debug("after the loop: final save %.2f s, summary and plot %.2f s, MLflow %.2f s (reserved %.2f s); "
              "charged %.2f s of %.0f s", t_saved - t_end, t_outputs - t_saved, clock() - t_outputs, reserve,
              charged(), spec.budget_seconds)
    summary = build_summary(session, result, prep_seconds=prep_seconds, wall=charged(), run_id=tracker.run_id,
                            tracking_error=tracker.error)
    write_atomic(paths.summary, summary.to_json())  # last: the wall time it records is the run's real one
    note = run_speed_note(session, result)
    if note:
        log.warning("%s", note)
    if eval_request is not None:
        _run_benchmarks(paths.root, eval_request, device=session.device_name, interrupted=result.interrupted,
                        within_budget=bench_reserve > 0, charged=charged, budget_seconds=spec.budget_seconds)
    return summary


def _benchmark_reserve(plan: Plan, request: EvalRequest | None) -> float:
    """Seconds kept free for `--eval` benchmarks after the final save: their estimate when it fits the budget's
    share for them, else 0 (they then run after the deadline; said now, before training)."""
    if request is None:
        return 0.0
    from oneday.evaluate.tasks import is_task_path

    seconds = costs.benchmark_seconds(request.tasks, limit=request.limit,
                                      forward_tokens_per_s=costs.forward_tokens_per_s(plan.prediction.tokens_per_s),
                                      task_index=not all(is_task_path(task) for task in request.tasks))
    if seconds <= costs.MAX_BENCHMARK_SHARE * plan.train.budget_seconds:
        log.info("--eval %s: ~%.0f s kept at the end of the budget for the benchmarks (training stops that much "
                 "earlier)", ",".join(request.tasks), seconds)
        return seconds
    log.warning("--eval %s: the benchmarks (~%.0f s) take more than %.0f%% of the budget; they run after the "
                "deadline, outside it (--eval-limit N scores fewer items)", ",".join(request.tasks), seconds,
                100 * costs.MAX_BENCHMARK_SHARE)
    return 0.0


def _run_benchmarks(root: Path, request: EvalRequest, *, device: str, interrupted: bool, within_budget: bool,
                    charged: Callable[[], float], budget_seconds: float) -> None:
    """`oneday eval` on the run just saved. A failure (the tasks' data not cached offline) costs a warning, never
    the finished run: `oneday eval RUN` scores it later."""
    from oneday.evaluate.harness import evaluate_run

    if interrupted:
        log.warning("--eval: the run was interrupted; no benchmarks (run `oneday eval %s` after it finishes)", root)
        return
    try:
        result = evaluate_run(root, tasks=request.tasks, limit=request.limit, device=device)
    except UserError as exc:
        log.warning("--eval: no benchmarks (%s); `oneday eval %s` scores the model later", exc, root)
        return
    spent = charged()
    where = "inside the budget" if within_budget and spent <= budget_seconds + 1.0 else "after the deadline"
    log.info("benchmarks scored %s in %.0f s (%s: %.0f s charged of %.0f s); %s", ",".join(request.tasks),
             result.seconds + result.load_seconds, where, spent, budget_seconds, root / "eval.json")


def _speed_watch(session: Session) -> SpeedWatch | None:
    """A `SpeedWatch` on the plan's speed, when this session trains as the plan measured (device, threads)."""
    if not measured_as_planned(session):
        return None
    plan = session.plan
    return SpeedWatch(planned_tokens_per_s=plan.prediction.tokens_per_s,
                      planned_train_seconds=session.spec.train_seconds, planned_tokens=plan.prediction.tokens,
                      device=session.device)


class _ResumeLog:
    """Says "resuming from step N" (the loop logs every other event itself)."""

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        if resumed:
            log.info("resuming from step %d (%s tokens)", step, f"{tokens:,}")


def _stop_on_signals(stop: threading.Event) -> contextlib.AbstractContextManager[bool]:
    """SIGINT/SIGTERM set `stop` (the loop saves a checkpoint and returns); a second SIGINT raises
    KeyboardInterrupt. Handlers are restored afterwards. Only in the main thread."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            signals.raise_interrupt(signum, frame)
        stop.set()
        log.warning("%s: saving a checkpoint and stopping (Ctrl-C again to abort without saving)",
                    signal.Signals(signum).name)

    return signals.handling((signal.SIGINT, signal.SIGTERM), handler)


__all__ = ["run_plan"]
