"""What a plan says, as plain text: the candidates table, the summary, the reasons.

Pure Python on a `Plan` (no rich, no torch): `oneday plan` renders these after planning and
`oneday plan --explain plan.json` renders them from a saved plan, so both show exactly the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from oneday.formats import clock_text, human_count, human_flops
from oneday.plan import Candidate, Plan

__all__ = ["COLUMNS", "CandidateRow", "candidate_rows", "summary_lines"]

COLUMNS = ("", "shape", "N", "total", "tok/s", "MFU", "how", "micro", "tokens", "epochs", "loss (band)")
"""Column headers: chosen mark, L×d, N (non-embedding + head), all parameters, tokens/s, MFU, whether the
tokens/s was measured or modelled, micro-batch, tokens in the budget, epochs of the data, predicted loss
(default law) with the band of both laws (none for a calibrated law: the plan's summary gives the fit's band)."""


@dataclass(frozen=True)
class CandidateRow:
    cells: tuple[str, ...]
    chosen: bool
    fits: bool


def _row(c: Candidate) -> CandidateRow:
    fits = c.micro_batch >= 1
    lo, hi = sorted((c.predicted_loss, c.band_loss))
    loss = f"{c.predicted_loss:.3f}" if fits else "–"
    cells = (
        "▶" if c.chosen else "",
        f"{c.n_layer}×{c.d_model}",
        human_count(c.params_scaling),
        human_count(c.params_total),
        f"{c.tokens_per_s:,.0f}",
        f"{c.mfu:.1%}",
        "measured" if c.measured else "modelled",
        str(c.micro_batch) if fits else "does not fit",
        human_count(c.tokens) if fits else "–",
        f"{c.epochs:.2f}" if fits else "–",
        loss if not fits or lo == hi else f"{loss} ({lo:.2f}–{hi:.2f})",
    )
    return CandidateRow(cells=cells, chosen=c.chosen, fits=fits)


def candidate_rows(plan: Plan) -> list[CandidateRow]:
    """One row per candidate, smallest first, in the order of `COLUMNS`."""
    return [_row(c) for c in sorted(plan.candidates, key=lambda c: c.params_scaling)]


def summary_lines(plan: Plan) -> list[tuple[str, str]]:
    """(label, text) pairs: model, batch, LR, schedule, tokens, predicted loss, time, device, data."""
    m, t, p, h, d = plan.model, plan.train, plan.prediction, plan.hardware, plan.data
    lines: list[tuple[str, str]] = []
    lines.append((
        "model",
        f"{m.n_layer}×{m.d_model} ({m.n_head} heads of {m.head_dim}, d_ff {m.d_ff}, vocab {m.vocab_size}, "
        f"seq {m.seq_len}), N = {human_count(m.params_scaling())} (non-embedding + head), "
        f"{human_count(m.params_total())} in all, {human_count(m.flops_per_token())} FLOPs/token",
    ))
    ranks = (f" × {t.world_size}", " × GPUs") if t.world_size > 1 else ("", "")
    lines.append((
        "batch",
        f"{t.micro_batch} × {t.grad_accum}{ranks[0]} × {t.seq_len} = {t.tokens_per_step():,} tokens per step "
        f"(micro-batch × accumulation{ranks[1]} × sequence), ~{t.planned_steps:,} steps",
    ))
    lines.append((
        "LR",
        f"{t.lr:.3g} peak, AdamW β = ({t.beta1}, {t.beta2}), weight decay {t.weight_decay}, "
        f"gradient clip {t.grad_clip}",
    ))
    warm = t.warmup_fraction * t.train_seconds
    cool = t.cooldown_fraction * t.train_seconds
    const = max(0.0, t.train_seconds - warm - cool)
    lines.append((
        "schedule",
        f"warmup {clock_text(warm)} ({t.warmup_fraction:.1%}) → constant {clock_text(const)} → "
        f"{t.cooldown_shape} cooldown {clock_text(cool)} ({t.cooldown_fraction:.0%}) to "
        f"{t.final_lr_fraction:g}× LR, keyed to the clock over {clock_text(t.train_seconds)} of training",
    ))
    lines.append((
        "tokens",
        f"{human_count(t.planned_tokens)} at {p.tokens_per_s:,.0f} tok/s (MFU {p.mfu:.1%}), {p.epochs:.2f} epochs "
        f"of {human_count(d.train_tokens)} unique tokens",
    ))
    lo, hi = p.loss_band
    if p.basis == "bound":  # the law's own figure is above what the data allows: no point prediction
        lines.append((
            "predicted loss",
            f"below {p.loss:.3f}, band {lo:.3f}–{hi:.3f} (not calibrated: {p.law} says {p.law_loss:.3f}, above the "
            "data's unigram entropy, where it does not hold)",
        ))
    else:
        lines.append((
            "predicted loss",
            f"{p.loss:.3f} (band {lo:.3f}–{hi:.3f}; {p.law}, "
            + ("the fit's 95% prediction interval)" if p.basis == "calibrated" else
               f"band {p.band_law}{', calibrated' if p.calibrated else ', not calibrated to this data'})"),
        ))
    probe = plan.provenance.probe_seconds
    evals = max(1, math.ceil(t.budget_seconds / t.eval_every_seconds))
    checkpoints = int(t.budget_seconds // t.checkpoint_every_seconds)
    lines.append((
        "time",
        f"budget {clock_text(plan.budget_seconds())}: probe {probe:.0f} s, then a run of "
        f"{clock_text(t.budget_seconds)}: {clock_text(t.train_seconds)} training, "
        f"{t.reserve_seconds():.0f} s reserved (start-up{' and compile' if t.compile else ''}, "
        f"~{evals} evaluation{'s' * (evals != 1)} of {t.eval_tokens:,} tokens every {t.eval_every_seconds:.0f} s, "
        f"{checkpoints} checkpoint{'s' * (checkpoints != 1)} every {t.checkpoint_every_seconds:.0f} s, final save; "
        "see the reasons)",
    ))
    compiled = ", torch.compile" if t.compile else ""
    threads = f", {t.threads} threads" if t.device == "cpu" and t.threads else ""
    count = f"{t.world_size} × " if t.world_size > 1 else ""
    what_if = "what-if (not probed): " if plan.provenance.what_if else ""
    lines.append((
        "device",
        f"{what_if}{count}{h.name} ({t.device}, {t.precision}{compiled}{threads}), peak {human_flops(h.peak_flops)} "
        f"({h.peak_flops_source.split(':')[0]})",
    ))
    lines.append((
        "data",
        f"{d.source}: {d.train_tokens:,} train + {d.val_tokens:,} val tokens, {d.bytes_per_token:.2f} bytes/token",
    ))
    return lines
