"""The training loop: one function, `train()`, to read top to bottom (DESIGN.md §3, §4).

It gets the `TrainSpec` (never the whole plan), a built model and its AdamW parameter groups, the token
arrays, a `CheckpointStore` and a deadline on `clock`. It trains until the projected end of training, evaluates
and checkpoints on a time cadence, and returns a `LoopResult`; progress goes to an `Observer`.

Time. `train_elapsed` counts wall time spent training: everything except evals, checkpoints and the first
step of each session (warm-up: `torch.compile` traces and compiles there, CUDA loads its kernels; its wall
time is still inside the deadline). The LR schedule's progress is train_elapsed over a horizon re-projected
before every step from the measured mean step time so that the cooldown ends at the deadline: see
`schedule.train_seconds_left` and `schedule.clock_progress`. With `spec.max_steps` set, the schedule is keyed
to steps and the run takes exactly that many, whatever the clock says: bitwise reproducible on the CPU,
including across an interruption and resume.

Bad steps. A step whose loss or gradient norm is not finite is skipped on the device: the fused AdamW kernel
reads `optimizer.found_inf` (the hook `torch.amp.GradScaler` uses) and leaves weights and moments untouched,
so no host sync is needed. The host learns about skips at the next sync point (every `log_every` steps, and
before evals, checkpoints and the end); `MAX_BAD_IN_A_ROW` in a row roll the weights back to the last
checkpoint with the LR scale halved (kept in the checkpoint state, so it survives a resume). The data
cursor moves on, past the batches that went bad.

Test hook: `ONEDAY_INJECT_NAN_AT_STEP` ("7", "7,8,9", "7-9" or "7-" for every step from 7 on) poisons the
loss of those steps, numbered from 1 like `StepRecord.step`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from oneday.data.windows import WindowSampler, val_batches
from oneday.errors import UserError
from oneday.plan import TrainSpec
from oneday.runner import costs
from oneday.runner.checkpoint import CheckpointError, CheckpointStore, capture_rng, restore_rng, unwrap
from oneday.runner.distributed import DistInfo
from oneday.runner.records import EvalRecord, Event, LoopResult, NullObserver, Observer, StepRecord
from oneday.runner.schedule import OVERHEAD_SAFETY, clock_progress, lr_multiplier, train_seconds_left

logger = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 3
MAX_ROLLBACKS = 5
INJECT_NAN_ENV = "ONEDAY_INJECT_NAN_AT_STEP"


class DivergedError(UserError):
    """Training kept producing non-finite losses after `MAX_ROLLBACKS` rollbacks."""


class _LMLoss(nn.Module):
    """Model and next-token loss as one module, so `torch.compile` fuses the fp32 upcast into the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _nan_steps_from_env() -> Callable[[int], bool]:
    """Parse `ONEDAY_INJECT_NAN_AT_STEP` into a predicate on 1-based step numbers."""
    text = os.environ.get(INJECT_NAN_ENV, "").strip()
    if not text:
        return lambda step: False
    singles: set[int] = set()
    ranges: list[tuple[int, float]] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if dash:
            ranges.append((int(low), float(high) if high.strip() else math.inf))
        else:
            singles.add(int(low))
    logger.warning("%s=%s: the loss of these steps will be NaN (test hook)", INJECT_NAN_ENV, text)
    return lambda step: step in singles or any(lo <= step <= hi for lo, hi in ranges)


def _agree(values: list[float], *, dist: DistInfo | None, group: Any) -> list[float]:
    """[interrupt, *decision]: interrupt set if any rank's is; the decision is rank 0's, for every rank."""
    if dist is None:
        return values
    mine = values if dist.rank == 0 else [values[0]] + [0.0] * (len(values) - 1)
    tensor = torch.tensor(mine, dtype=torch.float64)
    torch_dist.all_reduce(tensor, group=group)
    out = tensor.tolist()
    out[0] = float(out[0] > 0)
    return out


def _evaluate(loss_fn: nn.Module, batches: list[torch.Tensor], *, autocast: Callable[[], Any]) -> float:
    """Mean next-token loss over the fixed validation windows (every window has seq_len targets)."""
    loss_fn.eval()
    total = torch.zeros((), dtype=torch.float64, device=batches[0].device)
    windows = 0
    with torch.no_grad():
        for batch in batches:
            with autocast():
                loss = loss_fn(batch[:, :-1], batch[:, 1:])
            total += loss.double() * batch.shape[0]
            windows += batch.shape[0]
    loss_fn.train()
    return total.item() / windows


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
    main = rank == 0
    observer = observer if observer is not None and main else NullObserver()
    events: list[Event] = []

    def event(kind: str, message: str, step: int) -> None:
        events.append(Event(kind, message, step))
        level = logging.INFO if kind in ("checkpoint", "resume") else logging.WARNING
        logger.log(level, "step %d: %s", step, message)
        observer.on_event(kind, message, step=step)

    # --- devices and numerics ---------------------------------------------------------------------------
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    elif spec.threads:
        torch.set_num_threads(spec.threads)
    bf16 = cuda and spec.precision == "bf16"
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if bf16 else nullcontext

    # --- data, model, optimizer --------------------------------------------------------------------------
    B, A, T = spec.micro_batch, spec.grad_accum, spec.seq_len
    sampler = WindowSampler(train_tokens, seq_len=T, seed=spec.seed)
    val = [torch.from_numpy(b).to(dev) for b in val_batches(val_tokens, seq_len=T, max_tokens=spec.eval_tokens,
                                                            batch_size=B)]
    poisoned = _nan_steps_from_env()
    raw = unwrap(model).to(dev)
    raw.train()
    # fused: one kernel for the whole update, and it honours `found_inf` (skips bad steps on the device).
    optimizer = torch.optim.AdamW(param_groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                                  weight_decay=spec.weight_decay, fused=True)

    # --- resume ------------------------------------------------------------------------------------------
    step = tokens = tokens_timed = cursor = skipped = rollbacks = resumes = 0
    train_elapsed = wall_before = 0.0
    lr_scale = 1.0
    checkpoint = checkpoints.latest()
    if checkpoint is not None:
        saved = checkpoint.state
        if plan_hash and saved.get("plan_hash") and saved["plan_hash"] != plan_hash:
            raise UserError(
                f"{checkpoint.path}: this checkpoint belongs to another plan (plan hash {saved['plan_hash']}, "
                f"this plan {plan_hash}); resume with that plan or use a new run folder"
            )
        checkpoint.restore(raw, optimizer)
        restore_rng(saved["rng"])
        step, tokens, tokens_timed, cursor = saved["step"], saved["tokens"], saved["tokens_timed"], saved["cursor"]
        skipped, rollbacks, resumes = saved["skipped_steps"], saved["rollbacks"], saved["resumes"] + 1
        train_elapsed, wall_before, lr_scale = saved["train_elapsed"], saved["wall_elapsed"], saved["lr_scale"]
        for reason in checkpoint.skipped:
            event("checkpoint-fallback", f"skipped unreadable checkpoint {reason}", step)
        event("resume", f"resumed from {checkpoint.path.name}: step {step}, {tokens} tokens, "
                        f"{train_elapsed:.1f} s trained, LR scale {lr_scale:g}", step)
    observer.on_start(step=step, tokens=tokens, resumed=checkpoint is not None)

    def state() -> dict[str, Any]:
        """Everything a resume needs besides weights and optimizer: plain values and tensors only."""
        return {"step": step, "tokens": tokens, "tokens_timed": tokens_timed, "cursor": cursor,
                "train_elapsed": train_elapsed, "wall_elapsed": wall_before + clock() - session_start,
                "skipped_steps": skipped, "rollbacks": rollbacks, "lr_scale": lr_scale, "resumes": resumes,
                "plan_hash": plan_hash, "world_size": world, "rng": capture_rng()}

    # --- wrappers: loss in the module, compile, DDP -------------------------------------------------------
    loss_fn = _LMLoss(raw)
    net: nn.Module = torch.compile(loss_fn) if spec.compile else loss_fn
    group = None
    if dist is not None:
        # broadcast_buffers off: the only buffers (RoPE frequencies) are constants; no collective per forward.
        device_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if cuda else None
        net = nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False,
                                                  gradient_as_bucket_view=True)
        # Decisions travel as CPU tensors on a gloo group, so agreeing on them never waits for the GPU.
        group = torch_dist.new_group(backend="gloo") if dist.backend == "nccl" else None

    # --- time bookkeeping ---------------------------------------------------------------------------------
    # Until the first evaluation and checkpoint are timed, the planner's cost model stands in for them.
    step_prior = spec.train_seconds / spec.planned_steps  # the planner's measured step time
    val_tokens_used = sum(b.shape[0] for b in val) * T
    eval_seconds = costs.eval_seconds(val_tokens_used,
                                      forward_tokens_per_s=costs.forward_tokens_per_s(A * B * T / step_prior))
    save_seconds = costs.checkpoint_seconds(sum(p.numel() for p in raw.parameters()))
    eval_every, save_every = spec.eval_every_seconds, spec.checkpoint_every_seconds
    budget_left = partial(train_seconds_left, deadline=deadline, eval_every_seconds=eval_every,
                          checkpoint_every_seconds=save_every)
    next_eval_at = (math.floor(train_elapsed / eval_every) + 1) * eval_every
    last_save = clock()
    session_steps = 0
    session_train = 0.0  # training seconds of this session's timed steps, for the step-time estimate
    warmup_seconds = 0.0
    t_mark = clock()  # start of the current training segment

    pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, grad_norm, bad]) still on the device
    window_tokens, window_seconds = 0, 0.0
    bad_in_a_row = 0
    progress = lr_now = step_progress = 0.0
    interrupted = False
    final_val_loss: float | None = None

    while True:
        # --- 1. decide: stop? eval? checkpoint? the next step's progress. Rank 0's clock rules --------------
        now = clock()
        train_elapsed += now - t_mark
        window_seconds += now - t_mark
        t_mark = now
        step_seconds = session_train / (session_steps - 1) if session_steps > 1 else step_prior
        eval_due = train_elapsed >= next_eval_at
        save_due = now - last_save >= save_every
        if spec.max_steps is not None:
            train_left = max(0, spec.max_steps - step) * step_seconds
        else:
            train_left = min(budget_left(now=now, eval_seconds=eval_seconds, checkpoint_seconds=save_seconds,
                                         slack_seconds=step_seconds),
                             spec.train_seconds - train_elapsed)
        # The final eval and checkpoint come within an interval: periodic ones there would only cost time
        # (and would cut the projected run short by more than a step, so the last step would miss the end).
        eval_due = eval_due and train_left >= eval_every
        save_due = save_due and train_left >= save_every
        if spec.max_steps is not None:
            steps_left = max(0, spec.max_steps - step)
            progress = min(1.0, (step + 1) / spec.max_steps)
        else:
            if eval_due or save_due:  # they happen before the next step: take their time off first
                soon = now + OVERHEAD_SAFETY * (eval_seconds * eval_due + save_seconds * save_due)
                train_left = min(budget_left(now=soon, eval_seconds=eval_seconds, checkpoint_seconds=save_seconds,
                                             slack_seconds=step_seconds),
                                 spec.train_seconds - train_elapsed)
            progress, steps_left = clock_progress(train_elapsed=train_elapsed, step_seconds=step_seconds,
                                                  train_left=train_left)
        interrupt = stop is not None and stop.is_set()
        interrupt, done, progress, eval_due, save_due = _agree(
            [float(interrupt), float(steps_left < 1), progress, float(eval_due), float(save_due)],
            dist=dist, group=group)

        # --- 2. sync point: read the losses, norms and bad-step flags the last steps left on the device -----
        # Checkpoints flush too, so that the state they save has counted every skipped step.
        if pending and (len(pending) >= log_every or done or interrupt or save_due):
            values = torch.stack([v for _, v in pending])
            if dist is not None:
                torch_dist.all_reduce(values)
                values /= world
            rows = values.tolist()
            roll_back = False
            for (at, _), (_loss, _norm, bad) in zip(pending, rows, strict=True):
                if bad:
                    skipped += 1
                    bad_in_a_row += 1
                    event("skip", f"non-finite loss or gradient norm at step {at}: update skipped", at)
                    if bad_in_a_row >= MAX_BAD_IN_A_ROW:
                        roll_back, bad_in_a_row = True, 0
                else:
                    bad_in_a_row = 0
            good = [r for r in rows if not r[2]]
            tokens_per_s = window_tokens / window_seconds if window_seconds > 0 else 0.0
            record = StepRecord(
                step=step, tokens=tokens, lr=lr_now,
                loss=sum(r[0] for r in good) / len(good) if good else math.nan,
                grad_norm=sum(r[1] for r in good) / len(good) if good else math.nan,
                tokens_per_s=tokens_per_s, mfu=tokens_per_s * flops_per_token / (peak_flops * world),
                train_elapsed=train_elapsed, budget_fraction=step_progress, epoch=cursor / sampler.windows_per_epoch,
            )
            observer.on_step(record)
            logger.debug("step %d: loss %.4f, lr %.3g, %.0f tok/s", step, record.loss, lr_now, tokens_per_s)
            pending.clear()
            window_tokens, window_seconds = 0, 0.0
            if roll_back:
                target = checkpoints.latest()
                if target is None:
                    event("skip", f"{MAX_BAD_IN_A_ROW} bad steps in a row and no checkpoint yet: still skipping", step)
                else:
                    rollbacks += 1
                    if rollbacks > MAX_ROLLBACKS:
                        raise DivergedError(
                            f"training diverged: non-finite losses persisted through {MAX_ROLLBACKS} rollbacks "
                            f"(LR scale now {lr_scale:g}); lower train.lr in the plan"
                        )
                    target.restore(raw, optimizer)
                    lr_scale *= 0.5
                    event("rollback", f"{MAX_BAD_IN_A_ROW} bad steps in a row: weights rolled back to "
                                      f"{target.path.name}, LR scale halved to {lr_scale:g}", step)

        if interrupt:
            interrupted = True
            event("interrupt", "stop requested: saving a checkpoint and stopping", step)
            break
        if done:
            break

        # --- 3. periodic eval (train time) and checkpoint (wall time); rank 0 only, not training time -------
        if eval_due or save_due:
            if cuda:
                torch.cuda.synchronize()  # the queued steps belong to training time
            t = clock()
            train_elapsed += t - t_mark
            window_seconds += t - t_mark
            if eval_due:
                if main:
                    val_loss = _evaluate(loss_fn, val, autocast=autocast)
                    eval_seconds = clock() - t
                    observer.on_eval(EvalRecord(step=step, tokens=tokens, val_loss=val_loss,
                                                val_bpb=val_loss / math.log(2) / val_bytes_per_token,
                                                train_elapsed=train_elapsed, final=False))
                next_eval_at = (math.floor(train_elapsed / eval_every) + 1) * eval_every
            if save_due:
                t_save = clock()
                if main:
                    try:
                        path = checkpoints.save(model=raw, optimizer=optimizer, state=state())
                        event("checkpoint", f"saved {path.name}", step)
                    except CheckpointError as exc:  # keep training; the final save will raise if it persists
                        event("checkpoint-error", str(exc), step)
                    save_seconds = clock() - t_save
                last_save = clock()
            t_mark = clock()

        # --- 4. one optimizer step: grad_accum micro-steps of micro_batch windows on each rank -------------
        step_progress = progress
        lr_now = spec.lr * lr_scale * lr_multiplier(
            progress, warmup_fraction=spec.warmup_fraction, cooldown_fraction=spec.cooldown_fraction,
            cooldown_shape=spec.cooldown_shape, final_lr_fraction=spec.final_lr_fraction)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_now * param_group.get("lr_scale", 1.0)
        batch = torch.from_numpy(sampler.batch(cursor, A * B, rank=rank, world_size=world))
        if cuda:
            batch = batch.pin_memory().to(dev, non_blocking=True)
        loss_sum = torch.zeros((), device=dev)
        for micro in range(A):
            chunk = batch[micro * B : (micro + 1) * B]
            # DDP all-reduces gradients on the last micro-step only.
            sync = net.no_sync() if dist is not None and micro < A - 1 else nullcontext()
            with sync:
                with autocast():
                    loss = net(chunk[:, :-1], chunk[:, 1:])
                if poisoned(step + 1):
                    loss = loss * math.nan
                (loss / A).backward()
            loss_sum += loss.detach()
        grad_norm = nn.utils.clip_grad_norm_(raw.parameters(), spec.grad_clip)
        bad = (~torch.isfinite(loss_sum) | ~torch.isfinite(grad_norm)).float()
        if dist is not None:
            torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)  # a rank's bad loss skips every rank
        optimizer.found_inf = bad  # type: ignore[attr-defined]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        cursor += world * A * B
        tokens += world * A * B * T
        pending.append((step, torch.stack([loss_sum / A, grad_norm.float(), bad])))

        now = clock()
        if session_steps == 0:  # warm-up: compile and first-touch costs, inside the deadline but not trained time
            warmup_seconds += now - t_mark
        else:
            train_elapsed += now - t_mark
            session_train += now - t_mark
            window_seconds += now - t_mark
            window_tokens += world * A * B * T
            tokens_timed += world * A * B * T
        t_mark = now
        session_steps += 1

    # --- 5. the end: a final checkpoint, then the final eval (not when interrupted) -------------------------
    if cuda:
        torch.cuda.synchronize()
    train_elapsed += clock() - t_mark
    final_path: Path | None = None
    if main:
        final_path = checkpoints.save(model=raw, optimizer=optimizer, state=state())
        event("checkpoint", f"saved {final_path.name} (final)", step)
        if not interrupted:
            final_val_loss = _evaluate(loss_fn, val, autocast=autocast)
            observer.on_eval(EvalRecord(step=step, tokens=tokens, val_loss=final_val_loss,
                                        val_bpb=final_val_loss / math.log(2) / val_bytes_per_token,
                                        train_elapsed=train_elapsed, final=True))
    if dist is not None:
        torch_dist.barrier(group=group)  # no rank leaves (and tears down the group) before the final save

    mean_tokens_per_s = tokens_timed / train_elapsed if train_elapsed > 0 else 0.0
    return LoopResult(
        steps=step, tokens=tokens, train_seconds=train_elapsed, skipped_steps=skipped, rollbacks=rollbacks,
        resumes=resumes, final_val_loss=final_val_loss,
        final_val_bpb=None if final_val_loss is None else final_val_loss / math.log(2) / val_bytes_per_token,
        mean_tokens_per_s=mean_tokens_per_s,
        mfu=mean_tokens_per_s * flops_per_token / (peak_flops * world), final_lr=lr_now, interrupted=interrupted,
        events=tuple(events), wall_seconds=wall_before + clock() - session_start, warmup_seconds=warmup_seconds,
        epochs=cursor / sampler.windows_per_epoch, checkpoint=final_path,
    )


__all__ = [
    "INJECT_NAN_ENV",
    "MAX_BAD_IN_A_ROW",
    "MAX_ROLLBACKS",
    "DivergedError",
    "EvalRecord",
    "Event",
    "LoopResult",
    "NullObserver",
    "Observer",
    "StepRecord",
    "train",
]
