"""Scaling rules the planner applies: loss as a function of N and D, compute-optimal sizes, batch and
learning rate, learning-rate horizon correction, and the value of repeated data and of parameters the data
cannot feed.

Pure Python: no torch, no clock, no I/O; every function is a formula with its source.

Conventions: N counts non-embedding parameters plus the LM head (`ModelSpec.params_scaling()`),
D counts training tokens, C = 6·N·D training FLOPs (Kaplan et al. 2020; Hoffmann et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from oneday.errors import UserError

__all__ = [
    "EPOCH_2024",
    "HOFFMANN_2022",
    "MUENNIGHOFF_MIN_UNIQUE_TOKENS",
    "MUENNIGHOFF_R_STAR",
    "MUENNIGHOFF_R_STAR_PARAMS",
    "NEGLIGIBLE_REPETITION_EPOCHS",
    "VANISHING_RETURN_EPOCHS",
    "LossLaw",
    "data_constrained_loss",
    "deepseek_batch_tokens",
    "deepseek_lr",
    "effective_params",
    "effective_tokens",
    "epochs",
    "fit_law_eab",
    "lr_horizon_correction",
    "supported_params",
    "unigram_entropy",
]


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Loss as a function of N and D
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossLaw:
    """A Chinchilla-form loss law L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2).

    The absolute losses belong to the data and tokenizer the law was fitted on; the location of the
    optimum is what transfers. `calibrated()` (or `dataclasses.replace`) carries a law whose E, A, B
    were refitted on the user's data with α, β fixed (see `fit_law_eab`; docs/design.md, Calibration).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str
    source: str

    def loss(self, n: float, d: float) -> float:
        """L = E + A/N^α + B/D^β (Hoffmann et al. 2022, eq. 2)."""
        _positive("n", n)
        _positive("d", d)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, c_flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing L under C = 6·N·D (Hoffmann et al. 2022, eq. 4 / appendix D.2).

        G = (αA/(βB))^(1/(α+β)), N_opt = G·(C/6)^(β/(α+β)), D_opt = (C/6)/N_opt.

        A calibration may fit A = 0 (size buys nothing on this data at these scales: every token to the
        smallest model, N_opt = 1) or B = 0 (tokens buy nothing: D_opt = 1); non-negative least squares finds
        such fits when the runs say so.
        """
        _positive("c_flops", c_flops)
        if self.A <= 0 or self.B <= 0:
            n_opt = 1.0 if self.A <= 0 else c_flops / 6.0
            return n_opt, (c_flops / 6.0) / n_opt
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n_opt = g * (c_flops / 6.0) ** (b / (a + b))
        return n_opt, (c_flops / 6.0) / n_opt

    def data_optimal_params(self, tokens: float) -> float:
        """N whose compute-optimal token count is `tokens`: `compute_optimal` solved for N given D_opt.

        From N_opt = G·(C/6)^(β/(α+β)) and D_opt = G⁻¹·(C/6)^(α/(α+β)): N = G·(D·G)^(β/α). Muennighoff et
        al. 2023 (Scaling data-constrained language models, eq. 5; `D_to_N` in their code) take this as U_N,
        the parameters the unique data supports: D/30 at 100M tokens, D/24 at 10B under the default law.
        Unbounded (inf) for a law with A = 0 or B = 0: no size is in excess of what the data supports when size
        does not move the loss, or when the tokens do not.
        """
        _positive("tokens", tokens)
        if self.A <= 0 or self.B <= 0:
            return math.inf
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        return g * (tokens * g) ** (b / a)

    def calibrated(self, *, E: float, A: float, B: float, source: str, name: str | None = None) -> LossLaw:
        """This law with E, A, B replaced (α, β kept): the result of a calibration fit (docs/design.md, Calibration)."""
        return replace(self, E=E, A=A, B=B, source=source, name=name or f"{self.name}-calibrated")


EPOCH_2024 = LossLaw(
    E=1.8172,
    A=482.01,
    B=2085.43,
    alpha=0.3478,
    beta=0.3658,
    name="epoch-2024",
    source="Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt (arXiv 2404.10102)",
)
"""The default law: Epoch AI's refit of the Chinchilla data."""

HOFFMANN_2022 = LossLaw(
    E=1.69,
    A=406.4,
    B=410.7,
    alpha=0.34,
    beta=0.28,
    name="hoffmann-2022",
    source="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models (arXiv 2203.15556)",
)
"""The second opinion (band): the original Chinchilla approach-3 fit."""


# --------------------------------------------------------------------------------------------------
# Calibration: E, A, B by non-negative least squares with α, β fixed
# --------------------------------------------------------------------------------------------------
def _lstsq(columns: Sequence[Sequence[float]], y: Sequence[float]) -> tuple[list[float], float]:
    """Least squares y ≈ Σ x_j·col_j by modified Gram-Schmidt QR on unit-scaled columns.

    Returns (coefficients, residual sum of squares). Columns that are (numerically) dependent on the
    previous ones get coefficient 0.
    """
    m = len(y)
    scales = [math.sqrt(sum(v * v for v in col)) or 1.0 for col in columns]
    q: list[list[float]] = [[v / s for v in col] for col, s in zip(columns, scales, strict=True)]
    k = len(q)
    r = [[0.0] * k for _ in range(k)]
    usable = [True] * k
    for j in range(k):
        for i in range(j):
            if not usable[i]:
                continue
            r[i][j] = sum(q[i][t] * q[j][t] for t in range(m))
            q[j] = [q[j][t] - r[i][j] * q[i][t] for t in range(m)]
        norm = math.sqrt(sum(v * v for v in q[j]))
        if norm < 1e-10:
            usable[j] = False
            continue
        r[j][j] = norm
        q[j] = [v / norm for v in q[j]]
    qty = [sum(q[j][t] * y[t] for t in range(m)) if usable[j] else 0.0 for j in range(k)]
    x = [0.0] * k
    for j in reversed(range(k)):
        if not usable[j]:
            continue
        x[j] = (qty[j] - sum(r[j][i] * x[i] for i in range(j + 1, k))) / r[j][j]
    coef = [x[j] / scales[j] for j in range(k)]
    fitted = [sum(coef[j] * columns[j][t] for j in range(k)) for t in range(m)]
    rss = sum((y[t] - fitted[t]) ** 2 for t in range(m))
    return coef, rss


def fit_law_eab(
    points: Sequence[tuple[float, float, float]],
    *,
    alpha: float = EPOCH_2024.alpha,
    beta: float = EPOCH_2024.beta,
    base: LossLaw = EPOCH_2024,
) -> LossLaw:
    """Fit E, A, B of L = E + A/N^α + B/D^β to (n, d, loss) points with α, β fixed (docs/design.md, Calibration).

    With α, β fixed the law is linear in (E, A, B): loss = E·1 + A·N^−α + B·D^−β. It is solved as
    non-negative least squares (E, A, B ≥ 0, the only physically meaningful region) exactly, by
    trying every active set of the three coefficients (2³ least-squares solves on at most three
    columns) and keeping the feasible solution with the smallest residual; this is the NNLS optimum
    (Lawson & Hanson 1974) for so few variables. Needs at least three points; with fewer distinct
    N (or D) values, the A (or B) term cannot be told from E and the fit says so through the result.
    """
    if len(points) < 3:
        raise UserError(f"calibration: need at least 3 (n, d, loss) points to fit E, A, B, got {len(points)}")
    for n, d, loss in points:
        _positive("n", n)
        _positive("d", d)
        if not math.isfinite(loss):
            raise UserError(f"calibration: loss {loss!r} at n={n:.3g}, d={d:.3g} is not finite")
    y = [float(p[2]) for p in points]
    cols = [[1.0] * len(points), [p[0] ** -alpha for p in points], [p[1] ** -beta for p in points]]
    best: tuple[float, list[float]] | None = None
    for mask in range(1, 8):
        active = [j for j in range(3) if mask >> j & 1]
        coef_active, rss = _lstsq([cols[j] for j in active], y)
        if any(c < 0 for c in coef_active):
            continue
        coef = [0.0, 0.0, 0.0]
        for j, c in zip(active, coef_active, strict=True):
            coef[j] = c
        if best is None or rss < best[0] - 1e-15 * max(1.0, best[0]):
            best = (rss, coef)
    # best is None only when every loss is negative: then only zero is non-negative
    coef = [0.0, 0.0, 0.0] if best is None else best[1]
    e, a, b = coef
    return replace(
        base,
        E=e,
        A=a,
        B=b,
        alpha=alpha,
        beta=beta,
        name=f"{base.name}-calibrated",
        source=(
            f"E, A, B fitted by non-negative least squares on {len(points)} runs with "
            f"α={alpha}, β={beta} fixed from {base.name}"
        ),
    )


# --------------------------------------------------------------------------------------------------
# Other compute-optimal rules
# --------------------------------------------------------------------------------------------------
def deepseek_lr(c_flops: float) -> float:
    """η_opt = 0.3118·C^−0.1250 (DeepSeek LLM, DeepSeek-AI 2024, eq. 1; C in FLOPs)."""
    _positive("c_flops", c_flops)
    return 0.3118 * c_flops**-0.1250


def deepseek_batch_tokens(c_flops: float) -> float:
    """B_opt = 0.2920·C^0.3271 tokens (DeepSeek LLM, DeepSeek-AI 2024, eq. 1; C in FLOPs)."""
    _positive("c_flops", c_flops)
    return 0.2920 * c_flops**0.3271


def lr_horizon_correction(d_from: float, d_to: float) -> float:
    """Factor that moves an optimal LR found at horizon d_from to horizon d_to: (d_to/d_from)^−0.32.

    Bjorck et al., ICLR 2025 (Scaling optimal LR across token horizons): LR* ∝ D^−0.32, fitted past the
    first thousands of steps. Over a run's first ~60 steps the optimum rises instead (measured; see
    `studies.proxy.MIN_TRIAL_STEPS`), so the horizons this moves between should both lie past that.
    """
    _positive("d_from", d_from)
    _positive("d_to", d_to)
    return (d_to / d_from) ** -0.32


# --------------------------------------------------------------------------------------------------
# Repeated data
# --------------------------------------------------------------------------------------------------
MUENNIGHOFF_R_STAR = 15.39
"""R*_D of Muennighoff et al. 2023 (Scaling data-constrained language models, eq. 5 fit: 15.387)."""

MUENNIGHOFF_R_STAR_PARAMS = 5.309
"""R*_N of Muennighoff et al. 2023 (same fit): excess parameters lose value three times faster than
repeated tokens."""

NEGLIGIBLE_REPETITION_EPOCHS = 4.0
"""Up to 4 epochs, repeated data is worth almost as much as fresh data (Muennighoff et al. 2023, abstract: "up to
4 epochs of repeated data yields negligible changes to loss"; `effective_tokens` gives 93% at 4 epochs)."""

VANISHING_RETURN_EPOCHS = 16.0
"""Past ~16 epochs the returns from repeating vanish (Muennighoff et al. 2023: "the value of adding compute
eventually decays to zero"; their eq. 5 fit puts the decay constant at R*_D ≈ 15.4 repetitions, i.e. 16 epochs):
one more pass is worth e^(−R/R*_D) of fresh data, 37% at 16 epochs, 8% at 40, so more compute buys little and
more unique data is what helps."""


def epochs(total_tokens: float, unique_tokens: float) -> float:
    """Passes over the data: total tokens trained / unique tokens."""
    _positive("unique_tokens", unique_tokens)
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be non-negative, got {total_tokens!r}")
    return total_tokens / unique_tokens


def effective_tokens(total_tokens: float, unique_tokens: float, r_star: float = MUENNIGHOFF_R_STAR) -> float:
    """Fresh-data equivalent of training `total_tokens` on `unique_tokens` unique tokens.

    D' = U + U·R*·(1 − e^(−R/R*)), R = epochs − 1 repetitions (Muennighoff et al. 2023, eq. 5,
    R* = 15.39). With no repetition (total ≤ unique) D' = total. 4 epochs are worth ≈ 93% of fresh
    tokens, 16 epochs ≈ 66%; D' never exceeds U·(1 + R*).
    """
    _positive("r_star", r_star)
    ep = epochs(total_tokens, unique_tokens)
    if ep <= 1.0:
        return float(total_tokens)
    repeats = ep - 1.0
    return unique_tokens + unique_tokens * r_star * (1.0 - math.exp(-repeats / r_star))


MUENNIGHOFF_MIN_UNIQUE_TOKENS = 1e8
"""The smallest unique-data budget behind Muennighoff et al. 2023's eq. 5 fit (100M unique tokens, their
figure 3; the fit spans 100M to 9B+ unique tokens and 10M to 9B parameters). Below it the excess-parameter
decay was never observed, and the law's U_N extrapolates to models no fit has seen (U_N = 26k parameters at
1M tokens): on the built-in corpus it priced a 2×64 model at a loss of 34, ten times what it reaches."""


def supported_params(unique_tokens: float, *, law: LossLaw) -> float:
    """U_N, the parameters the unique data supports, bounded to the range Muennighoff et al. 2023 fitted:
    `law.data_optimal_params`(max(U_D, `MUENNIGHOFF_MIN_UNIQUE_TOKENS`)).

    The bound only ever raises U_N, so it only ever removes discount: below 100M unique tokens a model no
    larger than the 100M-token U_N (≈3.3M parameters under the default law) is worth what it is, and
    larger ones decay from there. Unbounded, U_N shrinks with the data as D^(1+β/α)·… towards nothing, and
    the discount then predicts losses far above ln V for models that train fine. From 100M unique tokens
    up it is the paper's U_N unchanged."""
    _positive("unique_tokens", unique_tokens)
    return law.data_optimal_params(max(unique_tokens, MUENNIGHOFF_MIN_UNIQUE_TOKENS))


def effective_params(
    params: float, unique_tokens: float, *, law: LossLaw, r_star: float = MUENNIGHOFF_R_STAR_PARAMS
) -> float:
    """What `params` parameters are worth when the data has only `unique_tokens` unique tokens.

    N' = U_N + U_N·R*_N·(1 − e^(−R_N/R*_N)), U_N = min(N, `supported_params`(U_D)),
    R_N = N/U_N − 1 (Muennighoff et al. 2023, eq. 5, R*_N = 5.309): parameters beyond those the unique
    data supports are "excess" and decay in value like repeated tokens, faster. N' never exceeds
    U_N·(1 + R*_N). U_D here is the corpus's unique tokens, so N' = N exactly whenever N ≤ U_N: on a corpus
    large enough for the model the plain law holds, whatever the tokens trained. (The paper's U_D is the
    unique tokens a run sees, the same thing once a run repeats data; below one epoch its reading would
    discount every shape larger than compute-optimal even on unlimited data, which the plain law already
    prices through A/N^α.) U_N is bounded to the fit's range (`supported_params`): below 100M unique tokens
    the paper has no evidence, and the unbounded U_N predicts absurd losses for tiny corpora.
    """
    _positive("params", params)
    _positive("r_star", r_star)
    unique_params = supported_params(unique_tokens, law=law)
    if params <= unique_params:
        return float(params)
    excess = params / unique_params - 1.0
    return unique_params + unique_params * r_star * (1.0 - math.exp(-excess / r_star))


def data_constrained_loss(law: LossLaw, *, params: float, tokens: float, unique_tokens: float) -> float:
    """L(N', D') with both of Muennighoff et al. 2023's discounts (eq. 5): `effective_params` for N and
    `effective_tokens` for D, under `law`'s E, A, B, α, β. Equals `law.loss(N, D)` when the data neither
    repeats nor is too small for the model."""
    return law.loss(effective_params(params, unique_tokens, law=law), effective_tokens(tokens, unique_tokens))


# --------------------------------------------------------------------------------------------------
# What any model trained on this data should beat
# --------------------------------------------------------------------------------------------------
def unigram_entropy(counts: Sequence[int]) -> float:
    """H = −Σ p_i·ln p_i (nats per token) of the token frequencies `counts` (Shannon 1948).

    The cross-entropy of the best context-free predictor, the token frequencies themselves: a language model
    learns them within its first few hundred steps, so its validation loss should end below H (and H ≤ ln V,
    the uniform guess). A published law that predicts more than H on this data is outside its range."""
    total = float(sum(counts))
    if not total > 0:
        raise ValueError("unigram_entropy needs at least one counted token")
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)
