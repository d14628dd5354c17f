"""`make_plan`: from a budget in hours and a corpus to a validated `Plan` (docs/design.md, Planning rules).

This module measures and assembles; the rules live in pure modules (`policy`, `laws`, `ladder`, `throughput`,
`decide`, `budget`) and the sentences in `reasons`. In order:

1. Check the request (budget, sequence length, probe time, calibration file) before any slow work, and refuse a
   budget that cannot even pay for probing, start-up and the final save (`policy`).
2. Probe the hardware (`hardware.probe_hardware`; `--device cuda` without a GPU is a `UserError`), then prepare
   the data (`oneday.data.prepare.prepare_data`; its errors pass through; a cached entry costs nothing).
3. Probe: the device's peak FLOP/s for the run's dtype (`hardware.resolve_peak_flops`: the datasheet table on
   GPUs, a timed matmul on CPUs), then real training steps of several candidate shapes
   (`measure.probe_throughput`, timing the runner's own step; on a GPU starting at the shape the loss law
   favours at a typical MFU, `policy.expected_optimum`). The probe's wall time counts against the budget,
   as in Cramming (Geiping & Goldstein 2023): the person's budget is wall-clock, not optimizer time.
4. `throughput.fit_throughput`, the cadence and reserves (`budget`), `decide.choose`, `decide.batch_and_lr`.
   The reserves depend on the chosen shape (its checkpoint size, its eval speed), so reserves and choice are
   iterated to a fixed point. Then `settle.settle` measures what the choice rests on and chooses again: a rung
   beyond the ladder when an end of it wins, the chosen shape at its planned micro-batch when that was only
   predicted (`measure.measure_more`).
5. The `Plan`.

Too small a budget is a `UserError`: when the reserves leave no training time, or when the training time is
shorter than `MIN_TRAIN_STEPS` (10) optimizer steps of the smallest measured shape.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday import __version__
from oneday.data.sources import short_name
from oneday.errors import UserError
from oneday.formats import human_count, human_seconds
from oneday.models.spec import ModelSpec
from oneday.plan import (
    Candidate,
    DataInfo,
    HardwareInfo,
    Plan,
    Prediction,
    Provenance,
    TrainSpec,
    plan_name_problem,
)
from oneday.planner.budget import KEEP_CHECKPOINTS, Reserve
from oneday.planner.calibration import load_calibration
from oneday.planner.decide import CandidateResult
from oneday.planner.ladder import candidate_shapes
from oneday.planner.laws import EPOCH_2024, HOFFMANN_2022
from oneday.planner.policy import (
    Setup,
    candidate_range,
    check_hours,
    check_seq_len,
    expected_optimum,
    min_reserve_seconds,
    sequence_length,
    setup_for,
)
from oneday.planner.reasons import reasons
from oneday.planner.settle import MICRO_BATCH_SLACK, settle
from oneday.progress import NULL_PROGRESS, Progress
from oneday.runner import costs

log = logging.getLogger(__name__)

PEAK_MEASURE_SECONDS = 0.5
MIN_TRAIN_STEPS = 10


def default_plan_name(data: str, *, budget_seconds: float, params_total: int) -> str:
    """`<data short name>-<budget like 10m/24h>-<size like 12M>`, e.g. `tinystories-24h-124M`."""
    return f"{short_name(data)}-{human_seconds(budget_seconds)}-{human_count(params_total)}"


def make_plan(
    *,
    hours: float,
    data: str,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_column: str | None = None,
    config: str | None = None,
    split: str | None = None,
    max_tokens: int | None = None,
    device: str = "auto",
    seq_len: int | None = None,
    name: str | None = None,
    probe_seconds: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    command: str = "",
    clock: Callable[[], float] = time.monotonic,
    progress: Progress | None = None,
) -> Plan:
    """Measure this machine and decide what to train in `hours` of wall-clock on `data` (module docstring).

    `data`, `tokenizer`, `vocab_size`, `text_column`, `config`, `split`, `max_tokens`, `cache_dir` go to
    `prepare_data` (and into the plan's data record, so it can be prepared again elsewhere); `device` is
    auto/cuda/cpu; `probe_seconds` overrides the measuring time; `calibration` is a calibration file
    whose law replaces the default. Every problem the user can fix raises `UserError` (one line).
    """
    from oneday.planner.hardware import probe_hardware, resolve_peak_flops
    from oneday.planner.measure import probe_throughput

    progress = progress or NULL_PROGRESS
    budget_seconds = check_hours(hours) * 3600.0
    _check_request(budget_seconds=budget_seconds, seq_len=seq_len, device=device, probe_seconds=probe_seconds,
                   name=name)
    law = load_calibration(calibration) if calibration is not None else EPOCH_2024
    band_law = HOFFMANN_2022

    # -- hardware, then a first check that the budget can pay for the fixed costs ---------------------
    hw = probe_hardware(device)
    if hw.device == "cuda" and not hw.torch_cuda_available:
        raise UserError(
            f"--device cuda: found {hw.name}, but torch {hw.torch_version} cannot use it (a CPU-only build?); "
            "install a CUDA build of torch, or plan with --device cpu"
        )
    setup = setup_for(hw, budget_seconds=budget_seconds, probe_seconds=probe_seconds)
    floor = min_reserve_seconds(setup)
    if budget_seconds <= floor:
        raise UserError(
            f"budget too small: {budget_seconds:.3g} s cannot pay for probing ({setup.probe_seconds:.0f} s), "
            f"start-up{' and compile' if setup.compile else ''} "
            f"({floor - setup.probe_seconds - costs.FINAL_SAVE_FIXED_SECONDS:.0f} s) and the final save "
            f"({costs.FINAL_SAVE_FIXED_SECONDS:.1f} s) on {setup.device}, {floor:.0f} s in all, before any training"
        )

    # -- data -------------------------------------------------------------------------------------------
    from oneday.data.prepare import prepare_data

    prepared = prepare_data(
        data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column, config=config, split=split,
        max_tokens=max_tokens, cache_dir=cache_dir, progress=progress,
    )
    seq, seq_reason = sequence_length(seq_len, device=setup.device, budget_seconds=budget_seconds, data=prepared)

    # -- probe: peak FLOP/s and real training steps (counted against the budget) ------------------------
    import oneday.models.build  # noqa: F401  (transformers loads here: start-up, which the run pays too, not probing)

    probe_started = clock()
    peak, peak_source = resolve_peak_flops(hw, setup.dtype, seconds=PEAK_MEASURE_SECONDS)
    min_params, max_params = candidate_range(
        vocab=prepared.vocab_size, seq_len=seq, peak_flops=peak, budget_seconds=budget_seconds, law=law,
    )
    ladder = candidate_shapes(vocab_size=prepared.vocab_size, seq_len=seq, min_params=min_params,
                              max_params=max_params)
    setup, thread_note = _cpu_threads(setup, ladder[0])
    optimum = None
    if setup.device == "cuda":
        optimum = expected_optimum(ladder, peak_flops=peak, train_seconds=budget_seconds - floor,
                                   unique_tokens=float(prepared.train_tokens), law=law)
    measure_seconds = max(0.5, setup.probe_seconds - (clock() - probe_started))
    probe = probe_throughput(
        ladder, device=setup.device, dtype=setup.dtype, compile=setup.compile, seconds=measure_seconds,
        memory_limit_bytes=setup.memory_limit_bytes, threads=setup.threads, progress=progress,
        peak_flops=peak, optimum_params=optimum, clock=clock,
    )

    # -- the choice, measured again where it rests on a prediction; reserves depend on the chosen shape --
    settled = settle(ladder, probe=probe, peak=peak, setup=setup, budget_seconds=budget_seconds,
                      probe_started=probe_started, prepared=prepared, law=law, band_law=band_law, clock=clock,
                      progress=progress)
    ladder, probe, decision, reserve, cadence, bl = (settled.ladder, settled.probe, settled.decision,
                                                     settled.reserve, settled.cadence, settled.bl)
    probe_seconds_spent = settled.probe_seconds  # as recorded in the provenance
    chosen = decision.chosen()
    _check_enough_training(probe, reserve=reserve, budget_seconds=budget_seconds)

    # -- assemble -----------------------------------------------------------------------------------------
    # The probe already spent part of the budget (Cramming counts it too): the run gets the rest, and its
    # own reserves are what is left of the reserve once the probe is taken out.
    train = TrainSpec(
        budget_seconds=budget_seconds - probe_seconds_spent,
        train_seconds=reserve.train_seconds(),
        seq_len=seq,
        micro_batch=bl.micro_batch,
        grad_accum=bl.grad_accum,
        lr=bl.lr,
        planned_tokens=max(1, int(chosen.tokens)),
        planned_steps=bl.steps(),
        device=setup.device,  # type: ignore[arg-type]
        precision=setup.dtype,  # type: ignore[arg-type]
        compile=setup.compile,
        threads=setup.threads,
        beta1=bl.beta1,
        beta2=bl.beta2,
        weight_decay=bl.weight_decay,
        grad_clip=1.0,
        warmup_fraction=bl.warmup_fraction,
        cooldown_fraction=bl.cooldown_fraction,
        cooldown_shape=bl.cooldown_shape,  # type: ignore[arg-type]
        final_lr_fraction=0.0,
        eval_every_seconds=cadence.eval_every,
        eval_tokens=cadence.eval_tokens,
        checkpoint_every_seconds=cadence.checkpoint_every,
        keep_checkpoints=KEEP_CHECKPOINTS,
        seed=0,
    )
    mfu = chosen.mfu
    prediction = Prediction(
        tokens_per_s=chosen.tokens_per_s,
        mfu=min(mfu, 1.5),
        tokens=max(1, int(chosen.tokens)),
        loss=chosen.predicted_loss,
        loss_band=decision.loss_band(),
        law=law.name,
        band_law=band_law.name,
        epochs=chosen.epochs,
        effective_tokens=chosen.effective_tokens,
        calibrated=calibration is not None,
    )
    plan_reasons = reasons(
        decision=decision, bl=bl, probe=probe, ladder=ladder, reserve=reserve, cadence=cadence, setup=setup,
        seq_reason=seq_reason, law=law, calibration=calibration, mfu=mfu, budget_seconds=budget_seconds,
        gpu_count=hw.count if setup.device == "cuda" else 1,
    )
    if thread_note:
        plan_reasons.append(thread_note)
    if max_tokens is not None:
        from oneday.data.plan_data import capped_corpus_note

        capped_note = capped_corpus_note(prepared, planned_tokens=chosen.tokens)
        if capped_note:
            plan_reasons.append(capped_note)
    if setup.device == "cuda" and chosen.measured and not (
        bl.micro_batch <= chosen.micro_batch <= MICRO_BATCH_SLACK * bl.micro_batch
    ):
        plan_reasons.append(
            f"{chosen.label()} was timed at micro-batch {chosen.micro_batch}, not at the plan's {bl.micro_batch} "
            "(the probe's time was up): its speed at that micro-batch is assumed the same."
        )
    plan = Plan(
        name=name.strip() if name else default_plan_name(
            data, budget_seconds=budget_seconds, params_total=chosen.spec.params_total()
        ),
        hardware=_hardware_info(hw, setup, peak=peak, peak_source=peak_source),
        data=replace(_data_info(prepared, data=data, tokenizer=tokenizer, text_column=text_column),
                     config=config, split=split, max_tokens=max_tokens),
        model=chosen.spec,
        train=train,
        prediction=prediction,
        provenance=Provenance(
            oneday_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=command,
            probe_seconds=round(probe_seconds_spent, 3),
            calibration=str(Path(calibration).expanduser().resolve()) if calibration is not None else None,
        ),
        candidates=tuple(_candidate(r) for r in decision.results),
        reasons=tuple(plan_reasons),
    )
    log.info("plan %s: %s, %s tokens, predicted loss %.3f", plan.name, chosen.label(), human_count(chosen.tokens),
             chosen.predicted_loss)
    return plan


def _check_request(*, budget_seconds: float, seq_len: int | None, device: str, probe_seconds: float | None,
                   name: str | None) -> None:
    """The request's own errors, before any slow work."""
    check_seq_len(seq_len)
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device}: expected auto, cuda or cpu")
    if probe_seconds is not None and not (0 < probe_seconds < budget_seconds):
        raise UserError(
            f"--probe-seconds: must be more than 0 and less than the budget ({budget_seconds:.0f} s), "
            f"got {probe_seconds:g}"
        )
    if name is not None and not name.strip():
        raise UserError("--name: must not be empty")
    problem = plan_name_problem(name.strip()) if name is not None else None
    if problem is not None:
        raise UserError(f"--name: {problem}, got {name.strip()!r}")


def _cpu_threads(setup: Setup, smallest: ModelSpec) -> tuple[Setup, str | None]:
    """On a CPU with several cores: 1 thread or all, whichever trains `smallest` faster right now (with other
    load on the machine, fewer threads can be faster), and the sentence saying so."""
    if setup.device != "cpu" or (setup.threads or 1) <= 1:
        return setup, None
    from oneday.planner.timing import fastest_cpu_threads

    threads, speeds = fastest_cpu_threads(smallest, max_threads=setup.threads or 1)
    note = (
        f"Torch threads: {threads} ("
        + ", ".join(f"{n} thread{'s' * (n > 1)}: {v:,.0f} tok/s" for n, v in sorted(speeds.items()))
        + f" on {smallest.label()} just now; with other load on the machine, fewer threads can be faster). "
        "Override with `oneday run --threads`."
    )
    return replace(setup, threads=threads), note


def _hardware_info(hw: Any, setup: Setup, *, peak: float, peak_source: str) -> HardwareInfo:
    """The plan's record of the probed hardware and the peak FLOP/s its MFU is measured against."""
    return HardwareInfo(
        device=setup.device,  # type: ignore[arg-type]
        name=hw.name,
        count=max(1, hw.count),
        memory_bytes=max(1, int(hw.memory_bytes)),
        peak_flops=peak,
        peak_flops_source=peak_source,
        dtype=setup.dtype,  # type: ignore[arg-type]
        torch_version=hw.torch_version or "unknown",
        threads=max(1, int(setup.threads or hw.cpu_cores or 1)),
        free_memory_bytes=int(hw.free_memory_bytes) if hw.free_memory_bytes else None,
        driver_version=hw.driver_version,
        cuda_version=hw.cuda_version,
        compute_capability=hw.compute_capability,
        bf16_supported=bool(hw.bf16_supported),
        power_limit_w=hw.power_limit_w,
        sm_clock_max_mhz=hw.sm_clock_max_mhz,
        cpu_flags=tuple(hw.cpu_flags),
        notes=tuple(hw.notes),
    )


def _data_info(prepared: Any, *, data: str, tokenizer: str | None, text_column: str | None) -> DataInfo:
    """The plan's record of its prepared data, and how it was asked for (so it can be prepared again)."""
    return DataInfo(
        source=prepared.source,
        key=prepared.key,
        path=str(Path(prepared.directory).resolve()),
        tokenizer=str(Path(prepared.tokenizer_dir).resolve()),
        vocab_size=int(prepared.vocab_size),
        train_tokens=int(prepared.train_tokens),
        val_tokens=int(prepared.val_tokens),
        bytes_per_token=float(prepared.bytes_per_token()),
        spec=_respec(data),
        tokenizer_spec=_respec(tokenizer) if tokenizer else None,
        text_column=text_column,
    )


def _check_enough_training(probe: Any, *, reserve: Reserve, budget_seconds: float) -> None:
    smallest = probe.timings[0]
    need = MIN_TRAIN_STEPS * smallest.step_seconds
    if reserve.train_seconds() < need:
        raise UserError(
            f"budget too small: {budget_seconds:.0f} s leave {reserve.train_seconds():.1f} s for training after "
            f"{reserve.reserved_seconds():.0f} s of probing, start-up, evaluation, checkpoints and the final save; "
            f"the smallest model ({smallest.label()}) needs {smallest.step_seconds:.2f} s a step, "
            f"{need:.0f} s for {MIN_TRAIN_STEPS} steps"
        )


def _respec(spec: str) -> str:
    """The data (or tokenizer) spec as a run elsewhere can prepare it again: an existing local path
    becomes absolute; anything else (builtin:, hf:, hub names, globs) stays as given."""
    try:
        path = Path(spec).expanduser()
        if path.exists():
            return str(path.resolve())
    except OSError:
        pass
    return spec


def _candidate(r: CandidateResult) -> Candidate:
    s = r.spec
    return Candidate(
        n_layer=s.n_layer,
        d_model=s.d_model,
        n_head=s.n_head,
        params_total=s.params_total(),
        params_scaling=s.params_scaling(),
        tokens_per_s=float(r.tokens_per_s),
        mfu=float(r.mfu),
        measured=bool(r.measured),
        micro_batch=int(r.micro_batch),
        peak_memory_bytes=int(r.peak_memory_bytes),
        tokens=int(r.tokens),
        epochs=float(r.epochs),
        predicted_loss=float(r.predicted_loss),
        band_loss=float(r.band_loss),
        chosen=bool(r.chosen),
    )


__all__ = ["default_plan_name", "make_plan"]
