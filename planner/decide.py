"""The decision: which shape to train, on how many tokens, with what batch, LR and schedule.

Pure Python (no torch, no clock, no I/O), so every rule is unit-testable in milliseconds. The inputs
are numbers someone else measured: `Measurement`s of real training steps (the measurement module
builds each candidate, runs forward/backward/optimizer steps at the largest micro-batch that fits and
times them), the training seconds left after `reserve_seconds`, the data's unique token count and the
device's peak FLOP/s (`hardware.resolve_peak_flops`).

The method (DESIGN §3, "hours, not FLOPs"):
1. `candidate_shapes` enumerates a ladder of sensible shapes between two sizes;
2. `fit_throughput` models tokens/s across sizes from the measured ones;
3. `choose` turns seconds into tokens per candidate, D(N) = tok/s(N) × seconds, discounts repeated
   data (Muennighoff et al. 2023), predicts the loss L(N, D') with the default law and the band law,
   and picks the minimum — among near-ties the faster shape;
4. `batch_and_lr` sets the batch, LR, β₂, warmup and cooldown for the chosen shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from oneday.errors import UserError
from oneday.models.spec import ModelSpec, Parametrization
from oneday.planner.laws import (
    EPOCH_2024,
    HOFFMANN_2022,
    LossLaw,
    deepseek_batch_tokens,
    deepseek_lr,
    effective_tokens,
    epochs,
)

__all__ = [
    "BatchLR",
    "CandidateResult",
    "Decision",
    "Measurement",
    "Reserve",
    "ThroughputModel",
    "batch_and_lr",
    "candidate_shapes",
    "choose",
    "estimate_memory_bytes",
    "fit_throughput",
    "pad_vocab",
    "reserve_seconds",
    "shape_key",
]

# --------------------------------------------------------------------------------------------------
# Candidate shapes
# --------------------------------------------------------------------------------------------------
ShapeKey = tuple[int, int, int, int, int, int]


def pad_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Vocabulary rounded up to a multiple of `multiple` (64 or 128): the LM-head matmul then tiles
    evenly on tensor cores (Karpathy's nanoGPT 50257 → 50304 gave a ~25% speed-up)."""
    if vocab_size <= 0 or multiple <= 0:
        raise ValueError(f"vocab_size and multiple must be positive, got {vocab_size}, {multiple}")
    return -(-vocab_size // multiple) * multiple


def swiglu_ff(d_model: int, multiple: int = 64) -> int:
    """SwiGLU hidden size: the multiple of `multiple` nearest 8/3·d, which keeps the MLP's parameters
    at 8·d² like a 4·d GELU MLP (Shazeer 2020, GLU variants; Llama uses the same 2/3·4d rule)."""
    return max(multiple, round(8 * d_model / 3 / multiple) * multiple)


def shape_key(spec: ModelSpec) -> ShapeKey:
    """What identifies a shape for throughput and memory: (n_layer, d_model, n_head, d_ff, vocab, seq)."""
    return (spec.n_layer, spec.d_model, spec.n_head, spec.d_ff, spec.vocab_size, spec.seq_len)


def _make_spec(
    n_layer: int,
    d_model: int,
    *,
    head_dim: int,
    vocab_size: int,
    seq_len: int,
    tied_embeddings: bool,
    parametrization: Parametrization,
) -> ModelSpec:
    return ModelSpec(
        n_layer=n_layer,
        d_model=d_model,
        n_head=d_model // head_dim,
        d_ff=swiglu_ff(d_model),
        vocab_size=vocab_size,
        seq_len=seq_len,
        tied_embeddings=tied_embeddings,
        parametrization=parametrization,
    )


def candidate_shapes(
    *,
    vocab_size: int,
    seq_len: int,
    min_params: float,
    max_params: float,
    head_dim: int = 64,
    ladder_ratio: float = 1.6,
    aspect_min: float = 32.0,
    aspect_max: float = 100.0,
    aspect_target: float = 64.0,
    max_layers: int = 64,
    vocab_multiple: int = 64,
    tied_embeddings: bool = False,
    parametrization: Parametrization = "sp",
) -> list[ModelSpec]:
    """A ladder of shapes spaced about `ladder_ratio`× apart in N covering [min_params, max_params].

    Rules:
    - widths d_model are multiples of 64 below 1024 and of 128 from 1024 on, and always of `head_dim`
      (64 by default; pass 128 for wide models), so n_head = d_model / head_dim;
    - the aspect ratio d_model / n_layer stays in [aspect_min, aspect_max] (default 32–100): Kaplan
      et al. 2020 (fig. 5) find the loss within a few percent over a wide band of aspect ratios at
      fixed N, so the band only keeps shapes away from the degenerate extremes; inside it the shape
      nearest `aspect_target` = 64 is preferred (4×256, 6×384, 8×512, 12×768 are the classic ones);
    - d_ff = multiple of 64 nearest 8/3·d (SwiGLU), vocab padded to a multiple of `vocab_multiple`;
    - N = `ModelSpec.params_scaling()` (non-embedding + head). Targets form a geometric grid from
      min_params with ratio `ladder_ratio`; for each target the shape with N within ±ratio^0.3 of it
      and the aspect nearest 64 is taken (else the nearest N); shapes closer than ratio^0.5 in N to
      the previous one are dropped, so the ladder is spaced ~1.3–2×.
    Sorted by N. UserError when no shape fits the range.
    """
    if not 0 < min_params <= max_params:
        raise UserError(f"model size range: need 0 < min_params <= max_params, got {min_params:.3g}, {max_params:.3g}")
    if head_dim <= 0 or head_dim % 2:
        raise UserError(f"head_dim {head_dim}: must be a positive even number")
    if ladder_ratio <= 1.0:
        raise ValueError(f"ladder_ratio must be > 1, got {ladder_ratio}")
    vocab = pad_vocab(vocab_size, vocab_multiple)
    make = dict(head_dim=head_dim, vocab_size=vocab, seq_len=seq_len,
                tied_embeddings=tied_embeddings, parametrization=parametrization)

    # every valid (n_layer, d_model) pair, with its N
    pool: list[tuple[float, float, int, int]] = []  # (N, aspect deviation, n_layer, d_model)
    d_model = head_dim
    while True:
        step = 64 if d_model < 1024 else 128
        step = math.lcm(step, head_dim)
        d_model = -(-d_model // step) * step
        fewest_layers = max(1, math.ceil(d_model / aspect_max))
        if _make_spec(fewest_layers, d_model, **make).params_scaling() > max_params * ladder_ratio:
            break
        for n_layer in range(1, max_layers + 1):
            aspect = d_model / n_layer
            if not aspect_min <= aspect <= aspect_max:
                continue
            n = _make_spec(n_layer, d_model, **make).params_scaling()
            pool.append((n, abs(math.log(aspect / aspect_target)), n_layer, d_model))
        d_model += step

    chosen: list[tuple[float, float, int, int]] = []
    window = ladder_ratio**0.3
    target = min_params
    while pool and target <= max_params * window:
        near = [p for p in pool if target / window <= p[0] <= target * window]
        if near:
            pick = min(near, key=lambda p: (p[1], abs(math.log(p[0] / target))))
        else:
            pick = min(pool, key=lambda p: abs(math.log(p[0] / target)))
        inside = min_params / window <= pick[0] <= max_params * window
        if inside and (not chosen or pick[0] >= chosen[-1][0] * ladder_ratio**0.5):
            chosen.append(pick)
        target *= ladder_ratio
    if not chosen:
        first = math.lcm(64, head_dim)
        smallest = min(p[0] for p in pool) if pool else _make_spec(1, first, **make).params_scaling()
        raise UserError(
            f"model size range {min_params:.3g}–{max_params:.3g}: the smallest shape with vocab {vocab} "
            f"and head_dim {head_dim} already has N = {smallest:.3g} (the LM head alone is {vocab}×d_model)"
        )
    return [_make_spec(p[2], p[3], **make) for p in chosen]


# --------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------
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

    @property
    def n_layer(self) -> int:
        return self.spec.n_layer

    @property
    def d_model(self) -> int:
        return self.spec.d_model

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


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def _memory_scale(measurements: Sequence[Measurement], *, activation_bytes: int) -> float:
    """measured / estimated peak memory, the largest over the measurements (a conservative
    correction of `ModelSpec.estimate_train_memory_bytes` for this device, dtype and allocator);
    1.0 when no measurement reports memory."""
    ratios = [
        m.peak_memory_bytes
        / m.spec.estimate_train_memory_bytes(micro_batch=m.micro_batch, activation_bytes=activation_bytes)
        for m in measurements
        if m.peak_memory_bytes > 0
    ]
    return max(ratios) if ratios else 1.0


def estimate_memory_bytes(spec: ModelSpec, micro_batch: int, *, activation_bytes: int = 4, scale: float = 1.0) -> float:
    """Training memory of one AdamW step: `ModelSpec.estimate_train_memory_bytes` (weights, grads,
    Adam moments in fp32; activations at `activation_bytes` per value: 4 for fp32, 2 under bf16
    autocast) times `scale`, the measured/estimated ratio seen on the measured shapes."""
    return scale * spec.estimate_train_memory_bytes(micro_batch=micro_batch, activation_bytes=activation_bytes)


def _max_micro_batch(spec: ModelSpec, *, memory_limit: float, activation_bytes: int, scale: float, cap: int) -> int:
    """Largest micro-batch ≤ cap whose estimated memory fits (the estimate is affine in micro-batch)."""
    one = estimate_memory_bytes(spec, 1, activation_bytes=activation_bytes, scale=scale)
    per_sample = estimate_memory_bytes(spec, 2, activation_bytes=activation_bytes, scale=scale) - one
    if one > memory_limit:
        return 0
    return int(min(cap, 1 + (memory_limit - one) // per_sample))


# --------------------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CandidateResult:
    """One row of the planner's table: a shape, its throughput and what the budget buys with it."""

    spec: ModelSpec
    tokens_per_s: float
    mfu: float
    measured: bool
    micro_batch: int
    """Measured micro-batch, or the largest that the memory estimate allows (0: does not fit)."""
    peak_memory_bytes: float
    """Measured peak memory, or the estimate at `micro_batch`."""
    fits_memory: bool
    tokens: float
    epochs: float
    effective_tokens: float
    predicted_loss: float
    """Loss under the default law at the effective (repetition-discounted) tokens."""
    band_loss: float
    """The same under the band (second-opinion) law."""
    fresh_loss: float
    """Loss under the default law if all `tokens` were fresh data."""
    chosen: bool = False

    def params(self) -> int:
        """N (non-embedding + head)."""
        return self.spec.params_scaling()

    def tokens_per_param(self) -> float:
        return self.tokens / self.params()

    def repetition_cost(self) -> float:
        """Predicted loss lost to repeating data: loss(N, D_eff) − loss(N, D)."""
        return self.predicted_loss - self.fresh_loss

    def label(self) -> str:
        return f"{self.spec.n_layer}×{self.spec.d_model}"


@dataclass(frozen=True)
class Decision:
    """The planner's table, the chosen row and why."""

    results: tuple[CandidateResult, ...]
    chosen_index: int
    reasons: tuple[str, ...]
    law: LossLaw
    band_law: LossLaw
    train_seconds: float
    unique_tokens: float
    throughput_note: str

    def chosen(self) -> CandidateResult:
        return self.results[self.chosen_index]

    def loss_band(self) -> tuple[float, float]:
        """(low, high) of the chosen shape's predicted loss under the two laws."""
        c = self.chosen()
        return min(c.predicted_loss, c.band_loss), max(c.predicted_loss, c.band_loss)


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def choose(
    *,
    candidates: Sequence[ModelSpec],
    throughput: ThroughputModel,
    train_seconds: float,
    unique_tokens: float,
    memory_limit_bytes: float | None = None,
    activation_bytes: int = 4,
    law: LossLaw = EPOCH_2024,
    band_law: LossLaw = HOFFMANN_2022,
    tie_tolerance: float = 0.005,
    max_good_epochs: float = 4.0,
) -> Decision:
    """Pick the shape that minimizes predicted loss in `train_seconds` (DESIGN §3, steps 3–4).

    For each candidate: D = tok/s × train_seconds; D' = Muennighoff effective tokens given the unique
    tokens; loss = law.loss(N, D') and band = band_law.loss(N, D'). Candidates that do not fit in
    `memory_limit_bytes` are skipped: measured ones fit by definition; for the others the largest
    micro-batch (≤ the largest measured) is estimated with `estimate_memory_bytes` (activations at
    `activation_bytes` per value, corrected by the measured/estimated ratio); the caller keeps a
    margin in the limit (CUDA context, fragmentation).

    The isoFLOP valley is flat (Hoffmann et al. 2022, fig. 3), so among near-ties — within
    `tie_tolerance` (relative, 0.5%) of the best loss — the fastest shape (highest tok/s, the smaller
    one) wins: the same predicted loss sooner, and cheaper to tune. Reasons say why, and say when the
    data runs short (more than `max_good_epochs` epochs) and what that costs: loss(N, D') − loss(N, D).
    """
    if not train_seconds > 0:
        raise UserError(f"training seconds must be positive, got {train_seconds:.3g}")
    if not unique_tokens > 0:
        raise UserError("data: no unique training tokens (the training split is empty)")
    if not candidates:
        raise ValueError("choose needs at least one candidate shape")
    scale = _memory_scale(throughput.measurements, activation_bytes=activation_bytes)
    cap = max(m.micro_batch for m in throughput.measurements)

    rows: list[CandidateResult] = []
    for spec in candidates:
        m = throughput.measurement_for(spec)
        if m is not None:
            micro, memory, fits = m.micro_batch, float(m.peak_memory_bytes), True
        elif memory_limit_bytes is None:
            micro, fits = cap, True
            memory = estimate_memory_bytes(spec, micro, activation_bytes=activation_bytes, scale=scale)
        else:
            micro = _max_micro_batch(
                spec, memory_limit=memory_limit_bytes, activation_bytes=activation_bytes, scale=scale, cap=cap
            )
            fits = micro >= 1
            memory = estimate_memory_bytes(spec, max(micro, 1), activation_bytes=activation_bytes, scale=scale)
        tps = throughput.tokens_per_s(spec)
        n = spec.params_scaling()
        tokens = tps * train_seconds
        d_eff = effective_tokens(tokens, unique_tokens)
        rows.append(
            CandidateResult(
                spec=spec,
                tokens_per_s=tps,
                mfu=throughput.mfu(spec),
                measured=m is not None,
                micro_batch=micro,
                peak_memory_bytes=memory,
                fits_memory=fits,
                tokens=tokens,
                epochs=epochs(tokens, unique_tokens),
                effective_tokens=d_eff,
                predicted_loss=law.loss(n, d_eff),
                band_loss=band_law.loss(n, d_eff),
                fresh_loss=law.loss(n, tokens),
            )
        )

    feasible = [i for i, r in enumerate(rows) if r.fits_memory]
    if not feasible:
        limit = f"{memory_limit_bytes / 2**30:.1f} GiB" if memory_limit_bytes else "?"
        raise UserError(
            f"no candidate shape fits in memory ({limit}); the smallest, {rows[0].label()}, needs about "
            f"{rows[0].peak_memory_bytes / 2**30:.1f} GiB"
        )
    best_i = min(feasible, key=lambda i: rows[i].predicted_loss)
    best_loss = rows[best_i].predicted_loss
    ties = [i for i in feasible if rows[i].predicted_loss <= best_loss * (1.0 + tie_tolerance)]
    chosen_i = max(ties, key=lambda i: (rows[i].tokens_per_s, -rows[i].params()))
    rows = [r if i != chosen_i else _with_chosen(r) for i, r in enumerate(rows)]
    c = rows[chosen_i]

    reasons = [
        f"Chose {c.label()} (N = {_fmt(c.params())}): {_fmt(c.tokens)} tokens in {train_seconds / 3600:.3g} h at "
        f"{_fmt(c.tokens_per_s)} tok/s (MFU {c.mfu:.1%}, {'measured' if c.measured else 'predicted'}), "
        f"{c.tokens_per_param():.3g} tokens per parameter; predicted loss {c.predicted_loss:.3f} "
        f"({law.name}), {c.band_loss:.3f} under {band_law.name}.",
    ]
    if chosen_i != best_i:
        b = rows[best_i]
        reasons.append(
            f"{b.label()} predicts a {best_loss:.3f} loss, within {tie_tolerance:.1%} of {c.label()}'s "
            f"{c.predicted_loss:.3f}; the loss valley is flat there, so the faster shape wins "
            f"({c.tokens_per_s / b.tokens_per_s:.2g}× the tokens/s)."
        )
    if not c.measured:
        reasons.append(
            f"The throughput of {c.label()} is predicted from the measured shapes, not measured: "
            "measure it before training on this plan."
        )
    skipped = [r for r in rows if not r.fits_memory]
    if skipped:
        reasons.append(
            f"{len(skipped)} larger shape(s) ({', '.join(r.label() for r in skipped)}) are estimated not "
            f"to fit in {memory_limit_bytes / 2**30:.1f} GiB and were not considered."
        )
    largest = max(feasible, key=lambda i: rows[i].params())
    smallest = min(feasible, key=lambda i: rows[i].params())
    if chosen_i == largest and len(feasible) > 1 and not skipped:
        reasons.append(
            "The largest candidate was chosen: the budget may favour a larger model than the range "
            "offered; raise the maximum size to check."
        )
    if chosen_i == smallest and len(feasible) > 1:
        reasons.append(
            "The smallest candidate was chosen: the budget may favour a smaller model than the range "
            "offered; lower the minimum size to check."
        )
    if c.epochs > max_good_epochs:
        reasons.append(
            f"The data is too small for this budget: {_fmt(c.tokens)} tokens are {c.epochs:.1f} epochs of "
            f"the {_fmt(unique_tokens)} unique tokens (more than {max_good_epochs:g}); repeated, they are "
            f"worth {_fmt(c.effective_tokens)} fresh tokens ({c.effective_tokens / c.tokens:.0%}), which "
            f"costs {c.repetition_cost():+.3f} predicted loss against {_fmt(c.tokens)} fresh tokens "
            "(Muennighoff et al. 2023). More data would help."
        )
    elif c.epochs > 1.0:
        reasons.append(
            f"{c.epochs:.2f} epochs over the data: repetition costs {c.repetition_cost():+.3f} predicted loss "
            "(up to ~4 epochs are worth almost as much as fresh data, Muennighoff et al. 2023)."
        )
    return Decision(
        results=tuple(rows),
        chosen_index=chosen_i,
        reasons=tuple(reasons),
        law=law,
        band_law=band_law,
        train_seconds=train_seconds,
        unique_tokens=unique_tokens,
        throughput_note=throughput.note,
    )


def _with_chosen(r: CandidateResult) -> CandidateResult:
    return replace(r, chosen=True)


# --------------------------------------------------------------------------------------------------
# Batch, learning rate, schedule
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLR:
    """Batch size, optimizer and schedule defaults for one shape and token budget (before tuning)."""

    compute_flops: float
    batch_tokens_opt: float
    """DeepSeek's B_opt(C) in tokens, before rounding and the minimum-steps cap."""
    micro_batch: int
    grad_accum: int
    seq_len: int
    planned_tokens: float
    lr_opt: float
    """DeepSeek's η_opt(C)."""
    lr: float
    """η_opt scaled for the batch actually used (square-root rule)."""
    beta1: float
    beta2: float
    weight_decay: float
    warmup_fraction: float
    cooldown_fraction: float
    cooldown_shape: str
    notes: tuple[str, ...]

    def global_batch_tokens(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len

    def steps(self) -> int:
        """Planned optimizer steps (an estimate: the run is keyed to the clock)."""
        return max(1, int(self.planned_tokens // self.global_batch_tokens()))


def batch_and_lr(
    *,
    spec: ModelSpec,
    tokens: float,
    max_micro_batch: int,
    min_steps: int = 300,
    small_batch_tokens: int = 2**18,
    cooldown_fraction: float = 0.2,
    weight_decay: float = 0.1,
) -> BatchLR:
    """Batch, LR and schedule from the compute C = 6·N·D (D = planned tokens).

    - Batch: B_opt = 0.2920·C^0.3271 tokens (DeepSeek LLM 2024), capped at D/`min_steps` so a short
      run still takes at least `min_steps` (300) optimizer steps when the budget allows (a few hundred
      steps are needed for warmup, the stable phase and the cooldown to mean anything), and at least
      one sequence. Rounded to micro_batch · grad_accum sequences of seq_len tokens with
      micro_batch ≤ `max_micro_batch` (the largest that fit in the memory probe): grad_accum =
      ceil(sequences / max_micro_batch), micro_batch = ceil(sequences / grad_accum).
    - LR: η_opt = 0.3118·C^−0.1250 (DeepSeek LLM 2024) for B_opt; when the batch used is smaller it
      is scaled by sqrt(B / B_opt) (square-root rule for Adam, Malladi et al. 2022), never raised.
    - AdamW β₁ = 0.9; β₂ = 0.95 at large batch, 0.99 when the global batch is below
      `small_batch_tokens` (2^18 ≈ 262k tokens): Porian et al. 2024 find β₂ = 0.99 essential at
      small batch sizes, where 0.95 averages the second moment over too few tokens.
    - Warmup ≈ N tokens (Porian et al. 2024), as a fraction of D, clamped to [1%, 10%].
    - Cooldown: the last 20% of the time, shape 1−sqrt (Hägele et al. 2024).
    - Weight decay 0.1 (DeepSeek LLM, Llama).
    """
    if not tokens > 0:
        raise UserError(f"planned tokens must be positive, got {tokens:.3g}")
    if max_micro_batch < 1:
        raise UserError(f"{spec.n_layer}×{spec.d_model}: not even one sequence fits in memory (micro-batch 0)")
    n = spec.params_scaling()
    c = 6.0 * n * tokens
    b_opt = deepseek_batch_tokens(c)
    notes = []
    target = b_opt
    if b_opt > tokens / min_steps:
        target = tokens / min_steps
        notes.append(
            f"Batch capped at {_fmt(target)} tokens (DeepSeek's optimum is {_fmt(b_opt)}) so the run takes "
            f"at least {min_steps} optimizer steps."
        )
    sequences = max(1, round(target / spec.seq_len))
    grad_accum = -(-sequences // max_micro_batch)
    micro = -(-sequences // grad_accum)
    global_tokens = micro * grad_accum * spec.seq_len
    lr_opt = deepseek_lr(c)
    lr = lr_opt * min(1.0, math.sqrt(global_tokens / b_opt))
    if lr < lr_opt:
        notes.append(
            f"LR scaled from {lr_opt:.3g} to {lr:.3g} for the smaller batch (square-root rule)."
        )
    beta2 = 0.99 if global_tokens < small_batch_tokens else 0.95
    warmup = min(0.10, max(0.01, n / tokens))
    return BatchLR(
        compute_flops=c,
        batch_tokens_opt=b_opt,
        micro_batch=micro,
        grad_accum=grad_accum,
        seq_len=spec.seq_len,
        planned_tokens=tokens,
        lr_opt=lr_opt,
        lr=lr,
        beta1=0.9,
        beta2=beta2,
        weight_decay=weight_decay,
        warmup_fraction=warmup,
        cooldown_fraction=cooldown_fraction,
        cooldown_shape="1-sqrt",
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------------------------
# Time reserved for what is not training
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reserve:
    """How the wall-clock budget splits: everything but training is reserved up front (seconds)."""

    budget_seconds: float
    probe_seconds: float
    compile_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    final_save_seconds: float

    def reserved_seconds(self) -> float:
        return (self.probe_seconds + self.compile_seconds + self.eval_seconds
                + self.checkpoint_seconds + self.final_save_seconds)

    def train_seconds(self) -> float:
        return self.budget_seconds - self.reserved_seconds()

    def train_fraction(self) -> float:
        return self.train_seconds() / self.budget_seconds


def reserve_seconds(
    *,
    budget_seconds: float,
    compile_seconds: float,
    eval_seconds_each: float,
    eval_count: int,
    checkpoint_seconds_each: float,
    checkpoint_count: int,
    final_save_seconds: float,
    probe_seconds: float,
) -> Reserve:
    """Training seconds = budget − (probe + compile/warm-up + evals + checkpoints + final save).

    The probing and measuring count against the budget, as in Cramming (Geiping & Goldstein 2023):
    the budget is the person's wall-clock, not the optimizer's. UserError when nothing is left.
    """
    if not budget_seconds > 0:
        raise UserError(f"budget must be positive, got {budget_seconds:.3g} s")
    parts = dict(compile_seconds=compile_seconds, eval_seconds_each=eval_seconds_each, eval_count=eval_count,
                 checkpoint_seconds_each=checkpoint_seconds_each, checkpoint_count=checkpoint_count,
                 final_save_seconds=final_save_seconds, probe_seconds=probe_seconds)
    for name, value in parts.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
    reserve = Reserve(
        budget_seconds=budget_seconds,
        probe_seconds=probe_seconds,
        compile_seconds=compile_seconds,
        eval_seconds=eval_seconds_each * eval_count,
        checkpoint_seconds=checkpoint_seconds_each * checkpoint_count,
        final_save_seconds=final_save_seconds,
    )
    if reserve.train_seconds() <= 0:
        raise UserError(
            f"budget too small: {budget_seconds:.0f} s leaves nothing for training after "
            f"{reserve.reserved_seconds():.0f} s of probing ({probe_seconds:.0f}), compiling "
            f"({compile_seconds:.0f}), evaluation ({reserve.eval_seconds:.0f}), checkpoints "
            f"({reserve.checkpoint_seconds:.0f}) and the final save ({final_save_seconds:.0f})"
        )
    return reserve
