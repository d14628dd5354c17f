"""The throughput probe: which candidate shapes to time, within what time (docs/design.md, Planning rules).

`probe_throughput` times real training steps of several shapes of the ladder (`oneday.planner.timing`
times one: the runner's own model builder and training step, the largest micro-batch that fits, the run's
dtype and compile setting) and returns what it measured; the planner fits its throughput model
(`throughput.fit_throughput`) on it. `measure_more` times one more shape afterwards, at a given micro-batch
(the planner's check of its chosen shape, and the rungs it adds to the ladder). One torch thread count —
the run's — is set for the measurement and restored afterwards; on CUDA, TF32 matmuls as in the run.

Which shapes. The ladder from `ladder.candidate_shapes` is sorted by N and spaced ~1.6× apart, so an
index is a position in log N. Without a hint (the CPU) shapes are measured in the order smallest, largest
that fits memory, then midpoints of the widest remaining gaps (1/2, then 1/4 and 3/4, ...): the throughput
model is a line in log-log space, and its two ends plus interior points pin it down. With `optimum_params`
(the GPU: the size the loss law favours for the budget at a typical MFU) the shape nearest it comes first,
then its neighbours outwards, one above before one below: what decides the choice is the throughput near
the optimum, and the probe's time seldom reaches far from it (a GPU shape costs a compile). At most
`MAX_SHAPES`. A shape whose estimated memory at micro-batch 1 does not fit is never built (CPU: with
`timing.cpu_memory_need_bytes`; CUDA: within `decide.SAFE_MEMORY_FRACTION` of the limit, corrected by the
measured/estimated ratio once a shape is measured), and neither is anything larger.

The time bound decides how many: before each shape the cost of building, warming up and timing it is
predicted (`predict_cost`: the shape's own micro-batch, and on a GPU at least `CUDA_FLOOR_MFU` of the peak,
since achieved FLOP/s grows with size and the smallest shape's ~4% MFU would make every large shape look
ten times too dear to measure); a shape that would not finish in the time left is skipped and the next is
tried. The first shape is always measured (even past the bound: without one point there is no plan), and
while time allows at least two.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.planner.decide import SAFE_MEMORY_FRACTION, estimate_memory_bytes, memory_scale, safe_micro_batch
from oneday.planner.ladder import shape_key
from oneday.planner.throughput import Measurement
from oneday.planner.timing import (
    CPU_MIN_TOKENS_PER_MICRO_BATCH,
    CUDA_MAX_TOKENS_PER_MICRO_BATCH,
    MIN_TIMED_STEPS,
    WARMUP_STEPS,
    ShapeTiming,
    SkipShape,
    cpu_max_micro_batch,
    cpu_memory_need_bytes,
    measure_one,
)
from oneday.progress import NULL_PROGRESS, Progress

log = logging.getLogger(__name__)

MAX_SHAPES = 5
# The least MFU a GPU shape is predicted to run at when the probe plans its time: a conservative round figure
# for a full micro-batch in bf16 (nanoGPT-class models run at 30-50% with torch.compile), so predictions err
# long without taking the smallest shape's ~4% for every size.
CUDA_FLOOR_MFU = 0.1
# Building a model initializes its weights on the host: 135M parameters took 5 s on 2 cores here (models/build.py),
# ~40 ns a parameter; hosts with more cores are faster, so this errs long.
BUILD_SECONDS_PER_PARAM = 40e-9


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
    tokens: Any = field(default=None, repr=False, compare=False)  # the training sample the batches come from

    @property
    def measurements(self) -> list[Measurement]:
        return [t.measurement for t in self.timings]

    def timing_for(self, spec: ModelSpec) -> ShapeTiming | None:
        for t in self.timings:
            if shape_key(t.spec) == shape_key(spec):
                return t
        return None

    def with_timing(self, timing: ShapeTiming, *, seconds: float) -> ThroughputProbe:
        """This probe with `timing` in place of any earlier timing of the same shape, `seconds` more spent."""
        key = shape_key(timing.spec)
        kept = [t for t in self.timings if shape_key(t.spec) != key]
        timings = tuple(sorted([*kept, timing], key=lambda t: t.spec.params_scaling()))
        return replace(self, timings=timings, seconds=self.seconds + seconds)

    def with_skipped(self, reason: str, *, seconds: float) -> ThroughputProbe:
        return replace(self, skipped=(*self.skipped, reason), seconds=self.seconds + seconds)

    def nearest(self, spec: ModelSpec) -> ShapeTiming:
        """The measured shape nearest `spec` in log N (for estimates about an unmeasured shape)."""
        if not self.timings:
            raise ValueError("no shape was measured")
        n = spec.params_scaling()
        return min(self.timings, key=lambda t: abs(math.log(t.spec.params_scaling() / n)))


def measure_order(count: int, *, limit: int = MAX_SHAPES, near: int | None = None) -> list[int]:
    """Indices into a ladder of `count` shapes sorted by N, in measuring order, at most `limit`: smallest,
    largest, then the midpoints of the widest remaining gaps; with `near`, that index first and then its
    neighbours outwards (one above, then one below)."""
    if count <= 0:
        return []
    if near is not None:
        if not 0 <= near < count:
            raise ValueError(f"near must index the ladder (0..{count - 1}), got {near}")
        outwards = sorted(range(count), key=lambda i: (abs(i - near), i < near))
        return outwards[:limit]
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
    optimum_params: float | None = None,
    tokens: Any = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ThroughputProbe:
    """Measured throughput of several of `specs` (a ladder sorted by N) within about `seconds` in all (module
    docstring: which shapes, in what order — nearest `optimum_params` first when given —, the micro-batch rule,
    what is timed), on windows of `tokens` (`training_sample`; None: uniform random tokens). UserError when not
    even the smallest shape fits."""
    import torch

    import oneday.models.build  # noqa: F401  (transformers: its import, seconds, is not measuring time)

    _check_settings(device=device, dtype=dtype)
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
    activation_bytes = _activation_bytes(dtype)

    # Drop the shapes whose estimated memory at micro-batch 1 does not fit: they are never built.
    skipped: list[str] = []
    ladder = [s for s in specs if _fits_estimate(s, device=device, memory_limit_bytes=memory_limit_bytes,
                                                 activation_bytes=activation_bytes, scale=1.0)]
    for s in specs:
        if s not in ladder:
            skipped.append(f"{s.label()}: estimated not to fit in {_allowed_text(device, memory_limit_bytes)}")
    if not ladder:
        need = (cpu_memory_need_bytes(specs[0], 1) if device == "cpu"
                else estimate_memory_bytes(specs[0], 1, activation_bytes=activation_bytes) / SAFE_MEMORY_FRACTION)
        raise UserError(
            f"not even the smallest shape, {specs[0].label()}, fits in {memory_limit_bytes / 2**30:.2f} GiB "
            f"of memory (it needs about {need / 2**30:.2f} GiB)"
        )

    timings: list[ShapeTiming] = []
    target = min(MAX_SHAPES, len(ladder))
    near = None
    if optimum_params is not None:
        near = min(range(len(ladder)), key=lambda i: abs(math.log(ladder[i].params_scaling() / optimum_params)))
    with _torch_settings(device=device, threads=threads), progress.task(
        f"measuring throughput on {device}", total=round(seconds, 1), unit="s"
    ) as task:
        pending = measure_order(len(ladder), limit=len(ladder), near=near)
        too_big: set[int] = set()
        while pending and len(timings) < target:
            index = pending.pop(0)
            spec = ladder[index]
            if index in too_big:
                continue
            scale = memory_scale([t.measurement for t in timings], activation_bytes=activation_bytes)
            if timings and not _fits_estimate(spec, device=device, memory_limit_bytes=memory_limit_bytes,
                                              activation_bytes=activation_bytes, scale=scale):
                # The measured shapes use more memory than estimated: this one (and larger) would not fit.
                skipped.append(f"{spec.label()}: estimated not to fit in {_allowed_text(device, memory_limit_bytes)} "
                               f"(with the measured/estimated memory ratio {scale:.2f})")
                too_big.update(range(index, len(ladder)))
                continue
            left = deadline - clock()
            shapes_left = max(1, target - len(timings))
            if timings:
                if left <= 0:
                    skipped.append(f"{spec.label()}: the measuring time ({seconds:.0f} s) was used up")
                    continue
                predicted = predict_cost(spec, timings, device=device, compile=compile,
                                         memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
                                         peak_flops=peak_flops)
                if predicted > left:
                    skipped.append(
                        f"{spec.label()}: measuring it would take about {predicted:.1f} s, {max(left, 0):.1f} s left"
                    )
                    continue
            budget = max(left, 0.0) / shapes_left
            task.update(description=f"measuring {spec.label()} ({len(timings) + 1}/{target})")
            shape_started = clock()
            try:
                timing = measure_one(
                    spec, device=device, dtype=dtype, compile=compile, budget_seconds=budget,
                    memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
                    peak_flops=peak_flops, reference=timings, hard_deadline=deadline if timings else None,
                    clock=clock, tokens=tokens,
                )
            except SkipShape as skip:
                skipped.append(f"{spec.label()}: {skip}")
                if "memory" in str(skip):
                    # Neither does anything larger fit, and the "largest that fits" slot moves one rung down.
                    too_big.update(range(index, len(ladder)))
                    below = index - 1
                    if below >= 0 and all(shape_key(t.spec) != shape_key(ladder[below]) for t in timings):
                        if below in pending:
                            pending.remove(below)
                        pending.insert(0, below)
                continue
            finally:
                task.advance(clock() - shape_started)
            timings.append(timing)
            _log_timing(timing, compile=compile)
    if not timings:
        raise UserError(
            f"not even the smallest shape, {ladder[0].label()}, fits in {device} memory at micro-batch 1 "
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
        tokens=tokens,
    )


PROBE_SAMPLE_TOKENS = 1 << 20


def training_sample(prepared: Any) -> Any:
    """The probe's batches come from here: the first `PROBE_SAMPLE_TOKENS` training tokens of `prepared` (read
    once, a flat int64 array), or None when it has none to read (data only assumed: a what-if)."""
    import numpy as np

    train_array = getattr(prepared, "train_array", None)
    if train_array is None:
        return None
    return np.array(train_array()[:PROBE_SAMPLE_TOKENS], dtype=np.int64)


def measure_more(
    probe: ThroughputProbe,
    spec: ModelSpec,
    *,
    micro_batch: int | None,
    deadline: float,
    memory_limit_bytes: int,
    peak_flops: float | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.perf_counter,
    grad_accum: int = 1,
) -> ThroughputProbe:
    """`probe` with one more timing: `spec` at `micro_batch` (None: the largest that fits, as the probe
    chooses) and `grad_accum` micro-batches per optimizer step, in place of any earlier timing of that shape.
    Not when its estimated memory does not fit (never built) or when its predicted cost (`predict_cost`) would
    not finish by `deadline` (a `clock()` time): the probe then says why in `skipped`, as it does when the
    measurement itself fails."""
    started = clock()
    label = spec.label() + (f" at micro-batch {micro_batch}" if micro_batch else "") + (
        f" × {grad_accum} accumulated" if grad_accum > 1 else "")
    activation_bytes = _activation_bytes(probe.dtype)
    scale = memory_scale(probe.measurements, activation_bytes=activation_bytes)
    if not _fits_estimate(spec, device=probe.device, memory_limit_bytes=memory_limit_bytes,
                          activation_bytes=activation_bytes, scale=scale, micro_batch=micro_batch or 1):
        return probe.with_skipped(
            f"{label}: estimated not to fit in {_allowed_text(probe.device, memory_limit_bytes)}", seconds=0.0
        )
    reference = list(probe.timings)
    predicted = predict_cost(spec, reference, device=probe.device, compile=probe.compile,
                             memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
                             peak_flops=peak_flops, micro_batch=micro_batch and micro_batch * grad_accum)
    left = deadline - started
    if predicted > left:
        return probe.with_skipped(
            f"{label}: measuring it would take about {predicted:.1f} s, {max(left, 0):.1f} s left", seconds=0.0
        )
    progress = progress or NULL_PROGRESS
    # A new shape gets half the time left (or what the minimum takes): another may follow. A check of a shape at
    # its planned micro-batch gets all of it: it is the measurement the plan's tokens rest on (`planner.settle`).
    budget = left if micro_batch is not None else min(left, max(predicted, left / 2))
    with _torch_settings(device=probe.device, threads=probe.threads), progress.task(
        f"measuring {label}", total=round(budget, 1), unit="s"
    ) as task:
        try:
            timing = measure_one(
                spec, device=probe.device, dtype=probe.dtype, compile=probe.compile, budget_seconds=budget,
                memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes, peak_flops=peak_flops,
                reference=reference, hard_deadline=deadline, clock=clock, micro_batch=micro_batch,
                tokens=probe.tokens, grad_accum=grad_accum,
            )
        except SkipShape as skip:
            return probe.with_skipped(f"{label}: {skip}", seconds=clock() - started)
        finally:
            task.advance(clock() - started)
    _log_timing(timing, compile=probe.compile)
    return probe.with_timing(timing, seconds=clock() - started)


def predict_cost(
    spec: ModelSpec,
    reference: Sequence[ShapeTiming],
    *,
    device: str,
    compile: bool,
    memory_limit_bytes: float,
    activation_bytes: int,
    peak_flops: float | None,
    micro_batch: int | None = None,
) -> float:
    """Least seconds that measuring `spec` should take (build, warm-up, the minimum of timed steps, the
    forward pass, on CUDA the micro-batch search), from the measured shapes in `reference`; errs long.

    - Tokens per step: `micro_batch` when given; on CUDA the micro-batch the search starts from (the largest
      power of two the memory estimate allows, capped); on the CPU the nearest measured shape's, at most the
      smallest micro-batch the time slice may shrink it to.
    - Speed: on CUDA the highest achieved FLOP/s measured on a shape no larger (achieved FLOP/s grows with
      size; a smaller shape: its tokens/s at most the nearest larger one's), and at least `CUDA_FLOOR_MFU` of
      the peak; on the CPU the nearest measured shape's.
    - Build time: the nearest shape's (in log N) plus `BUILD_SECONDS_PER_PARAM` for each parameter more
      (scaling a tiny shape's time, mostly fixed costs, by the parameter ratio predicted minutes for a 1.6B
      model); compile time scales with depth (`scale_compile_seconds`).
    """
    n = spec.params_scaling()
    near = min(reference, key=lambda t: abs(math.log(t.spec.params_scaling() / n)))
    flops = spec.flops_per_token()
    if micro_batch is not None:
        tokens = micro_batch * spec.seq_len
    elif device == "cpu":
        near_tokens = near.measurement.micro_batch * near.spec.seq_len
        tokens = min(near_tokens, max(spec.seq_len, CPU_MIN_TOKENS_PER_MICRO_BATCH))
    else:
        # where `timing.cuda_micro_batch` starts: the largest power of two the corrected estimate allows in
        # the whole limit (the search's own rule, not the plan's safe fraction)
        scale = memory_scale([t.measurement for t in reference], activation_bytes=activation_bytes)
        cap = max(1, CUDA_MAX_TOKENS_PER_MICRO_BATCH // spec.seq_len)
        fits = safe_micro_batch(spec, memory_limit_bytes=memory_limit_bytes / SAFE_MEMORY_FRACTION,
                                activation_bytes=activation_bytes, scale=scale, cap=cap)
        tokens = 2 ** int(math.log2(max(1, fits))) * spec.seq_len
    if device == "cpu":
        speed = near.measurement.achieved_flops()
    else:
        no_larger = [t.measurement.achieved_flops() for t in reference if t.spec.flops_per_token() <= flops]
        if no_larger:
            speed = max(no_larger)
        else:
            larger = min(reference, key=lambda t: t.spec.flops_per_token())
            speed = larger.measurement.tokens_per_s * flops
        if peak_flops:
            speed = max(speed, CUDA_FLOOR_MFU * peak_flops)
    step = tokens * flops / speed
    steps = WARMUP_STEPS[device] + MIN_TIMED_STEPS + 0.5  # + the forward-only pass
    if device == "cuda" and micro_batch is None:
        steps += 3  # micro-batch search
    build = near.build_seconds + BUILD_SECONDS_PER_PARAM * max(0, spec.params_total() - near.spec.params_total())
    comp = 0.0
    if compile:
        compiled = [t for t in reference if t.compile_seconds > 0] or [near]
        base = min(compiled, key=lambda t: abs(t.spec.n_layer - spec.n_layer))
        comp = scale_compile_seconds(base.compile_seconds, base.spec, spec)
    return build + comp + steps * step


def scale_compile_seconds(seconds: float, measured: ModelSpec, target: ModelSpec) -> float:
    """Compile time of `target` from one measured on `measured`: half of it taken as fixed (tracing set-up,
    the optimizer-independent graph machinery), half as growing with depth (the HF layers are unrolled);
    never less than measured. A rough rule that errs long for deeper models."""
    return seconds * max(1.0, 0.5 + 0.5 * target.n_layer / measured.n_layer)


def _check_settings(*, device: str, dtype: str) -> None:
    if device not in ("cpu", "cuda"):
        raise UserError(f"device {device!r}: expected cpu or cuda")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise UserError(f"dtype {dtype!r}: expected bf16, fp16 or fp32")
    if device == "cpu" and dtype == "bf16":
        raise UserError("bf16 on the CPU is ~50x slower than fp32 here; measure in fp32")
    if device == "cpu" and dtype == "fp16":
        raise UserError("fp16 (with a grad scaler) is for GPUs without bf16; measure the CPU in fp32")


def _activation_bytes(dtype: str) -> int:
    return 2 if dtype in ("bf16", "fp16") else 4


def _fits_estimate(spec: ModelSpec, *, device: str, memory_limit_bytes: float, activation_bytes: int, scale: float,
                   micro_batch: int = 1) -> bool:
    """Whether `spec` at `micro_batch` fits by estimate: CPU `cpu_max_micro_batch` (its margin); CUDA within
    `SAFE_MEMORY_FRACTION` of the limit, corrected by `scale` (measured / estimated memory)."""
    if device == "cpu":
        return cpu_max_micro_batch(spec, memory_limit_bytes) >= micro_batch
    return safe_micro_batch(spec, memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes,
                            scale=scale, cap=micro_batch) >= micro_batch


def _allowed_text(device: str, memory_limit_bytes: float) -> str:
    if device == "cpu":
        return f"{memory_limit_bytes / 2**30:.1f} GiB"
    return f"{SAFE_MEMORY_FRACTION:.0%} of {memory_limit_bytes / 2**30:.1f} GiB"


def _log_timing(timing: ShapeTiming, *, compile: bool) -> None:
    m = timing.measurement
    log.info(
        "measured %s: micro-batch %d (%s), %s tok/s%s, %s MB peak memory (%s), %d steps of %.2f s%s",
        timing.label(), m.micro_batch, timing.micro_batch_reason, f"{m.tokens_per_s:,.0f}",
        f", MFU {timing.mfu:.1%}" if timing.mfu is not None else "",
        f"{m.peak_memory_bytes / 1e6:,.0f}", timing.memory_source, timing.timed_steps,
        timing.step_seconds, f", compile {timing.compile_seconds:.1f} s" if compile else "",
    )


@contextlib.contextmanager
def _torch_settings(*, device: str, threads: int | None) -> Iterator[None]:
    """The run's thread count and, on CUDA, TF32 matmuls, restored afterwards; on the CPU, the run's allocator
    setting (`runner.step.keep_freed_memory`, process-wide), without which the probe times page faults."""
    import torch

    from oneday.runner.step import keep_freed_memory

    if device == "cpu":
        keep_freed_memory()
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


__all__ = [
    "CUDA_FLOOR_MFU",
    "MAX_SHAPES",
    "ThroughputProbe",
    "measure_more",
    "measure_order",
    "predict_cost",
    "probe_throughput",
    "scale_compile_seconds",
    "training_sample",
]
