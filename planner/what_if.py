"""`oneday plan --what-if h100x8`: plan for hardware that is not in the machine (docs/design.md, What-if planning).

What a person asks before renting or buying a GPU. The same orchestration as the real path (`make.plan_for`)
runs on what the probe would have returned, taken from elsewhere:

- the hardware: the datasheet table (`oneday.devices.GPU_MODELS`: the name, memory and MFU class;
  `PEAK_FLOPS_TABLE`: the peak FLOP/s), `count` GPUs of it (`h100x8`), never probed;
- the data: prepared as usual (`--data`), or assumed (`--data-tokens N`: a corpus not yet downloaded, N training
  tokens, the validation split `oneday data prepare` would hold out, vocabulary from --vocab-size);
- the throughput: the device class's MFU model (`throughput.MFU_CLASSES`, with sources), or measurements saved
  on the real machine (`--throughput FILE`: a plan.json, whose candidates table holds the measured shapes, or a
  small throughput JSON, `load_throughput`).

Nothing here imports torch or measures anything: a what-if plan takes well under a second on any machine. The
plan says in its provenance (`Provenance.what_if`) and its reasons that it is a what-if, with the MFU it
assumed; `oneday run` refuses it on other hardware unless --force (`runner.preflight.check_hardware`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oneday.devices import GPU_MODELS, GpuModel, gpu_model, match_gpu, peak_flops
from oneday.errors import UserError
from oneday.models.spec import ModelSpec, SpecError
from oneday.plan import Plan, PlanError
from oneday.planner.budget import plan_cadence
from oneday.planner.calibration import load_calibration
from oneday.planner.decide import batch_and_lr
from oneday.planner.hardware import HardwareProbe
from oneday.planner.ladder import swiglu_ff
from oneday.planner.laws import EPOCH_2024, LossLaw
from oneday.planner.make import Choice, PlanRequest, check_gpus, check_request, ladder_for, plan_for
from oneday.planner.measure import ThroughputProbe
from oneday.planner.policy import COMPILE_FALLBACK_SECONDS, Setup, check_hours
from oneday.planner.settle import Settled, choose_with_reserves, split_batch
from oneday.planner.throughput import (
    DATA_PARALLEL_EFFICIENCY,
    MFU_CLASSES,
    Measurement,
    assumed_throughput,
    data_parallel,
    fit_throughput,
)
from oneday.planner.timing import CUDA_MAX_TOKENS_PER_MICRO_BATCH
from oneday.runner import costs

ASSUMED_BYTES_PER_TOKEN = 4.0
"""Bytes of text per token assumed for a corpus not yet tokenized: English with a BPE of 8k-50k tokens runs at
about 4 (GPT-2's tokenizer on English web text; the plan only uses it to report sizes)."""


# --------------------------------------------------------------------------------------------------
# The hardware
# --------------------------------------------------------------------------------------------------
def parse_what_if(text: str, *, gpus: int = 1) -> tuple[GpuModel, int]:
    """("h100x8" → the H100 entry and 8). A `--gpus` count other than 1 multiplies a bare name; with a count in
    the name it must agree. `UserError` naming the known GPUs when the name is unknown."""
    check_gpus(gpus)
    raw = text.strip()
    gpu, count = gpu_model(raw), None
    if gpu is None:
        match = re.fullmatch(r"(.+?)\s*[x×*]\s*(\d+)", raw, flags=re.IGNORECASE)
        if match:
            gpu, count = gpu_model(match.group(1)), int(match.group(2))
    if gpu is None:
        known = ", ".join(g.key for g in GPU_MODELS)
        raise UserError(f"--what-if {text!r}: unknown GPU; known: {known} (add xN for N of them, e.g. h100x8)")
    if count is not None and count < 1:
        raise UserError(f"--what-if {text!r}: the number of GPUs must be >= 1")
    if count is not None and gpus not in (1, count):
        raise UserError(f"--what-if {text!r} and --gpus {gpus}: two different GPU counts; give one")
    return gpu, count or gpus


def what_if_hardware(gpu: GpuModel, count: int) -> HardwareProbe:
    """What `probe_hardware` would return on a machine with `count` × `gpu`, from the datasheet table."""
    return HardwareProbe(
        device="cuda", name=gpu.name, count=count, memory_bytes=gpu.memory_bytes, free_memory_bytes=gpu.memory_bytes,
        power_limit_w=None, sm_clock_max_mhz=None, driver_version=None, cuda_version=None, compute_capability=None,
        bf16_supported=True, torch_version="not probed (what-if)", cpu_cores=1, torch_threads=None, cpu_flags=(),
        notes=(f"What-if: {count} × {gpu.name} from the datasheet table ({gpu.memory_source}), not probed.",),
        torch_cuda_available=True,
    )


# --------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AssumedData:
    """What `prepare_data` would return for a corpus of `train_tokens` training tokens not yet downloaded
    (`--data-tokens`): the validation split is what `oneday data prepare` would hold out
    (`oneday.data.token_files.val_target`)."""

    vocab_size: int
    train_tokens: int
    val_tokens: int
    source: str = "assumed"
    key: str = "assumed"
    assumed: bool = True

    def bytes_per_token(self) -> float:
        return ASSUMED_BYTES_PER_TOKEN


def parse_token_count(text: str) -> int:
    """"10B" → 10_000_000_000; also K, M, T, plain numbers and 1e10. `UserError` below 1 or unreadable."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbt]?)\s*", str(text), flags=re.IGNORECASE)
    value = None
    if match:
        try:
            value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2).lower()]
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        raise UserError(f"--data-tokens: expected a number of tokens like 10B, 100M or 5e8, got {text!r}")
    if value < 1:
        raise UserError(f"--data-tokens: must be at least 1 token, got {text!r}")
    return int(value)


def assumed_data(train_tokens: int, *, vocab_size: int) -> AssumedData:
    from oneday.data.token_files import val_target

    if vocab_size < 2:
        raise UserError(f"--vocab-size: must be >= 2, got {vocab_size}")
    val = val_target(train_tokens)
    return AssumedData(vocab_size=vocab_size, train_tokens=train_tokens, val_tokens=val)


# --------------------------------------------------------------------------------------------------
# The throughput: assumed per device class, or measured on the real machine and saved
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedThroughput:
    """Measurements saved on a real machine (`load_throughput`): what was timed, on what, against what peak."""

    measurements: tuple[Measurement, ...]
    device_name: str
    peak_flops: float
    path: str


def load_throughput(path: str | os.PathLike[str]) -> SavedThroughput:
    """Read measured shapes from a plan.json (its candidates with `measured`, shapes completed from its model) or
    from a throughput JSON: {"device": NAME, "peak_flops": F, "measurements": [{ModelSpec fields..., "micro_batch",
    "tokens_per_s", "peak_memory_bytes"}]}. Every problem is one `UserError` naming --throughput and the file."""
    where = f"--throughput {path}"
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{where}: cannot read it ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a plan.json or a throughput JSON object")
    try:
        if "candidates" in raw and "hardware" in raw:
            return _from_plan(Plan.from_dict(raw), path=str(path))
        return _from_throughput_json(raw, path=str(path))
    except (PlanError, SpecError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{where}: {str(exc) or exc.__class__.__name__}") from None


def _from_plan(plan: Plan, *, path: str) -> SavedThroughput:
    """The measured rows of a plan's candidates table, their shapes completed from the plan's model (the ladder's
    shapes differ only in depth, width and heads; d_ff follows the width), their tokens/s one GPU's."""
    # a plan for several GPUs lists their aggregate tokens/s: one GPU measured that over ranks × efficiency
    aggregate = plan.train.world_size * plan.prediction.data_parallel_efficiency
    measured = []
    for c in plan.candidates:
        if not c.measured:
            continue
        spec = replace(plan.model, n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head, d_ff=swiglu_ff(c.d_model))
        measured.append(Measurement(spec=spec, micro_batch=c.micro_batch, tokens_per_s=c.tokens_per_s / aggregate,
                                    peak_memory_bytes=c.peak_memory_bytes, seconds_measured=0.0))
    if plan.provenance.what_if is not None:
        raise ValueError("a what-if plan holds no measurements; use a plan made on the real machine")
    if not measured:
        raise ValueError("the plan holds no measured shape (its candidates table has none marked measured)")
    return SavedThroughput(tuple(measured), device_name=plan.hardware.name, peak_flops=plan.hardware.peak_flops,
                           path=path)


def _from_throughput_json(raw: dict[str, Any], *, path: str) -> SavedThroughput:
    device, peak, rows = raw["device"], raw["peak_flops"], raw["measurements"]
    if not isinstance(device, str) or not isinstance(peak, (int, float)) or not peak > 0:
        raise ValueError("expected 'device' (a name) and 'peak_flops' (> 0)")
    if not isinstance(rows, list) or not rows:
        raise ValueError("'measurements' must be a non-empty list")
    fields = set(ModelSpec.__dataclass_fields__)
    measured = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"measurements[{i}]: expected an object")
        spec = ModelSpec(**{k: v for k, v in row.items() if k in fields})
        measured.append(Measurement(spec=spec, micro_batch=int(row["micro_batch"]),
                                    tokens_per_s=float(row["tokens_per_s"]),
                                    peak_memory_bytes=int(row.get("peak_memory_bytes", 0)), seconds_measured=0.0))
    return SavedThroughput(tuple(measured), device_name=device, peak_flops=float(peak), path=path)


def on_device(saved: SavedThroughput, *, name: str, peak: float) -> tuple[tuple[Measurement, ...], str]:
    """The saved measurements as they would run on the GPU `name` of `peak` FLOP/s, and the sentence saying how:
    as measured when it is the same GPU (the table's entry), else at the same MFU (tokens/s × peak ratio)."""
    same = (match_gpu(saved.device_name) or saved.device_name) == (match_gpu(name) or name)
    if same:
        return saved.measurements, f"measured on {saved.device_name} ({saved.path})"
    ratio = peak / saved.peak_flops
    scaled = tuple(replace(m, tokens_per_s=m.tokens_per_s * ratio) for m in saved.measurements)
    return scaled, (
        f"measured on {saved.device_name} ({saved.path}) and scaled to this GPU at the same MFU "
        f"(× {ratio:.3g}, the ratio of the peaks)"
    )


@dataclass(frozen=True)
class AssumedSource:
    """`make.ThroughputSource` for a GPU that is not here: `saved` measurements when given, else the device
    class's MFU model. Choose as the real path does (`settle.choose_with_reserves`, `batch_and_lr`,
    `split_batch`), with the probe's time reserved as `oneday plan` on that machine would spend it."""

    gpu: GpuModel
    saved: SavedThroughput | None = None

    def choose(self, hw: Any, *, setup: Setup, prepared: Any, seq: int, request: PlanRequest, floor: float,
               law: LossLaw, band_law: LossLaw) -> Choice:
        found = peak_flops(hw.name, setup.dtype)
        if found is None:  # every GPU_MODELS entry is in the table (tests/test_what_if.py)
            raise UserError(f"--what-if {self.gpu.key}: no datasheet peak for {setup.dtype}")
        peak, peak_source = found
        ranks, budget_seconds = request.gpus, request.budget_seconds
        ladder = ladder_for(prepared, seq=seq, peak=peak * ranks, budget_seconds=budget_seconds, law=law)
        if self.saved is not None:
            measurements, how = on_device(self.saved, name=hw.name, peak=peak)
            one_gpu: Any = fit_throughput(measurements, peak_flops=peak)
        else:
            mfu_class = MFU_CLASSES[self.gpu.mfu_class]
            one_gpu = assumed_throughput(mfu_class, peak_flops=peak,
                                         max_micro_batch=max(1, CUDA_MAX_TOKENS_PER_MICRO_BATCH // seq))
            how = f"assumed ({mfu_class.name} class)"
        efficiency = DATA_PARALLEL_EFFICIENCY if ranks > 1 else 1.0

        def cadence_for(spec: ModelSpec) -> Any:
            return plan_cadence(spec, setup=setup, budget_seconds=budget_seconds, val_tokens=prepared.val_tokens,
                                forward_tokens_per_s=costs.forward_tokens_per_s(one_gpu.tokens_per_s(spec)),
                                compile_seconds=COMPILE_FALLBACK_SECONDS)

        decision, reserve, cadence = choose_with_reserves(
            ladder, start=ladder[len(ladder) // 2], cadence_for=cadence_for,
            throughput=data_parallel(one_gpu, ranks=ranks, efficiency=efficiency), setup=setup,
            budget_seconds=budget_seconds, probe_seconds=setup.probe_seconds, prepared=prepared, law=law,
            band_law=band_law)
        chosen = decision.chosen()
        cap = max(1, chosen.micro_batch)
        bl = split_batch(batch_and_lr(spec=chosen.spec, tokens=chosen.tokens, max_micro_batch=cap), ranks=ranks,
                         max_micro_batch=cap)
        probe = ThroughputProbe(timings=(), skipped=(), seconds=0.0, device=setup.device, dtype=setup.dtype,
                                compile=setup.compile, threads=setup.threads)
        settled = Settled(ladder=ladder, probe=probe, decision=decision, reserve=reserve, cadence=cadence, bl=bl,
                          probe_seconds=setup.probe_seconds)
        smallest = next(r for r in decision.results if r.fits_memory)
        step_seconds = max(1, smallest.micro_batch) * seq * ranks / smallest.tokens_per_s
        one_mfu = chosen.mfu / efficiency
        note = (
            f"What-if plan for {ranks} × {hw.name} ({self.gpu.key}), hardware it was not made on: nothing was probed "
            f"or measured. Peak {peak / 1e12:,.0f} TFLOP/s per GPU ({setup.dtype}, datasheet), "
            f"{self.gpu.memory_gib:g} GiB each ({self.gpu.memory_source}); throughput {how}: "
            f"MFU {one_mfu:.1%} per GPU assumed for {chosen.label()}; {setup.probe_seconds:.0f} s reserved for "
            "the probe `oneday plan` would run there. `oneday run` refuses this plan on other hardware "
            "unless --force."
        )
        return Choice(peak=peak, peak_source=peak_source, settled=settled, setup=setup, notes=(note,),
                      smallest_step=(smallest.label(), step_seconds), dp_efficiency=efficiency,
                      what_if={"gpu": self.gpu.key, "name": hw.name, "count": ranks,
                               "memory_gib": self.gpu.memory_gib, "throughput": how,
                               "assumed_mfu": one_mfu, "data_parallel_efficiency": efficiency})


def what_if_plan(
    *,
    what_if: str,
    hours: float,
    data: str | None = None,
    data_tokens: int | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 8192,
    text_column: str | None = None,
    config: str | None = None,
    split: str | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    name: str | None = None,
    probe_seconds: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    throughput: str | os.PathLike[str] | None = None,
    gpus: int = 1,
    compile: bool | None = None,
    command: str = "",
    progress: Any = None,
) -> Plan:
    """The plan `oneday plan` would make on `what_if` hardware (module docstring). Exactly one of `data` (prepared
    as usual) and `data_tokens` (assumed). Every problem the user can fix raises `UserError` (one line)."""
    gpu, count = parse_what_if(what_if, gpus=gpus)
    if (data is None) == (data_tokens is None):
        raise UserError("give the data as exactly one of --data or --data-tokens" + (
            " (not both)" if data is not None else ""))
    if data_tokens is not None and (isinstance(data_tokens, bool) or data_tokens < 1):
        raise UserError(f"--data-tokens: must be at least 1 token, got {data_tokens!r}")
    request = PlanRequest(
        budget_seconds=check_hours(hours) * 3600.0, data=data or "", tokenizer=tokenizer, text_column=text_column,
        config=config, split=split, max_tokens=max_tokens,
        seq_len=seq_len, name=name, probe_seconds=probe_seconds, calibration=calibration, command=command, gpus=count,
        compile=compile, law=load_calibration(calibration) if calibration is not None else EPOCH_2024,
    )
    check_request(request, device="cuda")
    saved = load_throughput(throughput) if throughput is not None else None  # before any slow work
    hw = what_if_hardware(gpu, count)
    if data_tokens is not None:
        prepared: Any = assumed_data(int(data_tokens), vocab_size=vocab_size)
    else:
        from oneday.data.prepare import prepare_data

        prepared = prepare_data(data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column,
                                config=config, split=split, max_tokens=max_tokens, cache_dir=cache_dir,
                                progress=progress)
    return plan_for(hardware=hw, data=prepared, throughput=AssumedSource(gpu, saved), request=request)


__all__ = ["ASSUMED_BYTES_PER_TOKEN", "AssumedData", "AssumedSource", "SavedThroughput", "assumed_data",
           "load_throughput", "on_device", "parse_token_count", "parse_what_if", "what_if_hardware", "what_if_plan"]
