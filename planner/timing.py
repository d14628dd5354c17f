"""Timing one candidate shape: build it, find its micro-batch, warm it up, time real training steps.

`time_shape` builds the shape with the runner's model builder (`models.build.build_model`: the Hugging Face
model with SDPA attention and oneday's init) and trains it with the runner's own step
(`oneday.runner.step.TrainStep`: `LMLoss`, fused AdamW over `param_groups`, clipping, the bad-step flag), in
the dtype and compile setting the run will use, on windows of seq_len + 1 tokens drawn from a sample of the
training data (`tokens`; uniform random tokens without one): the planner times exactly the step the run trains.
The data matters on a CPU: 2×48 trained 1.7% faster on real text than on uniform tokens (fewer distinct rows
in the embedding's gradient). It also times the no-grad forward pass the run's evaluations make
(`runner.step.evaluate`).

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

Dtype and compile: CUDA runs under bf16 autocast (fp16 with the run's grad scaler on GPUs without bf16; fp32
weights and optimizer state) with TF32 matmuls, fused AdamW, and `torch.compile` when the run will compile;
the first compiled step's extra time is recorded as the compile time. CPU: fp32, eager (bf16 on CPUs without
AVX-512 BF16/AMX is ~50× slower; compiling takes 60–90 s here and gains nothing at steady state;
docs/design.md, Measured facts).

torch is imported inside the functions: importing this module stays cheap.
"""


from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oneday.models.spec import ModelSpec
from oneday.planner.throughput import Measurement

CPU_MAX_TOKENS_PER_MICRO_BATCH = 4096
CUDA_MAX_TOKENS_PER_MICRO_BATCH = 2**17
CPU_MEMORY_MARGIN = 1.25
# The time slice may not shrink a CPU micro-batch below this many tokens at first (only a slow first step does).
CPU_MIN_TOKENS_PER_MICRO_BATCH = 1024
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
    grad_accum: int = 1
    """Micro-batches per timed optimizer step (one update per `grad_accum` micro-batches, as the run trains)."""

    @property
    def spec(self) -> ModelSpec:
        return self.measurement.spec

    def label(self) -> str:
        return self.spec.label()


def cpu_memory_need_bytes(spec: ModelSpec, micro_batch: int) -> float:
    """Memory a CPU training step needs: the estimate with its activations counted twice, × CPU_MEMORY_MARGIN.
    The CPU step keeps freed memory in the heap (`runner.step.keep_freed_memory`), whose holes hold up to about
    one more step's activations (measured: 2×64 at micro-batch 10 × 2, peak RSS 704 → 986 MB over 388 MB of
    imports)."""
    one = spec.estimate_train_memory_bytes(micro_batch=1)
    per = spec.estimate_train_memory_bytes(micro_batch=2) - one  # the estimate is affine in the micro-batch
    return CPU_MEMORY_MARGIN * (one + (2 * micro_batch - 1) * per)


def cpu_max_micro_batch(spec: ModelSpec, memory_limit_bytes: float) -> int:
    """Largest micro-batch whose `cpu_memory_need_bytes` fits in `memory_limit_bytes` (0 when none does)."""
    one = cpu_memory_need_bytes(spec, 1)
    per = cpu_memory_need_bytes(spec, 2) - one
    if one > memory_limit_bytes:
        return 0
    return int(1 + (memory_limit_bytes - one) // per)


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


class SkipShape(Exception):
    """A shape that cannot be measured: out of memory at micro-batch 1, or out of time."""


def measure_one(spec: ModelSpec, *, device: str, compile: bool, **kwargs: Any) -> ShapeTiming:
    """`time_shape`, then free what it built (its frame is gone by then) before the next shape."""
    import torch

    try:
        return time_shape(spec, device=device, compile=compile, **kwargs)
    finally:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            if compile:
                torch._dynamo.reset()


def time_shape(
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
    micro_batch: int | None = None,
    tokens: Any = None,
    grad_accum: int = 1,
) -> ShapeTiming:
    """Build, size, warm up and time one shape within `budget_seconds` (a slice of the probe's time).

    `micro_batch` fixes the micro-batch (the plan's, to check it) instead of the rules of the module
    docstring; an out-of-memory error still halves it. Raises `SkipShape` when it does not fit at
    micro-batch 1 (CUDA), or when `hard_deadline` (the end of the probe's time; None for the one shape that
    must be measured) would pass before the minimum of timed steps is done, judged from the first warm-up step.
    `tokens`: a flat int64 array of training tokens (`measure.training_sample`) the batches are windows of.
    `grad_accum`: micro-batches per timed optimizer step (the plan's, in a CPU check: one update per micro-batch
    costs a CPU a share of a small micro-batch's step that the run, accumulating, does not pay; `settle`).
    """
    import torch

    from oneday.data.windows import ProbeBatches
    from oneday.models.build import build_model, param_groups
    from oneday.runner.step import LMLoss, TrainStep, autocast, evaluate, grad_scaler, make_optimizer

    started = clock()
    model = build_model(spec, seed=0, device=device)
    model.train()
    build_seconds = clock() - started
    optimizer = make_optimizer(param_groups(model, spec, lr=1e-4, weight_decay=0.1), lr=1e-4, betas=(0.9, 0.95))
    loss = LMLoss(model)
    precision = autocast(device, dtype)
    scaler = grad_scaler(device, dtype)  # fp16: the run's loss scaler is part of the step it times
    draw = ProbeBatches(tokens, seq_len=spec.seq_len, vocab_size=spec.vocab_size)

    def batch(m: int) -> Any:
        """The windows of one optimizer step of micro-batch m (seq_len + 1 tokens each: inputs and their
        next-token targets), as the run reads them."""
        return torch.from_numpy(draw(m * grad_accum)).to(device)

    def trainer(net: Any) -> TrainStep:
        return TrainStep(net, params=model.parameters(), optimizer=optimizer, grad_accum=grad_accum,
                         grad_clip=GRAD_CLIP, precision=precision, scaler=scaler)

    eager = trainer(loss)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    # -- micro-batch -----------------------------------------------------------------------------
    if micro_batch is not None:
        micro, reason = micro_batch, "the plan's micro-batch"
    elif device == "cuda":
        micro, reason = cuda_micro_batch(
            spec, step=eager, batch=batch, optimizer=optimizer,
            memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
            deadline=started + budget_seconds / 2, clock=clock,
        )
        if micro == 0:
            raise SkipShape("out of memory at micro-batch 1")
    else:
        by_memory = cpu_max_micro_batch(spec, memory_limit_bytes)
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
    step = trainer(torch.compile(loss)) if compile else eager
    x = batch(micro)
    warm_started = clock()
    first_step = 0.0
    attempts = 0
    while True:
        try:
            sync()
            t0 = clock()
            step(x)
            sync()
            first_step = clock() - t0
            done = 1
            steady = first_step
            if compile:
                # the first compiled step is mostly compiling: judge the step time from the next one
                t0 = clock()
                step(x)
                sync()
                steady = clock() - t0
                done = 2
            rest = max(0, WARMUP_STEPS[device] - done) + MIN_TIMED_STEPS + 0.5
            now = clock()
            slice_left = max(0.0, started + budget_seconds - now)
            hard_left = math.inf if hard_deadline is None else max(0.0, hard_deadline - now)
            room = min(1.5 * slice_left, hard_left)
            if device == "cpu" and not compile and micro_batch is None and micro > 1 and rest * steady > room:
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
                    raise SkipShape(f"out of time (a step would take {steady:.1f} s)")
                t0 = clock()
                step(x)
                sync()
                steady = clock() - t0  # measured at the new size: fixed costs do not shrink
            if hard_deadline is not None and clock() + rest * steady > hard_deadline:
                raise SkipShape(f"out of time (a step took {steady:.1f} s at micro-batch {micro})")
            for _ in range(WARMUP_STEPS[device] - done):
                step(x)
            sync()
            break
        except SkipShape:
            raise
        except Exception as exc:
            if not is_oom(exc):
                raise
        # Out of memory. Freed here, not in the except: its traceback still held the failed step's tensors.
        del x
        _free(optimizer)
        if micro == 1 or attempts >= 3:
            raise SkipShape(f"out of memory at micro-batch {micro} (compiled)")
        attempts += 1
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
    marks: list[tuple[int, float]] = [(0, t0)]  # (steps done, time), at each synchronised look at the clock
    while True:
        step(x)
        timed += 1
        if timed < MIN_TIMED_STEPS:
            if hard_deadline is not None:
                sync()
                now = clock()
                if now + (MIN_TIMED_STEPS - timed + 0.5) * (now - t0) / timed > hard_deadline:
                    raise SkipShape(f"out of time (a step took {(now - t0) / timed:.1f} s)")
            continue
        sync()
        now = clock()
        marks.append((timed, now))
        if timed >= MAX_TIMED_STEPS or now + (now - t0) / timed > slice_end:
            break
    timed_seconds = clock() - t0
    step_seconds = steady_step_seconds(marks)
    tokens_per_s = micro * grad_accum * spec.seq_len / step_seconds
    if device == "cuda":
        peak_memory = int(torch.cuda.max_memory_allocated())
        memory_source = "measured: torch.cuda.max_memory_allocated"
    else:
        peak_memory = int(spec.estimate_train_memory_bytes(micro_batch=micro))
        memory_source = "estimate: ModelSpec.estimate_train_memory_bytes"

    # -- forward only (what an evaluation costs) -------------------------------------------------
    for _ in range(2 if device == "cuda" else 1):  # on CUDA the first one pays for the eval kernels
        sync()
        f0 = clock()
        evaluate(loss, [x[:micro]], precision=precision)  # reads the loss back: synchronised
        forward_seconds = clock() - f0
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
        grad_accum=grad_accum,
    )


def cuda_micro_batch(
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
        out_of_memory = False
        try:
            step(batch(m))
            torch.cuda.synchronize()
        except Exception as exc:
            if not is_oom(exc):
                raise
            out_of_memory = True
        if out_of_memory:  # freed here: inside the except, its traceback still held the failed step's tensors
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


def steady_step_seconds(marks: Sequence[tuple[int, float]]) -> float:
    """Seconds per step at steady state from (steps done, time) marks: the mean over the second half of the timed
    steps when that half has at least `MIN_TIMED_STEPS`, else over all. The first steps after a warm-up are
    still slower (measured on a CPU, 2×48 at micro-batch 10: 5.1k, 7.1k, 7.3k, 8.6k ... tok/s, 9.8k from about
    the tenth step on, as the heap reaches its working size), and the run's hours are all steady state."""
    (first, start), (last, end) = marks[0], marks[-1]
    half = [(n, t) for n, t in marks if n <= first + (last - first) // 2]
    n_mid, t_mid = half[-1]
    if last - n_mid >= MIN_TIMED_STEPS:
        first, start = n_mid, t_mid
    return (end - start) / (last - first)


def is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _free(optimizer: Any) -> None:
    import torch

    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    from oneday.runner.step import LMLoss, TrainStep, keep_freed_memory, make_optimizer

    if max_threads <= 1:
        return 1, {}
    keep_freed_memory()  # as the probe and the run will train
    before = torch.get_num_threads()
    model = build_model(spec, seed=0)
    optimizer = make_optimizer(param_groups(model, spec, lr=1e-4, weight_decay=0.1), lr=1e-4, betas=(0.9, 0.95))
    step = TrainStep(LMLoss(model), params=model.parameters(), optimizer=optimizer, grad_accum=1, grad_clip=GRAD_CLIP)
    x = torch.randint(0, spec.vocab_size, (max(1, tokens // spec.seq_len), spec.seq_len + 1),
                      generator=torch.Generator().manual_seed(0))
    tokens_per_step = x.shape[0] * spec.seq_len
    speeds: dict[int, float] = {}
    try:
        for threads in (1, max_threads):
            torch.set_num_threads(threads)
            best = math.inf
            for i in range(3):
                t0 = clock()
                step(x)
                elapsed = clock() - t0
                if i:
                    best = min(best, elapsed)
                if threads > 1 and 1 in speeds and elapsed > 2 * tokens_per_step / speeds[1]:
                    best = min(best, elapsed)
                    break  # already twice as slow as one thread: no need to finish
            speeds[threads] = tokens_per_step / best
    finally:
        torch.set_num_threads(before)
    choice = max(speeds, key=lambda t: (speeds[t], t))
    return choice, speeds


__all__ = [
    "CPU_MAX_TOKENS_PER_MICRO_BATCH",
    "CPU_MEMORY_MARGIN",
    "CPU_MIN_TOKENS_PER_MICRO_BATCH",
    "CUDA_MAX_TOKENS_PER_MICRO_BATCH",
    "ShapeTiming",
    "SkipShape",
    "cpu_max_micro_batch",
    "cpu_memory_need_bytes",
    "cuda_micro_batch",
    "fastest_cpu_threads",
    "is_oom",
    "measure_one",
    "steady_step_seconds",
]
