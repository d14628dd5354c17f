"""The training loop: one function, `train()`, to read top to bottom (docs/design.md, Training).

It gets the `TrainSpec` (never the whole plan), a built model and its AdamW parameter groups, the token arrays,
a `CheckpointStore` and a deadline on an injected `clock`. It resumes from the newest checkpoint, trains until
no further step fits, evaluates and checkpoints on a time cadence, and returns a `LoopResult`; progress goes to
an `Observer` (`oneday.runner.records`). Each iteration:

1. decide: stop? evaluate? checkpoint? the schedule's progress at the end of the next step (`pacing.Pacer`,
   on the training time of `pacing.TrainingClock`; rank 0's clock rules every rank);
2. every `log_every` steps, and before a checkpoint or the end, read back the losses and bad-step flags the
   steps left on the device (the only host sync);
3. evaluate and checkpoint when due (their time is not training time);
4. one optimizer step (`step.TrainStep`: the same step the planner timed).

Bad steps. A step whose loss or gradient norm is not finite is skipped on the device (the fused AdamW reads
`found_inf`). `MAX_BAD_IN_A_ROW` in a row roll the weights back to the last checkpoint with the LR scale halved
(kept in the checkpoint's `TrainState`, so it survives a resume); the data cursor moves on past the batches
that went bad; more than `MAX_ROLLBACKS` rollbacks end the run with `DivergedError`.

Out of memory. A step that raises `torch.OutOfMemoryError` (the first step on a card smaller than the
planner's, or after a resume on one) is retried with the micro-batch halved and the accumulation doubled: the
same windows (the cursor moves only after a step succeeds), the same global batch, LR and schedule. The
change is an "oom" event and in `LoopResult.micro_batch_changes`; at micro-batch 1 the run fails in one
line. Not under DDP, where the other ranks would wait in their all-reduce: there the error is the same line.

Checkpoints are written in the background (`CheckpointStore.save_async`): training waits only for the copy
to host memory; the next checkpoint, a rollback and the end of the run wait for the write (the final
checkpoint is written in the foreground), and a failed write is reported at the next of those.

With `spec.max_steps` set, the schedule is keyed to steps and the run takes exactly that many: bitwise
reproducible on the CPU, across an interruption and resume too. Faults for tests: `oneday.runner.faults`.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

from oneday.data.windows import WindowSampler, val_batches
from oneday.errors import UserError
from oneday.plan import TrainSpec
from oneday.runner import costs
from oneday.runner.checkpoint import CheckpointError, CheckpointStore, capture_rng, restore_rng, unwrap
from oneday.runner.distributed import DistInfo, fit_to_world
from oneday.runner.faults import OutOfMemoryLoss, PoisonedLoss, nan_steps_from_env, oom_from_env
from oneday.runner.pacing import Pacer, TrainingClock
from oneday.runner.records import EvalRecord, Event, LoopResult, NullObserver, Observer, StepRecord
from oneday.runner.schedule import lr_multiplier
from oneday.runner.state import TrainState
from oneday.runner.step import (
    LMLoss,
    TrainStep,
    autocast,
    evaluate_with_se,
    grad_scaler,
    make_optimizer,
    wrap_data_parallel,
)

logger = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 3
MAX_ROLLBACKS = 5


class DivergedError(UserError):
    """Training kept producing non-finite losses after `MAX_ROLLBACKS` rollbacks."""


def train(
    *,
    model: nn.Module,
    param_groups: list[dict],
    spec: TrainSpec,
    train_tokens: np.ndarray,
    val_tokens: np.ndarray,
    val_bytes_per_token: float,
    checkpoints: CheckpointStore,
    deadline: float,
    flops_per_token: float,
    peak_flops: float,
    clock: Callable[[], float] = time.monotonic,
    observer: Observer | None = None,
    device: str = "cpu",
    stop: threading.Event | None = None,
    dist: DistInfo | None = None,
    plan_hash: str = "",
    log_every: int = 10,
) -> LoopResult:
    """Train `model` until `deadline` (on `clock`) or `spec.max_steps`; see the module docstring."""
    session_start = clock()
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    spec, refit = fit_to_world(spec, world)  # the spec's global batch on these ranks (run.py has done it already)
    if refit:
        logger.info("%s", refit)
    main = rank == 0
    observer = observer if observer is not None and main else NullObserver()
    events: list[Event] = []

    def event(kind: str, message: str, step: int) -> None:
        events.append(Event(kind, message, step))
        logger.log(logging.INFO if kind in ("checkpoint", "resume") else logging.WARNING, "step %d: %s", step, message)
        observer.on_event(kind, message, step=step)

    # --- device, data, model, optimizer ------------------------------------------------------------------
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    elif spec.threads:
        torch.set_num_threads(spec.threads)
    precision = autocast(dev, spec.precision)
    B, A, T = spec.micro_batch, spec.grad_accum, spec.seq_len
    tokens_per_step = world * A * B * T
    sampler = WindowSampler(train_tokens, seq_len=T, seed=spec.seed)
    val = [torch.from_numpy(b).to(dev) for b in val_batches(val_tokens, seq_len=T, max_tokens=spec.eval_tokens,
                                                            batch_size=B)]
    raw = unwrap(model).to(dev)
    raw.train()
    optimizer = make_optimizer(param_groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                               weight_decay=spec.weight_decay)

    # --- resume: weights, optimizer, RNG and the loop's state from the newest good checkpoint -------------
    state, resumed = _resume(checkpoints, raw, optimizer, plan_hash=plan_hash, event=event)
    scaler = grad_scaler(dev, spec.precision)  # fp16 only; its scale is resumed with the rest
    if scaler is not None and state.grad_scaler:
        scaler.load_state_dict(state.grad_scaler)
    state.world_size = world
    wall_before = state.wall_elapsed
    observer.on_start(step=state.step, tokens=state.tokens, resumed=resumed)

    def save(*, background: bool = False) -> Path:
        state.train_elapsed = timer.train_elapsed
        state.wall_elapsed = wall_before + clock() - session_start
        state.grad_scaler = scaler.state_dict() if scaler is not None else None
        write = checkpoints.save_async if background else checkpoints.save
        return write(model=raw, optimizer=optimizer, state=state.to_dict(rng=capture_rng()))

    def report_pending_write(suffix: str = "") -> None:
        try:
            checkpoints.wait()
        except CheckpointError as exc:
            event("checkpoint-error", f"{exc}{suffix}", state.step)

    # --- the step: the loss in the module, wrapped for DDP, compiled -------------------------------------
    loss = LMLoss(raw)
    poisoned = nan_steps_from_env()
    oom_fault = oom_from_env()
    oom_net = OutOfMemoryLoss(loss, fits=oom_fault[0], on_step=oom_fault[1]) if oom_fault else None
    net: nn.Module = oom_net or loss
    poisoned_net = PoisonedLoss(net, poisoned, first_step=state.step, grad_accum=A) if poisoned else None
    net = poisoned_net or net
    group = None
    if dist is not None:
        net = wrap_data_parallel(net, device=dev)
        # Decisions travel as CPU tensors on a gloo group, so agreeing on them never waits for the GPU.
        group = torch_dist.new_group(backend="gloo") if dist.backend == "nccl" else None
    if spec.compile:  # compile DDP, not DDP the compiled module: the graph splits at DDP's buckets, so each
        net = torch.compile(net)  # bucket's all-reduce overlaps the rest of the compiled backward
    train_step = TrainStep(net, params=raw.parameters(), optimizer=optimizer, grad_accum=A,
                           grad_clip=spec.grad_clip, precision=precision, ddp=dist is not None, scaler=scaler)

    # --- time: until an evaluation and a checkpoint are timed, the cost model stands in for them ---------
    step_prior = spec.train_seconds / spec.planned_steps  # the planner's measured step time
    eval_estimate = costs.eval_seconds(sum(b.shape[0] for b in val) * T,
                                       forward_tokens_per_s=costs.forward_tokens_per_s(A * B * T / step_prior))
    params = sum(p.numel() for p in raw.parameters())
    timer = TrainingClock(clock, train_elapsed=state.train_elapsed, prior_step_seconds=step_prior)
    pacer = Pacer(spec, deadline=deadline, eval_seconds=eval_estimate,
                  checkpoint_seconds=costs.checkpoint_seconds(params, every_seconds=spec.checkpoint_every_seconds),
                  final_checkpoint_seconds=costs.checkpoint_write_seconds(params),
                  train_elapsed=state.train_elapsed, now=clock())

    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad_norm, bad]) still on the device
    bad_in_a_row = 0
    lr_now = progress_now = 0.0
    interrupted = False
    final_val_loss: float | None = None
    micro_batch_changes: list[str] = []

    while True:
        # --- 1. decide ----------------------------------------------------------------------------------
        now = timer.count_training()
        due = pacer.due(now=now, train_elapsed=timer.train_elapsed, step_seconds=timer.step_seconds,
                        step=state.step, stop=stop is not None and stop.is_set()).agreed(dist=dist, group=group)

        # --- 2. sync point: checkpoints read back too, so the state they save has counted every skip --------
        if pending and (len(pending) >= log_every or due.done or due.stop or due.checkpoint):
            rows = _read_back(pending, dist=dist)
            roll_back = False
            for (at, _), (_loss, _norm, bad) in zip(pending, rows, strict=True):
                bad_in_a_row = bad_in_a_row + 1 if bad else 0
                if bad:
                    state.skipped_steps += 1
                    event("skip", f"non-finite loss or gradient norm at step {at}: update skipped", at)
                    if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                        roll_back, bad_in_a_row = True, 0
            pending.clear()
            good = [r for r in rows if not r[2]]
            tokens_per_s = timer.take_window()
            observer.on_step(StepRecord(
                step=state.step, tokens=state.tokens, lr=lr_now,
                loss=sum(r[0] for r in good) / len(good) if good else math.nan,
                grad_norm=sum(r[1] for r in good) / len(good) if good else math.nan,
                tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops_per_token / (peak_flops * world),
                train_elapsed=timer.train_elapsed, budget_fraction=progress_now,
                epoch=state.cursor / sampler.windows_per_epoch,
            ))
            if roll_back:
                _roll_back(checkpoints, raw, optimizer, state=state, event=event)
        if due.stop:
            interrupted = True
            event("interrupt", "stop requested: saving a checkpoint and stopping", state.step)
            break
        if due.done:
            break

        # --- 3. periodic evaluation (training time) and checkpoint (wall time); rank 0 does them ----------
        if due.evaluate or due.checkpoint:
            if cuda:
                torch.cuda.synchronize()  # the queued steps belong to training time
            timer.count_training()
            if due.evaluate:
                seconds = None
                if main:
                    started = clock()
                    val_loss, val_se = evaluate_with_se(loss, val, precision=precision)
                    seconds = clock() - started
                    observer.on_eval(EvalRecord(step=state.step, tokens=state.tokens, val_loss=val_loss,
                                                val_bpb=val_loss / math.log(2) / val_bytes_per_token,
                                                train_elapsed=timer.train_elapsed, final=False, val_loss_se=val_se))
                pacer.evaluated(train_elapsed=timer.train_elapsed, seconds=seconds)
            if due.checkpoint:
                seconds = None
                if main:
                    started = clock()
                    report_pending_write()  # the previous background write, done by now (or waited for here)
                    try:
                        event("checkpoint", f"saved {save(background=True).name}", state.step)
                    except CheckpointError as exc:  # keep training: the next save, or the final one, may work
                        event("checkpoint-error", str(exc), state.step)
                    seconds = clock() - started
                pacer.checkpointed(now=clock(), seconds=seconds)
            timer.restart()

        # --- 4. one optimizer step: grad_accum micro-batches of micro_batch windows on each rank ------------
        progress_now = due.progress
        lr_now = spec.lr * state.lr_scale * lr_multiplier(
            progress_now, warmup_fraction=spec.warmup_fraction, cooldown_fraction=spec.cooldown_fraction,
            cooldown_shape=spec.cooldown_shape, final_lr_fraction=spec.final_lr_fraction)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_now * param_group.get("lr_scale", 1.0)
        batch = torch.from_numpy(sampler.batch(state.cursor, A * B, rank=rank, world_size=world))
        if cuda:
            batch = batch.pin_memory().to(dev, non_blocking=True)
        if oom_net is not None:
            oom_net.step = state.step + 1
        out_of_memory = False
        try:
            result = train_step(batch)
        except torch.OutOfMemoryError:  # freed below: inside the except, its traceback holds the step's tensors
            out_of_memory = True
        if out_of_memory:
            del batch
            old_b, old_a = B, A
            B, A = _smaller_micro_batch(optimizer, micro_batch=B, grad_accum=A, distributed=dist is not None,
                                        seq_len=T, step=state.step + 1, cuda=cuda)
            change = f"oom: micro-batch {old_b}→{B}, accumulation {old_a}→{A}"
            micro_batch_changes.append(change)
            event("oom", f"{change} at step {state.step + 1} (global batch unchanged; its windows are retried)",
                  state.step)
            train_step.grad_accum = A
            if poisoned_net is not None:  # its step count restarts at the step being retried
                poisoned_net.first_step, poisoned_net.calls, poisoned_net.grad_accum = state.step, 0, A
            continue  # the same step again: the cursor has not moved, and the compiled step recompiles on the shape
        pending.append((state.step + 1, result))
        state.step += 1
        state.cursor += world * A * B
        state.tokens += tokens_per_step
        if timer.step_done(tokens_per_step):
            state.tokens_timed += tokens_per_step

    # --- 5. the end: a final checkpoint, then the final evaluation (not when interrupted) -------------------
    if cuda:
        torch.cuda.synchronize()
    timer.count_training()
    state.train_elapsed = timer.train_elapsed
    final_path: Path | None = None
    if main:
        report_pending_write(" (a background write)")
        try:
            final_path = save()
            event("checkpoint", f"saved {final_path.name} (final)", state.step)
        except CheckpointError as exc:  # the trained weights are still in memory: the final model may fit
            event("checkpoint-error", f"{exc} (the final checkpoint)", state.step)
        if not interrupted:
            final_val_loss, val_se = evaluate_with_se(loss, val, precision=precision)
            observer.on_eval(EvalRecord(step=state.step, tokens=state.tokens, val_loss=final_val_loss,
                                        val_bpb=final_val_loss / math.log(2) / val_bytes_per_token,
                                        train_elapsed=state.train_elapsed, final=True, val_loss_se=val_se))
    if dist is not None:
        torch_dist.barrier(group=group)  # no rank leaves (and tears down the group) before the final save

    mean_tokens_per_s = state.tokens_timed / state.train_elapsed if state.train_elapsed > 0 else 0.0
    return LoopResult(
        steps=state.step, tokens=state.tokens, train_seconds=state.train_elapsed, skipped_steps=state.skipped_steps,
        rollbacks=state.rollbacks, resumes=state.resumes, final_val_loss=final_val_loss,
        final_val_bpb=None if final_val_loss is None else final_val_loss / math.log(2) / val_bytes_per_token,
        mean_tokens_per_s=mean_tokens_per_s,
        mfu=mean_tokens_per_s * flops_per_token / (peak_flops * world), final_lr=lr_now, interrupted=interrupted,
        events=tuple(events), wall_seconds=wall_before + clock() - session_start,
        warmup_seconds=timer.warmup_seconds, epochs=state.cursor / sampler.windows_per_epoch, checkpoint=final_path,
        micro_batch_changes=tuple(micro_batch_changes),
    )


def _resume(checkpoints: CheckpointStore, model: nn.Module, optimizer: torch.optim.Optimizer, *, plan_hash: str,
            event: Callable[[str, str, int], None]) -> tuple[TrainState, bool]:
    """(the state to start from, whether it was resumed): the newest checkpoint that loads (weights, optimizer
    and RNG restored), or a fresh state. A checkpoint of another plan is refused."""
    newest = checkpoints.latest_state()
    if newest is not None and plan_hash and newest.get("plan_hash") not in (None, "", plan_hash):
        raise UserError(
            f"{checkpoints.directory}: the newest checkpoint belongs to another plan (plan hash "
            f"{newest.get('plan_hash')}, this plan {plan_hash}); resume with that plan or use a new run folder"
        )
    checkpoint = checkpoints.restore_latest(model, optimizer)
    if checkpoint is None:
        return TrainState(plan_hash=plan_hash), False
    saved = TrainState.from_dict(checkpoint.state)
    if plan_hash and saved.plan_hash and saved.plan_hash != plan_hash:
        raise UserError(
            f"{checkpoint.path}: this checkpoint belongs to another plan (plan hash {saved.plan_hash}, "
            f"this plan {plan_hash}); resume with that plan or use a new run folder"
        )
    restore_rng(checkpoint.state["rng"])
    saved.resumes += 1
    saved.plan_hash = plan_hash
    for reason in checkpoint.skipped:
        event("checkpoint-fallback", f"skipped unreadable checkpoint {reason}", saved.step)
    event("resume", f"resumed from {checkpoint.path.name}: step {saved.step}, {saved.tokens} tokens, "
                    f"{saved.train_elapsed:.1f} s trained, LR scale {saved.lr_scale:g}", saved.step)
    return saved, True


def _smaller_micro_batch(optimizer: torch.optim.Optimizer, *, micro_batch: int, grad_accum: int, distributed: bool,
                         seq_len: int, step: int, cuda: bool) -> tuple[int, int]:
    """After an out-of-memory step: free what it left (outside the `except`, whose traceback held its tensors)
    and return the next (micro-batch, accumulation) of the same global batch; one line when none is left."""
    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    smaller = max((d for d in range(1, micro_batch // 2 + 1) if micro_batch % d == 0), default=0)
    if smaller == 0:
        raise UserError(f"out of memory at step {step} with micro-batch 1 (seq_len {seq_len}): the model does not "
                        "fit on this device; plan a smaller model or a shorter seq_len")
    if distributed:
        raise UserError(f"out of memory at step {step} with micro-batch {micro_batch} under DDP: set "
                        f"train.micro_batch to {smaller} and train.grad_accum to "
                        f"{grad_accum * micro_batch // smaller} in the plan (same global batch)")
    return smaller, grad_accum * micro_batch // smaller


def _read_back(pending: list[tuple[int, torch.Tensor]], *, dist: DistInfo | None) -> list[list[float]]:
    """[loss, grad_norm, bad] of each pending step, averaged over ranks: the loop's one host sync."""
    values = torch.stack([v for _, v in pending])
    if dist is not None:
        torch_dist.all_reduce(values)
        values /= dist.world_size
    return values.tolist()


def _roll_back(checkpoints: CheckpointStore, model: nn.Module, optimizer: torch.optim.Optimizer, *,
               state: TrainState, event: Callable[[str, str, int], None]) -> None:
    """After `MAX_BAD_IN_A_ROW` bad steps: the last checkpoint's weights and optimizer, the LR scale halved."""
    try:
        checkpoints.wait()  # the newest checkpoint may still be being written
    except CheckpointError as exc:
        event("checkpoint-error", str(exc), state.step)
    if state.rollbacks >= MAX_ROLLBACKS and checkpoints.folders():
        raise DivergedError(
            f"training diverged: non-finite losses persisted through {MAX_ROLLBACKS} rollbacks "
            f"(LR scale now {state.lr_scale:g}); lower train.lr in the plan"
        )
    target = checkpoints.restore_latest(model, optimizer)
    if target is None:
        event("skip", f"{MAX_BAD_IN_A_ROW} bad steps in a row and no checkpoint yet: still skipping", state.step)
        return
    state.rollbacks += 1
    state.lr_scale *= 0.5
    event("rollback", f"{MAX_BAD_IN_A_ROW} bad steps in a row: weights rolled back to {target.path.name}, "
                      f"LR scale halved to {state.lr_scale:g}", state.step)


__all__ = ["MAX_BAD_IN_A_ROW", "MAX_ROLLBACKS", "DivergedError", "train"]
