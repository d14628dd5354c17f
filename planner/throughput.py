"""Throughput across model sizes: what was measured (`Measurement`) and the model fitted on it (`ThroughputModel`).

Pure Python (no torch): the probe (`oneday.planner.measure`) times real training steps of a few shapes; this
module turns them into tokens/s and MFU for every shape of the ladder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from oneday.models.spec import ModelSpec
from oneday.planner.ladder import shape_key


@dataclass(frozen=True)
class Measurement:
    """Timed real training steps of one shape (forward, backward, optimizer; compiled, in the run's
    dtype) at the largest micro-batch that fit. `spec` identifies the shape (see `shape_key`)."""

    spec: ModelSpec
    micro_batch: int
    tokens_per_s: float
    peak_memory_bytes: int
    seconds_measured: float

    def __post_init__(self) -> None:
        if self.micro_batch < 1 or not self.tokens_per_s > 0:
            raise ValueError(f"measurement needs micro_batch >= 1 and tokens_per_s > 0, got {self}")

    def achieved_flops(self) -> float:
        """Achieved training FLOP/s: tokens/s × FLOPs/token (6N + 12·L·d·T, PaLM appendix B)."""
        return self.tokens_per_s * self.spec.flops_per_token()

    def mfu(self, peak_flops: float) -> float:
        """Model FLOPs utilization: achieved FLOP/s / peak FLOP/s (PaLM, Chowdhery et al. 2022)."""
        return self.achieved_flops() / peak_flops


MFU_CEILING = 0.75
"""The highest MFU an extrapolation may reach on a datasheet peak (unless a measurement was higher: a CPU's
peak is a timed matmul that training can beat). The best published end-to-end training figures sit below it:
PaLM 46% (Chowdhery et al. 2022), FlashAttention-2 GPT training 72% on an A100 (Dao 2023)."""


@dataclass(frozen=True)
class ThroughputModel:
    """tokens/s as a function of shape: MFU from a power law fitted through the measured shapes, and above
    the largest measured shape a saturating curve rising toward `mfu_ceiling`. See `fit_throughput`.

    Measured shapes return their measured tokens/s; others are predicted.
    """

    a: float
    b: float
    peak_flops: float
    mfu_low: float
    mfu_high: float
    measurements: tuple[Measurement, ...]
    note: str
    flops_top: float = math.inf
    """FLOPs/token of the largest measured shape: the power law holds up to it, the saturating curve above."""
    mfu_top: float = 0.0
    """The power law's (clamped) MFU at `flops_top`, where the saturating curve starts."""
    mfu_ceiling: float = 0.0
    """The saturating curve's limit m_max (≤ `mfu_top`: no rise seen, the clamped power law holds above too)."""
    flops_bottom: float = 0.0
    """FLOPs/token of the smallest measured shape: below it the saturating curve (when a rise was seen)."""
    mfu_bottom: float = 0.0
    """The power law's (clamped) MFU at `flops_bottom`."""

    def micro_batch_cap(self) -> int:
        """The largest micro-batch an unmeasured shape may be planned at: the largest that was measured."""
        return max(m.micro_batch for m in self.measurements)

    def measurement_for(self, spec: ModelSpec) -> Measurement | None:
        """The fastest measurement of this shape, if it was measured."""
        key = shape_key(spec)
        same = [m for m in self.measurements if shape_key(m.spec) == key]
        return max(same, key=lambda m: m.tokens_per_s) if same else None

    def predicted_mfu(self, spec: ModelSpec) -> float:
        """The power law, clamped to [mfu_low, mfu_high]. When the measurements show a rise, outside the
        measured sizes the saturating curve m(F) = m_max·F / (F + F_half) instead (`fit_throughput` says
        why): above the largest, equal to `mfu_top` at `flops_top` and rising toward m_max = `mfu_ceiling`
        (never below the clamped power law); below the smallest, equal to `mfu_bottom` at `flops_bottom`."""
        f = spec.flops_per_token()
        power_law = math.exp(self.a + self.b * math.log(f)) / self.peak_flops
        clamped = min(self.mfu_high, max(self.mfu_low, power_law))
        rises = self.mfu_ceiling > max(self.mfu_top, self.mfu_bottom)
        if f > self.flops_top and rises:
            half = self.flops_top * (self.mfu_ceiling / self.mfu_top - 1.0)
            return max(clamped, self.mfu_ceiling * f / (f + half))
        if f < self.flops_bottom and rises:
            # Below the smallest measured shape MFU falls along the same curve: the power law's floor (half the
            # lowest measured MFU) would make the smallest shapes of a GPU ladder look several times too fast.
            half = self.flops_bottom * (self.mfu_ceiling / self.mfu_bottom - 1.0)
            return self.mfu_ceiling * f / (f + half)
        return clamped

    def mfu(self, spec: ModelSpec) -> float:
        """Measured MFU when measured, else the prediction."""
        m = self.measurement_for(spec)
        return m.mfu(self.peak_flops) if m else self.predicted_mfu(spec)

    def tokens_per_s(self, spec: ModelSpec) -> float:
        """Measured tokens/s when measured, else predicted MFU × peak / FLOPs per token."""
        m = self.measurement_for(spec)
        if m is not None:
            return m.tokens_per_s
        return self.predicted_mfu(spec) * self.peak_flops / spec.flops_per_token()


def saturating_ceiling(measurements: Sequence[Measurement], *, peak_flops: float) -> float | None:
    """m_max of the fit seconds/token = F / (m_max·P) + t₀ through the measurements, or None.

    Why this form: a step's time is its FLOPs at the rate the device sustains on large matmuls plus work
    that does not grow with them (kernel launches, memory-bound norms and activations, the optimizer's
    pass: Amdahl's law; the roofline model of Williams, Waterman & Patterson 2009). Then MFU =
    F / (P·(F/(m_max·P) + t₀)) = m_max·F / (F + F_half) with F_half = m_max·P·t₀: it rises with size and
    saturates at m_max instead of growing as a power law or stopping at the largest measured value.
    Seconds per token is affine in F, so the fit is linear least squares, weighted by 1/t² so that each
    shape counts by its relative error (the smallest shape's microseconds would otherwise count for
    nothing). None without two distinct sizes, or when the fit finds no rise (t₀ ≤ 0 or slope ≤ 0).
    """
    points = [(m.spec.flops_per_token(), 1.0 / m.tokens_per_s) for m in measurements]
    if len({f for f, _ in points}) < 2:
        return None
    w = [1.0 / t**2 for _, t in points]
    sw = sum(w)
    sx = sum(wi * f for wi, (f, _) in zip(w, points, strict=True))
    sy = sum(wi * t for wi, (_, t) in zip(w, points, strict=True))
    sxx = sum(wi * f * f for wi, (f, _) in zip(w, points, strict=True))
    sxy = sum(wi * f * t for wi, (f, t) in zip(w, points, strict=True))
    det = sw * sxx - sx * sx
    if det <= 0:
        return None
    slope = (sw * sxy - sx * sy) / det
    overhead = (sxx * sy - sx * sxy) / det
    if slope <= 0 or overhead <= 0:
        return None
    return 1.0 / (slope * peak_flops)


def fit_throughput(measurements: Sequence[Measurement], *, peak_flops: float) -> ThroughputModel:
    """Model tokens/s across sizes from measured shapes.

    Achieved FLOP/s grows with model size (small models leave the device idle: kernel launch and
    memory-bound ops dominate; Cramming, Geiping & Goldstein 2023). Up to the largest measured shape we
    fit, by least squares, log(tok/s × F) = a + b·log F, with F = FLOPs/token (6N + 12·L·d·T), i.e.
    achieved FLOP/s as a power of the per-token cost, and predict tok/s(spec) = exp(a + b·log F)/F, its
    MFU clamped to [0.5 × lowest measured MFU, highest measured MFU].

    Above the largest measured shape a power law would grow without bound and a clamp would hold every
    larger shape at the largest measured MFU (which made the planner choose too small a model whenever the
    probe had not reached the optimum); there MFU follows a saturating curve m_max·F/(F + F_half)
    (`saturating_ceiling`: its ceiling m_max fitted on all measured shapes, capped at `MFU_CEILING` or the
    highest measured MFU if that is higher), starting from the power law's value at the largest measured
    shape (never below the clamped power law); below the smallest measured shape MFU falls along the same
    curve. Without a fitted rise the clamped power law holds everywhere.

    With a single measured size (one point, or several of one shape) the slope is unknown: the model
    assumes the same achieved FLOP/s for every size (b = 0) and `note` says so. Needs ≥ 1 measurement.
    """
    if not measurements:
        raise ValueError("fit_throughput needs at least one measurement")
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops!r}")
    xs = [math.log(m.spec.flops_per_token()) for m in measurements]
    ys = [math.log(m.achieved_flops()) for m in measurements]
    mfus = [m.mfu(peak_flops) for m in measurements]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    distinct = len({shape_key(m.spec) for m in measurements})
    high = min(1.0, max(mfus))
    low = min(high, 0.5 * min(mfus))
    if distinct < 2 or sxx < 1e-12:
        b = 0.0
        ceiling = None
        note = (
            f"Only one shape measured: assuming the same achieved FLOP/s (MFU {mfus[0]:.1%}) at every "
            "size; measure a second size to model how throughput changes with size."
        )
    else:
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        ceiling = saturating_ceiling(measurements, peak_flops=peak_flops)
        note = (
            f"Throughput fitted on {distinct} measured shapes: achieved FLOP/s ∝ (FLOPs/token)^{b:.2f}, "
            f"MFU {min(mfus):.1%}–{max(mfus):.1%} measured; predictions clamped to "
            f"[{0.5 * min(mfus):.1%}, {min(1.0, max(mfus)):.1%}] within the measured sizes"
        )
    a = my - b * mx
    top = max(m.spec.flops_per_token() for m in measurements)
    bottom = min(m.spec.flops_per_token() for m in measurements)
    mfu_top = min(high, max(low, math.exp(a + b * math.log(top)) / peak_flops))
    mfu_bottom = min(high, max(low, math.exp(a + b * math.log(bottom)) / peak_flops))
    ceiling = min(ceiling, max(MFU_CEILING, high)) if ceiling is not None else mfu_top
    if distinct >= 2:
        note += (
            f"; outside the measured sizes MFU follows a curve saturating at {ceiling:.1%} "
            "(seconds/token = F/(m_max·peak) + overhead)."
            if ceiling > max(mfu_top, mfu_bottom)
            else "; they show no rise with size to extrapolate."
        )
    return ThroughputModel(a=a, b=b, peak_flops=peak_flops, mfu_low=low, mfu_high=high,
                           measurements=tuple(measurements), note=note, flops_top=top, mfu_top=mfu_top,
                           mfu_ceiling=ceiling, flops_bottom=bottom, mfu_bottom=mfu_bottom)


# --------------------------------------------------------------------------------------------------
# Hardware that is not in the machine (`oneday plan --what-if`), and several GPUs
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MfuClass:
    """MFU against size for one class of GPU, assumed rather than measured: m(F) = m_max·F / (F + F_half),
    F = FLOPs/token, the same saturating form `saturating_ceiling` fits on measurements (a step is its FLOPs
    at the rate large matmuls reach plus work that does not grow with them). `flops_half` is set so that the
    reference shape of `source` runs at the MFU it reports; `source` says where both numbers come from."""

    name: str
    mfu_max: float
    flops_half: float
    source: str

    def mfu(self, flops_per_token: float) -> float:
        return self.mfu_max * flops_per_token / (flops_per_token + self.flops_half)


# GPT-2 124M (12×768, vocabulary 50304, 1024 tokens) costs F ≈ 8.6e8 FLOPs/token, GPT-2 1.5B (48×1600) ≈ 1.03e10.
MFU_CLASSES: dict[str, MfuClass] = {
    "hopper": MfuClass(
        "hopper", 0.50, 6.8e8,
        "llm.c trains GPT-2 1.5B on 8×H100 at ~50% MFU (Karpathy, llm.c discussion #677: 24 h, $672); for the "
        "124M model an H100 node cuts llm.c's A100 time (#481) by 2-3× (Karpathy), ~28% of the H100's higher "
        "peak; oneday's PyTorch step is assumed to reach llm.c's MFU at large sizes: m(1.5B) = 47%, m(124M) = 28%",
    ),
    "blackwell": MfuClass(
        "blackwell", 0.50, 6.8e8,
        "no published small-model training MFU on a B200 yet: assumed as Hopper (llm.c #677: ~50% on H100)",
    ),
    "ampere": MfuClass(
        "ampere", 0.55, 3.2e8,
        "GPT-2 124M: nanoGPT ~30% on A100 (README: 4 days on 8×A100 for 600k steps of 491,520 tokens, "
        "nanoGPT #182), llm.c up to ~60% (discussion #481: 10B tokens in 90 min on 8×A100 80GB); assumed 40% "
        "at 124M (PyTorch with torch.compile and SDPA), saturating at 55%",
    ),
    "ampere-small": MfuClass(
        "ampere-small", 0.55, 3.2e8,
        "no published figure: assumed as the A100 (GPT-2 124M at 40%, nanoGPT #182 and llm.c #481)",
    ),
    "ada": MfuClass(
        "ada", 0.45, 6.8e8,
        "no published figure: assumed below Hopper (GDDR6 gives these GPUs less memory bandwidth per FLOP)",
    ),
    "geforce": MfuClass(
        "geforce", 0.55, 1.9e8,
        "nanoGPT #182: GPT-2 124M at '29% MFU' against an A100's 312 TFLOP/s on one RTX 4090, i.e. ~90 TFLOP/s, "
        "55% of the 4090's 165 (bf16, fp32 accumulate); assumed 45% at 124M (one user's report), saturating at 55%",
    ),
    "l4": MfuClass(
        "l4", 0.35, 6.8e8,
        "no published figure: the L4 is held to 72 W and runs below its datasheet clocks under load; "
        "assumed 35% at most",
    ),
}

DATA_PARALLEL_EFFICIENCY = 0.9
"""Per-GPU throughput under data parallelism as a share of one GPU's, assumed when the GPUs are not measured
together: within one node DDP overlaps the gradient all-reduce with the backward pass (Li et al. 2020, PyTorch
Distributed, VLDB) and reports near-linear scaling; llm.c's 124M reproduction ran at about the same MFU on 8
GPUs as on one (discussion #481). 90% leaves room for the all-reduce that does not overlap."""


@dataclass(frozen=True)
class AssumedThroughput:
    """The `ThroughputModel` interface for a GPU that is not here: every shape predicted by its `MfuClass`,
    none measured. `max_micro_batch` caps the micro-batch of every shape (memory decides below it)."""

    mfu_class: MfuClass
    peak_flops: float
    max_micro_batch: int
    note: str
    measurements: tuple[Measurement, ...] = ()

    def micro_batch_cap(self) -> int:
        return self.max_micro_batch

    def measurement_for(self, spec: ModelSpec) -> Measurement | None:
        return None

    def predicted_mfu(self, spec: ModelSpec) -> float:
        return self.mfu_class.mfu(spec.flops_per_token())

    def mfu(self, spec: ModelSpec) -> float:
        return self.predicted_mfu(spec)

    def tokens_per_s(self, spec: ModelSpec) -> float:
        return self.predicted_mfu(spec) * self.peak_flops / spec.flops_per_token()


def assumed_throughput(mfu_class: MfuClass, *, peak_flops: float, max_micro_batch: int) -> AssumedThroughput:
    """`AssumedThroughput` with the sentence that says what it assumes and why."""
    note = (
        f"Throughput assumed, not measured: MFU = {mfu_class.mfu_max:.0%}·F/(F + {mfu_class.flops_half:.2g}) "
        f"for F FLOPs/token ({mfu_class.name} class; {mfu_class.source}). Measure it on the machine with "
        "`oneday plan` and plan again with --throughput plan.json."
    )
    return AssumedThroughput(mfu_class=mfu_class, peak_flops=peak_flops, max_micro_batch=max_micro_batch, note=note)


@dataclass(frozen=True)
class DataParallelThroughput:
    """`inner` (one GPU's throughput) on `ranks` data-parallel GPUs at `efficiency` each: tokens/s =
    ranks × efficiency × one GPU's, MFU (against the aggregate peak) = efficiency × one GPU's. Micro-batches and
    memory stay per GPU."""

    inner: ThroughputModel | AssumedThroughput
    ranks: int
    efficiency: float

    @property
    def measurements(self) -> tuple[Measurement, ...]:
        return tuple(self.inner.measurements)

    @property
    def note(self) -> str:
        return self.inner.note

    def micro_batch_cap(self) -> int:
        return self.inner.micro_batch_cap()

    def measurement_for(self, spec: ModelSpec) -> Measurement | None:
        return self.inner.measurement_for(spec)

    def mfu(self, spec: ModelSpec) -> float:
        return self.efficiency * self.inner.mfu(spec)

    def tokens_per_s(self, spec: ModelSpec) -> float:
        return self.ranks * self.efficiency * self.inner.tokens_per_s(spec)


def data_parallel(throughput: Any, *, ranks: int, efficiency: float) -> Any:
    """`throughput` on `ranks` GPUs (`DataParallelThroughput`); itself on one."""
    if ranks < 1 or not 0 < efficiency <= 1:
        raise ValueError(f"ranks must be >= 1 and efficiency in (0, 1], got {ranks}, {efficiency}")
    return throughput if ranks == 1 else DataParallelThroughput(throughput, ranks=ranks, efficiency=efficiency)


__all__ = ["DATA_PARALLEL_EFFICIENCY", "MFU_CEILING", "MFU_CLASSES", "AssumedThroughput", "DataParallelThroughput",
           "Measurement", "MfuClass", "ThroughputModel", "assumed_throughput", "data_parallel", "fit_throughput",
           "saturating_ceiling"]
