"""The decision: which shape to train, on how many tokens, with what batch, LR and schedule.

Pure Python (no torch, no clock, no I/O), so every rule is unit-testable in milliseconds. The inputs
are numbers someone else measured: `Measurement`s of real training steps (the measurement module
builds each candidate, runs forward/backward/optimizer steps at the largest micro-batch that fits and
times them), the training seconds left after `budget.reserve_seconds`, the data's unique token count and the
device's peak FLOP/s (`hardware.resolve_peak_flops`).

The method ("hours, not FLOPs"; docs/design.md, Planning rules):
1. `ladder.candidate_shapes` enumerates a ladder of sensible shapes between two sizes;
2. `throughput.fit_throughput` models tokens/s across sizes from the measured ones;
3. `choose` turns seconds into tokens per candidate, D(N) = tok/s(N) × seconds, discounts repeated
   data and the parameters the data cannot feed (Muennighoff et al. 2023), predicts the loss L(N', D')
   with the default law and the band law, and picks the minimum — among near-ties the faster shape;
4. `batch_and_lr` sets the batch, LR, β₂, warmup and cooldown for the chosen shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from oneday.errors import UserError
from oneday.formats import human_count
from oneday.models.spec import ModelSpec
from oneday.planner.laws import (
    EPOCH_2024,
    HOFFMANN_2022,
    NEGLIGIBLE_REPETITION_EPOCHS,
    VANISHING_RETURN_EPOCHS,
    LossLaw,
    data_constrained_loss,
    deepseek_batch_tokens,
    deepseek_lr,
    effective_params,
    effective_tokens,
    epochs,
    supported_params,
)
from oneday.planner.throughput import Measurement, ThroughputModel

__all__ = [
    "LR_MIN_COMPUTE",
    "SAFE_MEMORY_FRACTION",
    "BatchLR",
    "CandidateResult",
    "Decision",
    "batch_and_lr",
    "choose",
    "estimate_memory_bytes",
    "memory_scale",
    "safe_micro_batch",
]

# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
SAFE_MEMORY_FRACTION = 0.85
"""The share of the memory limit an *estimated* micro-batch may fill. The estimate
(`ModelSpec.estimate_train_memory_bytes`, corrected by the measured/estimated ratio) leaves out the
allocator's caching and fragmentation (reserved exceeds allocated by 5-15% in long runs), torch.compile
and cuBLAS workspaces (hundreds of MiB) and the CUDA context; a plan that fills the limit to the last GiB
(micro-batch 67 at 124.9 of 125.4 GiB on an H200, 17 at 20.4 of 20.6 GiB on a 4090, seen in simulation)
fails at its first step. 15% covers those; a micro-batch that was measured ran and needs no margin."""


def memory_scale(measurements: Sequence[Measurement], *, activation_bytes: int) -> float:
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


def safe_micro_batch(
    spec: ModelSpec, *, memory_limit_bytes: float, activation_bytes: int, scale: float = 1.0, cap: int
) -> int:
    """Largest micro-batch ≤ `cap` whose estimated memory (`estimate_memory_bytes`, affine in the
    micro-batch) stays within `SAFE_MEMORY_FRACTION` of `memory_limit_bytes`; 0 when not even one fits."""
    allowed = SAFE_MEMORY_FRACTION * memory_limit_bytes
    one = estimate_memory_bytes(spec, 1, activation_bytes=activation_bytes, scale=scale)
    per_sample = estimate_memory_bytes(spec, 2, activation_bytes=activation_bytes, scale=scale) - one
    if one > allowed:
        return 0
    return int(min(cap, 1 + (allowed - one) // per_sample))


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
    effective_params: float
    """What N is worth on this data under the default law (`laws.effective_params`): N unless the model is
    larger than the unique tokens support."""
    predicted_loss: float
    """Loss under the default law at the effective parameters and tokens (`laws.data_constrained_loss`)."""
    band_loss: float
    """The same under the band (second-opinion) law."""
    fresh_loss: float
    """Loss under the default law if all `tokens` were fresh data (and the data no limit on N)."""
    chosen: bool = False

    def params(self) -> int:
        """N (non-embedding + head)."""
        return self.spec.params_scaling()

    def tokens_per_param(self) -> float:
        return self.tokens / self.params()

    def repetition_cost(self) -> float:
        """Predicted loss lost to the data's size: loss(N', D') − loss(N, D) (repeated tokens, excess parameters)."""
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
    max_good_epochs: float = NEGLIGIBLE_REPETITION_EPOCHS,
) -> Decision:
    """Pick the shape that minimizes predicted loss in `train_seconds` (docs/design.md, Planning rules).

    For each candidate: D = tok/s × train_seconds; D' and N' = Muennighoff et al. 2023's effective tokens
    and parameters given the unique tokens (eq. 5; N' = N unless the model is larger than the data
    supports); loss = law.loss(N', D') and band = band_law.loss(N', D'), each law with its own N'
    (`laws.data_constrained_loss`). Candidates that do not fit in `memory_limit_bytes` are skipped:
    measured ones fit by definition (their micro-batch ran); for the others the largest micro-batch (≤ the
    largest measured) whose `estimate_memory_bytes` (activations at `activation_bytes` per value, corrected
    by the measured/estimated ratio) stays within `SAFE_MEMORY_FRACTION` of the limit (`safe_micro_batch`:
    what the estimate leaves out).

    The isoFLOP valley is flat (Hoffmann et al. 2022, fig. 3), so among near-ties — within
    `tie_tolerance` (relative, 0.5%) of the best loss — the fastest shape (highest tok/s, the smaller
    one) wins: the same predicted loss sooner, and cheaper to tune. Reasons say why, and say when the
    data runs short (more than `max_good_epochs` epochs) and what that costs: loss(N', D') − loss(N, D);
    past `laws.VANISHING_RETURN_EPOCHS` a warning leads, with what more unique data would buy
    (`_data_reasons`).
    """
    if not train_seconds > 0:
        raise UserError(f"training seconds must be positive, got {train_seconds:.3g}")
    if not unique_tokens > 0:
        raise UserError("data: no unique training tokens (the training split is empty)")
    if not candidates:
        raise ValueError("choose needs at least one candidate shape")
    scale = memory_scale(throughput.measurements, activation_bytes=activation_bytes)
    cap = throughput.micro_batch_cap()

    rows: list[CandidateResult] = []
    for spec in candidates:
        m = throughput.measurement_for(spec)
        if m is not None:
            micro, memory, fits = m.micro_batch, float(m.peak_memory_bytes), True
        elif memory_limit_bytes is None:
            micro, fits = cap, True
            memory = estimate_memory_bytes(spec, micro, activation_bytes=activation_bytes, scale=scale)
        else:
            micro = safe_micro_batch(
                spec, memory_limit_bytes=memory_limit_bytes, activation_bytes=activation_bytes, scale=scale, cap=cap
            )
            fits = micro >= 1
            memory = estimate_memory_bytes(spec, max(micro, 1), activation_bytes=activation_bytes, scale=scale)
        tps = throughput.tokens_per_s(spec)
        n = spec.params_scaling()
        tokens = tps * train_seconds
        d_eff = effective_tokens(tokens, unique_tokens)
        n_eff = effective_params(n, unique_tokens, law=law)
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
                effective_params=n_eff,
                predicted_loss=law.loss(n_eff, d_eff),
                band_loss=data_constrained_loss(band_law, params=n, tokens=tokens, unique_tokens=unique_tokens),
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

    other = f", {c.band_loss:.3f} under {band_law.name}" if band_law != law else ""
    reasons = [
        f"Chose {c.label()} (N = {human_count(c.params())}): {human_count(c.tokens)} tokens in "
        f"{train_seconds / 3600:.3g} h at "
        f"{human_count(c.tokens_per_s)} tok/s (MFU {c.mfu:.1%}, {'measured' if c.measured else 'predicted'}), "
        f"{c.tokens_per_param():.3g} tokens per parameter; predicted loss {c.predicted_loss:.3f} "
        f"({law.name}){other}.",
    ]
    uniform = math.log(c.spec.vocab_size)
    if c.predicted_loss > uniform:  # the law's figure ranks the shapes; as a loss it is outside the law's range
        reasons[0] = reasons[0].replace(
            f"predicted loss {c.predicted_loss:.3f} ({law.name}){other}.",
            f"the law's loss {c.predicted_loss:.3f} ({law.name}; {c.band_loss:.3f} under {band_law.name}) ranks the "
            f"shapes, but is above ln(vocab) = {uniform:.2f}: not a prediction at this scale (see below).",
        )
    if chosen_i != best_i:
        b = rows[best_i]
        reasons.append(
            f"{b.label()} predicts a {best_loss:.3f} loss, within {tie_tolerance:.1%} of {c.label()}'s "
            f"{c.predicted_loss:.3f}; the loss valley is flat there, so the faster shape wins "
            f"({c.tokens_per_s / b.tokens_per_s:.2g}× the tokens/s)."
        )
    if not c.measured and any(r.measured for r in rows):  # (a what-if measured nothing and says so itself)
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
            "The largest candidate was chosen: a larger model may do better still. The planner adds up to two "
            "larger shapes while the probe's time lasts; more --probe-seconds lets it measure further."
        )
    if chosen_i == smallest and len(feasible) > 1:
        reasons.append(
            "The smallest candidate was chosen: a smaller model may do better still. The planner adds up to two "
            "smaller shapes (down to the smallest valid one) while the probe's time lasts; more --probe-seconds "
            "lets it measure further."
        )
    warning, notes = _data_reasons(
        rows, chosen_i, unique_tokens=unique_tokens, law=law, max_good_epochs=max_good_epochs
    )
    reasons[1:1] = warning
    reasons += notes
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


MORE_DATA_FACTOR = 4.0
"""`_data_reasons` says what this many times the unique tokens would buy in the same time."""


def _data_reasons(
    rows: Sequence[CandidateResult], chosen_i: int, *, unique_tokens: float, law: LossLaw, max_good_epochs: float
) -> tuple[list[str], list[str]]:
    """(warning, notes) about the data's size for the chosen row: past `VANISHING_RETURN_EPOCHS` a warning
    (to lead the reasons) with what `MORE_DATA_FACTOR`× the unique tokens would buy — the best predicted loss
    over the same rows, each training the same tokens, under `laws.data_constrained_loss`; past
    `max_good_epochs` a note with what repetition costs; past one epoch a short note."""
    c = rows[chosen_i]
    if c.epochs <= 1.0:
        return [], []
    share = c.effective_tokens / c.tokens
    worth = f"repeated, they are worth {human_count(c.effective_tokens)} fresh tokens ({share:.0%})"
    if c.effective_params < c.params():
        worth += (
            f", and the data supports about {human_count(supported_params(unique_tokens, law=law))} parameters, "
            f"so the model's {human_count(c.params())} are worth {human_count(c.effective_params)}"
        )
    cost = f"this costs {c.repetition_cost():+.3f} predicted loss against fresh data (Muennighoff et al. 2023)"
    if c.epochs <= max_good_epochs:
        return [], [
            f"{c.epochs:.2f} epochs over the data: repetition costs {c.repetition_cost():+.3f} predicted loss "
            f"(up to ~{max_good_epochs:g} epochs are worth almost as much as fresh data, Muennighoff et al. 2023)."
        ]
    more = MORE_DATA_FACTOR * unique_tokens
    losses_more = {
        i: data_constrained_loss(law, params=r.params(), tokens=r.tokens, unique_tokens=more)
        for i, r in enumerate(rows)
        if r.fits_memory
    }
    best_more_i = min(losses_more, key=losses_more.__getitem__)
    best_more, loss_more = rows[best_more_i], losses_more[best_more_i]
    if c.epochs <= VANISHING_RETURN_EPOCHS:
        return [], [
            f"The data is too small for this budget: {human_count(c.tokens)} tokens are {c.epochs:.1f} epochs of "
            f"the {human_count(unique_tokens)} unique tokens (more than {max_good_epochs:g}); {worth}; {cost}. "
            f"More data would help: {MORE_DATA_FACTOR:g}× the unique tokens would predict {loss_more:.3f} "
            f"({loss_more - c.predicted_loss:+.3f}) in the same time."
        ]
    return [
        f"WARNING: the data is far too small for this budget: {human_count(c.tokens)} tokens are "
        f"{c.epochs:.1f} epochs of the {human_count(unique_tokens)} unique tokens, past the ~"
        f"{VANISHING_RETURN_EPOCHS:g} epochs where more passes stop paying; {worth}; {cost}. "
        f"{MORE_DATA_FACTOR:g}× the unique tokens ({human_count(more)}) would predict {loss_more:.3f} "
        f"({loss_more - c.predicted_loss:+.3f}) in the same time, with {best_more.label()} "
        f"(N = {human_count(best_more.params())}). Add data before adding hours."
    ], []


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
    """DeepSeek's η_opt(C), C no lower than `LR_MIN_COMPUTE`."""
    lr: float
    """η_opt scaled for the batch actually used (square-root rule)."""
    beta1: float
    beta2: float
    weight_decay: float
    warmup_fraction: float
    cooldown_fraction: float
    cooldown_shape: str
    notes: tuple[str, ...]
    world_size: int = 1
    """Data-parallel ranks: `micro_batch` and `grad_accum` are per rank (`settle.split_batch`)."""

    def global_batch_tokens(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size * self.seq_len

    def steps(self) -> int:
        """Planned optimizer steps (an estimate: the run is keyed to the clock)."""
        return max(1, int(self.planned_tokens // self.global_batch_tokens()))


LR_MIN_COMPUTE = 1e17
"""The smallest compute (FLOPs) DeepSeek's η_opt(C) is evaluated at (`batch_and_lr`)."""


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
    - LR: η_opt = 0.3118·C^−0.1250 (DeepSeek LLM 2024) for B_opt, with C no lower than `LR_MIN_COMPUTE`
      (1e17 FLOPs, the small end of the compute DeepSeek fitted it on: η ≤ 2.34e-3); when the batch used is
      smaller it is scaled by sqrt(B / B_opt) (square-root rule for Adam, Malladi et al. 2022), never raised.
      Extrapolated below its data the formula keeps rising, and measured it overshoots: a 3-minute CPU plan
      (2×128, C ≈ 7e12, η 6.1e-3) reached val loss 5.83 ± 0.20 over two seeds at η, 5.64 ± 0.03 at η/2,
      5.48 ± 0.05 at η/4 and 5.70 at η/8 (one seed).
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
            f"Batch capped at {human_count(target)} tokens (DeepSeek's optimum is {human_count(b_opt)}) so the "
            f"run takes at least {min_steps} optimizer steps."
        )
    sequences = max(1, round(target / spec.seq_len))
    grad_accum = -(-sequences // max_micro_batch)
    micro = -(-sequences // grad_accum)
    global_tokens = micro * grad_accum * spec.seq_len
    lr_opt = deepseek_lr(max(c, LR_MIN_COMPUTE))
    if c < LR_MIN_COMPUTE:
        notes.append(
            f"LR {lr_opt:.3g}, DeepSeek's value at {LR_MIN_COMPUTE:.0e} FLOPs, the small end of its fit: at this "
            f"run's {c:.2g} FLOPs the formula says {deepseek_lr(c):.3g}, which measured too high at this scale."
        )
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
