"""What machine are we on, and how many FLOP/s can it do at most?

`probe_hardware` asks NVML (the `pynvml` module of nvidia-ml-py) about NVIDIA GPUs and torch about
what it can drive; without a GPU or driver it describes the CPU. `peak_flops` reads the vendors'
datasheets (dense, no sparsity) from `PEAK_FLOPS_TABLE`; `measure_peak_flops` times a large matmul
for devices the table does not know (CPUs included). MFU is always computed against the figure for
the device and dtype in use, never a single hard-coded GPU (nanoGPT issues #182/#464, DESIGN §3).

torch is imported inside the functions that need it: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from oneday.errors import UserError

log = logging.getLogger(__name__)

__all__ = [
    "PEAK_FLOPS_TABLE",
    "GpuPeak",
    "HardwareProbe",
    "match_gpu",
    "measure_peak_flops",
    "normalize_dtype",
    "peak_flops",
    "probe_hardware",
    "resolve_peak_flops",
]

Device = Literal["cuda", "cpu"]
T = TypeVar("T")

# CPU flags that matter for matmul speed (x86 from "flags", Arm from "Features" in /proc/cpuinfo).
CPU_FLAGS_OF_INTEREST = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


@dataclass(frozen=True)
class HardwareProbe:
    """What `probe_hardware` found. Memory in bytes, power in watts, clocks in MHz.

    For a CUDA probe the GPU fields describe the first visible GPU (`count` says how many there are);
    the CPU fields always describe the host. `notes` are plain sentences for the user.
    """

    device: Device
    name: str
    count: int
    memory_bytes: int
    free_memory_bytes: int
    power_limit_w: float | None
    sm_clock_max_mhz: int | None
    driver_version: str | None
    cuda_version: str | None
    """CUDA version the driver supports (NVML); `torch_cuda_version` is the one torch was built with."""
    compute_capability: str | None
    bf16_supported: bool
    torch_version: str | None
    cpu_cores: int
    torch_threads: int | None
    cpu_flags: tuple[str, ...]
    notes: tuple[str, ...]
    torch_cuda_version: str | None = None
    torch_cuda_available: bool = False
    cpu_name: str | None = None

    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30


# --------------------------------------------------------------------------------------------------
# Peak FLOP/s table (dense; no 2:4 sparsity), per device
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peak FLOP/s of one GPU model by dtype (dense tensor-core figures for bf16/fp16/tf32,
    CUDA-core figure for fp32). `pattern` is matched against the NVML name, case-insensitively."""

    key: str
    pattern: str
    flops: dict[str, float]
    source: str


_H100_SXM = "NVIDIA H100 Tensor Core GPU datasheet (SXM5): dense = half the with-sparsity figures"
_H100_NVL = "NVIDIA H100 NVL datasheet (2024, per GPU): dense = half the with-sparsity figures"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet: dense = half the with-sparsity figures"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (40GB/80GB, SXM4 and PCIe): dense figures"
_ADA_DC = "NVIDIA {} datasheet: dense = half the with-sparsity figures"
_GEFORCE = (
    "NVIDIA {} whitepaper, peak FP16/BF16 tensor TFLOPS with FP32 accumulate, dense "
    "(GeForce cards run FP32-accumulate at half the FP16-accumulate rate)"
)

# Order matters: the first matching pattern wins (H100 NVL/PCIe before H100 SXM, L40S before L40
# before L4, A100 before A10G before A10, ...).
PEAK_FLOPS_TABLE: tuple[GpuPeak, ...] = (
    GpuPeak("B200", r"\bB200\b", {"bf16": 2.25e15, "fp16": 2.25e15, "tf32": 1.1e15, "fp32": 75e12},
            "NVIDIA HGX B200 datasheet (per GPU): dense = half the with-sparsity figures"),
    GpuPeak("GH200", r"\bGH200\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
            "NVIDIA GH200 Grace Hopper datasheet (H100 GPU): dense = half the with-sparsity figures"),
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
            _H200 + " (H200 NVL column)"),
    GpuPeak("H200 SXM", r"\bH200\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12},
            _H200 + " (H200 SXM column)"),
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
            _H100_NVL),
    GpuPeak("H100 PCIe", r"\bH100\b.*(\bPCIe\b|HBM2e)",
            {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
            "NVIDIA H100 Tensor Core GPU datasheet (PCIe): dense = half the with-sparsity figures"),
    GpuPeak("H100 SXM", r"\bH100\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
            _H100_SXM),
    GpuPeak("A100", r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, _A100),
    GpuPeak("L40S", r"\bL40S\b", {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
            _ADA_DC.format("L40S")),
    GpuPeak("L40", r"\bL40\b", {"bf16": 181.05e12, "fp16": 181.05e12, "tf32": 90.5e12, "fp32": 90.5e12},
            _ADA_DC.format("L40")),
    GpuPeak("L4", r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
            _ADA_DC.format("L4")),
    GpuPeak("A10G", r"\bA10G\b", {"bf16": 70e12, "fp16": 70e12},
            "AWS EC2 G5 (A10G) tensor figure as published by AWS; NVIDIA publishes no A10G datasheet "
            "(its tensor rate is about half the A10's); tf32/fp32 are measured"),
    GpuPeak("A10", r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
            "NVIDIA A10 Tensor Core GPU datasheet: dense = half the with-sparsity figures"),
    GpuPeak("RTX 6000 Ada", r"\bRTX 6000 Ada\b", {"bf16": 364.2e12, "fp16": 364.2e12, "tf32": 182.1e12,
            "fp32": 91.1e12}, "NVIDIA RTX 6000 Ada Generation datasheet: dense = half the with-sparsity figures"),
    GpuPeak("RTX A6000", r"\bRTX A6000\b", {"bf16": 154.8e12, "fp16": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12},
            "NVIDIA RTX A6000 datasheet (309.7 TFLOPS tensor with sparsity): dense = half"),
    GpuPeak("RTX 4090", r"\bRTX 4090\b(?!.*\bLaptop\b)(?!\s*D\b)",
            {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
            _GEFORCE.format("Ada Lovelace (AD102) architecture, GeForce RTX 4090")),
    GpuPeak("RTX 3090", r"\bRTX 3090\b(?!\s*Ti\b)(?!.*\bLaptop\b)",
            {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
            _GEFORCE.format("Ampere GA102, GeForce RTX 3090")),
    GpuPeak("V100 SXM2", r"\bV100\b.*\bSXM", {"fp16": 125e12, "fp32": 15.7e12},
            "NVIDIA Tesla V100 datasheet (SXM2): tensor FP16 mixed precision; no bf16"),
    GpuPeak("V100 PCIe", r"\bV100\b", {"fp16": 112e12, "fp32": 14e12},
            "NVIDIA Tesla V100 datasheet (PCIe): tensor FP16 mixed precision; no bf16"),
    GpuPeak("T4", r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12},
            "NVIDIA T4 datasheet: FP16/FP32 mixed-precision tensor; no bf16"),
)

_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "tf32": "tf32",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}


def normalize_dtype(dtype: str) -> str:
    """'bfloat16'/'bf16' → 'bf16', 'float16' → 'fp16', 'float32' → 'fp32', 'tf32' → 'tf32'."""
    key = _DTYPE_ALIASES.get(str(dtype).strip().lower())
    if key is None:
        raise UserError(f"dtype {dtype!r}: expected one of bf16, fp16, tf32, fp32")
    return key


def match_gpu(name: str) -> GpuPeak | None:
    """The table entry for an NVML device name ("NVIDIA H100 80GB HBM3" → H100 SXM), or None."""
    for entry in PEAK_FLOPS_TABLE:
        if re.search(entry.pattern, name, flags=re.IGNORECASE):
            return entry
    return None


def peak_flops(name: str, dtype: str) -> tuple[float, str] | None:
    """Datasheet peak dense FLOP/s of one device of this name for this dtype, with its source.

    None when the device is unknown or the dtype has no tensor/CUDA-core figure (e.g. bf16 on V100/T4).
    """
    entry = match_gpu(name)
    if entry is None:
        return None
    flops = entry.flops.get(normalize_dtype(dtype))
    if flops is None:
        return None
    return flops, f"{entry.key} ({normalize_dtype(dtype)}, dense): {entry.source}"


# --------------------------------------------------------------------------------------------------
# Measurement fallback
# --------------------------------------------------------------------------------------------------
def measure_peak_flops(device: str, dtype: str, *, seconds: float = 1.0, size: int | None = None) -> float:
    """Best achieved FLOP/s of a square matmul (2·n³ FLOPs each), timed for about `seconds`.

    CPU: n = 1024 by default (fp32 unless told otherwise), best single matmul over the window.
    CUDA: n = 8192 in the dtype, timed in batches of 10 between synchronizations; tf32 enables
    TF32 matmuls for the measurement only. At least three timed repetitions after one warm-up.
    This is an achievable rather than a datasheet peak, so MFU against it reads high.
    """
    import torch

    key = normalize_dtype(dtype)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch cannot use a CUDA GPU here")
        n = size or 8192
        inner = 10
        prev_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = key == "tf32"

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        n = size or 1024
        inner = 1
        prev_tf32 = None

        def sync() -> None:
            pass

    try:
        a = torch.randn(n, n, device=device, dtype=torch_dtype[key])
        b = torch.randn(n, n, device=device, dtype=torch_dtype[key])
        torch.matmul(a, b)  # warm-up
        sync()
        best = float("inf")
        reps = 0
        deadline = time.perf_counter() + seconds
        while reps < 3 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            for _ in range(inner):
                torch.matmul(a, b)
            sync()
            best = min(best, (time.perf_counter() - t0) / inner)
            reps += 1
            if reps >= 1000:
                break
    finally:
        if prev_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    flops = 2.0 * n**3 / best
    log.debug("measured %.3g FLOP/s on %s (%s, n=%d, %d reps)", flops, device, key, n, reps)
    return flops


def resolve_peak_flops(probe: HardwareProbe, dtype: str, *, seconds: float = 1.0) -> tuple[float, str]:
    """Peak FLOP/s of one device of `probe` for `dtype`, with where the number came from.

    GPUs: the datasheet table (`peak_flops`), else a timed matmul. CPUs: always a timed matmul (CPU
    datasheets rarely give a usable dense-matmul peak). The figure is per device; a run on `count`
    GPUs has `count` times as much.
    """
    key = normalize_dtype(dtype)
    if probe.device == "cuda":
        found = peak_flops(probe.name, key)
        if found is not None:
            return found
        flops = measure_peak_flops("cuda", key, seconds=seconds)
        return flops, f"measured: 8192² {key} matmul on {probe.name} (not in the datasheet table)"
    flops = measure_peak_flops("cpu", key, seconds=seconds)
    return flops, f"measured: 1024² {key} matmul on {probe.name} ({probe.torch_threads} torch threads)"


# --------------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------------
def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _cpu_info() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, flags of interest) from /proc/cpuinfo, else from `platform`."""
    text = _read_text("/proc/cpuinfo") or ""
    name = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and name is None and value.strip():
            name = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return name, tuple(f for f in CPU_FLAGS_OF_INTEREST if f in flags)


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes: /proc/meminfo, capped by a cgroup v2/v1 memory limit if lower."""
    total = available = 0
    text = _read_text("/proc/meminfo")
    if text:
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0]) * 1024  # kB
        total = fields.get("MemTotal", 0)
        available = fields.get("MemAvailable", fields.get("MemFree", 0))
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        raw = (_read_text(path) or "").strip()
        if raw.isdigit() and 0 < int(raw) < total:
            limit = int(raw)
            used_raw = (
                _read_text("/sys/fs/cgroup/memory.current")
                or _read_text("/sys/fs/cgroup/memory/memory.usage_in_bytes")
                or ""
            ).strip()
            used = int(used_raw) if used_raw.isdigit() else 0
            total, available = limit, min(available, max(0, limit - used))
            break
    return total, available


def _torch_info() -> dict[str, Any]:
    """torch version, threads and CUDA facts, each None when torch (or the query) is unavailable."""
    info: dict[str, Any] = {
        "torch_version": None,
        "torch_threads": None,
        "torch_cuda_version": None,
        "cuda_available": False,
        "cuda_count": None,
        "capability": None,
        "bf16": None,
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch_version"] = str(torch.__version__)
    info["torch_threads"] = torch.get_num_threads()
    info["torch_cuda_version"] = torch.version.cuda
    try:
        info["cuda_available"] = bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA install must not stop a probe
        info["cuda_available"] = False
    if info["cuda_available"]:
        try:
            info["cuda_count"] = torch.cuda.device_count()
            major, minor = torch.cuda.get_device_capability(0)
            info["capability"] = f"{major}.{minor}"
            info["bf16"] = bool(torch.cuda.is_bf16_supported())
        except Exception as exc:
            log.debug("torch CUDA query failed: %s", exc)
    return info


def _nvml_try(fn: Callable[..., T], *args: Any) -> T | None:
    """Call an NVML query; None when the device or driver does not support it."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(pynvml: Any) -> Any:
    """The handle of the first GPU torch would use: honours CUDA_VISIBLE_DEVICES (index or UUID)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.isdigit():
        handle = _nvml_try(pynvml.nvmlDeviceGetHandleByIndex, int(visible))
        if handle is not None:
            return handle
    elif visible.startswith(("GPU-", "MIG-")):
        handle = _nvml_try(pynvml.nvmlDeviceGetHandleByUUID, visible)
        if handle is not None:
            return handle
    return pynvml.nvmlDeviceGetHandleByIndex(0)


def _nvml_probe() -> tuple[dict[str, Any] | None, str]:
    """GPU facts from NVML, or (None, reason) when there is no driver or no GPU."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count <= 0:
            return None, "the NVIDIA driver reports 0 GPUs"
        handle = _nvml_handle(pynvml)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        power_mw = _nvml_try(pynvml.nvmlDeviceGetPowerManagementLimit, handle)
        clock = _nvml_try(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM)
        driver = _nvml_try(pynvml.nvmlSystemGetDriverVersion)
        cuda = _nvml_try(pynvml.nvmlSystemGetCudaDriverVersion)
        cc = _nvml_try(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
        facts = {
            "count": int(count),
            "name": _text(pynvml.nvmlDeviceGetName(handle)),
            "memory": int(mem.total),
            "free": int(mem.free),
            "power_w": power_mw / 1000.0 if power_mw else None,
            "clock": int(clock) if clock else None,
            "driver": _text(driver) if driver is not None else None,
            "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "capability": f"{cc[0]}.{cc[1]}" if cc else None,
        }
        return facts, ""
    except pynvml.NVMLError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _cpu_probe(notes: list[str], torch_info: dict[str, Any]) -> HardwareProbe:
    cpu_name, flags = _cpu_info()
    total, available = _host_memory()
    cores = _cpu_cores()
    native_bf16 = bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))
    if not native_bf16:
        notes.append("This CPU has no native bf16 matmul (no AVX-512 BF16 or AMX): fp32 is the fast dtype here.")
    return HardwareProbe(
        device="cpu",
        name=cpu_name,
        count=1,
        memory_bytes=total,
        free_memory_bytes=available,
        power_limit_w=None,
        sm_clock_max_mhz=None,
        driver_version=None,
        cuda_version=None,
        compute_capability=None,
        bf16_supported=native_bf16,
        torch_version=torch_info["torch_version"],
        cpu_cores=cores,
        torch_threads=torch_info["torch_threads"],
        cpu_flags=flags,
        notes=tuple(notes),
        torch_cuda_version=torch_info["torch_cuda_version"],
        torch_cuda_available=bool(torch_info["cuda_available"]),
        cpu_name=cpu_name,
    )


def probe_hardware(device: str = "auto") -> HardwareProbe:
    """Describe the GPU (through NVML, then torch) or, without one, the CPU.

    device="auto": the GPU when NVML finds one and torch can drive it, else the CPU (with a note
    saying why). device="cuda": the GPU; UserError when there is none; if torch cannot drive it the
    probe still describes it and a note says so (`torch_cuda_available` is False). device="cpu":
    the CPU, whatever else is present.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device}: expected auto, cuda or cpu")
    torch_info = _torch_info()
    notes: list[str] = []
    if device == "cpu":
        notes.append("Planning for the CPU (--device cpu).")
        return _cpu_probe(notes, torch_info)

    gpu, reason = _nvml_probe()
    if gpu is None:
        if device == "cuda":
            raise UserError(f"--device cuda: no NVIDIA GPU found ({reason})")
        notes.append(f"No NVIDIA GPU found ({reason}): planning for the CPU.")
        return _cpu_probe(notes, torch_info)

    if not torch_info["cuda_available"]:
        why = (
            f"torch {torch_info['torch_version']} is a CPU-only build"
            if torch_info["torch_version"] and not torch_info["torch_cuda_version"]
            else "torch cannot use it"
        )
        if device == "auto":
            notes.append(
                f"Found {gpu['count']}× {gpu['name']}, but {why}: planning for the CPU "
                "(install a CUDA build of torch to use the GPU)."
            )
            return _cpu_probe(notes, torch_info)
        notes.append(f"Found {gpu['count']}× {gpu['name']}, but {why}: training on it will fail.")

    capability = gpu["capability"] or torch_info["capability"]
    bf16 = torch_info["bf16"]
    if bf16 is None:  # bf16 tensor cores arrived with Ampere (compute capability 8.0)
        bf16 = capability is not None and float(capability) >= 8.0
    count = gpu["count"]
    if torch_info["cuda_count"] is not None and torch_info["cuda_count"] != count:
        notes.append(
            f"NVML sees {count} GPUs, torch sees {torch_info['cuda_count']} (CUDA_VISIBLE_DEVICES): "
            f"using torch's count."
        )
        count = torch_info["cuda_count"]
    if not bf16:
        notes.append(f"{gpu['name']} has no bf16 tensor cores: use fp16 with loss scaling, or fp32.")
    if match_gpu(gpu["name"]) is None:
        notes.append(f"{gpu['name']} is not in the peak FLOP/s table: its peak will be measured.")
    cpu_name, flags = _cpu_info()
    return HardwareProbe(
        device="cuda",
        name=gpu["name"],
        count=count,
        memory_bytes=gpu["memory"],
        free_memory_bytes=gpu["free"],
        power_limit_w=gpu["power_w"],
        sm_clock_max_mhz=gpu["clock"],
        driver_version=gpu["driver"],
        cuda_version=gpu["cuda"],
        compute_capability=capability,
        bf16_supported=bool(bf16),
        torch_version=torch_info["torch_version"],
        cpu_cores=_cpu_cores(),
        torch_threads=torch_info["torch_threads"],
        cpu_flags=flags,
        notes=tuple(notes),
        torch_cuda_version=torch_info["torch_cuda_version"],
        torch_cuda_available=bool(torch_info["cuda_available"]),
        cpu_name=cpu_name,
    )
