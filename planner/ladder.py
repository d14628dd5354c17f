"""The ladder of candidate shapes the planner chooses from: widths, depths, head size, vocabulary padding.

Pure Python (no torch). `candidate_shapes` spaces shapes about 1.6× apart in N between two sizes, keeping the
aspect ratio d_model / n_layer in a sensible band; `next_rung` adds one beyond either end (when the planner's
choice falls on an end); `shape_key` identifies a shape for throughput and memory.
"""

from __future__ import annotations

import math
from dataclasses import replace

from oneday.errors import UserError
from oneday.models.spec import ModelSpec, Parametrization

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


Pooled = tuple[float, float, int, int]  # (N, |log(aspect / aspect_target)|, n_layer, d_model)


def _shape_pool(make: dict, *, up_to: float, aspect_min: float, aspect_max: float, aspect_target: float,
                max_layers: int) -> list[Pooled]:
    """Every valid (n_layer, d_model) pair (widths and aspect band of `candidate_shapes`) with N up to about `up_to`."""
    head_dim = make["head_dim"]
    pool: list[Pooled] = []
    d_model = head_dim
    while True:
        step = 64 if d_model < 1024 else 128
        step = math.lcm(step, head_dim)
        d_model = -(-d_model // step) * step
        fewest_layers = max(1, math.ceil(d_model / aspect_max))
        if _make_spec(fewest_layers, d_model, **make).params_scaling() > up_to:
            break
        for n_layer in range(1, max_layers + 1):
            aspect = d_model / n_layer
            if not aspect_min <= aspect <= aspect_max:
                continue
            n = _make_spec(n_layer, d_model, **make).params_scaling()
            pool.append((n, abs(math.log(aspect / aspect_target)), n_layer, d_model))
        d_model += step
    return pool


def next_rung(
    ladder: list[ModelSpec],
    *,
    below: bool,
    ladder_ratio: float = 1.6,
    aspect_min: float = 32.0,
    aspect_max: float = 100.0,
    aspect_target: float = 64.0,
    max_layers: int = 64,
) -> ModelSpec | None:
    """The shape one rung beyond the smallest (`below`) or largest end of `ladder`, by the rules of
    `candidate_shapes` (same vocabulary, sequence length, head size, tying, parametrization): N near
    end / `ladder_ratio` (or × it) with the aspect nearest `aspect_target`, else the valid shape nearest the
    end that is at least ladder_ratio^0.5 beyond it. Below the narrowest such shape (1×64 with heads of 64),
    `narrow_rung`: one head as wide as the model. None when nothing valid lies beyond."""
    end = ladder[0] if below else ladder[-1]
    make = dict(head_dim=end.head_dim, vocab_size=end.vocab_size, seq_len=end.seq_len,
                tied_embeddings=end.tied_embeddings, parametrization=end.parametrization)
    n = float(end.params_scaling())
    spacing = ladder_ratio**0.5
    target = n / ladder_ratio if below else n * ladder_ratio
    pool = _shape_pool(make, up_to=target * ladder_ratio, aspect_min=aspect_min, aspect_max=aspect_max,
                       aspect_target=aspect_target, max_layers=max_layers)
    beyond = [p for p in pool if (p[0] * spacing <= n if below else p[0] >= n * spacing)]
    if not beyond:
        return narrow_rung(end, ladder_ratio=ladder_ratio) if below else None
    near = [p for p in beyond if target / spacing <= p[0] <= target * spacing]
    if near:
        pick = min(near, key=lambda p: (p[1], abs(math.log(p[0] / target))))
    else:
        pick = min(beyond, key=lambda p: abs(math.log(p[0] / n)))
    return _make_spec(pick[2], pick[3], **make)


NARROW_WIDTH_STEP = 16
"""Widths below the head size step by this much, down to it (`narrow_rung`)."""


def reshape(spec: ModelSpec, *, n_layer: int, d_model: int, head_dim: int = 64) -> ModelSpec:
    """`spec` at another depth and width, by the ladder's rules: heads of `head_dim` (one head as wide as the
    model below it) and the SwiGLU d_ff of that width."""
    return replace(spec, n_layer=n_layer, d_model=d_model, n_head=max(1, d_model // head_dim), d_ff=swiglu_ff(d_model))


def narrow_rung(end: ModelSpec, *, ladder_ratio: float = 1.6) -> ModelSpec | None:
    """A rung below `end` narrower than the ladder's head size: `end`'s depth, one head as wide as the model (a
    multiple of `NARROW_WIDTH_STEP`), N at most end / ladder_ratio^0.5 and nearest end / `ladder_ratio`. On a
    CPU's minutes with a vocabulary of thousands the LM head dominates N, and 2×32 can beat the ladder's
    narrowest 2×64 by 10% (bench/plan_quality.py, a 3-minute budget), so the smallest end must be able to
    go there. None below `NARROW_WIDTH_STEP` wide."""
    n, spacing = float(end.params_scaling()), ladder_ratio**0.5
    shapes = [reshape(end, n_layer=end.n_layer, d_model=w, head_dim=end.head_dim)
              for w in range(NARROW_WIDTH_STEP, end.d_model, NARROW_WIDTH_STEP)]
    beyond = [s for s in shapes if s.params_scaling() * spacing <= n]
    if not beyond:
        return None
    return min(beyond, key=lambda s: abs(math.log(s.params_scaling() * ladder_ratio / n)))


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
    pool = _shape_pool(make, up_to=max_params * ladder_ratio, aspect_min=aspect_min, aspect_max=aspect_max,
                       aspect_target=aspect_target, max_layers=max_layers)

    chosen: list[Pooled] = []
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


__all__ = ["NARROW_WIDTH_STEP", "ShapeKey", "candidate_shapes", "narrow_rung", "next_rung", "pad_vocab", "reshape",
           "shape_key", "swiglu_ff"]
