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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

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
from oneday.planner.calibration import (
    LawFit,
    cached_calibration,
    calibration_points,
    fit_law,
    load_calibration,
    presented_loss,
)
from oneday.planner.decide import BatchLR, CandidateResult
from oneday.planner.ladder import candidate_shapes
from oneday.planner.laws import EPOCH_2024, HOFFMANN_2022, LossLaw, unigram_entropy
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
from oneday.planner.reasons import DATA_PARALLEL_SOURCE, reasons
from oneday.planner.settle import MICRO_BATCH_SLACK, Settled, settle
from oneday.planner.throughput import DATA_PARALLEL_EFFICIENCY
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
    gpus: int = 1,
    compile: bool | None = None,
    clock: Callable[[], float] = time.monotonic,
    progress: Progress | None = None,
    auto_calibrate: bool = True,
) -> Plan:
    """Measure this machine and decide what to train in `hours` of wall-clock on `data` (module docstring).

    `data`, `tokenizer`, `vocab_size`, `text_column`, `config`, `split`, `max_tokens`, `cache_dir` go to
    `prepare_data` (and into the plan's data record, so it can be prepared again elsewhere); `device` is
    auto/cuda/cpu; `probe_seconds` overrides the measuring time; `calibration` is a calibration file
    whose law replaces the default; `gpus` plans for that many of this machine's GPUs (data parallel);
    `compile` True/False compiles on CUDA whatever the budget, or never (None: budgets of 30 min and more).
    Every problem the user can fix raises `UserError` (one line). The probe, the data and the measurements
    go to `plan_for`, which `oneday plan --what-if` calls with a datasheet and assumed throughput instead.
    """
    from oneday.planner.hardware import probe_hardware

    progress = progress or NULL_PROGRESS
    request = PlanRequest(
        budget_seconds=check_hours(hours) * 3600.0, data=data, tokenizer=tokenizer, text_column=text_column,
        config=config, split=split, max_tokens=max_tokens,
        seq_len=seq_len, name=name, probe_seconds=probe_seconds, calibration=calibration, command=command,
        gpus=check_gpus(gpus), compile=compile,
        law=load_calibration(calibration) if calibration is not None else EPOCH_2024,
    )
    check_request(request, device=device)
    hw = probe_hardware(device)
    if hw.device == "cuda" and not hw.torch_cuda_available:
        raise UserError(
            f"--device cuda: found {hw.name}, but torch {hw.torch_version} cannot use it (a CPU-only build?); "
            "install a CUDA build of torch, or plan with --device cpu"
        )
    if gpus > 1 and (hw.device != "cuda" or gpus > hw.count):
        found = f"{hw.count} × {hw.name}" if hw.device == "cuda" else "no GPU"
        raise UserError(f"--gpus {gpus}: this machine has {found}; plan for GPUs it lacks with --what-if")
    fixed_costs(hw, request)  # before the data: a budget that cannot pay for them fails fast

    from oneday.data.prepare import prepare_data

    prepared = prepare_data(
        data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column, config=config, split=split,
        max_tokens=max_tokens, cache_dir=cache_dir, progress=progress,
    )
    plan = plan_for(hardware=hw, data=prepared, throughput=MeasuredThroughput(clock=clock, progress=progress),
                    request=request)
    if (auto_calibrate and calibration is None and not plan.prediction.calibrated
            and request.budget_seconds >= AUTO_CALIBRATION_MIN_SECONDS):
        again = dict(data=data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column, config=config,
                     split=split, max_tokens=max_tokens, device=device,
                     seq_len=seq_len, name=name or plan.name, probe_seconds=probe_seconds, cache_dir=cache_dir,
                     command=command, gpus=gpus, clock=clock, progress=progress)
        return _self_calibrated(plan, budget_seconds=request.budget_seconds, again=again, clock=clock)
    return plan


@dataclass(frozen=True)
class PlanRequest:
    """What the person asked for, apart from the hardware, the data and the throughput (`plan_for`)."""

    budget_seconds: float
    data: str
    tokenizer: str | None = None
    text_column: str | None = None
    config: str | None = None
    split: str | None = None
    max_tokens: int | None = None
    seq_len: int | None = None
    name: str | None = None
    probe_seconds: float | None = None
    calibration: str | os.PathLike[str] | None = None
    command: str = ""
    gpus: int = 1
    compile: bool | None = None
    """`--compile/--no-compile`: torch.compile on CUDA whatever the budget, or never; None: by the budget."""
    law: LossLaw = EPOCH_2024
    """The loss law to choose by: the calibrated one from `calibration` (loaded before any slow work), else the
    default."""


@dataclass(frozen=True)
class Choice:
    """What a throughput source (`MeasuredThroughput`, `what_if.AssumedSource`) gives `plan_for`: the peak
    FLOP/s and its source, the settled choice, the device setup it ran with, sentences for the reasons, the
    smallest shape's (label, seconds per step) for the too-small-budget check, and the data-parallel efficiency
    the choice assumed (with its sentence)."""

    peak: float
    peak_source: str
    settled: Settled
    setup: Setup
    notes: tuple[str, ...]
    smallest_step: tuple[str, float]
    dp_efficiency: float = 1.0
    dp_source: str = DATA_PARALLEL_SOURCE
    what_if: dict[str, Any] | None = None
    """For `Provenance.what_if`: the hardware planned for and what was assumed (None on the real path)."""


class ThroughputSource(Protocol):
    """Where `plan_for` gets the throughput it chooses on: measured here, or assumed for other hardware."""

    def choose(self, hw: Any, *, setup: Setup, prepared: Any, seq: int, request: PlanRequest, floor: float,
               law: LossLaw, band_law: LossLaw) -> Choice: ...


def check_gpus(gpus: int) -> int:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise UserError(f"--gpus: must be a whole number >= 1, got {gpus!r}")
    return gpus


def fixed_costs(hw: Any, request: PlanRequest) -> tuple[Setup, float]:
    """The device setup and what any plan on it must spend besides training; `UserError` when the budget cannot
    pay for that."""
    budget_seconds = request.budget_seconds
    setup = setup_for(hw, budget_seconds=budget_seconds, probe_seconds=request.probe_seconds,
                      compile=request.compile)
    floor = min_reserve_seconds(setup)
    if budget_seconds <= floor:
        raise UserError(
            f"budget too small: {budget_seconds:.3g} s cannot pay for probing ({setup.probe_seconds:.0f} s), "
            f"start-up{' and compile' if setup.compile else ''} "
            f"({floor - setup.probe_seconds - costs.FINAL_SAVE_FIXED_SECONDS:.0f} s) and the final save "
            f"({costs.FINAL_SAVE_FIXED_SECONDS:.1f} s) on {setup.device}, {floor:.0f} s in all, before any training"
        )
    return setup, floor


def ladder_for(prepared: Any, *, seq: int, peak: float, budget_seconds: float, law: LossLaw) -> list[ModelSpec]:
    """The candidate shapes for this data, sequence length, peak FLOP/s and budget (`policy.candidate_range`)."""
    min_params, max_params = candidate_range(
        vocab=prepared.vocab_size, seq_len=seq, peak_flops=peak, budget_seconds=budget_seconds, law=law,
    )
    return candidate_shapes(vocab_size=prepared.vocab_size, seq_len=seq, min_params=min_params,
                            max_params=max_params)


@dataclass(frozen=True)
class MeasuredThroughput:
    """The real path: time real training steps on this machine (the probe) and settle on them. On `gpus` GPUs
    the probe times one; the choice assumes `DATA_PARALLEL_EFFICIENCY` until the chosen step has been timed on
    all of them (`planner.parallel`), then rests on the measured efficiency."""

    clock: Callable[[], float]
    progress: Progress

    def choose(self, hw: Any, *, setup: Setup, prepared: Any, seq: int, request: PlanRequest, floor: float,
               law: LossLaw, band_law: LossLaw) -> Choice:
        import oneday.models.build  # noqa: F401  (transformers loads here: start-up, which the run pays too)
        from oneday.planner.hardware import resolve_peak_flops
        from oneday.planner.measure import probe_throughput, training_sample

        clock, budget_seconds = self.clock, request.budget_seconds
        probe_started = clock()
        peak, peak_source = resolve_peak_flops(hw, setup.dtype, seconds=PEAK_MEASURE_SECONDS)
        ladder = ladder_for(prepared, seq=seq, peak=peak * request.gpus, budget_seconds=budget_seconds, law=law)
        setup, thread_note = _cpu_threads(setup, ladder[0])
        optimum = None
        if setup.device == "cuda":
            optimum = expected_optimum(ladder, peak_flops=peak * request.gpus, train_seconds=budget_seconds - floor,
                                       unique_tokens=float(prepared.train_tokens), law=law)
        measure_seconds = max(0.5, setup.probe_seconds - (clock() - probe_started))
        probe = probe_throughput(
            ladder, device=setup.device, dtype=setup.dtype, compile=setup.compile, seconds=measure_seconds,
            memory_limit_bytes=setup.memory_limit_bytes, threads=setup.threads, progress=self.progress,
            peak_flops=peak, optimum_params=optimum, tokens=training_sample(prepared), clock=clock,
        )
        efficiency = DATA_PARALLEL_EFFICIENCY if request.gpus > 1 else 1.0

        def measure_parallel(spec: ModelSpec, bl: BatchLR, seconds: float) -> Any:
            from oneday.planner.parallel import measure_data_parallel

            return measure_data_parallel(spec, ranks=request.gpus, micro_batch=bl.micro_batch,
                                         grad_accum=bl.grad_accum, device=setup.device, dtype=setup.dtype,
                                         compile=setup.compile, threads=setup.threads, tokens=probe.tokens,
                                         timeout_seconds=seconds)

        settled = settle(ladder, probe=probe, peak=peak, setup=setup, budget_seconds=budget_seconds,
                         probe_started=probe_started, prepared=prepared, law=law, band_law=band_law, clock=clock,
                         progress=self.progress, ranks=request.gpus, dp_efficiency=efficiency,
                         dp_source=DATA_PARALLEL_SOURCE, measure_parallel=measure_parallel)
        smallest = settled.probe.timings[0]
        return Choice(peak=peak, peak_source=peak_source, settled=settled, setup=setup,
                      notes=(thread_note,) if thread_note else (), smallest_step=(smallest.label(),
                                                                                  smallest.step_seconds),
                      dp_efficiency=settled.dp_efficiency, dp_source=settled.dp_source)


def plan_for(*, hardware: Any, data: Any, throughput: ThroughputSource, request: PlanRequest) -> Plan:
    """The plan for `hardware` (a `HardwareProbe`: probed, or built from the datasheet table), `data` (prepared
    data, or `what_if.AssumedData`) and `throughput` (measured here, or assumed): the same orchestration for the
    real path and `oneday plan --what-if`."""
    hw, prepared, budget_seconds = hardware, data, request.budget_seconds
    calibration = request.calibration
    law, band_law = request.law, HOFFMANN_2022
    setup, floor = fixed_costs(hw, request)
    seq, seq_reason = sequence_length(request.seq_len, device=setup.device, budget_seconds=budget_seconds,
                                      data=prepared)
    # what any trained model should beat, and a calibration kept with this data (planner/calibration.py)
    entropy = _unigram_entropy(prepared)
    law, fit, reused = _calibrated_law(law, calibration=calibration, data_dir=getattr(prepared, "directory", None),
                                       entropy=entropy)
    if fit is not None:  # the published laws' spread says nothing about a law fitted on this data: the fit's band does
        band_law = law
    choice = throughput.choose(hw, setup=setup, prepared=prepared, seq=seq, request=request, floor=floor, law=law,
                               band_law=band_law)
    setup, settled, peak = choice.setup, choice.settled, choice.peak
    ladder, probe, decision, reserve, cadence, bl = (settled.ladder, settled.probe, settled.decision,
                                                     settled.reserve, settled.cadence, settled.bl)
    probe_seconds_spent = settled.probe_seconds  # as recorded in the provenance
    chosen = decision.chosen()
    _check_enough_training(*choice.smallest_step, reserve=reserve, budget_seconds=budget_seconds)

    # -- assemble -----------------------------------------------------------------------------------------
    # The probe already spent part of the budget (Cramming counts it too): the run gets the rest, and its
    # own reserves are what is left of the reserve once the probe is taken out.
    train = TrainSpec(
        budget_seconds=budget_seconds - probe_seconds_spent,
        train_seconds=reserve.train_seconds(),
        seq_len=seq,
        micro_batch=bl.micro_batch,
        grad_accum=bl.grad_accum,
        world_size=bl.world_size,
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
    shown = presented_loss(
        law_loss=chosen.predicted_loss, band_loss=chosen.band_loss, laws=(law, band_law),
        vocab_size=prepared.vocab_size, unigram_entropy=entropy,
        fit_band=fit.loss_band(chosen.effective_params, chosen.effective_tokens) if fit is not None else None,
    )
    prediction = Prediction(
        tokens_per_s=chosen.tokens_per_s,
        mfu=min(mfu, 1.5),
        tokens=max(1, int(chosen.tokens)),
        loss=shown.loss,
        loss_band=shown.band,
        law=law.name,
        band_law=band_law.name,
        epochs=chosen.epochs,
        effective_tokens=chosen.effective_tokens,
        calibrated=calibration is not None or reused is not None,
        data_parallel_efficiency=choice.dp_efficiency,
        basis=shown.basis,
        law_loss=chosen.predicted_loss,
    )
    plan_reasons = reasons(
        decision=decision, bl=bl, probe=probe, ladder=ladder, reserve=reserve, cadence=cadence, setup=setup,
        seq_reason=seq_reason, law=law, calibration=calibration or reused, mfu=mfu, budget_seconds=budget_seconds,
        gpu_count=hw.count if setup.device == "cuda" else 1, ranks=request.gpus, dp_efficiency=choice.dp_efficiency,
        dp_source=choice.dp_source, shown=shown, fit=fit,
    )
    # a what-if says so first; the real path's notes (CPU threads) follow the device's reasons
    plan_reasons = [*choice.notes, *plan_reasons] if choice.what_if else [*plan_reasons, *choice.notes]
    if request.max_tokens is not None:
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
    assumed = getattr(prepared, "assumed", False)
    data_name = f"{human_count(prepared.train_tokens)}-tokens" if assumed else request.data
    plan = Plan(
        name=request.name.strip() if request.name else default_plan_name(
            data_name, budget_seconds=budget_seconds, params_total=chosen.spec.params_total()
        ),
        hardware=_hardware_info(hw, setup, peak=peak, peak_source=choice.peak_source),
        data=replace(_data_info(prepared, data=request.data, tokenizer=request.tokenizer,
                                text_column=request.text_column),
                     config=request.config, split=request.split, max_tokens=request.max_tokens),
        model=chosen.spec,
        train=train,
        prediction=prediction,
        provenance=Provenance(
            oneday_version=__version__,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=request.command,
            probe_seconds=round(probe_seconds_spent, 3),
            calibration=str(Path(calibration).expanduser().resolve()) if calibration is not None else None,
            what_if=choice.what_if,
        ),
        candidates=tuple(_candidate(r) for r in decision.results),
        reasons=tuple(plan_reasons),
    )
    log.info("plan %s: %s, %s tokens, predicted loss %.3f (%s)", plan.name, chosen.label(),
             human_count(chosen.tokens), shown.loss, shown.basis)
    return plan


AUTO_CALIBRATION_MIN_SECONDS = 3600.0
"""`oneday plan` calibrates on its own from a 1 h budget, where `AUTO_CALIBRATION_SHARE` buys enough runs."""
AUTO_CALIBRATION_SHARE = 0.05
"""What calibrating on its own may cost, the first probe included, as a share of the budget."""
AUTO_CALIBRATION_MIN_RUN_SECONDS = 60.0


def _self_calibrated(first: Plan, *, budget_seconds: float, again: dict[str, Any], clock: Callable[[], float]
                     ) -> Plan:
    """Calibrate on `first` (the plan's recipe at smaller sizes, `studies.calibrate`) within `AUTO_CALIBRATION_SHARE`
    of the budget less the probe already spent, keep the fit with the data, and plan again with the rest of the
    budget: the second plan finds the kept fit. `first`, with a reason, when the share buys too little."""
    import tempfile

    from oneday.plan import save_plan
    from oneday.studies.calibrate import CalibrationBudgetError, calibrate_plan

    spent = first.provenance.probe_seconds
    allowed = AUTO_CALIBRATION_SHARE * budget_seconds - spent
    if allowed < AUTO_CALIBRATION_MIN_RUN_SECONDS:
        note = (f"Not calibrated: {AUTO_CALIBRATION_SHARE:.0%} of the budget less the probe leaves {allowed:.0f} s "
                "for calibration runs; `oneday tune plan.json --calibrate` fits the law to this data.")
        return replace(first, reasons=(*first.reasons, note))
    with tempfile.TemporaryDirectory(prefix="oneday-calibrate-") as tmp:
        path = save_plan(first, Path(tmp) / "plan.json")
        try:
            result = calibrate_plan(path, hours=allowed / 3600.0, out=Path(tmp) / "calibration.json", clock=clock,
                                    track=False)
        except CalibrationBudgetError as exc:
            # what a user can do: pay for the calibration once, outside this budget (a CPU's smallest calibration
            # costs about a fifth of a 1 h plan: its narrowest models are mostly the vocabulary's embedding)
            tune_hours = math.ceil(1.1 * exc.need_seconds / 180.0) * 0.05  # in 0.05 h, 10% to spare
            note = (f"Not calibrated: {AUTO_CALIBRATION_SHARE:.0%} of the budget less the probe leaves "
                    f"{allowed:.0f} s, the smallest calibration needs ~{exc.need_seconds:.0f} s "
                    f"({exc.need_seconds / budget_seconds:.0%} of the budget); `oneday tune plan.json --calibrate "
                    f"--hours {tune_hours:.2f}` runs it once, and later plans on this data reuse the fit.")
            return replace(first, reasons=(*first.reasons, note))
        except UserError as exc:
            return replace(first, reasons=(*first.reasons, f"Not calibrated: {exc}."))
    spent += result.seconds
    plan = make_plan(hours=(budget_seconds - spent) / 3600.0, calibration=None, auto_calibrate=False, **again)
    note = (f"Calibrated on its own: {len(result.runs)} runs of this plan's recipe at smaller sizes in "
            f"{result.seconds:.0f} s, {spent:.0f} s with the first probe ({spent / budget_seconds:.1%} of the "
            "budget, counted against it); later plans on this data reuse the fit.")
    return replace(plan, provenance=replace(plan.provenance, calibration_seconds=round(spent, 3)),
                   reasons=(*plan.reasons, note))


UNIGRAM_SAMPLE_TOKENS = 2**25
"""Tokens counted for the unigram entropy: all of a corpus up to 32M, else 32 evenly spaced slices of 1M."""


def _unigram_entropy(prepared: Any) -> float | None:
    """The training tokens' unigram entropy (`laws.unigram_entropy`), from their counts (numpy bincount over the
    memory-mapped file: ~0.1 s per 10M tokens); None when the file cannot be read."""
    import numpy as np

    if getattr(prepared, "assumed", False):  # `--data-tokens`: a corpus not yet tokenized has no counts
        return None
    try:
        tokens = prepared.train_array()
        if len(tokens) > UNIGRAM_SAMPLE_TOKENS:
            width = UNIGRAM_SAMPLE_TOKENS // 32
            starts = np.linspace(0, len(tokens) - width, 32).astype(np.int64)
            counts = sum(np.bincount(tokens[s:s + width], minlength=prepared.vocab_size) for s in starts)
        else:
            counts = np.bincount(tokens, minlength=prepared.vocab_size)
        return unigram_entropy(counts.tolist())
    except (OSError, ValueError, AttributeError) as exc:  # AttributeError: a data object without token files
        log.warning("data: token counts unavailable (%s); the loss is bounded by ln V only", exc)
        return None


def _calibrated_law(law: LossLaw, *, calibration: Any, data_dir: Path | None, entropy: float | None
                    ) -> tuple[LossLaw, LawFit | None, str | None]:
    """(law, fit, reused): a calibration file's points (or those kept with this data, when no file is given)
    refitted with E bounded by the unigram entropy (`calibration.fit_law`), so the plan can show the fit's
    band; the file's own law when it holds too few points. `reused` names a calibration found with the data."""
    points: tuple[tuple[float, float, float], ...] = ()
    reused = None
    if calibration is not None:
        points = calibration_points(calibration)
    else:
        cached = cached_calibration(data_dir) if data_dir is not None else None
        if cached is None:
            return law, None, None
        law, points, reused = cached.law, cached.points, str(cached.path)
    if len(points) < 3:
        return law, None, reused
    fit = fit_law(points, base=law, max_e=entropy)
    return replace(fit.law, name=law.name, source=f"{law.source}; {fit.law.source}"), fit, reused


def check_request(request: PlanRequest, *, device: str) -> None:
    """The request's own errors, before any slow work."""
    _check_request(budget_seconds=request.budget_seconds, seq_len=request.seq_len, device=device,
                   probe_seconds=request.probe_seconds, name=request.name)


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
    """The plan's record of its prepared data, and how it was asked for (so it can be prepared again); for data
    that was only assumed (`what_if.AssumedData`) the counts, and no place."""
    if getattr(prepared, "assumed", False):
        return DataInfo(source=prepared.source, key=prepared.key, path="", tokenizer="",
                        vocab_size=int(prepared.vocab_size), train_tokens=int(prepared.train_tokens),
                        val_tokens=int(prepared.val_tokens), bytes_per_token=float(prepared.bytes_per_token()),
                        assumed=True)
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


def _check_enough_training(label: str, step_seconds: float, *, reserve: Reserve, budget_seconds: float) -> None:
    """`UserError` when the training time is shorter than `MIN_TRAIN_STEPS` steps of the smallest shape."""
    need = MIN_TRAIN_STEPS * step_seconds
    if reserve.train_seconds() < need:
        raise UserError(
            f"budget too small: {budget_seconds:.0f} s leave {reserve.train_seconds():.1f} s for training after "
            f"{reserve.reserved_seconds():.0f} s of probing, start-up, evaluation, checkpoints and the final save; "
            f"the smallest model ({label}) needs {step_seconds:.2f} s a step, "
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


__all__ = ["Choice", "MeasuredThroughput", "PlanRequest", "ThroughputSource", "check_gpus", "check_request",
           "default_plan_name", "fixed_costs", "ladder_for", "make_plan", "plan_for"]
