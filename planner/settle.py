"""After the probe: choose, measure what the choice rests on, choose again (`settle`).

The probe measures a spread of shapes; the choice may then rest on a prediction. When an end of the ladder wins,
the optimum may lie outside it: one rung beyond is measured. When the chosen shape was not timed at its planned
micro-batch, it is timed there. Each new measurement is followed by the choice again, with the reserves of the
chosen shape (`choose_with_reserves`: checkpoint size and eval speed depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.planner.budget import Cadence, Reserve, plan_cadence, reserve_for
from oneday.planner.decide import BatchLR, Decision, batch_and_lr, choose
from oneday.planner.ladder import next_rung, shape_key
from oneday.planner.laws import LossLaw
from oneday.planner.policy import COMPILE_FALLBACK_SECONDS, Setup
from oneday.planner.throughput import ThroughputModel, data_parallel, fit_throughput
from oneday.progress import Progress

if TYPE_CHECKING:
    from oneday.planner.measure import ThroughputProbe
    from oneday.planner.parallel import ParallelTiming

MAX_LADDER_EXTENSIONS = 2
MAX_PLAN_CHECKS = 2
MICRO_BATCH_SLACK = 1.25
CHECK_HEADROOM = 1.1
# The measurements after the probe (a rung beyond the ladder, the chosen shape at its micro-batch) may run past
# the probe's time by this share of it: they are what the choice rests on, and cost about one shape each.
EXTRA_PROBE_SHARE = 0.5
# A measurement the choice rests on (a rung beyond a winning end, a check of the chosen shape) always gets at
# least this long: on a CPU's minutes the probe's share is gone by then, and a rung was skipped for time (a
# calibrated plan on ../shared/data kept 2×64 while 2×32 did 10% better). `measure_more` gives a rung half the
# time left and a check all of it, less build and warm-up: 5 s leave a check about `CPU_CHECK_MIN_SECONDS` of
# timed steps (2 s left it two steps of 0.25 s, as short as the timing it was checking).
SETTLE_MIN_SECONDS = 5.0
# ... but never past this share of the budget from the probe's start (or the probe's own allowance, when larger):
# a 1-minute plan asked for 2 s of probing, not 14.
SETTLE_MAX_BUDGET_SHARE = 0.05
# On a CPU a measurement of the chosen shape stands for any micro-batch, but only if it timed this long: two
# steps of 0.3 s measured 2×48 at 9.0k tok/s where the run trained at 5.5k (bench/predictions.py, 5 minutes).
# One second (2–7 steps) was still too short: single steps of one shape scatter by ~5% on a CPU that shares its
# memory with a busy neighbour (2×48: 13.4k, 12.9k, 10.7k, 12.9k, 10.3k tok/s), and the four 5- and 10-minute
# plans of bench/predictions.py then trained 1.7–7.4% more tokens than they promised.
CPU_CHECK_MIN_SECONDS = 3.0


@dataclass(frozen=True)
class Settled:
    """What `settle` ends with: the ladder (extended or not), every measurement, and the choice on them."""

    ladder: list[ModelSpec]
    probe: ThroughputProbe
    decision: Decision
    reserve: Reserve
    cadence: Cadence
    bl: BatchLR
    probe_seconds: float
    dp_efficiency: float = 1.0
    dp_source: str = ""
    """Where `dp_efficiency` comes from, for the reasons: measured here, or assumed (and why)."""


MeasureParallel = Callable[[ModelSpec, BatchLR, float], "ParallelTiming"]
"""(shape, its batch split over the ranks, seconds allowed) -> the step timed alone and under DDP
(`planner.parallel.measure_data_parallel` on the real path; simulated in tests)."""

# The data-parallel measurement runs the chosen shape's step on every GPU twice (alone, then under DDP), each
# compiled when the plan compiles: it gets the time left of `SETTLE_MAX_BUDGET_SHARE` and runs only when that
# is at least this, plus two compilations (`COMPILE_FALLBACK_SECONDS` each) when the plan compiles.
PARALLEL_MIN_SECONDS = 60.0


def settle(ladder: list[ModelSpec], *, probe: ThroughputProbe, peak: float, setup: Setup, budget_seconds: float,
            probe_started: float, prepared: Any, law: LossLaw, band_law: LossLaw, clock: Callable[[], float],
            progress: Progress, ranks: int = 1, dp_efficiency: float = 1.0, dp_source: str = "",
            measure_parallel: MeasureParallel | None = None) -> Settled:
    """Choose on what the probe measured, then measure what the choice rests on and choose again, until
    nothing is left to measure (`_next_measurement`) or the time is up: when the choice is an end of the
    ladder, one rung beyond it (at most `MAX_LADDER_EXTENSIONS`: the optimum may lie outside the range); then
    the chosen shape at its planned micro-batch when that was not measured (at most `MAX_PLAN_CHECKS`). These
    measurements count as probing, and run while their predicted cost fits in the probe's time plus
    `EXTRA_PROBE_SHARE` of it; each gets at least `SETTLE_MIN_SECONDS`, within `SETTLE_MAX_BUDGET_SHARE` of the
    budget. On `ranks` GPUs the choice rests on `ranks` × the measured throughput ×
    `dp_efficiency` (`throughput.data_parallel`), and the batch is split across them (`split_batch`). With
    `measure_parallel`, once nothing is left to measure on one GPU the chosen step is timed on the `ranks` GPUs
    (at least `PARALLEL_MIN_SECONDS`) and the choice is made again with the measured efficiency; when that
    fails, `dp_efficiency` stays and `dp_source` says why."""
    from oneday.planner.measure import measure_more

    deadline = probe_started + (1.0 + EXTRA_PROBE_SHARE) * setup.probe_seconds
    latest = max(deadline, probe_started + SETTLE_MAX_BUDGET_SHARE * budget_seconds)
    tried: set[tuple[Any, int | None, int]] = set()
    # The largest micro-batch that ran per shape: a check at a smaller one replaces the shape's timing, but the
    # plan may still use up to this (else `batch_and_lr`'s rounding would move the micro-batch at each check).
    ran = {shape_key(t.spec): t.measurement.micro_batch for t in probe.timings}
    extensions = checks = 0
    while True:
        one_gpu = fit_throughput(probe.measurements, peak_flops=peak)
        spent = round(clock() - probe_started, 3)

        def cadence_for(spec: ModelSpec, probe: ThroughputProbe = probe, one_gpu: ThroughputModel = one_gpu) -> Cadence:
            return _cadence_for(spec, probe=probe, throughput=one_gpu, setup=setup, budget_seconds=budget_seconds,
                                val_tokens=prepared.val_tokens)

        decision, reserve, cadence = choose_with_reserves(
            ladder, start=probe.timings[len(probe.timings) // 2].spec, cadence_for=cadence_for,
            throughput=data_parallel(one_gpu, ranks=ranks, efficiency=dp_efficiency), setup=setup,
            budget_seconds=budget_seconds, probe_seconds=spent, prepared=prepared, law=law, band_law=band_law)
        chosen = decision.chosen()
        cap = max(1, chosen.micro_batch, ran.get(shape_key(chosen.spec), 0))
        bl = split_batch(batch_and_lr(spec=chosen.spec, tokens=chosen.tokens, max_micro_batch=cap), ranks=ranks,
                         max_micro_batch=cap)
        timed = probe.timing_for(chosen.spec)
        wanted = _next_measurement(decision, bl, ladder=ladder, setup=setup, tried=tried, micro_cap=cap,
                                   extend=extensions < MAX_LADDER_EXTENSIONS, check=checks < MAX_PLAN_CHECKS,
                                   timed_seconds=timed.measurement.seconds_measured if timed is not None else 0.0,
                                   timed_accum=timed.grad_accum if timed is not None else 1)
        if wanted is None and ranks > 1 and measure_parallel is not None:
            allowed = latest - clock()
            needed = PARALLEL_MIN_SECONDS + (2 * COMPILE_FALLBACK_SECONDS if setup.compile else 0.0)
            measure, measure_parallel = measure_parallel, None  # once
            if allowed < needed:
                dp_source = (f"{dp_source}; not measured: {max(0.0, allowed):.0f} s of the budget's "
                             f"{SETTLE_MAX_BUDGET_SHARE:.0%} for measuring were left, it needs {needed:.0f} s")
            else:
                try:
                    with progress.task(f"timing {chosen.label()} on {ranks} GPUs, alone and together"):
                        timing = measure(chosen.spec, bl, allowed)
                    dp_efficiency, dp_source = timing.efficiency(), timing.sentence()
                except UserError as exc:
                    dp_source = f"{dp_source}; measuring it failed: {exc}"
                continue  # choose again: on the measured efficiency, and with the time it took counted
        if wanted is None:
            return Settled(ladder=ladder, probe=probe, decision=decision, reserve=reserve, cadence=cadence, bl=bl,
                            probe_seconds=spent, dp_efficiency=dp_efficiency, dp_source=dp_source)
        spec, micro, accum, rung = wanted
        tried.add((shape_key(spec), micro, accum))
        extensions += rung
        checks += not rung
        probe = measure_more(probe, spec, micro_batch=micro,
                             deadline=max(deadline, min(latest, clock() + SETTLE_MIN_SECONDS)),
                             memory_limit_bytes=setup.memory_limit_bytes, peak_flops=peak, progress=progress,
                             clock=clock, grad_accum=accum)
        timing = probe.timing_for(spec)
        if timing is None:
            continue  # not measured (out of time, or it does not fit): a rung stays off the ladder
        if rung:
            ladder = sorted([*ladder, spec], key=lambda s: s.params_scaling())
        key, ran_at = shape_key(spec), timing.measurement.micro_batch
        # an out-of-memory error halved the planned micro-batch: that is the most it may use
        ran[key] = ran_at if micro is not None and ran_at < micro else max(ran.get(key, 0), ran_at)


def _next_measurement(decision: Decision, bl: BatchLR, *, ladder: list[ModelSpec], setup: Setup,
                      tried: set[tuple[Any, int | None, int]], micro_cap: int, extend: bool, check: bool,
                      timed_seconds: float = math.inf, timed_accum: int = 1
                      ) -> tuple[ModelSpec, int | None, int, bool] | None:
    """(shape, micro-batch or None for the probe's own rule, micro-batches per optimizer step, whether it is a
    new rung) to measure next, or None.

    A new rung when the chosen shape is the smallest or the largest of the ladder (a larger shape left out
    for memory is still on the ladder, so a memory-bound choice is not extended). Else the chosen shape at
    the plan's micro-batch p when no measurement stands for it: on CUDA a measurement at m stands for p when
    p ≤ m ≤ `MICRO_BATCH_SLACK`·p (less memory than measured, a step at least 80% as large); on a CPU any
    measurement of the shape that timed `timed_seconds` ≥ `CPU_CHECK_MIN_SECONDS` at the plan's accumulation
    (`timed_accum`) does: tok/s barely depends on the micro-batch there (`timing` module docstring), but a
    couple of short steps do not predict a run, and the optimizer's update, once per micro-batch in the probe
    and once per `grad_accum` in the run, is a share of a small micro-batch's step (the README demo's 2×64 at
    micro-batch 8 × 5 of 128 tokens, two threads: 4% faster at accumulation 5 than at 1, interleaved).
    On CUDA the check runs at `CHECK_HEADROOM`·p (at most `micro_cap`, what memory allows): the measured speed
    moves the tokens, hence the batch and p a little, and the measurement must still stand for the plan made on
    it. On a CPU, where it stands for any micro-batch, at p itself: the step the run will train (2×64 ran 1–4%
    faster at micro-batch 13 than at 15 or 16), and with the plan's accumulation."""
    chosen = decision.chosen()
    if extend:
        below, above = chosen.spec == ladder[0], chosen.spec == ladder[-1]
        rung = next_rung(ladder, below=below) if below or above else None
        if rung is not None and (shape_key(rung), None, 1) not in tried:
            return rung, None, 1, True
    if not check:
        return None
    planned = bl.micro_batch
    if setup.device == "cpu":
        stands = timed_seconds >= CPU_CHECK_MIN_SECONDS and timed_accum == bl.grad_accum
    else:
        stands = planned <= chosen.micro_batch <= MICRO_BATCH_SLACK * planned
    if chosen.measured and stands:
        return None
    micro = planned if setup.device == "cpu" else min(micro_cap, math.ceil(CHECK_HEADROOM * planned))
    accum = bl.grad_accum if setup.device == "cpu" else 1
    if (shape_key(chosen.spec), micro, accum) in tried:
        return None
    return chosen.spec, micro, accum, False


def choose_with_reserves(ladder: list[ModelSpec], *, start: ModelSpec, cadence_for: Callable[[ModelSpec], Cadence],
                          throughput: Any, setup: Setup, budget_seconds: float, probe_seconds: float, prepared: Any,
                          law: LossLaw, band_law: LossLaw) -> tuple[Decision, Reserve, Cadence]:
    """`decide.choose` with the reserves of the shape it chooses: they depend on it (checkpoint size, eval
    speed: `cadence_for`), so reserves and choice are iterated to a fixed point (at most 4 rounds) from `start`."""
    ref = start
    for _ in range(4):
        cadence = cadence_for(ref)
        reserve = reserve_for(cadence, budget_seconds=budget_seconds, probe_seconds=probe_seconds)
        decision = choose(
            candidates=ladder, throughput=throughput, train_seconds=reserve.train_seconds(),
            unique_tokens=float(prepared.train_tokens), memory_limit_bytes=setup.memory_limit_bytes,
            activation_bytes=2 if setup.dtype in ("bf16", "fp16") else 4, law=law, band_law=band_law,
        )
        if decision.chosen().spec == ref:
            break
        ref = decision.chosen().spec
    return decision, reserve, cadence


def split_batch(bl: BatchLR, *, ranks: int, max_micro_batch: int) -> BatchLR:
    """`bl`'s global batch of S sequences on `ranks` data-parallel GPUs: per rank grad_accum = ceil(S /
    (max_micro_batch · ranks)) and micro_batch = ceil(S / (grad_accum · ranks)), so micro_batch · grad_accum ·
    ranks is S rounded up to what the ranks hold (the LR and schedule stay those of the global batch). On one
    GPU `bl` itself. `BatchLR.world_size` records the ranks."""
    if ranks == 1:
        return bl
    sequences = bl.micro_batch * bl.grad_accum
    accum = -(-sequences // (max_micro_batch * ranks))
    micro = -(-sequences // (accum * ranks))
    return replace(bl, micro_batch=micro, grad_accum=accum, world_size=ranks)


def _cadence_for(
    spec: ModelSpec,
    *,
    probe: Any,
    throughput: ThroughputModel,
    setup: Setup,
    budget_seconds: float,
    val_tokens: int,
) -> Cadence:
    """Cadence and costs for `spec`, from its own timing if measured, else the nearest measured shape's."""
    from oneday.planner.measure import scale_compile_seconds

    timing = probe.timing_for(spec)
    near = timing or probe.nearest(spec)
    # forward tok/s: measured, or the model's training tok/s times the nearest shape's forward/train ratio
    ratio = near.forward_tokens_per_s / near.measurement.tokens_per_s
    forward = timing.forward_tokens_per_s if timing else ratio * throughput.tokens_per_s(spec)
    if setup.compile:
        measured = [t for t in probe.timings if t.compile_seconds > 0]
        if timing is not None and timing.compile_seconds > 0:
            compile_s = timing.compile_seconds
        elif measured:
            base = min(measured, key=lambda t: abs(t.spec.n_layer - spec.n_layer))
            compile_s = scale_compile_seconds(base.compile_seconds, base.spec, spec)
        else:
            compile_s = COMPILE_FALLBACK_SECONDS
    else:
        compile_s = 0.0
    return plan_cadence(spec, setup=setup, budget_seconds=budget_seconds, val_tokens=val_tokens,
                    forward_tokens_per_s=forward, compile_seconds=compile_s)


__all__ = [
    "CHECK_HEADROOM",
    "CPU_CHECK_MIN_SECONDS",
    "EXTRA_PROBE_SHARE",
    "MAX_LADDER_EXTENSIONS",
    "MAX_PLAN_CHECKS",
    "MICRO_BATCH_SLACK",
    "SETTLE_MAX_BUDGET_SHARE",
    "SETTLE_MIN_SECONDS",
    "Settled",
    "choose_with_reserves",
    "settle",
    "split_batch",
]
