"""The reasons a plan gives for its choices: plain sentences written into plan.json (`Plan.reasons`).

`oneday plan` and `oneday plan --explain` print them after the table; they say why this shape, what was
measured, what was reserved, what the device settings are and what the plan cannot promise.
"""

from __future__ import annotations

import math
from typing import Any

from oneday.formats import clock_text
from oneday.models.spec import ModelSpec
from oneday.planner.budget import Cadence, Reserve
from oneday.planner.calibration import LawFit, Presented
from oneday.planner.decide import BatchLR, Decision
from oneday.planner.laws import LossLaw
from oneday.planner.policy import COMPILE_MIN_SECONDS, Setup

DATA_PARALLEL_SOURCE = (
    "an assumption, not measured: DDP overlaps the gradient all-reduce with the backward pass within a node, "
    "Li et al. 2020, PyTorch Distributed"
)


def reasons(
    *,
    decision: Decision,
    bl: BatchLR,
    probe: Any,
    ladder: list[ModelSpec],
    reserve: Reserve,
    cadence: Cadence,
    setup: Setup,
    seq_reason: str,
    law: LossLaw,
    calibration: Any,
    mfu: float,
    budget_seconds: float,
    gpu_count: int,
    ranks: int = 1,
    dp_efficiency: float = 1.0,
    dp_source: str = DATA_PARALLEL_SOURCE,
    shown: Presented | None = None,
    fit: LawFit | None = None,
) -> list[str]:
    lines = list(decision.reasons)
    lines += bl.notes
    if decision.throughput_note:
        lines.append(decision.throughput_note)
    if probe.timings:  # none when the throughput is assumed (`oneday plan --what-if`)
        labels = ", ".join(t.label() for t in probe.timings)
        line = (
            f"Measured {len(probe.timings)} of {len(ladder)} candidate shapes ({labels}) with real training steps "
            f"in {reserve.probe_seconds:.1f} s with the peak FLOP/s ({reserve.probe_seconds / budget_seconds:.1%} "
            "of the budget); the probe counts against the budget (Cramming)."
        )
        if probe.skipped:
            line += f" Not measured: {'; '.join(probe.skipped)}."
        lines.append(line)
    startup = "start-up and compile" if setup.compile else "start-up"
    lines.append(
        f"Reserved {reserve.reserved_seconds():.0f} s of the {clock_text(budget_seconds)} budget: probe "
        f"{reserve.probe_seconds:.0f} s, {startup} {reserve.compile_seconds:.0f} s, {cadence.eval_count} "
        f"evaluation{'s' * (cadence.eval_count != 1)} of {cadence.eval_tokens:,} tokens every "
        f"{cadence.eval_every:.0f} s ({reserve.eval_seconds:.0f} s), {cadence.checkpoint_count} "
        f"checkpoint{'s' * (cadence.checkpoint_count != 1)} every "
        f"{cadence.checkpoint_every:.0f} s ({reserve.checkpoint_seconds:.0f} s), final save "
        f"{reserve.final_save_seconds:.1f} s; {reserve.train_seconds():.0f} s ({reserve.train_fraction():.0%}) "
        "are left for training."
    )
    if setup.device == "cpu":
        lines.append(
            f"CPU: fp32 and no torch.compile (bf16 is ~50x slower on CPUs without AVX-512 BF16/AMX; compiling "
            f"takes 60-90 s and gains nothing at steady state), {setup.threads} torch thread(s); micro-batches "
            "are capped at 4,096 tokens (tok/s does not grow past a few thousand tokens per micro-batch on a "
            "CPU), gradient accumulation makes up the batch; freed memory stays in the heap for the next step "
            "(glibc mallopt: no page faults, up to twice the tok/s of small models). Expect the CPU's speed to "
            "vary with other load."
        )
    else:
        compiled = (
            ("torch.compile (--compile)" if setup.compile_asked else "torch.compile") if setup.compile
            else "no torch.compile (--no-compile)" if setup.compile_asked is False
            else f"no torch.compile (the budget is under {COMPILE_MIN_SECONDS / 60:.0f} min; compiling costs ~1 min)"
        )
        precision = {"bf16": "bf16 autocast, ",
                     "fp16": "fp16 autocast with a grad scaler (this GPU has no bf16: compute capability < 8.0), "
                     }.get(setup.dtype, f"{setup.dtype} ")
        lines.append(f"CUDA: {precision}TF32 matmuls, {compiled}.")
    if ranks > 1:
        lines.append(
            f"Planned for {ranks} GPUs, data parallel: {ranks} × one GPU's tokens/s × {dp_efficiency:.0%} "
            f"({dp_source}); micro-batch {bl.micro_batch} × grad_accum {bl.grad_accum} per GPU, "
            f"{bl.global_batch_tokens():,} tokens per step in all. Run it with "
            f"`torchrun --nproc-per-node {ranks} -m oneday run plan.json`."
        )
    if gpu_count > ranks:
        lines.append(
            f"{gpu_count} GPUs found; this plan is for {ranks}. Plan with --gpus {gpu_count} to train on all of "
            "them (data parallel under torchrun)."
        )
    lines.append(seq_reason)
    lines += _prediction_lines(decision, law=law, calibration=calibration, shown=shown, fit=fit)
    if mfu > 1.0:
        lines.append(
            f"The measured MFU ({mfu:.0%}) is above 100%: the CPU's peak was measured with a matmul while "
            "other work slowed it; MFU figures on this machine are relative, not absolute."
        )
    return lines


def _prediction_lines(decision: Decision, *, law: LossLaw, calibration: Any, shown: Presented | None,
                      fit: LawFit | None) -> list[str]:
    """What the predicted loss rests on, and how far to trust it (`calibration.presented_loss`)."""
    chosen = decision.chosen()
    lines = []
    if calibration is not None:
        what = f"{len(fit.points)} runs, fitted {', '.join(fit.free)}" if fit else "a file"
        lines.append(f"Loss law calibrated on this data ({what}): {law.name} ({law.source}).")
    else:
        lines.append(
            "Predicted losses use published fits (Epoch AI 2024; band: Hoffmann et al. 2022) whose absolute "
            "values belong to their data and tokenizer: the choice of size transfers, the loss needs calibration."
        )
    uniform = math.log(chosen.spec.vocab_size)
    if shown is None:
        if chosen.predicted_loss > uniform:
            lines.append(f"The predicted loss ({chosen.predicted_loss:.2f}) is above ln(vocab) = {uniform:.2f}.")
        return lines
    low, high = shown.band
    bound = "the data's unigram entropy" if shown.ceiling < uniform else "ln(vocab)"
    if shown.basis == "bound":
        lines.append(
            f"Uncalibrated: the published law predicts {chosen.predicted_loss:.2f}, above {bound} "
            f"({shown.ceiling:.2f}; ln(vocab) = {uniform:.2f}), which predicting token frequencies alone reaches: "
            "the laws are fitted on far larger models and data and do not hold at this scale, so the plan gives no "
            f"point prediction, only a band: {low:.2f}–{high:.2f} (the published irreducible loss to {bound}). "
            "Trust the choice of size less; calibrate on short runs (`oneday tune plan.json --calibrate`)."
        )
    elif shown.basis == "law":
        lines.append(
            f"Uncalibrated band {low:.2f}–{high:.2f}: from the published irreducible loss to the higher of the "
            f"two laws (at most {bound}, {shown.ceiling:.2f}); published laws overestimate small runs."
        )
    else:
        lines.append(f"Calibrated band {low:.3f}–{high:.3f}: the fit's 95% prediction interval at this N and D.")
    return lines


__all__ = ["reasons"]
