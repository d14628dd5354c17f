"""The one training step: the loss, the optimizer, the precision, and an optimizer step over micro-batches.

The run's loop (`oneday.runner.loop`), the planner's throughput probe (`oneday.planner.timing`) and
`bench/throughput.py` all train through this module, so the planner times exactly the step the run trains:
same loss, same optimizer kernel, same autocast, same clipping, same skip of a bad step.

- `LMLoss`: the model and the next-token cross-entropy as one module. The logits are upcast to fp32 inside
  it, so under `torch.compile` the upcast fuses into the loss instead of materialising fp32 logits.
- `make_optimizer`: AdamW over the μP parameter groups (`models.build.param_groups`), always the fused kernel.
  Fused AdamW runs on CUDA and (torch ≥ 2.4) on the CPU; one kernel updates every tensor, and it reads
  `optimizer.found_inf` (the hook `torch.amp.GradScaler` uses) to leave weights and moments untouched on a
  bad step, so skipping one needs no host sync. The same rule on both devices keeps the probe honest.
- `autocast`: bf16 autocast on CUDA when the plan says bf16 (weights and optimizer state stay fp32), fp16 when
  it says fp16 (GPUs without bf16, compute capability < 8.0); no autocast otherwise (bf16 on a CPU without
  AVX-512 BF16/AMX is ~50× slower than fp32).
- `grad_scaler`: under fp16, a `torch.amp.GradScaler` (fp16's narrow range underflows small gradients unless
  the loss is scaled up): the loss is scaled before backward, the gradients unscaled before clipping, and the
  scaler's `step` hands the fused AdamW its own on-device `found_inf` (an overflow of the scaled gradients
  skips the update and lowers the scale, still without a host sync). Such overflow skips are the scaler's
  normal business (its first steps find the scale), not bad steps: only a non-finite loss is flagged bad.
- `TrainStep`: one optimizer step over `grad_accum` micro-batches of a batch of windows (seq_len + 1 tokens
  each): forward under autocast, backward of loss / grad_accum (DDP all-reduces gradients on the last
  micro-step only), gradient clipping, the on-device bad-step flag (a non-finite loss or gradient norm —
  under fp16 the loss only —, on any rank) fed to the fused optimizer, the update. It returns [mean loss,
  gradient norm, bad] as a device tensor: the host reads it only when it wants to (the loop every few steps).
- `wrap_data_parallel`: the DDP wrapper of the step on several ranks (the run's under torchrun, and the
  planner's measurement of the data-parallel efficiency).
- `evaluate`: the mean next-token loss over fixed validation batches, no gradients (what an evaluation costs
  is what the probe times as the forward speed); `evaluate_with_se` adds its standard error over the batches.
- `keep_freed_memory`: the CPU allocator setting every CPU step runs under, the probe's as the run's. PyTorch
  has no caching allocator on the CPU: each step's activations and logits (micro-batch × seq × vocab × 4 bytes,
  75 MB at 9 × 256 × 8192) come from glibc malloc, which serves blocks over 32 MB with fresh mmaps and returns
  them on free, so every step page-faults its largest tensors in again. Measured on a 2-core EPYC (2×48 at
  vocab 8192, one thread): 45% of the step was kernel time and the speed varied 4.8k–7.4k tok/s with the
  allocator's history; with mmap off and trimming only past 2 GiB, 0% kernel time and 9.6k–10.4k tok/s. Intel's
  launcher (`torch.backends.xeon.run_cpu`) gets the same from jemalloc or tcmalloc by LD_PRELOAD; mallopt
  does it in-process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

Autocast = Callable[[], AbstractContextManager[Any]]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h: mallopt parameters
_M_MMAP_MAX = -4
_kept = False


def is_glibc() -> bool:
    """Whether this process runs on glibc (Linux), asked of the C library itself (`platform.libc_ver`
    instead reads the whole Python binary, looking for a version string)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # musl has no such name
        return False


def keep_freed_memory() -> bool:
    """glibc: serve every allocation from the heap (no mmap) and trim it only past 2 GiB free at its top, so a
    training step reuses the memory the last step freed instead of faulting it in again (module docstring).
    Process-wide and idempotent. Resident memory stays near its peak, with up to one more step's activations
    in the heap's holes (`planner.timing.cpu_memory_need_bytes` counts them).
    False (nothing done) outside glibc: macOS and musl have allocators of their own."""
    global _kept
    if _kept:
        return True
    if not is_glibc():
        return False
    libc = ctypes.CDLL(None)
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("glibc malloc: mmap off, trim threshold 2 GiB (%s)", "set" if _kept else "refused")
    return _kept


class LMLoss(nn.Module):
    """A causal LM and its next-token loss: `forward(inputs, targets)` -> mean cross-entropy (fp32)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def make_optimizer(param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float = 1e-8,
                   weight_decay: float = 0.1) -> torch.optim.AdamW:
    """Fused AdamW over `param_groups` (each group's own `lr`/`weight_decay` are kept; module docstring)."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)


def autocast(device: str | torch.device, precision: str) -> Autocast:
    """A factory of the autocast context for `precision` on `device`: bf16 or fp16 on CUDA, else none."""
    if torch.device(device).type == "cuda" and precision in ("bf16", "fp16"):
        return partial(torch.autocast, "cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext


def grad_scaler(device: str | torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 needs (module docstring); None for every other precision."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


class TrainStep:
    """One optimizer step over `grad_accum` micro-batches (module docstring). `net` is `LMLoss`, possibly
    wrapped in DDP (`ddp=True`: gradients all-reduced on the last micro-step only, the others under
    `no_sync`; the bad-step flag agreed across ranks) and then compiled (a compiled DDP module passes
    `no_sync` through); `params` are the raw module's parameters (for clipping); `scaler` the fp16 loss
    scaler (`grad_scaler`), None otherwise."""

    def __init__(self, net: nn.Module, *, params: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer,
                 grad_accum: int, grad_clip: float, precision: Autocast = nullcontext, ddp: bool = False,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.net = net
        self.params = list(params)
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.precision = precision
        self.ddp = ddp
        self.scaler = scaler

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Train on `batch` ([grad_accum · micro_batch, seq_len + 1] token ids on the device); returns the
        device tensor [mean loss, gradient norm before clipping, 1.0 if the update was skipped else 0.0]."""
        accum = self.grad_accum
        micro = batch.shape[0] // accum
        loss_sum = torch.zeros((), device=batch.device)
        for i in range(accum):
            chunk = batch[i * micro : (i + 1) * micro]
            sync = self.net.no_sync() if self.ddp and i < accum - 1 else nullcontext()  # type: ignore[operator]
            with sync:
                with self.precision():
                    loss = self.net(chunk[:, :-1], chunk[:, 1:])
                scaled = loss / accum
                (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            loss_sum += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip (and report) the true gradients
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        bad = ~torch.isfinite(loss_sum)
        if self.scaler is None:  # with a scaler an overflow is its business (module docstring)
            bad |= ~torch.isfinite(grad_norm)
        bad = bad.float()
        if self.ddp:
            torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.MAX)  # a rank's bad loss skips every rank
        if self.scaler is None:
            self.optimizer.found_inf = bad  # type: ignore[attr-defined]
            self.optimizer.step()
        else:  # sets found_inf from its own check: a NaN loss gives NaN gradients, skipped as well
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return torch.stack([loss_sum / accum, grad_norm.float(), bad])


def wrap_data_parallel(net: nn.Module, *, device: torch.device) -> nn.Module:
    """`net` under DDP as the run trains it on several ranks (and the planner times it: `planner.parallel`).
    broadcast_buffers off: the only buffers (RoPE frequencies) are constants, so no collective per forward;
    gradients as views of the all-reduce buckets: no second copy of them."""
    cuda = device.type == "cuda"
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else None
    return nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)


def evaluate(loss: nn.Module, batches: Sequence[torch.Tensor], *, precision: Autocast = nullcontext) -> float:
    """Mean next-token loss over fixed validation batches of windows (every window has seq_len targets)."""
    return evaluate_with_se(loss, batches, precision=precision)[0]


def evaluate_with_se(loss: nn.Module, batches: Sequence[torch.Tensor], *,
                     precision: Autocast = nullcontext) -> tuple[float, float]:
    """(mean loss, its standard error) over fixed validation batches of windows.

    The standard error treats each batch's mean as one sample, weighted by its windows (the last batch may be
    smaller): sqrt(Σ w_i (x_i − x̄)² / (W − w̄)) / sqrt(n) with n batches, W windows; NaN for a single batch. It
    comes from the same forward passes (one host read at the end), so it costs nothing extra.
    """
    loss.eval()
    values = []
    with torch.no_grad():
        for batch in batches:
            with precision():
                values.append(loss(batch[:, :-1], batch[:, 1:]).double())
    loss.train()
    means = torch.stack(values).cpu().tolist()
    weights = [int(b.shape[0]) for b in batches]
    windows = sum(weights)
    mean = sum(w * x for w, x in zip(weights, means, strict=True)) / windows
    n = len(means)
    if n < 2:
        return mean, float("nan")
    variance = sum(w * (x - mean) ** 2 for w, x in zip(weights, means, strict=True)) / (windows - windows / n)
    return mean, (variance / n) ** 0.5


__all__ = ["Autocast", "LMLoss", "TrainStep", "autocast", "evaluate", "evaluate_with_se", "grad_scaler",
           "is_glibc", "keep_freed_memory", "make_optimizer"]
