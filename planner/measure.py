"""The throughput probe: which candidate shapes to time, within what time (docs/design.md, Planning rules).

`probe_throughput` times real training steps of several shapes of the ladder (`oneday.planner.timing`
times one: the runner's own model builder and training step, the largest micro-batch that fits, the run's
dtype and compile setting) and returns what it measured; the planner fits its throughput model
(`throughput.fit_throughput`) on it. One torch thread count — the run's — is set for the measurement and
restored afterwards; on CUDA, TF32 matmuls as in the run.

Which shapes. The ladder from `ladder.candidate_shapes` is sorted by N and spaced ~1.6× apart, so an
index is a position in log N. Shapes are measured in the order smallest, largest that fits memory, then
midpoints of the widest remaining gaps (1/2, then 1/4 and 3/4, ...), at most `MAX_SHAPES` of them: the
throughput model is a line in log-log space, and its two ends plus interior points are what pin it down.
The time bound decides how many: before each shape the cost of building, warming up and timing it is
predicted from what the previous shapes took (achieved FLOP/s of the nearest measured shape, which
under-estimates a larger shape's FLOP/s, so the prediction errs long); a shape that would not finish in
the time left is skipped and the next, usually smaller, one is tried. The smallest shape is always
measured (even past the bound: without one point there is no plan), and while time allows at least two.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.planner.ladder import shape_key
from oneday.planner.throughput import Measurement
from oneday.planner.timing import (
    CPU_MEMORY_MARGIN,
    CPU_MIN_TOKENS_PER_MICRO_BATCH,
    MIN_TIMED_STEPS,
    WARMUP_STEPS,
    ShapeTiming,
    SkipShape,
    cpu_max_micro_batch,
    measure_one,
)
from oneday.progress import NULL_PROGRESS, Progress

log = logging.getLogger(__name__)

MAX_SHAPES = 5


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
            if shape_key(t.spec) == shape_key(spec):
                return t
        return None

    def nearest(self, spec: ModelSpec) -> ShapeTiming:
        """The measured shape nearest `spec` in log N (for estimates about an unmeasured shape)."""
        if not self.timings:
            raise ValueError("no shape was measured")
        n = spec.params_scaling()
        return min(self.timings, key=lambda t: abs(math.log(t.spec.params_scaling() / n)))


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
        fitting = [s for s in ladder if cpu_max_micro_batch(s, memory_limit_bytes) >= 1]
        for s in ladder:
            if s not in fitting:
                skipped.append(f"{s.label()}: estimated not to fit in {memory_limit_bytes / 2**30:.1f} GiB")
        if not fitting:
            need = CPU_MEMORY_MARGIN * ladder[0].estimate_train_memory_bytes(micro_batch=1)
            raise UserError(
                f"not even the smallest shape, {ladder[0].label()}, fits in {memory_limit_bytes / 2**30:.2f} GiB "
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
                    skipped.append(f"{spec.label()}: the measuring time ({seconds:.0f} s) was used up")
                    continue
                predicted = _predict_cost(spec, timings, device=device, compile=compile)
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
                    clock=clock,
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
    )


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


__all__ = ["MAX_SHAPES", "ThroughputProbe", "measure_order", "probe_throughput", "scale_compile_seconds"]
