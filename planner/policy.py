"""The defaults that follow from the device and the budget, before anything is measured (pure).

- dtype / compile: CUDA — bf16 autocast (fp16 with a grad scaler on a GPU without bf16, compute capability < 8.0;
  fp32 when the capability is unknown), `torch.compile` when the budget is at
  least `COMPILE_MIN_SECONDS` (30 min: a ~60 s compile is then ≤ 3% of the budget); CPU — fp32, no compile (bf16
  is ~50× slower on CPUs without AVX-512 BF16/AMX; compiling takes 60–90 s with no steady-state gain;
  docs/design.md, Measured facts).
- threads (CPU): the torch default, one per core the process may use (`make_plan` then picks 1 or all cores,
  whichever trains faster right now: `timing.fastest_cpu_threads`).
- seq_len: 1024 on GPUs, 256 on CPUs (the CPU speed figures were measured at 256); halved for tiny budgets —
  CPU below 5 min → 128, GPU below 30 min → 512 — where shorter windows buy more optimizer steps; halved
  further (not below 16) until the validation split holds at least 4 windows. An explicit `seq_len` must lie in
  [16, `models.spec.MAX_SEQ_LEN`] and fit in the data.
- probe time: 2% of the budget up to `PROBE_KNEE_SECONDS` (3 min, reached at a 2.5 h budget), then 3 min until
  1% of the budget is more (5 h), then 1% (`PROBE_LONG_FRACTION`): the share shrinks as budgets grow, but the
  time grows with them, since a long budget trains a large model whose shapes take long to build, compile and
  time, and choosing it well is worth more than 1% of the day (a fixed 3 min left a 24 h GPU plan unable to
  measure the shapes near its optimum). At least `PROBE_MIN_SECONDS` (3 s on CPU: enough for two small shapes;
  20 s on CUDA, 90 s when compiling, since each measured shape compiles); `probe_seconds` overrides. A
  10-minute CPU budget probes for 12 s, a 1 h GPU budget that compiles for 90 s, a 24 h one for 14.4 min.
- candidate range: from 2 layers × 128 wide (the smallest sensible model) up to 3× the compute-optimal N
  (`LossLaw.compute_optimal`) of an upper bound on the compute — peak FLOP/s × budget × 0.5 (a generous MFU) —
  and at least 4× the smallest, so the ladder always offers a few rungs; shapes that do not fit memory are
  dropped by the measurement (CPU: by estimate) and by `choose`.
- which shapes to measure first (CUDA): the ladder shape the loss law favours if every shape ran at
  `EXPECTED_CUDA_MFU` (35%, what a well-sized model reaches with bf16 and torch.compile: nanoGPT's 124M runs at
  ~40% on an A100), with the data's repetition discount (`expected_optimum`); the probe starts there.
- memory limit: CUDA 90% of the free memory less 512 MiB (CUDA context, fragmentation); CPU 60% of the available
  RAM (the run also maps the data and other processes share the machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from oneday.errors import UserError
from oneday.models.spec import MAX_SEQ_LEN, ModelSpec
from oneday.planner.ladder import pad_vocab, swiglu_ff
from oneday.planner.laws import LossLaw, effective_tokens
from oneday.runner import costs

MAX_HOURS = 10_000.0
MIN_SEQ_LEN = 16
DEFAULT_SEQ_LEN = {"cuda": 1024, "cpu": 256}
SHORT_SEQ_LEN = {"cuda": 512, "cpu": 128}
SHORT_BUDGET_SECONDS = {"cuda": 1800.0, "cpu": 300.0}

PROBE_FRACTION = 0.02
PROBE_KNEE_SECONDS = 180.0
PROBE_LONG_FRACTION = 0.01
PROBE_MIN_SECONDS = {"cpu": 3.0, "cuda": 20.0, "cuda+compile": 90.0}

EXPECTED_CUDA_MFU = 0.35
COMPILE_MIN_SECONDS = 1800.0
COMPILE_FALLBACK_SECONDS = 60.0
GENEROUS_MFU = 0.5
MAX_PARAMS_OVER_OPTIMAL = 3.0
MIN_LADDER_SPAN = 4.0
SMALLEST_SHAPE = (2, 128)  # n_layer, d_model

CUDA_MEMORY_FRACTION = 0.9
CUDA_MEMORY_RESERVED = 512 << 20
CPU_MEMORY_FRACTION = 0.6


def check_hours(hours: float) -> float:
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or math.isnan(hours):
        raise UserError(f"--hours: expected a number, got {hours!r}")
    if not hours > 0:
        raise UserError(f"--hours: the budget must be more than 0, got {hours:g}")
    if hours > MAX_HOURS:
        raise UserError(f"--hours: {hours:g} hours is more than the supported maximum of {MAX_HOURS:,.0f} (~14 months)")
    return float(hours)


def check_seq_len(seq_len: int | None) -> None:
    if seq_len is None:
        return
    if isinstance(seq_len, bool) or not isinstance(seq_len, int):
        raise UserError(f"--seq-len: expected an integer, got {seq_len!r}")
    if seq_len < MIN_SEQ_LEN:
        raise UserError(f"--seq-len: {seq_len} is below the minimum of {MIN_SEQ_LEN}")
    if seq_len > MAX_SEQ_LEN:
        raise UserError(f"--seq-len: {seq_len} is above the model family's maximum of {MAX_SEQ_LEN}")


@dataclass(frozen=True)
class Setup:
    """How this device runs the plan: precision, compile, threads, the memory it may use, the probe's time."""

    device: str
    dtype: str
    compile: bool
    threads: int | None
    memory_limit_bytes: int
    probe_seconds: float
    compile_asked: bool | None = None  # `oneday plan --compile/--no-compile`; None: by the budget


def setup_for(probe: Any, *, budget_seconds: float, probe_seconds: float | None, compile: bool | None = None
              ) -> Setup:
    """The device setup (module docstring); `compile` (True/False) overrides the budget's rule on CUDA."""
    device = probe.device
    if device == "cuda":
        # no bf16 below compute capability 8.0 (V100, T4): fp16 autocast with a grad scaler; unknown: fp32
        dtype = "bf16" if probe.bf16_supported else "fp16" if probe.compute_capability else "fp32"
        compile_ = budget_seconds >= COMPILE_MIN_SECONDS if compile is None else compile
        threads = None
        free = probe.free_memory_bytes or probe.memory_bytes
        limit = int(CUDA_MEMORY_FRACTION * free - CUDA_MEMORY_RESERVED)
        floor = PROBE_MIN_SECONDS["cuda+compile" if compile_ else "cuda"]
    else:
        if compile:
            raise UserError("--compile: CPU plans train without torch.compile (compiling takes 60-90 s and "
                            "gains nothing at steady state on a CPU); use it with a CUDA GPU")
        dtype, compile_ = "fp32", False
        threads = probe.torch_threads or probe.cpu_cores or 1
        free = probe.free_memory_bytes or probe.memory_bytes
        limit = int(CPU_MEMORY_FRACTION * free)
        floor = PROBE_MIN_SECONDS["cpu"]
    if limit <= 0:
        raise UserError(f"{probe.name}: no free memory to train in ({free / 2**30:.2f} GiB free)")
    seconds = probe_seconds if probe_seconds is not None else probe_share(budget_seconds, floor=floor)
    return Setup(device=device, dtype=dtype, compile=compile_, threads=threads, memory_limit_bytes=limit,
                  probe_seconds=seconds, compile_asked=compile)


def probe_share(budget_seconds: float, *, floor: float) -> float:
    """Seconds of the budget the probe may use (module docstring): 2% up to the knee, 1% past it, at least `floor`."""
    share = min(PROBE_FRACTION * budget_seconds, max(PROBE_KNEE_SECONDS, PROBE_LONG_FRACTION * budget_seconds))
    return max(floor, share)


def sequence_length(requested: int | None, *, device: str, budget_seconds: float, data: Any) -> tuple[int, str]:
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


def candidate_range(
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


def expected_optimum(
    ladder: list[ModelSpec], *, peak_flops: float, train_seconds: float, unique_tokens: float, law: LossLaw
) -> float:
    """N of the ladder shape with the least predicted loss `law.loss(N, D')` if every shape trained at
    `EXPECTED_CUDA_MFU` of `peak_flops` for `train_seconds` (D = tokens, D' = Muennighoff's effective tokens of
    D over `unique_tokens`): where the probe starts measuring on a GPU (module docstring)."""

    def loss(spec: ModelSpec) -> float:
        tokens = EXPECTED_CUDA_MFU * peak_flops * train_seconds / spec.flops_per_token()
        return law.loss(spec.params_scaling(), effective_tokens(tokens, unique_tokens))

    return float(min(ladder, key=loss).params_scaling())


def min_reserve_seconds(setup: Setup) -> float:
    """What any plan on this device must spend besides training: probing, start-up (and compile), and
    the final save of the smallest model — known before anything is measured."""
    compile_ = COMPILE_FALLBACK_SECONDS if setup.compile else 0.0
    return setup.probe_seconds + costs.startup_seconds(setup.device) + compile_ + costs.FINAL_SAVE_FIXED_SECONDS


__all__ = ["MAX_HOURS", "MIN_SEQ_LEN", "Setup", "candidate_range", "check_hours", "check_seq_len",
           "expected_optimum", "min_reserve_seconds", "probe_share", "sequence_length", "setup_for"]
