"""`make_plan`: from a budget in hours and a corpus to a validated `Plan` (issue #3; DESIGN.md §2–3).

This module measures and assembles; the rules live in the pure modules (`laws`, `decide`). In order:

1. Check the request (budget, sequence length, probe time, calibration file) before any slow work, and
   refuse a budget that cannot even pay for probing, start-up and the final save.
2. Probe the hardware (`hardware.probe_hardware`; `--device cuda` without a GPU is a `UserError`), then
   prepare the data (`runner.data.prepare_data`; its errors pass through; a cached entry costs nothing).
3. Probe: the device's peak FLOP/s for the run's dtype (`resolve_peak_flops`: the datasheet table on
   GPUs, a timed matmul on CPUs), then real training steps of several candidate shapes
   (`measure.probe_throughput`). The probe's wall time counts against the budget, as in Cramming
   (Geiping & Goldstein 2023): the person's budget is wall-clock, not optimizer time.
4. `throughput.fit_throughput`, the reserves (`budget.reserve_seconds`), `decide.choose`,
   `decide.batch_and_lr`, then the `Plan`.

Defaults and why
----------------
- dtype / compile: CUDA — bf16 autocast when the GPU has bf16 (else fp32), `torch.compile` when the budget
  is at least `COMPILE_MIN_SECONDS` (30 min: a ~60 s compile is then ≤ 3% of the budget); CPU — fp32,
  no compile (DESIGN §7: bf16 ~50× slower on AVX2 CPUs, compile 60–90 s with no steady-state gain).
- threads (CPU): the torch default, one per core the process may use.
- seq_len: 1024 on GPUs, 256 on CPUs (the DESIGN §7 CPU figures are at 256); halved for tiny budgets —
  CPU below 5 min → 128, GPU below 30 min → 512 — where shorter windows buy more optimizer steps;
  halved further (not below 16) until the validation split holds at least 4 windows. An explicit
  `seq_len` must lie in [16, `models.spec.MAX_SEQ_LEN`] and fit in the data.
- probe time: 2% of the budget, at most 180 s, at least `PROBE_MIN_SECONDS` (3 s on CPU: enough for two
  small shapes; 20 s on CUDA, 90 s when compiling, since each measured shape compiles); `probe_seconds`
  overrides. A 10-minute CPU budget probes for 12 s.
- candidate range: from 2 layers × 128 wide (the smallest sensible model) up to 3× the compute-optimal N
  (`LossLaw.compute_optimal`) of an upper bound on the compute — peak FLOP/s × budget × 0.5
  (a generous MFU) — and at least 4× the smallest, so the ladder always offers a few rungs; shapes that do
  not fit memory are dropped by the measurement (CPU: by estimate) and by `choose`.
- memory limit: CUDA 90% of the free memory less 512 MiB (CUDA context, fragmentation); CPU 60% of the
  available RAM (the run also maps the data and other processes share the machine).
- reserves (seconds, all counted before training, see `budget.reserve_seconds`):
  start-up = `STARTUP_SECONDS` (imports, model build, first step: 10 s CPU, 20 s CUDA) + compile (the
  compile time measured on the nearest measured shape, scaled by depth; `COMPILE_FALLBACK_SECONDS` = 60 s
  when none was measured); evaluations = count × (eval_tokens / measured no-grad forward tok/s + 0.2 s);
  checkpoints = count × (0.5 s + 12 bytes per parameter (fp32 weights and both Adam moments) at 200 MB/s);
  final save = 1.5 s + 8 bytes per parameter at 200 MB/s (as the runner's own final reserve).
- cadences: an evaluation every max(30 s, budget / 40) — 20 to 40 evaluations a run, never closer than
  30 s — on min(val tokens, 2^20 on CUDA / 2^16 on CPU) tokens, halved (not below 8 windows) while the
  evaluations would cost more than 5% of the budget; if even that is too dear (a slow or busy CPU), fewer
  evaluations (at least 2) further apart; a checkpoint every 10% of the budget, clamped to [60 s, 30 min];
  keep the last 2.
- too small a budget: `UserError` when the reserves leave no training time, or when the training time is
  shorter than `MIN_TRAIN_STEPS` (10) optimizer steps of the smallest measured shape.

Calibration file (`calibration=`), written by the tuner's calibration study (DESIGN §6): a JSON object

    {"format_version": 1, "name": "epoch-2024-calibrated", "E": 2.1, "A": 480.0, "B": 2085.0,
     "alpha": 0.3478, "beta": 0.3658, "source": "fitted on 3 runs of tinystories (2026-11-28)",
     "points": [[n, d, loss], ...], "created": "2026-11-28T12:00:00Z"}

E, A, B (≥ 0), alpha, beta (> 0) and source are required; name, format_version (1), points and created
are optional; any other key is refused (a typo would otherwise be ignored). The law replaces the default
(Epoch AI 2024) in `choose`; the Hoffmann 2022 fit stays the band; `prediction.calibrated` is true.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday import __version__
from oneday.errors import UserError
from oneday.formats import clock_text, human_count, human_seconds
from oneday.models.spec import MAX_SEQ_LEN, ModelSpec
from oneday.plan import Candidate, DataInfo, HardwareInfo, Plan, Prediction, Provenance, TrainSpec
from oneday.planner.budget import Reserve, reserve_seconds
from oneday.planner.decide import BatchLR, CandidateResult, Decision, batch_and_lr, choose
from oneday.planner.ladder import candidate_shapes, pad_vocab, swiglu_ff
from oneday.planner.laws import EPOCH_2024, HOFFMANN_2022, LossLaw
from oneday.planner.throughput import ThroughputModel, fit_throughput
from oneday.progress import NULL_PROGRESS, Progress
from oneday.runner import costs

log = logging.getLogger(__name__)

__all__ = [
    "MAX_HOURS",
    "MIN_SEQ_LEN",
    "default_plan_name",
    "load_calibration",
    "make_plan",
]

MAX_HOURS = 10_000.0
MIN_SEQ_LEN = 16
DEFAULT_SEQ_LEN = {"cuda": 1024, "cpu": 256}
SHORT_SEQ_LEN = {"cuda": 512, "cpu": 128}
SHORT_BUDGET_SECONDS = {"cuda": 1800.0, "cpu": 300.0}

PROBE_FRACTION = 0.02
PROBE_MAX_SECONDS = 180.0
PROBE_MIN_SECONDS = {"cpu": 3.0, "cuda": 20.0, "cuda+compile": 90.0}
PEAK_MEASURE_SECONDS = 0.5

COMPILE_MIN_SECONDS = 1800.0
COMPILE_FALLBACK_SECONDS = 60.0
GENEROUS_MFU = 0.5
MAX_PARAMS_OVER_OPTIMAL = 3.0
MIN_LADDER_SPAN = 4.0
SMALLEST_SHAPE = (2, 128)  # n_layer, d_model

CUDA_MEMORY_FRACTION = 0.9
CUDA_MEMORY_RESERVED = 512 << 20
CPU_MEMORY_FRACTION = 0.6

EVAL_MIN_SPACING = 30.0
EVALS_PER_RUN = 40
EVAL_TOKENS = {"cuda": 2**20, "cpu": 2**16}
EVAL_MAX_SHARE = 0.05
CHECKPOINT_FRACTION = 0.10
CHECKPOINT_MIN_SECONDS = 60.0
CHECKPOINT_MAX_SECONDS = 1800.0
KEEP_CHECKPOINTS = 2
MIN_TRAIN_STEPS = 10

_CALIBRATION_REQUIRED = ("E", "A", "B", "alpha", "beta", "source")
_CALIBRATION_OPTIONAL = ("name", "format_version", "points", "created")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def _check_hours(hours: float) -> float:
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or math.isnan(hours):
        raise UserError(f"--hours: expected a number, got {hours!r}")
    if not hours > 0:
        raise UserError(f"--hours: the budget must be more than 0, got {hours:g}")
    if hours > MAX_HOURS:
        raise UserError(f"--hours: {hours:g} hours is more than the supported maximum of {MAX_HOURS:,.0f} (~14 months)")
    return float(hours)


def _check_seq_len(seq_len: int | None) -> None:
    if seq_len is None:
        return
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise UserError(f"--seq-len: expected an integer, got {seq_len!r}")
    if seq_len < MIN_SEQ_LEN:
        raise UserError(f"--seq-len: {seq_len} is below the minimum of {MIN_SEQ_LEN}")
    if seq_len > MAX_SEQ_LEN:
        raise UserError(f"--seq-len: {seq_len} is above the model family's maximum of {MAX_SEQ_LEN}")


def load_calibration(path: str | os.PathLike[str]) -> LossLaw:
    """A fitted loss law from a calibration file (format in the module docstring); UserError naming the
    file and the field on any problem."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such calibration file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a calibration file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read calibration ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a calibration file holds a JSON object, got {type(raw).__name__}")
    allowed = (*_CALIBRATION_REQUIRED, *_CALIBRATION_OPTIONAL)
    for key in raw:
        if key not in allowed:
            raise UserError(f"{path}: {key}: unknown key (expected: {', '.join(allowed)})")
    for key in _CALIBRATION_REQUIRED:
        if key not in raw:
            raise UserError(f"{path}: {key}: missing")
    version = raw.get("format_version", 1)
    if version != 1:
        raise UserError(f"{path}: format_version: this oneday reads calibration format 1, got {version!r}")
    values: dict[str, float] = {}
    for key in ("E", "A", "B", "alpha", "beta"):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{path}: {key}: expected a finite number, got {value!r}")
        if key in ("alpha", "beta") and not 0 < value < 2:
            raise UserError(f"{path}: {key}: must be in (0, 2), got {value!r}")
        if value < 0:
            raise UserError(f"{path}: {key}: must be >= 0, got {value!r}")
        values[key] = float(value)
    if values["E"] + values["A"] + values["B"] <= 0:
        raise UserError(f"{path}: E, A and B are all 0: that law predicts a loss of 0")
    source = raw["source"]
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{path}: source: expected a non-empty string, got {source!r}")
    name = raw.get("name") or f"calibrated ({path.name})"
    if not isinstance(name, str):
        raise UserError(f"{path}: name: expected a string, got {name!r}")
    return LossLaw(name=name, source=source, **values)


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def _data_short_name(data: str) -> str:
    """`builtin:pydoc` → pydoc, `hf:roneneldan/TinyStories` → TinyStories, `../x/corpus.txt` → corpus,
    `corpus/*.jsonl` → corpus (a glob is named after its folder)."""
    spec = data.strip()
    for prefix in ("builtin:", "hf:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
    parts = [p for p in re.split(r"[/\\]", spec) if p not in ("", ".", "..")]
    while parts and re.search(r"[*?\[\]]", parts[-1]):
        parts.pop()
    base = parts[-1] if parts else ""
    if Path(base).suffix.lower() in (".txt", ".raw", ".md", ".jsonl", ".json", ".parquet", ".csv"):
        base = Path(base).stem
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")
    return base or "data"


def default_plan_name(data: str, *, budget_seconds: float, params_total: int) -> str:
    """`<data short name>-<budget like 10m/24h>-<size like 12M>`, e.g. `tinystories-24h-124M`."""
    return f"{_data_short_name(data)}-{human_seconds(budget_seconds)}-{human_count(params_total)}"


# --------------------------------------------------------------------------------------------------
# Settings that follow from the device and budget
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Setup:
    device: str
    dtype: str
    compile: bool
    threads: int | None
    memory_limit_bytes: int
    probe_seconds: float


def _setup(probe: Any, *, budget_seconds: float, probe_seconds: float | None) -> _Setup:
    device = probe.device
    if device == "cuda":
        dtype = "bf16" if probe.bf16_supported else "fp32"
        compile_ = budget_seconds >= COMPILE_MIN_SECONDS
        threads = None
        free = probe.free_memory_bytes or probe.memory_bytes
        limit = int(CUDA_MEMORY_FRACTION * free - CUDA_MEMORY_RESERVED)
        floor = PROBE_MIN_SECONDS["cuda+compile" if compile_ else "cuda"]
    else:
        dtype, compile_ = "fp32", False
        threads = probe.torch_threads or probe.cpu_cores or 1
        free = probe.free_memory_bytes or probe.memory_bytes
        limit = int(CPU_MEMORY_FRACTION * free)
        floor = PROBE_MIN_SECONDS["cpu"]
    if limit <= 0:
        raise UserError(f"{probe.name}: no free memory to train in ({free / 2**30:.2f} GiB free)")
    seconds = probe_seconds if probe_seconds is not None else min(
        PROBE_MAX_SECONDS, max(floor, PROBE_FRACTION * budget_seconds)
    )
    return _Setup(device=device, dtype=dtype, compile=compile_, threads=threads, memory_limit_bytes=limit,
                  probe_seconds=seconds)


def _seq_len(requested: int | None, *, device: str, budget_seconds: float, data: Any) -> tuple[int, str]:
    """The sequence length and a sentence saying where it came from."""
    usable = min(int(data.train_tokens), int(data.val_tokens))
    if requested is not None:
        if requested + 1 > usable:
            raise UserError(
                f"--seq-len: {requested} is longer than the data allows ({int(data.val_tokens):,} validation "
                f"and {int(data.train_tokens):,} training tokens; a window is seq_len + 1 tokens)"
            )
        return requested, f"Sequence length {requested} (--seq-len)."
    if budget_seconds < SHORT_BUDGET_SECONDS[device]:
        seq = SHORT_SEQ_LEN[device]
        why = (f"the {device.upper()} default for budgets under {SHORT_BUDGET_SECONDS[device] / 60:.0f} min, "
               "where shorter windows buy more optimizer steps")
    else:
        seq = DEFAULT_SEQ_LEN[device]
        why = f"the {'GPU' if device == 'cuda' else 'CPU'} default"
    while seq > MIN_SEQ_LEN and 4 * (seq + 1) > int(data.val_tokens):
        seq //= 2
        why = "shortened so the validation split holds at least 4 windows"
    return seq, f"Sequence length {seq} ({why})."


def _candidate_range(
    *, vocab: int, seq_len: int, peak_flops: float, budget_seconds: float, law: LossLaw
) -> tuple[float, float]:
    """(min N, max N) for the candidate ladder (module docstring)."""
    layers, width = SMALLEST_SHAPE
    smallest = ModelSpec(
        n_layer=layers, d_model=width, n_head=width // 64, d_ff=swiglu_ff(width),
        vocab_size=pad_vocab(vocab), seq_len=seq_len,
    )
    min_params = float(smallest.params_scaling())
    c_upper = peak_flops * budget_seconds * GENEROUS_MFU
    n_opt, _ = law.compute_optimal(c_upper)
    max_params = max(MAX_PARAMS_OVER_OPTIMAL * n_opt, MIN_LADDER_SPAN * min_params)
    return min_params, max_params


# --------------------------------------------------------------------------------------------------
# Reserves
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cadence:
    eval_every: float
    eval_tokens: int
    eval_count: int
    eval_each: float
    checkpoint_every: float
    checkpoint_count: int
    checkpoint_each: float
    startup: float
    compile: float
    final_save: float


def _cadence(
    spec: ModelSpec,
    *,
    setup: _Setup,
    budget_seconds: float,
    val_tokens: int,
    forward_tokens_per_s: float,
    compile_seconds: float,
) -> _Cadence:
    params = spec.params_total()
    eval_every = max(EVAL_MIN_SPACING, budget_seconds / EVALS_PER_RUN)
    eval_count = max(1, math.ceil(budget_seconds / eval_every))  # the periodic ones and the final one
    eval_tokens = min(int(val_tokens), EVAL_TOKENS[setup.device])
    floor = min(int(val_tokens), 8 * (spec.seq_len + 1))

    def each(tokens: int) -> float:
        return costs.eval_seconds(tokens, forward_tokens_per_s=forward_tokens_per_s)

    while eval_tokens > floor and eval_count * each(eval_tokens) > EVAL_MAX_SHARE * budget_seconds:
        eval_tokens = max(floor, eval_tokens // 2)
    if eval_count > 2 and eval_count * each(eval_tokens) > EVAL_MAX_SHARE * budget_seconds:
        # even the smallest evaluation is too dear at this spacing (a slow device): evaluate less often
        eval_count = max(2, int(EVAL_MAX_SHARE * budget_seconds // each(eval_tokens)))
        eval_every = budget_seconds / eval_count
    checkpoint_every = min(CHECKPOINT_MAX_SECONDS, max(CHECKPOINT_MIN_SECONDS, CHECKPOINT_FRACTION * budget_seconds))
    return _Cadence(
        eval_every=eval_every,
        eval_tokens=eval_tokens,
        eval_count=eval_count,
        eval_each=each(eval_tokens),
        checkpoint_every=checkpoint_every,
        checkpoint_count=int(budget_seconds // checkpoint_every),
        checkpoint_each=costs.checkpoint_seconds(params),
        startup=costs.startup_seconds(setup.device),
        compile=compile_seconds if setup.compile else 0.0,
        final_save=costs.final_save_seconds(params),
    )


def _reserve(cadence: _Cadence, *, budget_seconds: float, probe_seconds: float) -> Reserve:
    return reserve_seconds(
        budget_seconds=budget_seconds,
        compile_seconds=cadence.startup + cadence.compile,
        eval_seconds_each=cadence.eval_each,
        eval_count=cadence.eval_count,
        checkpoint_seconds_each=cadence.checkpoint_each,
        checkpoint_count=cadence.checkpoint_count,
        final_save_seconds=cadence.final_save,
        probe_seconds=probe_seconds,
    )


def _min_reserve_seconds(setup: _Setup) -> float:
    """What any plan on this device must spend besides training: probing, start-up (and compile), and
    the final save of the smallest model — known before anything is measured."""
    compile_ = COMPILE_FALLBACK_SECONDS if setup.compile else 0.0
    return setup.probe_seconds + costs.startup_seconds(setup.device) + compile_ + costs.FINAL_SAVE_FIXED_SECONDS


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------
def make_plan(
    *,
    hours: float,
    data: str,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_column: str | None = None,
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

    `data`, `tokenizer`, `vocab_size`, `text_column`, `cache_dir` go to `prepare_data`; `device` is
    auto/cuda/cpu; `probe_seconds` overrides the measuring time; `calibration` is a calibration file
    whose law replaces the default. Every problem the user can fix raises `UserError` (one line).
    """
    from oneday.planner.hardware import probe_hardware, resolve_peak_flops
    from oneday.planner.measure import probe_throughput

    progress = progress or NULL_PROGRESS
    budget_seconds = _check_hours(hours) * 3600.0
    _check_seq_len(seq_len)
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device}: expected auto, cuda or cpu")
    if probe_seconds is not None and not (0 < probe_seconds < budget_seconds):
        raise UserError(
            f"--probe-seconds: must be more than 0 and less than the budget ({budget_seconds:.0f} s), "
            f"got {probe_seconds:g}"
        )
    if name is not None and not name.strip():
        raise UserError("--name: must not be empty")
    law = load_calibration(calibration) if calibration is not None else EPOCH_2024
    band_law = HOFFMANN_2022

    # -- hardware, then a first check that the budget can pay for the fixed costs ---------------------
    hw = probe_hardware(device)
    if hw.device == "cuda" and not hw.torch_cuda_available:
        raise UserError(
            f"--device cuda: found {hw.name}, but torch {hw.torch_version} cannot use it (a CPU-only build?); "
            "install a CUDA build of torch, or plan with --device cpu"
        )
    setup = _setup(hw, budget_seconds=budget_seconds, probe_seconds=probe_seconds)
    floor = _min_reserve_seconds(setup)
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
        data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column, cache_dir=cache_dir,
        progress=progress,
    )
    seq, seq_reason = _seq_len(seq_len, device=setup.device, budget_seconds=budget_seconds, data=prepared)

    # -- probe: peak FLOP/s and real training steps (counted against the budget) ------------------------
    import oneday.models.build  # noqa: F401  (transformers loads here: start-up, which the run pays too, not probing)

    probe_started = clock()
    peak, peak_source = resolve_peak_flops(hw, setup.dtype, seconds=PEAK_MEASURE_SECONDS)
    min_params, max_params = _candidate_range(
        vocab=prepared.vocab_size, seq_len=seq, peak_flops=peak, budget_seconds=budget_seconds, law=law,
    )
    ladder = candidate_shapes(vocab_size=prepared.vocab_size, seq_len=seq, min_params=min_params,
                              max_params=max_params)
    thread_note = None
    if setup.device == "cpu" and (setup.threads or 1) > 1:
        from oneday.planner.timing import fastest_cpu_threads

        threads, speeds = fastest_cpu_threads(ladder[0], max_threads=setup.threads or 1)
        thread_note = (
            f"Torch threads: {threads} ("
            + ", ".join(f"{n} thread{'s' * (n > 1)}: {v:,.0f} tok/s" for n, v in sorted(speeds.items()))
            + f" on {ladder[0].n_layer}×{ladder[0].d_model} just now; with other load on the machine, fewer "
            "threads can be faster). Override with `oneday run --threads`."
        )
        setup = replace(setup, threads=threads)
    measure_seconds = max(0.5, setup.probe_seconds - (clock() - probe_started))
    probe = probe_throughput(
        ladder, device=setup.device, dtype=setup.dtype, compile=setup.compile, seconds=measure_seconds,
        memory_limit_bytes=setup.memory_limit_bytes, threads=setup.threads, progress=progress,
        peak_flops=peak,
    )
    probe_seconds_spent = round(clock() - probe_started, 3)  # as recorded in the provenance
    throughput = fit_throughput(probe.measurements, peak_flops=peak)

    # -- reserves and the choice (reserves depend on the chosen shape: iterate to a fixed point) -------
    ref = probe.timings[len(probe.timings) // 2].spec
    decision: Decision | None = None
    reserve: Reserve | None = None
    cadence: _Cadence | None = None
    for _ in range(4):
        cadence = _cadence_for(ref, probe=probe, throughput=throughput, setup=setup, budget_seconds=budget_seconds,
                               val_tokens=prepared.val_tokens)
        reserve = _reserve(cadence, budget_seconds=budget_seconds, probe_seconds=probe_seconds_spent)
        decision = choose(
            candidates=ladder, throughput=throughput, train_seconds=reserve.train_seconds(),
            unique_tokens=float(prepared.train_tokens), memory_limit_bytes=setup.memory_limit_bytes,
            activation_bytes=2 if setup.dtype == "bf16" else 4, law=law, band_law=band_law,
        )
        if decision.chosen().spec == ref:
            break
        ref = decision.chosen().spec
    assert decision is not None and reserve is not None and cadence is not None
    chosen = decision.chosen()
    _check_enough_training(probe, reserve=reserve, budget_seconds=budget_seconds)
    bl = batch_and_lr(spec=chosen.spec, tokens=chosen.tokens, max_micro_batch=max(1, chosen.micro_batch))

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
    hardware = HardwareInfo(
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
    data_info = DataInfo(
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
    reasons = _reasons(
        decision=decision, bl=bl, probe=probe, ladder=ladder, reserve=reserve, cadence=cadence, setup=setup,
        seq_reason=seq_reason, law=law, calibration=calibration, mfu=mfu, budget_seconds=budget_seconds,
        gpu_count=hw.count if setup.device == "cuda" else 1,
    )
    if thread_note:
        reasons.append(thread_note)
    plan = Plan(
        name=name.strip() if name else default_plan_name(
            data, budget_seconds=budget_seconds, params_total=chosen.spec.params_total()
        ),
        hardware=hardware,
        data=data_info,
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
        reasons=tuple(reasons),
    )
    log.info("plan %s: %s, %s tokens, predicted loss %.3f", plan.name, chosen.label(), human_count(chosen.tokens),
             chosen.predicted_loss)
    return plan


def _cadence_for(
    spec: ModelSpec,
    *,
    probe: Any,
    throughput: ThroughputModel,
    setup: _Setup,
    budget_seconds: float,
    val_tokens: int,
) -> _Cadence:
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
    return _cadence(spec, setup=setup, budget_seconds=budget_seconds, val_tokens=val_tokens,
                    forward_tokens_per_s=forward, compile_seconds=compile_s)


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


def _reasons(
    *,
    decision: Decision,
    bl: BatchLR,
    probe: Any,
    ladder: list[ModelSpec],
    reserve: Reserve,
    cadence: _Cadence,
    setup: _Setup,
    seq_reason: str,
    law: LossLaw,
    calibration: Any,
    mfu: float,
    budget_seconds: float,
    gpu_count: int,
) -> list[str]:
    reasons = list(decision.reasons)
    reasons += bl.notes
    if decision.throughput_note:
        reasons.append(decision.throughput_note)
    labels = ", ".join(t.label() for t in probe.timings)
    line = (
        f"Measured {len(probe.timings)} of {len(ladder)} candidate shapes ({labels}) with real training steps "
        f"in {reserve.probe_seconds:.1f} s with the peak FLOP/s ({reserve.probe_seconds / budget_seconds:.1%} "
        "of the budget); the probe counts against the budget (Cramming)."
    )
    if probe.skipped:
        line += f" Not measured: {'; '.join(probe.skipped)}."
    reasons.append(line)
    startup = "start-up and compile" if setup.compile else "start-up"
    reasons.append(
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
        reasons.append(
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
        reasons.append(f"CUDA: {setup.dtype} {'autocast, ' if setup.dtype == 'bf16' else ''}TF32 matmuls, {compiled}.")
    if gpu_count > 1:
        reasons.append(
            f"{gpu_count} GPUs found; this plan is for one (tokens/s measured on one). Under torchrun with DDP "
            f"the run would see up to {gpu_count}x the tokens: make the plan with CUDA_VISIBLE_DEVICES set to "
            "the GPUs you will use once multi-GPU planning exists."
        )
    reasons.append(seq_reason)
    if calibration is not None:
        reasons.append(f"Loss law calibrated on this kind of data: {law.name} ({law.source}).")
    else:
        reasons.append(
            "Predicted losses use published fits (Epoch AI 2024; band: Hoffmann et al. 2022) whose absolute "
            "values belong to their data and tokenizer: the choice of size transfers, the loss needs calibration."
        )
    chosen = decision.chosen()
    uniform = math.log(chosen.spec.vocab_size)
    if chosen.predicted_loss > uniform:
        reasons.append(
            f"The predicted loss ({chosen.predicted_loss:.2f}) is above ln(vocab) = {uniform:.2f}, the loss of a "
            "uniform guess: the published laws are fitted on far larger models and data and do not hold at this "
            "scale. Trust the choice of size less, and calibrate the law on short runs (DESIGN §6)."
        )
    if mfu > 1.0:
        reasons.append(
            f"The measured MFU ({mfu:.0%}) is above 100%: the CPU's peak was measured with a matmul while "
            "other work slowed it; MFU figures on this machine are relative, not absolute."
        )
    return reasons
