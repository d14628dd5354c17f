"""Throughput measurement: time real training steps of candidate shapes (DESIGN.md §3, step 2).

`probe_throughput` builds each measured shape with the runner's own builder (`build_model`: the Hugging
Face model from `from_config` with SDPA attention, oneday's init), finds the largest micro-batch that fits,
and times real training steps — forward, backward, gradient clipping, AdamW step over `param_groups` —
in the dtype and compile setting the run will use, after warm-up. The planner fits its throughput model
(`throughput.fit_throughput`) on what comes back.

Which shapes. The ladder from `ladder.candidate_shapes` is sorted by N and spaced ~1.6× apart, so an
index is a position in log N. Shapes are measured in the order smallest, largest that fits memory, then
midpoints of the widest remaining gaps (1/2, then 1/4 and 3/4, ...), at most `MAX_SHAPES` of them: the
throughput model is a line in log-log space, and its two ends plus interior points are what pin it down.
The time bound decides how many: before each shape the cost of building, warming up and timing it is
predicted from what the previous shapes took (achieved FLOP/s of the nearest measured shape, which
under-estimates a larger shape's FLOP/s, so the prediction errs long); a shape that would not finish in
the time left is skipped and the next, usually smaller, one is tried. The smallest shape is always
measured (even past the bound: without one point there is no plan), and while time allows at least two.

Micro-batch.
- CUDA: powers of two, starting at the largest one the memory estimate (`estimate_train_memory_bytes`,
  bf16 activations) allows, going up while a real eager step runs without `torch.OutOfMemoryError` and
  its `max_memory_allocated` stays within `memory_limit_bytes` (the caller leaves headroom there:
  CUDA context, fragmentation), down after an OOM; capped at `CUDA_MAX_TOKENS_PER_MICRO_BATCH`
  (2^17 tokens; past that a step is large enough to keep the GPU busy and the global batch of small
  runs would be a single micro-batch anyway). Compiled steps use less memory than eager ones, so the
  eager search is a safe bound; a compiled OOM still halves the micro-batch.
- CPU: from the estimate — the largest micro-batch whose estimated memory × `CPU_MEMORY_MARGIN` fits in
  `memory_limit_bytes` — capped at `CPU_MAX_TOKENS_PER_MICRO_BATCH` = 4096 tokens per micro-batch, and
  smaller when a step would not fit the shape's time slice, but never below `CPU_MIN_TOKENS_PER_MICRO_BATCH`
  = 1024 tokens (or one sequence): below that, per-step overheads dominate and a probe would measure — and
  the run would train at — a fraction of the CPU's speed (seen here: 128-token micro-batches ran at a
  fifth of the speed of 1k-token ones). A CPU slower than expected (other load) makes the probe run
  over its time rather than shrink the micro-batch further; a shape other than the first is skipped then.
  On the 2-core machines here tok/s
  does not grow past ~2–4k tokens per micro-batch (measured, torch 2.13, fp32, 2 threads: a 1×64 model ran
  10.5k, 9.5k and 9.1k tok/s at 2k, 4k and 8k tokens; a 3×256 one 3.3k, 2.5k and 1.0k), so a larger one
  only makes the probe slower; the run uses at most the measured micro-batch (`batch_and_lr`) and gradient
  accumulation reaches the planned batch.

Memory recorded: CUDA — `torch.cuda.max_memory_allocated` over the timed steps (measured); CPU — the
estimate at the micro-batch used (`ShapeTiming.memory_source` says which): the process's RSS moves with
the allocator and with other threads, the estimate is calibrated to within ~15% (see ModelSpec).

Dtype and compile: CUDA runs under bf16 autocast (fp32 weights and optimizer state) with TF32 matmuls,
fused AdamW, and `torch.compile` when the run will compile; the first compiled step's extra time is
recorded as the compile time. CPU: fp32, eager (bf16 on CPUs without AVX-512 BF16/AMX is ~50× slower;
compiling takes 60–90 s here and gains nothing at steady state, DESIGN §7). One torch thread count —
the run's — is set for the measurement and restored afterwards.

torch is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.planner.throughput import Measurement
from oneday.progress import NULL_PROGRESS, Progress

log = logging.getLogger(__name__)

__all__ = [
    "CPU_MAX_TOKENS_PER_MICRO_BATCH",
    "CUDA_MAX_TOKENS_PER_MICRO_BATCH",
    "MAX_SHAPES",
    "ShapeTiming",
    "ThroughputProbe",
    "measure_order",
    "probe_throughput",
    "scale_compile_seconds",
]

CPU_MAX_TOKENS_PER_MICRO_BATCH = 4096
CUDA_MAX_TOKENS_PER_MICRO_BATCH = 2**17
CPU_MEMORY_MARGIN = 1.25
# The time slice may not shrink a CPU micro-batch below this many tokens at first (only a slow first step does).
CPU_MIN_TOKENS_PER_MICRO_BATCH = 1024
MAX_SHAPES = 5
MIN_TIMED_STEPS = 2
MAX_TIMED_STEPS = 30
WARMUP_STEPS = {"cpu": 1, "cuda": 2}
# Before the first measurement: a guess of achieved FLOP/s as a fraction of the peak, to size a CPU step.
FIRST_GUESS_MFU = 0.2
FIRST_GUESS_CPU_FLOPS = 1e10
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class ShapeTiming:
    """Everything measured on one shape; `measurement` is what the throughput model is fitted on."""

    measurement: Measurement
    timed_steps: int
    step_seconds: float
    """Mean wall time of one timed training step."""
    build_seconds: float
    warmup_seconds: float
    """Wall time of the warm-up steps (compile included)."""
    compile_seconds: float
    """Extra time of the first compiled step over a timed step (0 without compile)."""
    forward_tokens_per_s: float
    """No-grad forward speed at the same micro-batch: what an evaluation runs at."""
    mfu: float | None
    memory_source: str
    micro_batch_reason: str
    seconds: float
    """Wall time spent on this shape in all (build, micro-batch search, warm-up, timing, clean-up)."""

    @property
    def spec(self) -> ModelSpec:
        return self.measurement.spec

    def label(self) -> str:
        return f"{self.spec.n_layer}×{self.spec.d_model}"


@dataclass(frozen=True)
class ThroughputProbe:
    """The result of `probe_throughput`: the timings, what was skipped and why, and the time it took."""

    timings: tuple[ShapeTiming, ...]
    skipped: tuple[str, ...]
    seconds: float
    device: str
    dtype: str
    compile: bool
    threads: int | None

    @property
    def measurements(self) -> list[Measurement]:
        return [t.measurement for t in self.timings]

    def timing_for(self, spec: ModelSpec) -> ShapeTiming | None:
        for t in self.timings:
            if _key(t.spec) == _key(spec):
                return t
        return None

    def nearest(self, spec: ModelSpec) -> ShapeTiming:
        """The measured shape nearest `spec` in log N (for estimates about an unmeasured shape)."""
        if not self.timings:
            raise ValueError("no shape was measured")
        n = spec.params_scaling()
        return min(self.timings, key=lambda t: abs(math.log(t.spec.params_scaling() / n)))


def _key(spec: ModelSpec) -> tuple[int, ...]:
    return (spec.n_layer, spec.d_model, spec.n_head, spec.d_ff, spec.vocab_size, spec.seq_len)


def measure_order(count: int, *, limit: int = MAX_SHAPES) -> list[int]:
    """Indices into a ladder of `count` shapes sorted by N, in measuring order: smallest, largest, then
    the midpoints of the widest remaining gaps; at most `limit`."""
    if count <= 0:
        return []
    order = [0]
    if count > 1:
        order.append(count - 1)
    gaps = [(0, count - 1)] if count > 2 else []
    while gaps and len(order) < min(limit, count):
        gaps.sort(key=lambda g: (g[1] - g[0], -g[0]), reverse=True)
        lo, hi = gaps.pop(0)
        if hi - lo < 2:
            continue
        mid = (lo + hi) // 2
        order.append(mid)
        gaps += [(lo, mid), (mid, hi)]
    return order[:limit]


def probe_throughput(
    specs: Sequence[ModelSpec],
    *,
    device: str,
    dtype: str,
    compile: bool,
    seconds: float,
    memory_limit_bytes: int,
    threads: int | None,
    progress: Progress | None = None,
    peak_flops: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ThroughputProbe:
    """Measured throughput of several of `specs` (a ladder sorted by N) within about `seconds` in all (module
    docstring: which shapes, the micro-batch rule, what is timed). UserError when not even the smallest shape fits."""
    import torch

    import oneday.models.build  # noqa: F401  (transformers: its import, seconds, is not measuring time)

    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: expected cpu or cuda")
    if dtype not in ("bf16", "fp32"):
        raise UserError(f"dtype {dtype!r}: expected bf16 or fp32")
    if device == "cpu" and dtype == "bf16":
        raise UserError("bf16 on the CPU is ~50x slower than fp32 here; measure in fp32")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    if not specs:
        raise ValueError("probe_throughput needs at least one shape")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch cannot use a CUDA GPU here")
    specs = sorted(specs, key=lambda s: s.params_scaling())
    progress = progress or NULL_PROGRESS
    started = clock()
    deadline = started + seconds
    activation_bytes = 2 if dtype == "bf16" else 4

    # CPU: drop the shapes whose estimated memory at micro-batch 1 does not fit (CUDA finds out by trying).
    ladder = list(specs)
    skipped: list[str] = []
    if device == "cpu":
        fitting = [s for s in ladder if _cpu_max_micro_batch(s, memory_limit_bytes) >= 1]
        for s in ladder:
            if s not in fitting:
                skipped.append(f"{_label(s)}: estimated not to fit in {memory_limit_bytes / 2**30:.1f} GiB")
        if not fitting:
            need = CPU_MEMORY_MARGIN * ladder[0].estimate_train_memory_bytes(micro_batch=1)
            raise UserError(
                f"not even the smallest shape, {_label(ladder[0])}, fits in {memory_limit_bytes / 2**30:.2f} GiB "
                f"of memory (it needs about {need / 2**30:.2f} GiB)"
            )
        ladder = fitting

    timings: list[ShapeTiming] = []
    target = min(MAX_SHAPES, len(ladder))
    with _torch_settings(device=device, threads=threads), progress.task(
        f"measuring throughput on {device}", total=round(seconds, 1), unit="s"
    ) as task:
        pending = measure_order(len(ladder), limit=len(ladder))
        too_big: set[int] = set()
        while pending and len(timings) < target:
            index = pending.pop(0)
            spec = ladder[index]
            if index in too_big:
                continue
            left = deadline - clock()
            shapes_left = max(1, target - len(timings))
            if timings:
                if left <= 0:
                    skipped.append(f"{_label(spec)}: the measuring time ({seconds:.0f} s) was used up")
                    continue
                predicted = _predict_cost(spec, timings, device=device, compile=compile)
                if predicted > left:
                    skipped.append(
                        f"{_label(spec)}: measuring it would take about {predicted:.1f} s, {max(left, 0):.1f} s left"
                    )
                    continue
            budget = max(left, 0.0) / shapes_left
            task.update(description=f"measuring {_label(spec)} ({len(timings) + 1}/{target})")
            shape_started = clock()
            try:
                timing = _measure_one(
                    spec, device=device, dtype=dtype, compile=compile, budget_seconds=budget,
                    memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
                    peak_flops=peak_flops, reference=timings, hard_deadline=deadline if timings else None,
                    clock=clock,
                )
            except _Skip as skip:
                skipped.append(f"{_label(spec)}: {skip}")
                if "memory" in str(skip):
                    # Neither does anything larger fit, and the "largest that fits" slot moves one rung down.
                    too_big.update(range(index, len(ladder)))
                    below = index - 1
                    if below >= 0 and all(_key(t.spec) != _key(ladder[below]) for t in timings):
                        if below in pending:
                            pending.remove(below)
                        pending.insert(0, below)
                continue
            finally:
                task.advance(clock() - shape_started)
            timings.append(timing)
            m = timing.measurement
            log.info(
                "measured %s: micro-batch %d (%s), %s tok/s%s, %s MB peak memory (%s), %d steps of %.2f s%s",
                timing.label(), m.micro_batch, timing.micro_batch_reason, f"{m.tokens_per_s:,.0f}",
                f", MFU {timing.mfu:.1%}" if timing.mfu is not None else "",
                f"{m.peak_memory_bytes / 1e6:,.0f}", timing.memory_source, timing.timed_steps,
                timing.step_seconds, f", compile {timing.compile_seconds:.1f} s" if compile else "",
            )
    if not timings:
        raise UserError(
            f"not even the smallest shape, {_label(ladder[0])}, fits in {device} memory at micro-batch 1 "
            f"({memory_limit_bytes / 2**30:.1f} GiB allowed)"
        )
    elapsed = clock() - started
    log.info("measured %d shape(s) in %.1f s (bound %.1f s)", len(timings), elapsed, seconds)
    return ThroughputProbe(
        timings=tuple(sorted(timings, key=lambda t: t.spec.params_scaling())),
        skipped=tuple(skipped),
        seconds=elapsed,
        device=device,
        dtype=dtype,
        compile=compile,
        threads=threads,
    )


# --------------------------------------------------------------------------------------------------
# One shape
# --------------------------------------------------------------------------------------------------
def _label(spec: ModelSpec) -> str:
    return f"{spec.n_layer}×{spec.d_model}"


def _cpu_max_micro_batch(spec: ModelSpec, memory_limit_bytes: float) -> int:
    """Largest micro-batch whose estimated memory × CPU_MEMORY_MARGIN fits (the estimate is affine in it)."""
    one = spec.estimate_train_memory_bytes(micro_batch=1)
    per = spec.estimate_train_memory_bytes(micro_batch=2) - one
    budget = memory_limit_bytes / CPU_MEMORY_MARGIN
    if one > budget:
        return 0
    return int(1 + (budget - one) // per)


def _achieved_flops_guess(
    spec: ModelSpec, reference: Sequence[ShapeTiming], *, peak_flops: float | None, device: str
) -> float:
    """Achieved training FLOP/s to expect: the nearest measured shape's (in log N), else a guess."""
    if reference:
        n = spec.params_scaling()
        near = min(reference, key=lambda t: abs(math.log(t.spec.params_scaling() / n)))
        return near.measurement.achieved_flops()
    if peak_flops:
        return FIRST_GUESS_MFU * peak_flops
    return FIRST_GUESS_CPU_FLOPS if device == "cpu" else 1e13


def _predict_cost(spec: ModelSpec, reference: Sequence[ShapeTiming], *, device: str, compile: bool) -> float:
    """Least seconds that measuring `spec` should take (build, warm-up, the minimum of timed steps, the
    forward pass), extrapolated from the nearest measured shape at its micro-batch in tokens; on the CPU
    at the smallest micro-batch the slice may shrink it to. Achieved FLOP/s grows with size, so this errs long."""
    near = min(reference, key=lambda t: abs(math.log(t.spec.params_scaling() / spec.params_scaling())))
    tokens = near.measurement.micro_batch * near.spec.seq_len
    if device == "cpu":
        tokens = min(tokens, max(spec.seq_len, CPU_MIN_TOKENS_PER_MICRO_BATCH))
    step = tokens * spec.flops_per_token() / near.measurement.achieved_flops()
    steps = WARMUP_STEPS[device] + MIN_TIMED_STEPS + 0.5  # + the forward-only pass
    if device == "cuda":
        steps += 3  # micro-batch search
    build = near.build_seconds * spec.params_total() / near.spec.params_total()
    comp = scale_compile_seconds(near.compile_seconds, near.spec, spec) if compile else 0.0
    return build + comp + steps * step


def scale_compile_seconds(seconds: float, measured: ModelSpec, target: ModelSpec) -> float:
    """Compile time of `target` from one measured on `measured`: half of it taken as fixed (tracing set-up,
    the optimizer-independent graph machinery), half as growing with depth (the HF layers are unrolled);
    never less than measured. A rough rule that errs long for deeper models."""
    return seconds * max(1.0, 0.5 + 0.5 * target.n_layer / measured.n_layer)


class _Skip(Exception):
    """A shape that cannot be measured: out of memory at micro-batch 1, or out of time."""


def _measure_one(spec: ModelSpec, *, device: str, compile: bool, **kwargs: Any) -> ShapeTiming:
    """`_time_shape`, then free what it built (its frame is gone by then) before the next shape."""
    import torch

    try:
        return _time_shape(spec, device=device, compile=compile, **kwargs)
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            if compile:
                torch._dynamo.reset()


def _time_shape(
    spec: ModelSpec,
    *,
    device: str,
    dtype: str,
    compile: bool,
    budget_seconds: float,
    memory_limit_bytes: int,
    activation_bytes: int,
    peak_flops: float | None,
    reference: Sequence[ShapeTiming],
    hard_deadline: float | None,
    clock: Callable[[], float],
) -> ShapeTiming:
    """Build, size, warm up and time one shape within `budget_seconds` (a slice of the probe's time).

    Raises `_Skip` when it does not fit at micro-batch 1 (CUDA), or when `hard_deadline` (the end of the
    probe's time; None for the one shape that must be measured) would pass before the minimum of timed
    steps is done, judged from the first warm-up step.
    """
    import torch

    from oneday.models.build import build_model, param_groups

    started = clock()
    model = build_model(spec, seed=0, device=device)
    model.train()
    build_seconds = clock() - started
    groups = param_groups(model, spec, lr=1e-4, weight_decay=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=device == "cuda")
    params = [p for g in groups for p in g["params"]]
    gen = torch.Generator(device="cpu").manual_seed(0)

    def batch(m: int) -> Any:
        return torch.randint(0, spec.vocab_size, (m, spec.seq_len), generator=gen).to(device)

    autocast = (
        (lambda: torch.autocast(device_type="cuda", dtype=torch.bfloat16))
        if device == "cuda" and dtype == "bf16"
        else contextlib.nullcontext
    )

    def step(module: Any, x: Any) -> None:
        with autocast():
            loss = module(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # -- micro-batch -----------------------------------------------------------------------------
    if device == "cuda":
        micro, reason = _cuda_micro_batch(
            spec, step=lambda x: step(model, x), batch=batch, optimizer=optimizer,
            memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
            deadline=started + budget_seconds / 2, clock=clock,
        )
        if micro == 0:
            raise _Skip("out of memory at micro-batch 1")
    else:
        by_memory = _cpu_max_micro_batch(spec, memory_limit_bytes)
        by_cap = max(1, CPU_MAX_TOKENS_PER_MICRO_BATCH // spec.seq_len)
        flops = _achieved_flops_guess(spec, reference, peak_flops=peak_flops, device=device)
        seq_seconds = spec.seq_len * spec.flops_per_token() / flops
        steps = WARMUP_STEPS[device] + MIN_TIMED_STEPS + 1
        by_time = max(1, int((budget_seconds - build_seconds) / steps / seq_seconds))
        floor = max(1, CPU_MIN_TOKENS_PER_MICRO_BATCH // spec.seq_len)
        micro = max(1, min(by_memory, by_cap, max(by_time, floor)))
        reason = (
            "memory estimate" if micro == by_memory
            else f"cap of {CPU_MAX_TOKENS_PER_MICRO_BATCH} tokens on CPU" if micro == by_cap
            else "time slice" if micro == by_time
            else f"floor of {CPU_MIN_TOKENS_PER_MICRO_BATCH} tokens (the time slice asked for less)"
        )

    # -- compile and warm up ---------------------------------------------------------------------
    module: Any = model
    if compile:
        module = torch.compile(model)
    x = batch(micro)
    warm_started = clock()
    first_step = 0.0
    attempts = 0
    while True:
        try:
            sync()
            t0 = clock()
            step(module, x)
            sync()
            first_step = clock() - t0
            done = 1
            steady = first_step
            if compile:
                # the first compiled step is mostly compiling: judge the step time from the next one
                t0 = clock()
                step(module, x)
                sync()
                steady = clock() - t0
                done = 2
            rest = max(0, WARMUP_STEPS[device] - done) + MIN_TIMED_STEPS + 0.5
            now = clock()
            slice_left = max(0.0, started + budget_seconds - now)
            hard_left = math.inf if hard_deadline is None else max(0.0, hard_deadline - now)
            room = min(1.5 * slice_left, hard_left)
            if device == "cpu" and not compile and micro > 1 and rest * steady > room:
                # The CPU is slower than expected (other load, or a first shape with no reference): shrink the
                # micro-batch so one more warm-up step and the minimum of timed steps fit (CPU tok/s barely
                # depends on the micro-batch; the run then uses this micro-batch too). Not when compiled: a
                # new shape would compile again.
                # Never below the floor: a tiny micro-batch measures (and would train at) a fraction of the
                # CPU's speed, since per-step overheads dominate; an over-long probe is the lesser harm.
                floor = max(1, CPU_MIN_TOKENS_PER_MICRO_BATCH // spec.seq_len)
                new = max(min(micro, floor), int(micro * room / ((rest + 1) * steady)))
                steady *= new / micro
                micro = new
                reason = "shrunk to the time left after a slow first step"
                x = batch(micro)
                if hard_deadline is not None and clock() + (rest + 1) * steady > hard_deadline:
                    raise _Skip(f"out of time (a step would take {steady:.1f} s)")
                t0 = clock()
                step(module, x)
                sync()
                steady = clock() - t0  # measured at the new size: fixed costs do not shrink
            if hard_deadline is not None and clock() + rest * steady > hard_deadline:
                raise _Skip(f"out of time (a step took {steady:.1f} s at micro-batch {micro})")
            for _ in range(WARMUP_STEPS[device] - done):
                step(module, x)
            sync()
            break
        except _Skip:
            raise
        except Exception as exc:
            if not _is_oom(exc) or micro == 1 or attempts >= 3:
                if _is_oom(exc):
                    _free(optimizer)
                    raise _Skip(f"out of memory at micro-batch {micro} (compiled)") from None
                raise
            attempts += 1
            _free(optimizer)
            micro //= 2
            reason = "halved after an out-of-memory error in the compiled step"
            x = batch(micro)
    warmup_seconds = clock() - warm_started

    # -- timed steps -----------------------------------------------------------------------------
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    slice_end = started + budget_seconds
    if hard_deadline is not None:
        slice_end = min(slice_end, hard_deadline)
    timed = 0
    sync()
    t0 = clock()
    while True:
        step(module, x)
        timed += 1
        if timed < MIN_TIMED_STEPS:
            if hard_deadline is not None:
                sync()
                now = clock()
                if now + (MIN_TIMED_STEPS - timed + 0.5) * (now - t0) / timed > hard_deadline:
                    raise _Skip(f"out of time (a step took {(now - t0) / timed:.1f} s)")
            continue
        sync()
        now = clock()
        if timed >= MAX_TIMED_STEPS or now + (now - t0) / timed > slice_end:
            break
    timed_seconds = clock() - t0
    step_seconds = timed_seconds / timed
    tokens_per_s = micro * spec.seq_len * timed / timed_seconds
    if device == "cuda":
        peak_memory = int(torch.cuda.max_memory_allocated())
        memory_source = "measured: torch.cuda.max_memory_allocated"
    else:
        peak_memory = int(spec.estimate_train_memory_bytes(micro_batch=micro))
        memory_source = "estimate: ModelSpec.estimate_train_memory_bytes"

    # -- forward only (what an evaluation costs) -------------------------------------------------
    model.eval()
    forward_runs = 2 if device == "cuda" else 1
    with torch.no_grad(), autocast():
        for _ in range(forward_runs):
            sync()
            f0 = clock()
            model(input_ids=x, use_cache=False)
            sync()
            forward_seconds = clock() - f0
    model.train()
    forward_tps = micro * spec.seq_len / max(forward_seconds, 1e-9)

    compile_seconds = max(0.0, first_step - step_seconds) if compile else 0.0
    measurement = Measurement(
        spec=spec, micro_batch=micro, tokens_per_s=tokens_per_s, peak_memory_bytes=peak_memory,
        seconds_measured=timed_seconds,
    )
    return ShapeTiming(
        measurement=measurement,
        timed_steps=timed,
        step_seconds=step_seconds,
        build_seconds=build_seconds,
        warmup_seconds=warmup_seconds,
        compile_seconds=compile_seconds,
        forward_tokens_per_s=forward_tps,
        mfu=measurement.mfu(peak_flops) if peak_flops else None,
        memory_source=memory_source,
        micro_batch_reason=reason,
        seconds=clock() - started,
    )


def _cuda_micro_batch(
    spec: ModelSpec,
    *,
    step: Callable[[Any], None],
    batch: Callable[[int], Any],
    optimizer: Any,
    memory_limit_bytes: int,
    activation_bytes: int,
    deadline: float,
    clock: Callable[[], float],
) -> tuple[int, str]:
    """Largest power-of-two micro-batch whose eager step runs within `memory_limit_bytes` (0: none)."""
    import torch

    cap = max(1, CUDA_MAX_TOKENS_PER_MICRO_BATCH // spec.seq_len)
    one = spec.estimate_train_memory_bytes(micro_batch=1, activation_bytes=activation_bytes)
    per = spec.estimate_train_memory_bytes(micro_batch=2, activation_bytes=activation_bytes) - one
    guess = 1 if one > memory_limit_bytes else int(1 + (memory_limit_bytes - one) // per)
    start = 2 ** int(math.log2(max(1, min(guess, cap))))

    def fits(m: int) -> bool:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            step(batch(m))
            torch.cuda.synchronize()
        except Exception as exc:
            if not _is_oom(exc):
                raise
            _free(optimizer)
            return False
        return torch.cuda.max_memory_allocated() <= memory_limit_bytes

    best = 0
    m = start
    if fits(m):
        best = m
        while 2 * m <= cap and clock() < deadline:
            if not fits(2 * m):
                break
            m *= 2
            best = m
        reason = "largest power of two that fit"
        if best >= cap:
            reason = f"cap of {CUDA_MAX_TOKENS_PER_MICRO_BATCH} tokens"
        elif clock() >= deadline:
            reason = "largest power of two tried in the time slice"
    else:
        while m > 1:
            m //= 2
            if fits(m):
                best = m
                break
        reason = "largest power of two that fit (after out-of-memory)"
    return best, reason


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _free(optimizer: Any) -> None:
    import torch

    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _torch_settings(*, device: str, threads: int | None) -> Iterator[None]:
    """The run's thread count and, on CUDA, TF32 matmuls; restored afterwards."""
    import torch

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    old_tf32 = old_cudnn = None
    if device == "cuda":
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        old_cudnn = torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        if threads:
            torch.set_num_threads(old_threads)
        if old_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
            torch.backends.cudnn.allow_tf32 = bool(old_cudnn)


def fastest_cpu_threads(
    spec: ModelSpec, *, max_threads: int, tokens: int = 512, clock: Callable[[], float] = time.perf_counter
) -> tuple[int, dict[int, float]]:
    """The torch thread count (1 or `max_threads`) that trains `spec` faster on this CPU right now.

    Why: on these small machines, all cores are not always faster — with other load, 2 threads ran a small
    model 3–7× slower than 1 (measured here: 250 vs 1,677 tok/s), because each step waits on the slowest
    thread. One warm-up and two timed steps of `tokens` tokens at each count; the many-thread measurement
    stops early once it is clearly slower. Returns the choice and the tok/s seen per count.
    """
    import torch

    from oneday.models.build import build_model, param_groups

    if max_threads <= 1:
        return 1, {}
    before = torch.get_num_threads()
    model = build_model(spec, seed=0)
    optimizer = torch.optim.AdamW(param_groups(model, spec, lr=1e-4, weight_decay=0.1), lr=1e-4)
    x = torch.randint(0, spec.vocab_size, (max(1, tokens // spec.seq_len), spec.seq_len),
                      generator=torch.Generator().manual_seed(0))
    speeds: dict[int, float] = {}
    try:
        for threads in (1, max_threads):
            torch.set_num_threads(threads)
            best = math.inf
            for i in range(3):
                t0 = clock()
                model(input_ids=x, labels=x, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                elapsed = clock() - t0
                if i:
                    best = min(best, elapsed)
                if threads > 1 and 1 in speeds and elapsed > 2 * x.numel() / speeds[1]:
                    best = min(best, elapsed)
                    break  # already twice as slow as one thread: no need to finish
            speeds[threads] = x.numel() / best
    finally:
        torch.set_num_threads(before)
    choice = max(speeds, key=lambda t: (speeds[t], t))
    return choice, speeds
