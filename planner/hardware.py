"""What machine are we on, and how many FLOP/s can it do at most?

`probe_hardware` asks NVML (the `pynvml` module of nvidia-ml-py) about NVIDIA GPUs and torch about
what it can drive; without a GPU or driver it describes the CPU. `resolve_peak_flops` takes the device's
peak for the run's dtype from the datasheet table in `oneday.devices`, or times a matmul where the table
has no figure (CPUs included).

torch is imported inside the functions that need it: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from oneday.devices import host_memory, match_gpu, measure_peak_flops, normalize_dtype, peak_flops, read_text
from oneday.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["HardwareProbe", "probe_hardware", "resolve_peak_flops"]

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
def _cpu_info() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, flags of interest) from /proc/cpuinfo, else from `platform`."""
    text = read_text("/proc/cpuinfo") or ""
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


def _host(torch_info: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The fields every probe has, whatever the device: the host CPU and what torch is."""
    cpu_name, flags = _cpu_info()
    return dict(torch_version=torch_info["torch_version"], cpu_cores=_cpu_cores(),
                torch_threads=torch_info["torch_threads"], cpu_flags=flags, notes=tuple(notes),
                torch_cuda_version=torch_info["torch_cuda_version"],
                torch_cuda_available=bool(torch_info["cuda_available"]), cpu_name=cpu_name)


def _cpu_probe(notes: list[str], torch_info: dict[str, Any]) -> HardwareProbe:
    cpu_name, flags = _cpu_info()
    total, available = host_memory()
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
        **_host(torch_info, notes),
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
        **_host(torch_info, notes),
    )
