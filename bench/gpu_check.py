"""One look at a GPU machine, in under 10 minutes: does oneday train on it as it should, and how fast?

Prints, section by section (each section reports FAILED with its reason and the next one goes on):

1. probe — the hardware probe (`oneday.planner.hardware.probe_hardware`): name, memory, compute capability, the
   datasheet peak (`oneday.devices` table) next to a measured matmul's FLOP/s, NVML's limits and live readings
   (temperature, power draw, clocks, utilization);
2. sdpa — whether scaled-dot-product attention takes the flash kernel with the model as oneday builds it
   (`models.build.build_model`, SDPA attention) under `torch.compile` and bf16 autocast (fp16 with a grad scaler
   on a GPU without bf16): one training step with
   SDPA restricted to FLASH_ATTENTION (`torch.nn.attention.sdpa_kernel`; it raises if the model's call cannot use
   flash, e.g. an explicit mask), and the kernel names the profiler sees in an unrestricted step;
3. nan — a NaN loss injected at two steps (`oneday.runner.faults`, the run's own hook) of a bf16 run through the
   run's step (`runner.step.TrainStep`): the fused AdamW skips them on the device (`found_inf`), with
   `torch.cuda.set_sync_debug_mode("error")` proving no host sync; skipped count, weights and Adam moments
   unchanged across a poisoned step and finite, the optimizer's step count (steps − skipped);
4. shapes — the planner's own probe (`planner.timing.measure_one`: the step the runner executes) on 12×768,
   20×1280 and 24×1536 at seq 1024, compiled: micro-batch, tok/s, MFU against the table's peak (goal printed
   beside it: ≥ 45% for ~124M at seq 1024 bf16 compiled on H100/H200; llm.c reaches ~41%), compile seconds,
   peak memory against the planner's estimate;
5. plan — `oneday plan --compile` (`make_plan(compile=True)`) for a `--minutes` budget (default 4) on the
   prepared data: compiled although the budget is short, so its probe times the compiled step and its reserve
   pays for the compile it measured (a compiled plan probes for at least 90 s and must afford a minute of
   compiling: 3 minutes would leave seconds of training, 4 leave about one minute);
6. chosen — the plan's shape at the plan's micro-batch for a few compiled steps: no OOM, peak memory against the
   limit the planner used;
7. run — `oneday run` (`run_plan`) of that plan end to end, as planned: wall time against the budget, tokens
   planned against achieved (goal: within 2%, issue 17), MFU, final validation loss;
8. parallel — on a machine with two or more GPUs, the data-parallel efficiency `oneday plan --gpus K` measures
   (`planner.parallel`: the plan's step on every GPU alone, then under DDP), against the assumed 90%; skipped on
   one GPU.

Data travels with the check: prepare it on a CPU machine first, then pass the same spec and cache folder:

    mkdir -p .gpucheck && cp /path/to/corpus.txt .gpucheck/corpus.txt
    oneday data prepare --data .gpucheck/corpus.txt --cache-dir .gpucheck/cache
    python bench/gpu_check.py --data .gpucheck/corpus.txt --data-cache .gpucheck/cache

(`--data` must name the same content as when prepared — the cache key hashes the files —; the GPU machine
needs the source files only to compute that key). README.md, "Checking a GPU", says how to carry the data,
the source tree and the missing wheels to a machine that cannot download.

`--dry-run`: the same sections on the CPU with tiny shapes, no compile and a 20-step run, in seconds; what needs
CUDA (flash, the sync check, compile) is skipped and says so. tests/test_gpu_check.py runs it in CI.

Packages: torch, transformers, tokenizers, numpy, xxhash are needed; mlflow, optuna, datasets are not (without
mlflow the run's tracking warns once and metrics.jsonl keeps everything; the check says which are missing).
Runs from a source tree that is not installed too (the package folders are mapped onto `oneday` here).
Exit code 0 when every section passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import oneday  # noqa: E402

if importlib.util.find_spec("oneday.planner") is None:
    # a source tree that is not installed: its top-level folders are oneday's sub-packages (setup.py's ROOTS)
    oneday.__path__.append(str(ROOT))

GOAL_MFU = 0.45
LLM_C_MFU = 0.41
GPU_SHAPES = ((12, 768), (20, 1280), (24, 1536))
DRY_SHAPES = ((2, 64), (2, 128), (3, 128))
SDPA_GPU_SHAPE = (2, 768)  # 12×768's attention (head size 64), 2 layers: two compiles stay short
GPU_SEQ_LEN, DRY_SEQ_LEN = 1024, 64
GPU_VOCAB = 50304  # GPT-2's 50257 padded: 12×768 is then the ~124M of nanoGPT/llm.c
DRY_VOCAB = 512
DRY_RUN_STEPS = 20
NAN_STEPS = (3, 5)  # 1-based, as ONEDAY_INJECT_NAN_AT_STEP counts
NAN_TOTAL_STEPS = 6
OPTIONAL_PACKAGES = {
    "mlflow": "run tracking (the run warns once; metrics.jsonl keeps everything)",
    "optuna": "`oneday tune` (not used here)",
    "datasets": "hub and parquet/jsonl corpora (plain-text corpora need it not)",
}
GiB = 2**30


class Skip(Exception):
    """A section (or part) that cannot run here, with the reason."""


class Report:
    """Prints sections as they go and keeps every figure for `--json`."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}
        self.failed: list[str] = []
        self.current: dict[str, Any] = {}

    @contextlib.contextmanager
    def section(self, name: str, title: str) -> Iterator[dict[str, Any]]:
        print(f"\n== {name}: {title}", flush=True)
        self.current = self.sections.setdefault(name, {"status": "ok"})
        started = time.perf_counter()
        try:
            yield self.current
        except Skip as exc:
            self.current["status"] = "skipped"
            self.current["reason"] = str(exc)
            print(f"   SKIPPED: {exc}", flush=True)
        except Exception as exc:
            self.current["status"] = "failed"
            self.current["reason"] = f"{type(exc).__name__}: {exc}"
            self.failed.append(name)
            print(f"   FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
            traceback.print_exc(limit=-6)  # the innermost frames: where it broke
        self.current["seconds"] = round(time.perf_counter() - started, 2)
        print(f"   ({self.current['seconds']:.1f} s)", flush=True)

    def line(self, key: str, value: Any, text: str | None = None) -> None:
        self.current[key] = value
        print(f"   {key}: {text if text is not None else value}", flush=True)


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GiB:.2f} GiB"


def tflops(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e12:.1f} TFLOP/s"


def run_precision(device: str) -> str:
    """The precision a plan trains in here: bf16 on GPUs that have it, fp16 (with a grad scaler) below compute
    capability 8.0, fp32 on the CPU (`planner.policy.setup_for`)."""
    import torch

    if device != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"


def missing_packages() -> dict[str, str]:
    """The optional packages that cannot be imported here, with what goes without them."""
    missing = {}
    for name, why in OPTIONAL_PACKAGES.items():
        try:
            importlib.import_module(name)
        except ImportError:
            missing[name] = why
    return missing


# ---------------------------------------------------------------------------------------------------------------
# 1. the probe
def nvml_readings() -> dict[str, Any]:
    """Live NVML readings of GPU 0 (temperature, power draw, clocks, utilization); {} without NVML."""
    try:
        import pynvml
    except ImportError:
        return {"nvml": "nvidia-ml-py is not installed"}
    out: dict[str, Any] = {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"nvml": f"NVML unavailable: {exc}"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        queries: dict[str, Callable[[], Any]] = {
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            "power_draw_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "utilization_percent": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
            "persistence_mode": lambda: pynvml.nvmlDeviceGetPersistenceMode(handle),
        }
        for key, query in queries.items():
            try:
                out[key] = query()
            except pynvml.NVMLError as exc:
                out[key] = f"n/a ({exc})"
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return out


def check_probe(report: Report, *, device: str) -> tuple[Any, float]:
    from oneday.devices import measure_peak_flops
    from oneday.planner.hardware import probe_hardware, resolve_peak_flops

    hw = probe_hardware(device)
    dtype = run_precision(hw.device)
    report.line("device", hw.device, f"{hw.device}: {hw.count}× {hw.name}")
    report.line("memory_bytes", hw.memory_bytes, f"{gib(hw.memory_bytes)} total, {gib(hw.free_memory_bytes)} free")
    report.line("compute_capability", hw.compute_capability)
    report.line("bf16_supported", hw.bf16_supported)
    report.line("driver", hw.driver_version, f"driver {hw.driver_version}, CUDA (driver) {hw.cuda_version}, "
                f"torch {hw.torch_version} built for CUDA {hw.torch_cuda_version}")
    report.line("power_limit_w", hw.power_limit_w)
    report.line("sm_clock_max_mhz", hw.sm_clock_max_mhz)
    report.line("sm_count", hw.sm_count)
    peak, source = resolve_peak_flops(hw, dtype, seconds=0.3 if hw.device == "cpu" else 1.0)
    report.line("peak_flops", peak, f"{tflops(peak)} {dtype} ({source})")
    measured = measure_peak_flops("cuda" if hw.device == "cuda" else "cpu", dtype,
                                  seconds=0.3 if hw.device == "cpu" else 2.0)
    report.line("measured_matmul_flops", measured, f"{tflops(measured)} {dtype} ({measured / peak:.0%} of the peak)")
    if hw.device == "cuda":
        for key, value in nvml_readings().items():
            report.line(f"nvml_{key}", value)
    for note in hw.notes:
        print(f"   note: {note}")
    return hw, peak


# ---------------------------------------------------------------------------------------------------------------
# 2. does SDPA take the flash kernel?
def check_sdpa(report: Report, *, device: str, compile_: bool, shape: tuple[int, int], seq_len: int,
               vocab: int) -> None:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from oneday.models.build import build_model, param_groups
    from oneday.models.spec import ModelSpec
    from oneday.planner.ladder import swiglu_ff
    from oneday.runner.step import LMLoss, TrainStep, autocast, grad_scaler, make_optimizer

    layers, width = shape
    spec = ModelSpec(n_layer=layers, d_model=width, n_head=width // 64 if width >= 128 else 2,
                     d_ff=swiglu_ff(width), vocab_size=vocab, seq_len=seq_len)
    model = build_model(spec, seed=0, device=device)
    precision = run_precision(device)
    optimizer = make_optimizer(param_groups(model, spec, lr=1e-4, weight_decay=0.1), lr=1e-4, betas=(0.9, 0.95))
    net = torch.compile(LMLoss(model)) if compile_ else LMLoss(model)
    step = TrainStep(net, params=model.parameters(), optimizer=optimizer, grad_accum=1, grad_clip=1.0,
                     precision=autocast(device, precision), scaler=grad_scaler(device, precision))
    batch = torch.randint(0, vocab, (2, seq_len + 1), device=device)
    report.line("model", spec.label(), f"{spec.label()} seq {seq_len} (head size {spec.head_dim}), {precision}, "
                f"{'torch.compile' if compile_ else 'eager (dry run: no compile)'}")
    if device != "cuda":
        print("   (the flash kernel is CUDA's: on the CPU this shows the path runs, not which GPU kernel it takes)")

    # which kernels the step launches as the run compiles it (no restriction); the profiler may be unavailable
    from torch.profiler import ProfilerActivity, profile

    step(batch)  # compile (and warm up) outside the profiler
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            step(batch)
            if device == "cuda":
                torch.cuda.synchronize()
        names = sorted({e.key for e in prof.key_averages()})
    except Exception as exc:  # CUPTI missing or refused (containers, gVisor)
        names = None
        report.line("profiler", f"unavailable: {exc}")
    if names is not None:
        attention = [n for n in names if any(k in n.lower() for k in ("flash", "fmha", "efficient_attention",
                                                                      "cudnn_attention", "scaled_dot_product"))]
        report.line("attention_kernels", attention, ", ".join(attention) or "none named flash/fmha/efficient/cudnn")
        report.line("flash_in_profile", any("flash" in n.lower() for n in attention))

    # the same step with SDPA allowed nothing but flash: it raises where the model's call cannot use flash
    if compile_:
        torch._dynamo.reset()  # the compiled graph baked in the backend it chose: compile again, restricted
        step.net = torch.compile(LMLoss(model))
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            values = step(batch)
        flash_ok, why = True, "a training step ran with SDPA restricted to FLASH_ATTENTION"
        report.line("loss", float(values[0]), f"{float(values[0]):.3f}")
    except Exception as exc:  # "No available kernel", or dynamo's wrapper of it when compiling
        flash_ok, why = False, f"SDPA restricted to FLASH_ATTENTION failed: {str(exc).splitlines()[0]}"
    report.line("flash_only_step", flash_ok, why)
    if not flash_ok:
        raise RuntimeError("SDPA cannot take the flash kernel with the model as built")


# ---------------------------------------------------------------------------------------------------------------
# 3. a NaN at two steps, skipped on the device
@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def check_nan_skip(report: Report, *, device: str, vocab: int, seq_len: int) -> None:
    import torch

    from oneday.models.build import build_model, param_groups
    from oneday.models.spec import ModelSpec
    from oneday.runner.faults import INJECT_NAN_ENV, PoisonedLoss, nan_steps_from_env
    from oneday.runner.step import LMLoss, TrainStep, autocast, grad_scaler, make_optimizer

    spec = ModelSpec(n_layer=2, d_model=128, n_head=2, d_ff=384, vocab_size=vocab, seq_len=seq_len)
    model = build_model(spec, seed=0, device=device)
    precision = run_precision(device)
    optimizer = make_optimizer(param_groups(model, spec, lr=1e-3, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.95))
    with _env(INJECT_NAN_ENV, ",".join(str(s) for s in NAN_STEPS)):
        poisoned = nan_steps_from_env()
    assert poisoned is not None
    net = PoisonedLoss(LMLoss(model), poisoned, first_step=0, grad_accum=1)
    step = TrainStep(net, params=model.parameters(), optimizer=optimizer, grad_accum=1, grad_clip=1.0,
                     precision=autocast(device, precision), scaler=grad_scaler(device, precision))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (4, seq_len + 1), generator=gen).to(device) for _ in range(NAN_TOTAL_STEPS)]
    params = list(model.parameters())
    report.line("setup", precision, f"{spec.label()} {precision} (eager: the optimizer's skip is the same compiled), "
                f"NaN loss at steps {NAN_STEPS} of {NAN_TOTAL_STEPS} via {INJECT_NAN_ENV}")

    sync_guard: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if device == "cuda":
        @contextlib.contextmanager
        def no_sync() -> Iterator[None]:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sync_guard = no_sync()
    else:
        print("   (host-sync check skipped: torch.cuda.set_sync_debug_mode needs CUDA)")

    results = [step(batches[0])]  # step 1 outside the guard: the first call sets up the optimizer state
    before: dict[int, list[Any]] = {}
    after: dict[int, list[Any]] = {}
    with sync_guard:
        for number in range(2, NAN_TOTAL_STEPS + 1):
            if number in NAN_STEPS:  # copies on the device: no sync
                before[number] = [p.detach().clone() for p in params] + [
                    optimizer.state[p]["exp_avg"].clone() for p in params]
            results.append(step(batches[number - 1]))
            if number in NAN_STEPS:
                after[number] = [p.detach().clone() for p in params] + [
                    optimizer.state[p]["exp_avg"].clone() for p in params]
    report.line("no_host_sync", device == "cuda", "no host sync in steps 2-6 (sync debug mode 'error')"
                if device == "cuda" else "not checked on the CPU")
    rows = torch.stack(results).tolist()
    skipped = [i + 1 for i, row in enumerate(rows) if row[2]]
    report.line("skipped_steps", skipped, f"{len(skipped)} skipped: steps {skipped} (expected {list(NAN_STEPS)})")
    unchanged = {n: all(torch.equal(a, b) for a, b in zip(before[n], after[n], strict=True)) for n in before}
    report.line("unchanged_across_poisoned_step", unchanged,
                ", ".join(f"step {n}: weights and Adam moments {'unchanged' if ok else 'CHANGED'}"
                          for n, ok in unchanged.items()))
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    report.line("weights_finite", finite)
    steps = sorted({int(optimizer.state[p]["step"]) for p in params})
    report.line("optimizer_step", steps, f"{steps} (expected [{NAN_TOTAL_STEPS - len(NAN_STEPS)}]: "
                f"{NAN_TOTAL_STEPS} steps, {len(NAN_STEPS)} skipped)")
    expected = NAN_TOTAL_STEPS - len(NAN_STEPS)
    # fp16: the grad scaler also skips the steps whose scaled gradients overflow while it finds its scale
    steps_ok = steps == [expected] or (precision == "fp16" and len(steps) == 1 and steps[0] <= expected)
    if skipped != list(NAN_STEPS) or not all(unchanged.values()) or not finite or not steps_ok:
        raise RuntimeError("a poisoned step was not skipped cleanly")


# ---------------------------------------------------------------------------------------------------------------
# 4. the probe on three shapes; 6. the chosen shape at its planned micro-batch
def time_one(report: Report, spec: Any, *, device: str, compile_: bool, peak: float, memory_limit: int,
             seconds: float, micro_batch: int | None = None) -> Any:
    from oneday.planner.timing import measure_one

    activation_bytes = 2 if device == "cuda" else 4
    timing = measure_one(spec, device=device, dtype=run_precision(device), compile=compile_,
                         budget_seconds=seconds, memory_limit_bytes=memory_limit, activation_bytes=activation_bytes,
                         peak_flops=peak, reference=(), hard_deadline=None, clock=time.perf_counter,
                         micro_batch=micro_batch)
    m = timing.measurement
    estimate = spec.estimate_train_memory_bytes(micro_batch=m.micro_batch, activation_bytes=activation_bytes)
    goal = f" (goal ≥ {GOAL_MFU:.0%} for ~124M; llm.c ~{LLM_C_MFU:.0%})" if spec.n_layer == 12 and device == "cuda" \
        else ""
    report.line(spec.label(), {
        "params": spec.params_total(), "micro_batch": m.micro_batch, "micro_batch_reason": timing.micro_batch_reason,
        "tokens_per_s": m.tokens_per_s, "mfu": timing.mfu, "compile_seconds": timing.compile_seconds,
        "peak_memory_bytes": m.peak_memory_bytes, "estimate_bytes": estimate, "memory_source": timing.memory_source,
        "memory_limit_bytes": memory_limit, "timed_steps": timing.timed_steps,
    }, f"{spec.params_total() / 1e6:.0f}M params, micro-batch {m.micro_batch} ({timing.micro_batch_reason}), "
       f"{m.tokens_per_s:,.0f} tok/s, MFU {timing.mfu or 0:.1%}{goal}, compile {timing.compile_seconds:.0f} s, "
       f"memory {gib(m.peak_memory_bytes)} vs estimate {gib(estimate)} ({m.peak_memory_bytes / estimate:.2f}×; "
       f"{timing.memory_source.split(':')[0]}), limit {gib(memory_limit)}")
    return timing


def shape_spec(layers: int, width: int, *, vocab: int, seq_len: int) -> Any:
    from oneday.models.spec import ModelSpec
    from oneday.planner.ladder import pad_vocab, swiglu_ff

    return ModelSpec(n_layer=layers, d_model=width, n_head=max(2, width // 64), d_ff=swiglu_ff(width),
                     vocab_size=pad_vocab(vocab), seq_len=seq_len)


# ---------------------------------------------------------------------------------------------------------------
# 5. and 7. plan and run end to end
def plan_e2e(report: Report, args: argparse.Namespace, *, device: str) -> Any:
    from oneday.planner.make import make_plan

    plan = make_plan(hours=args.minutes / 60, data=args.data, vocab_size=args.vocab_size, device=device,
                     cache_dir=args.data_cache, probe_seconds=args.probe_seconds, command="bench/gpu_check.py",
                     compile=True if device == "cuda" else None)
    report.line("plan", plan.name, f"{plan.name}: {plan.model.label()} ({plan.model.params_total() / 1e6:.1f}M), "
                f"micro-batch {plan.train.micro_batch} × accum {plan.train.grad_accum}, "
                f"{plan.train.planned_tokens:,} tokens planned, predicted MFU {plan.prediction.mfu:.1%}, "
                f"{plan.train.precision}, compile {plan.train.compile}")
    report.line("data", plan.data.path, f"{plan.data.source}: {plan.data.train_tokens:,} train + "
                f"{plan.data.val_tokens:,} val tokens in {plan.data.path}")
    for reason in plan.reasons:
        print(f"   reason: {reason}")
    return plan


def run_e2e(report: Report, plan: Any, args: argparse.Namespace, *, device: str, work: Path) -> None:
    from oneday.runner.run import run_plan

    if args.dry_run:  # the plumbing, not the budget: a fixed number of steps keeps the test short under load
        plan = replace(plan, train=replace(plan.train, max_steps=DRY_RUN_STEPS))
        print(f"   dry run: {DRY_RUN_STEPS} steps (train.max_steps), not the whole budget")
    if "mlflow" in missing_packages():
        print("   mlflow is not installed: the run's tracking will warn once; metrics.jsonl keeps everything")
    started = time.monotonic()
    summary = run_plan(plan, run_dir=work / "run", tracking_uri=args.tracking_uri, process_start=started,
                       clock=time.monotonic)
    wall = time.monotonic() - started
    report.line("wall_seconds", wall, f"{wall:.1f} s against a budget of {plan.train.budget_seconds:.0f} s "
                f"({wall / plan.train.budget_seconds:.0%})")
    report.line("tokens", summary.tokens, f"{summary.tokens:,} achieved vs {plan.train.planned_tokens:,} planned "
                f"(ratio {summary.tokens / plan.train.planned_tokens:.3f}; goal within 2%), {summary.steps} steps")
    report.line("mfu", summary.mfu, f"{summary.mfu:.1%} (predicted {plan.prediction.mfu:.1%}), "
                f"{summary.mean_tokens_per_s:,.0f} tok/s")
    report.line("final_val_loss", summary.final_val_loss,
                f"{summary.final_val_loss:.4f} (predicted {plan.prediction.loss:.3f})"
                if summary.final_val_loss is not None else "none")
    report.line("skipped_steps", summary.skipped_steps)
    report.line("tracking_error", summary.tracking_error)
    if not summary.finished or summary.final_val_loss is None or not math.isfinite(summary.final_val_loss):
        raise RuntimeError("the run did not finish with a finite validation loss")


# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no compile: seconds")
    parser.add_argument("--data", default="builtin:pydoc", help="the data spec, as given to `oneday data prepare`")
    parser.add_argument("--data-cache", default=None,
                        help="the cache folder `oneday data prepare --cache-dir` wrote (prepared beforehand)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="as given to `oneday data prepare`")
    parser.add_argument("--minutes", type=float, default=None, help="the end-to-end budget (4; dry run 0.5)")
    parser.add_argument("--probe-seconds", type=float, default=None, help="the plan's probe time (planner's rule)")
    parser.add_argument("--shape-seconds", type=float, default=None, help="time slice per shape (20; dry run 1)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of the run (default: sqlite in --work-dir)")
    parser.add_argument("--work-dir", default=None, help="where the run folder goes (default: a temporary folder)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: probe,sdpa,nan,shapes,plan,"
                                                   "chosen,run")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = 0.5 if args.dry_run else 4.0
    if args.shape_seconds is None:
        args.shape_seconds = 1.0 if args.dry_run else 20.0
    if args.probe_seconds is None and args.dry_run:
        args.probe_seconds = 2.0
    return args


def check_parallel(report: Report, plan: Any, *, ranks: int, device: str, compile_: bool) -> None:
    """The plan's step on `ranks` GPUs (gloo ranks on the CPU), alone and under DDP
    (`planner.parallel.measure_data_parallel`, what `oneday plan --gpus K` runs), against the assumed 90%."""
    from oneday.planner.parallel import measure_data_parallel
    from oneday.planner.throughput import DATA_PARALLEL_EFFICIENCY

    t = plan.train
    timing = measure_data_parallel(plan.model, ranks=ranks, micro_batch=t.micro_batch, grad_accum=t.grad_accum,
                                   device=device, dtype=t.precision, compile=compile_,
                                   threads=1 if device == "cpu" else None, tokens=None, timeout_seconds=600.0)
    report.line("ranks", ranks, f"{ranks} ({timing.backend}), micro-batch {t.micro_batch} × grad_accum "
                f"{t.grad_accum} of {plan.model.label()}")
    report.line("alone_seconds", timing.alone_seconds, f"{timing.alone_seconds:.4f} s a step on each, alone")
    report.line("together_seconds", timing.together_seconds, f"{timing.together_seconds:.4f} s under DDP")
    report.line("efficiency", timing.efficiency(),
                f"{timing.efficiency():.1%} (assumed without a measurement: {DATA_PARALLEL_EFFICIENCY:.0%})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    report = Report()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    import torch

    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    if args.dry_run:
        torch.set_num_threads(1)
        print("DRY RUN on the CPU: tiny shapes, no torch.compile; the flash kernel, the host-sync check and "
              "compile times need CUDA and are skipped or shown on the CPU path only.")
    elif not torch.cuda.is_available():
        print("no CUDA GPU here: use --dry-run for the CPU path", file=sys.stderr)
        return 2
    missing = missing_packages()
    for name, why in missing.items():
        print(f"package {name} is missing: {why}")
    work_ctx = contextlib.nullcontext(args.work_dir) if args.work_dir else tempfile.TemporaryDirectory(
        prefix="gpu-check-")
    with work_ctx as work_name:
        work = Path(work_name)
        if args.tracking_uri is None:
            args.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
        seq_len = DRY_SEQ_LEN if args.dry_run else GPU_SEQ_LEN
        vocab = DRY_VOCAB if args.dry_run else GPU_VOCAB
        shapes = DRY_SHAPES if args.dry_run else GPU_SHAPES
        hw, peak, limit = None, None, None

        def run_section(name: str, title: str, body: Callable[[], Any]) -> Any:
            if name in skip:
                print(f"\n== {name}: skipped (--skip)")
                return None
            with report.section(name, title):
                return body()
            return None

        found = run_section("probe", "the hardware probe", lambda: check_probe(report, device=device))
        if found is not None:
            from oneday.planner.policy import setup_for

            hw, peak = found
            limit = setup_for(hw, budget_seconds=args.minutes * 60, probe_seconds=1.0).memory_limit_bytes
        run_section("sdpa", "does SDPA take the flash kernel (compiled, as built)?",
                    lambda: check_sdpa(report, device=device, compile_=cuda, shape=shapes[0] if args.dry_run else
                                       SDPA_GPU_SHAPE, seq_len=seq_len,
                                       vocab=vocab))
        run_section("nan", "a NaN at two steps is skipped on the device",
                    lambda: check_nan_skip(report, device=device, vocab=vocab, seq_len=seq_len))

        def shapes_body() -> None:
            if peak is None or limit is None:
                raise Skip("the probe failed")
            for layers, width in shapes:
                time_one(report, shape_spec(layers, width, vocab=vocab, seq_len=seq_len), device=device,
                         compile_=cuda, peak=peak, memory_limit=limit, seconds=args.shape_seconds)

        run_section("shapes", f"the planner's probe on {len(shapes)} shapes at seq {seq_len}"
                    f"{', compiled' if cuda else ''}", shapes_body)
        plan = run_section("plan", f"`oneday plan` for {args.minutes:g} min on {args.data}",
                           lambda: plan_e2e(report, args, device=device))

        def chosen_body() -> None:
            if plan is None or peak is None or limit is None:
                raise Skip("no plan or no probe")
            timing = time_one(report, plan.model, device=device, compile_=cuda, peak=peak, memory_limit=limit,
                              seconds=args.shape_seconds, micro_batch=plan.train.micro_batch)
            if timing.measurement.micro_batch != plan.train.micro_batch:
                raise RuntimeError(f"the planned micro-batch {plan.train.micro_batch} ran out of memory "
                                   f"({timing.micro_batch_reason})")
            if cuda and timing.measurement.peak_memory_bytes > limit:
                raise RuntimeError("peak memory above the planner's limit")

        run_section("chosen", "the chosen shape at its planned micro-batch", chosen_body)

        def run_body() -> None:
            if plan is None:
                raise Skip("no plan")
            run_e2e(report, plan, args, device=device, work=work)

        run_section("run", "`oneday run` end to end", run_body)

        def parallel_body() -> None:
            if plan is None:
                raise Skip("no plan")
            ranks = 2 if args.dry_run else min(8, torch.cuda.device_count())
            if ranks < 2:
                raise Skip("one GPU here: the data-parallel efficiency needs two or more")
            check_parallel(report, plan, ranks=ranks, device=device, compile_=cuda)

        run_section("parallel", "the data-parallel efficiency `oneday plan --gpus K` measures", parallel_body)

    total = time.perf_counter() - started
    print(f"\n{'DRY RUN ' if args.dry_run else ''}done in {total:.0f} s: "
          f"{'all sections passed' if not report.failed else 'FAILED: ' + ', '.join(report.failed)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dry_run": args.dry_run, "seconds": total,
                                               "missing_packages": missing, "sections": report.sections},
                                              indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
