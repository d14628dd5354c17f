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
from oneday.planner.decide import BatchLR, Decision
from oneday.planner.laws import LossLaw
from oneday.planner.policy import COMPILE_MIN_SECONDS, Setup


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
) -> list[str]:
    lines = list(decision.reasons)
    lines += bl.notes
    if decision.throughput_note:
        lines.append(decision.throughput_note)
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
            "CPU), gradient accumulation makes up the batch. Expect the CPU's speed to vary with other load."
        )
    else:
        compiled = (
            "torch.compile" if setup.compile
            else f"no torch.compile (the budget is under {COMPILE_MIN_SECONDS / 60:.0f} min; compiling costs ~1 min)"
        )
        precision = {"bf16": "bf16 autocast, ",
                     "fp16": "fp16 autocast with a grad scaler (this GPU has no bf16: compute capability < 8.0), "
                     }.get(setup.dtype, f"{setup.dtype} ")
        lines.append(f"CUDA: {precision}TF32 matmuls, {compiled}.")
    if gpu_count > 1:
        lines.append(
            f"{gpu_count} GPUs found; this plan is for one (tokens/s measured on one). Under torchrun with DDP "
            f"the run would see up to {gpu_count}x the tokens: make the plan with CUDA_VISIBLE_DEVICES set to "
            "the GPUs you will use once multi-GPU planning exists."
        )
    lines.append(seq_reason)
    if calibration is not None:
        lines.append(f"Loss law calibrated on this kind of data: {law.name} ({law.source}).")
    else:
        lines.append(
            "Predicted losses use published fits (Epoch AI 2024; band: Hoffmann et al. 2022) whose absolute "
            "values belong to their data and tokenizer: the choice of size transfers, the loss needs calibration."
        )
    chosen = decision.chosen()
    uniform = math.log(chosen.spec.vocab_size)
    if chosen.predicted_loss > uniform:
        lines.append(
            f"The predicted loss ({chosen.predicted_loss:.2f}) is above ln(vocab) = {uniform:.2f}, the loss of a "
            "uniform guess: the published laws are fitted on far larger models and data and do not hold at this "
            "scale. Trust the choice of size less, and calibrate the law on short runs: "
            "`oneday tune plan.json --calibrate`."
        )
    if mfu > 1.0:
        lines.append(
            f"The measured MFU ({mfu:.0%}) is above 100%: the CPU's peak was measured with a matmul while "
            "other work slowed it; MFU figures on this machine are relative, not absolute."
        )
    return lines


__all__ = ["reasons"]
