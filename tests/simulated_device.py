"""Simulated devices for planner tests: what `timing.measure_one` would report, and the time it would take.

The planner's probe calls `measure_one` once per shape; tests replace it with `SimulatedGpu.measure_one`,
which returns a `ShapeTiming` with H200-like step times and memory, advances a fake clock by what the real
measurement would have cost (build, micro-batch search, compile, warm-up, timed steps), and raises the same
`SkipShape` as the real one on an out-of-memory at micro-batch 1 or when the probe's time runs out.

`SimulatedGpu` is an H200 (other GPUs by their peak and memory). Its figures (deliberately not the planner's own
throughput model, so a fit has something to approximate):
- MFU at a full micro-batch rises with FLOPs per token F and saturates: 0.5·(1 − exp(−(F/F0)^0.75)), F0 set
  so the smallest shape of an 8k-vocabulary, 1024-token ladder (2×128) runs at ~4% (seen on GPUs: small
  models leave the device idle) and a 12×768 one at ~40% (nanoGPT-class with torch.compile and bf16).
- Smaller micro-batches run slower: × tokens / (tokens + 2048).
- Memory (what `max_memory_allocated` reports): 1.1 × `estimate_train_memory_bytes` at bf16 activations;
  a step whose memory passes the device's free memory is an out-of-memory error.
- Costs: build 0.3 s + 30 ns a parameter (initialized on the host); compile 10 s + 1.5 s a layer; the CUDA
  micro-batch search three eager steps; two warm-up steps; timed steps until the slice ends (2–30).

`SimulatedCpu` runs each shape at the tokens/s a test gives it, at the CPU's micro-batch rule's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from oneday.models.spec import ModelSpec
from oneday.planner.parallel import ParallelTiming
from oneday.planner.throughput import Measurement
from oneday.planner.timing import (
    CUDA_MAX_TOKENS_PER_MICRO_BATCH,
    MAX_TIMED_STEPS,
    MIN_TIMED_STEPS,
    ShapeTiming,
    SkipShape,
)

GiB = 2**30
H200_PEAK = 989.4e12
H200_FREE = int(139.9 * GiB)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class SimulatedGpu:
    """An H200-like GPU: `measure_one` stands in for `oneday.planner.timing.measure_one`."""

    clock: FakeClock = field(default_factory=FakeClock)
    peak_flops: float = H200_PEAK
    free_memory_bytes: int = H200_FREE
    mfu_ceiling: float = 0.5
    f0: float = 4.4e8
    calls: list[tuple[str, int | None]] = field(default_factory=list)
    """(shape label, requested micro-batch) of every call, in order."""
    compiled: list[bool] = field(default_factory=list)
    """Whether each of those calls timed the compiled step."""
    parallel: list[ParallelTiming] = field(default_factory=list)
    """What every data-parallel measurement returned."""

    def mfu(self, spec: ModelSpec, tokens_per_micro_batch: int) -> float:
        full = self.mfu_ceiling * (1.0 - math.exp(-((spec.flops_per_token() / self.f0) ** 0.75)))
        return full * tokens_per_micro_batch / (tokens_per_micro_batch + 2048)

    def memory(self, spec: ModelSpec, micro_batch: int) -> int:
        return int(1.1 * spec.estimate_train_memory_bytes(micro_batch=micro_batch, activation_bytes=2))

    def step_seconds(self, spec: ModelSpec, micro_batch: int) -> float:
        tokens = micro_batch * spec.seq_len
        return tokens * spec.flops_per_token() / (self.mfu(spec, tokens) * self.peak_flops)

    def measure_one(
        self,
        spec: ModelSpec,
        *,
        device: str,
        compile: bool,
        budget_seconds: float,
        memory_limit_bytes: int,
        hard_deadline: float | None,
        clock: Callable[[], float],
        micro_batch: int | None = None,
        **_: object,
    ) -> ShapeTiming:
        assert device == "cuda"
        self.calls.append((spec.label(), micro_batch))
        self.compiled.append(compile)
        started = self.clock()
        build = 0.3 + 30e-9 * spec.params_total()
        self.clock.advance(build)
        cap = max(1, CUDA_MAX_TOKENS_PER_MICRO_BATCH // spec.seq_len)
        if micro_batch is None:
            micro, reason = 0, "largest power of two that fit"
            m = cap
            while m >= 1:
                if self.memory(spec, m) <= memory_limit_bytes:
                    micro = m
                    break
                m //= 2
            self.clock.advance(3 * self.step_seconds(spec, max(micro, 1)))
            if micro == 0:
                raise SkipShape("out of memory at micro-batch 1")
        else:
            micro, reason = micro_batch, "the planned micro-batch"
            while micro > 1 and self.memory(spec, micro) > self.free_memory_bytes:
                micro //= 2  # an out-of-memory error in the compiled step halves it, as the real one does
                reason = "halved after an out-of-memory error in the compiled step"
            if self.memory(spec, micro) > self.free_memory_bytes:
                raise SkipShape("out of memory at micro-batch 1 (compiled)")
        step = self.step_seconds(spec, micro)
        compile_seconds = 10.0 + 1.5 * spec.n_layer if compile else 0.0
        self.clock.advance(compile_seconds + 2 * step)
        if hard_deadline is not None and self.clock() + (MIN_TIMED_STEPS + 0.5) * step > hard_deadline:
            raise SkipShape(f"out of time (a step took {step:.1f} s at micro-batch {micro})")
        slice_left = started + budget_seconds - self.clock()
        timed = int(min(MAX_TIMED_STEPS, max(MIN_TIMED_STEPS, slice_left // step)))
        self.clock.advance(timed * step + 0.5 * step)
        tokens_per_s = micro * spec.seq_len / step
        measurement = Measurement(spec=spec, micro_batch=micro, tokens_per_s=tokens_per_s,
                                  peak_memory_bytes=self.memory(spec, micro), seconds_measured=timed * step)
        return ShapeTiming(
            measurement=measurement, timed_steps=timed, step_seconds=step, build_seconds=build,
            warmup_seconds=compile_seconds + 2 * step, compile_seconds=compile_seconds,
            forward_tokens_per_s=3 * tokens_per_s, mfu=measurement.mfu(self.peak_flops),
            memory_source="measured: torch.cuda.max_memory_allocated", micro_batch_reason=reason,
            seconds=self.clock() - started,
        )

    link_bytes_per_s: float = 100e9
    """What the all-reduce moves per second per GPU and does not hide behind the backward pass."""

    def measure_data_parallel(self, spec: ModelSpec, *, ranks: int, micro_batch: int, grad_accum: int,
                              compile: bool, timeout_seconds: float, **_: object) -> ParallelTiming:
        """`planner.parallel.measure_data_parallel` on `ranks` of these GPUs: the step alone, and with a ring
        all-reduce of the fp32 gradients (2·(K−1)/K of their bytes) at `link_bytes_per_s` added."""
        self.calls.append((f"{spec.label()} on {ranks}", micro_batch))
        alone = grad_accum * self.step_seconds(spec, micro_batch)
        together = alone + 2 * (ranks - 1) / ranks * 4 * spec.params_total() / self.link_bytes_per_s
        compile_seconds = 10.0 + 1.5 * spec.n_layer if compile else 0.0
        self.clock.advance(2 * (compile_seconds + 5 * together))
        timing = ParallelTiming(ranks=ranks, backend="nccl", alone_seconds=alone, together_seconds=together)
        self.parallel.append(timing)
        return timing


@dataclass
class SimulatedCpu:
    """A CPU that trains `spec` at `tokens_per_s(spec)` plus `update_seconds` per optimizer update (once per
    `grad_accum` micro-batches): `measure_one` stands in for the real one."""

    tokens_per_s: Callable[[ModelSpec], float]
    clock: FakeClock = field(default_factory=FakeClock)
    peak_flops: float = 1e11
    update_seconds: float = 0.0
    calls: list[tuple[str, int | None]] = field(default_factory=list)
    accumulations: list[int] = field(default_factory=list)
    """The `grad_accum` of each of those calls."""

    def speed(self, spec: ModelSpec, *, micro_batch: int, grad_accum: int = 1) -> float:
        """Tokens/s of the step at `micro_batch` × `grad_accum`."""
        tokens = micro_batch * grad_accum * spec.seq_len
        return tokens / (tokens / self.tokens_per_s(spec) + self.update_seconds)

    def measure_one(self, spec: ModelSpec, *, device: str, micro_batch: int | None = None, grad_accum: int = 1,
                    **_: object) -> ShapeTiming:
        assert device == "cpu"
        self.calls.append((spec.label(), micro_batch))
        self.accumulations.append(grad_accum)
        micro = micro_batch or max(1, 2048 // spec.seq_len)
        tokens_per_s = self.speed(spec, micro_batch=micro, grad_accum=grad_accum)
        step = micro * grad_accum * spec.seq_len / tokens_per_s
        build = 0.05
        self.clock.advance(build + 4.5 * step)
        measurement = Measurement(spec=spec, micro_batch=micro, tokens_per_s=tokens_per_s,
                                  peak_memory_bytes=spec.estimate_train_memory_bytes(micro_batch=micro),
                                  seconds_measured=3 * step)
        return ShapeTiming(
            measurement=measurement, timed_steps=3, step_seconds=step, build_seconds=build, warmup_seconds=step,
            compile_seconds=0.0, forward_tokens_per_s=3 * tokens_per_s, mfu=measurement.mfu(self.peak_flops),
            memory_source="estimate: ModelSpec.estimate_train_memory_bytes", micro_batch_reason="simulated",
            seconds=build + 4.5 * step, grad_accum=grad_accum,
        )
