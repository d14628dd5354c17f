"""Throughput across model sizes: what was measured (`Measurement`) and the model fitted on it (`ThroughputModel`).

Pure Python (no torch): the probe (`oneday.planner.measure`) times real training steps of a few shapes; this
module turns them into tokens/s and MFU for every shape of the ladder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ThroughputModel:
    """tokens/s as a function of shape: log(achieved FLOP/s) = a + b·log(FLOPs/token), MFU clamped.

    Measured shapes return their measured tokens/s; others are predicted. See `fit_throughput`.
    """

    a: float
    b: float
    peak_flops: float
    mfu_low: float
    mfu_high: float
    measurements: tuple[Measurement, ...]
    note: str

    def measurement_for(self, spec: ModelSpec) -> Measurement | None:
        """The fastest measurement of this shape, if it was measured."""
        key = shape_key(spec)
        same = [m for m in self.measurements if shape_key(m.spec) == key]
        return max(same, key=lambda m: m.tokens_per_s) if same else None

    def predicted_mfu(self, spec: ModelSpec) -> float:
        """MFU from the fit, clamped to [mfu_low, mfu_high]."""
        f = spec.flops_per_token()
        mfu = math.exp(self.a + self.b * math.log(f)) / self.peak_flops
        return min(self.mfu_high, max(self.mfu_low, mfu))

    def mfu(self, spec: ModelSpec) -> float:
        """Measured MFU when measured, else the clamped prediction."""
        m = self.measurement_for(spec)
        return m.mfu(self.peak_flops) if m else self.predicted_mfu(spec)

    def tokens_per_s(self, spec: ModelSpec) -> float:
        """Measured tokens/s when measured, else predicted MFU × peak / FLOPs per token."""
        m = self.measurement_for(spec)
        if m is not None:
            return m.tokens_per_s
        return self.predicted_mfu(spec) * self.peak_flops / spec.flops_per_token()


def fit_throughput(measurements: Sequence[Measurement], *, peak_flops: float) -> ThroughputModel:
    """Model tokens/s across sizes from measured shapes.

    Achieved FLOP/s grows with model size (small models leave the device idle: kernel launch and
    memory-bound ops dominate; Cramming, Geiping & Goldstein 2023). We fit, by least squares,
    log(tok/s × F) = a + b·log F, with F = FLOPs/token (6N + 12·L·d·T), i.e. achieved FLOP/s as a
    power of the per-token cost, and predict tok/s(spec) = exp(a + b·log F)/F. Predicted MFU is
    clamped to [0.5 × lowest measured MFU, highest measured MFU] and never above 1: no extrapolation
    beyond what was seen at the top, and at most a halving below it.

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
    if distinct < 2 or sxx < 1e-12:
        b = 0.0
        note = (
            f"Only one shape measured: assuming the same achieved FLOP/s (MFU {mfus[0]:.1%}) at every "
            "size; measure a second size to model how throughput changes with size."
        )
    else:
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
        note = (
            f"Throughput fitted on {distinct} measured shapes: achieved FLOP/s ∝ (FLOPs/token)^{b:.2f}, "
            f"MFU {min(mfus):.1%}–{max(mfus):.1%} measured; predictions clamped to "
            f"[{0.5 * min(mfus):.1%}, {min(1.0, max(mfus)):.1%}]."
        )
    a = my - b * mx
    high = min(1.0, max(mfus))
    low = min(high, 0.5 * min(mfus))
    return ThroughputModel(a=a, b=b, peak_flops=peak_flops, mfu_low=low, mfu_high=high,
                           measurements=tuple(measurements), note=note)


__all__ = ["Measurement", "ThroughputModel", "fit_throughput"]
