"""What machine are we on, and how many FLOP/s can it do at most?

`probe_hardware` asks torch which GPU it trains on and NVML (the `pynvml` module of nvidia-ml-py) about
that GPU, matched by UUID (CUDA's device order can differ from NVML's); where NVML is missing or cannot
answer (containers, MIG slices) torch's own facts describe the GPU. Without a GPU it describes the CPU.
`resolve_peak_flops` takes the device's peak for the run's dtype from the datasheet table in
`oneday.devices` (scaled to a MIG slice's share of the SMs), or times a matmul where the table has no
figure (CPUs included).

torch is imported inside the functions that need it: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from oneday.devices import (
    host_memory,
    match_gpu,
    measure_peak_flops,
    mig_peak_flops,
    normalize_dtype,
    peak_flops,
    read_text,
)
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

    For a CUDA probe the GPU fields describe the GPU torch trains on (CUDA device 0; `count` says how many
    there are); the CPU fields always describe the host. `notes` are plain sentences for the user.
    `sm_count` is that GPU's number of streaming multiprocessors (torch's figure: a MIG slice's own), `mig`
    whether it is a MIG slice of a larger GPU.
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
    sm_count: int | None = None
    mig: bool = False


def resolve_peak_flops(probe: HardwareProbe, dtype: str, *, seconds: float = 1.0) -> tuple[float, str]:
    """Peak FLOP/s of one device of `probe` for `dtype`, with where the number came from.

    GPUs: the datasheet table (`peak_flops`; for a MIG slice the whole GPU's figure × its share of the SMs,
    `mig_peak_flops`), else a timed matmul. CPUs: always a timed matmul (CPU datasheets rarely give a usable
    dense-matmul peak). The figure is per device; a run on `count` GPUs has `count` times as much.
    """
    key = normalize_dtype(dtype)
    if probe.device == "cuda":
        if probe.mig:
            found = mig_peak_flops(probe.name, key, slice_sm_count=probe.sm_count)
            if found is not None:
                return found
            flops = measure_peak_flops("cuda", key, seconds=seconds)
            return flops, (
                f"measured: 8192² {key} matmul on the MIG slice {probe.name} (the datasheet gives the whole GPU's "
                f"peak, and the slice's or the whole GPU's SM count is unknown)"
            )
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


@dataclass(frozen=True)
class TorchGpu:
    """What torch reports about the GPU it trains on (CUDA device 0, after CUDA_VISIBLE_DEVICES)."""

    name: str
    memory_bytes: int
    sm_count: int | None
    capability: tuple[int, int] | None
    uuid: str | None
    """CUDA's UUID, without NVML's "GPU-"/"MIG-" prefix."""


def _torch_info() -> dict[str, Any]:
    """torch version, threads and CUDA facts (`gpu`: a `TorchGpu`), each None when torch (or the query) is
    unavailable."""
    info: dict[str, Any] = {
        "torch_version": None,
        "torch_threads": None,
        "torch_cuda_version": None,
        "cuda_available": False,
        "cuda_count": None,
        "gpu": None,
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
            props = torch.cuda.get_device_properties(0)
            uuid = getattr(props, "uuid", None)
            info["gpu"] = TorchGpu(
                name=str(props.name),
                memory_bytes=int(props.total_memory),
                sm_count=int(props.multi_processor_count) if getattr(props, "multi_processor_count", 0) else None,
                capability=(int(props.major), int(props.minor)),
                uuid=_uuid_key(str(uuid)) if uuid is not None and str(uuid) else None,
            )
        except Exception as exc:
            log.debug("torch CUDA query failed: %s", exc)
    return info


def _torch_memory() -> tuple[int, int] | None:
    """(free, total) bytes of torch's GPU from `torch.cuda.mem_get_info`, or None. Asked only when NVML cannot
    tell (or tells about the whole GPU of a MIG slice): the call creates a CUDA context."""
    try:
        import torch

        free, total = torch.cuda.mem_get_info(0)
    except Exception as exc:
        log.debug("torch.cuda.mem_get_info failed: %s", exc)
        return None
    return int(free), int(total)


def _uuid_key(uuid: str) -> str:
    """A GPU UUID as both NVML ("GPU-1a2b…", "MIG-…") and CUDA ("1a2b…") spell it, reduced to the bare form."""
    key = uuid.strip().lower()
    for prefix in ("mig-", "gpu-"):
        key = key.removeprefix(prefix)
    return key


def _nvml_try(fn: Callable[..., T], *args: Any) -> T | None:
    """Call an NVML query; None when the device or driver does not support it."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def _nvml_optional(pynvml: Any, name: str, *args: Any) -> Any:
    """An NVML query that older nvidia-ml-py releases lack: None when missing or unsupported."""
    fn = getattr(pynvml, name, None)
    return None if fn is None else _nvml_try(fn, *args)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_device() -> str:
    """The first entry of CUDA_VISIBLE_DEVICES: the GPU torch sees as device 0 (index or UUID), or ""."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()


def _nvml_handle(pynvml: Any, *, count: int, torch_uuid: str | None) -> tuple[Any, bool]:
    """The NVML handle of the GPU torch trains on, and whether it was matched by UUID.

    CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML by PCI bus: the same index
    can name different GPUs, a UUID cannot. Without torch's UUID (or when NVML knows none like it) the handle
    comes from CUDA_VISIBLE_DEVICES (index or UUID), else index 0.
    """
    if torch_uuid:
        for index in range(count):
            handle = _nvml_try(pynvml.nvmlDeviceGetHandleByIndex, index)
            uuid = None if handle is None else _nvml_optional(pynvml, "nvmlDeviceGetUUID", handle)
            if uuid is not None and _uuid_key(_text(uuid)) == torch_uuid:
                return handle, True
        # a MIG slice has its own UUID, which the loop over whole GPUs cannot meet
        handle = _nvml_try(pynvml.nvmlDeviceGetHandleByUUID, f"MIG-{torch_uuid}")
        if handle is not None:
            return handle, True
    visible = _visible_device()
    if visible.isdigit():
        handle = _nvml_try(pynvml.nvmlDeviceGetHandleByIndex, int(visible))
        if handle is not None:
            return handle, False
    elif visible.startswith(("GPU-", "MIG-")):
        handle = _nvml_try(pynvml.nvmlDeviceGetHandleByUUID, visible)
        if handle is not None:
            return handle, False
    return pynvml.nvmlDeviceGetHandleByIndex(0), False


def _nvml_probe(torch_uuid: str | None) -> tuple[dict[str, Any] | None, str]:
    """GPU facts from NVML, or (None, reason) when there is no driver or no GPU. A fact NVML does not
    support on this device (a container, a MIG slice) is None."""
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
        handle, by_uuid = _nvml_handle(pynvml, count=int(count), torch_uuid=torch_uuid)
        name = _nvml_try(pynvml.nvmlDeviceGetName, handle)
        mem = _nvml_try(pynvml.nvmlDeviceGetMemoryInfo, handle)
        power_mw = _nvml_try(pynvml.nvmlDeviceGetPowerManagementLimit, handle)
        clock = _nvml_try(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM)
        driver = _nvml_try(pynvml.nvmlSystemGetDriverVersion)
        cuda = _nvml_try(pynvml.nvmlSystemGetCudaDriverVersion)
        cc = _nvml_try(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
        mig_mode = _nvml_optional(pynvml, "nvmlDeviceGetMigMode", handle)  # (current, pending) on a whole GPU
        mig_enabled = getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1)
        facts = {
            "count": int(count),
            "by_uuid": by_uuid,
            "name": _text(name) if name is not None else None,
            "memory": int(mem.total) if mem is not None else None,
            "free": int(mem.free) if mem is not None else None,
            "power_w": power_mw / 1000.0 if power_mw else None,
            "clock": int(clock) if clock else None,
            "driver": _text(driver) if driver is not None else None,
            "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "capability": (int(cc[0]), int(cc[1])) if cc else None,
            "mig": bool(_nvml_optional(pynvml, "nvmlDeviceIsMigDeviceHandle", handle))
            or bool(mig_mode and mig_mode[0] == mig_enabled),
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


BF16_MIN_CAPABILITY = (8, 0)  # bf16 tensor cores arrived with Ampere (compute capability 8.0)


def _is_mig(nvml_says: bool, *names: str) -> bool:
    """A MIG slice: NVML says so (a MIG device handle, or MIG mode on the whole GPU), CUDA_VISIBLE_DEVICES
    names a MIG UUID, or the device name carries MIG ("NVIDIA H100 80GB HBM3 MIG 1g.10gb")."""
    return (
        nvml_says
        or _visible_device().upper().startswith("MIG-")
        or any(re.search(r"\bMIG\b", name) for name in names)
    )


def probe_hardware(device: str = "auto") -> HardwareProbe:
    """Describe the GPU torch trains on (NVML's facts, matched by UUID, completed by torch's) or, without
    one, the CPU.

    device="auto": the GPU when torch can drive it, else the CPU (with a note saying why). A GPU without bf16
    (compute capability < 8.0: V100, T4) trains in fp16 with a grad scaler (`bf16_supported` False; a note says so).
    NVML missing or failing is no reason to plan for the CPU: torch's facts describe the GPU then.
    device="cuda": the GPU; UserError when there is none; if torch cannot drive it
    the probe still describes it and a note says so (`torch_cuda_available` is False). device="cpu": the
    CPU, whatever else is present.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise UserError(f"--device {device}: expected auto, cuda or cpu")
    torch_info = _torch_info()
    notes: list[str] = []
    if device == "cpu":
        notes.append("Planning for the CPU (--device cpu).")
        return _cpu_probe(notes, torch_info)

    torch_gpu: TorchGpu | None = torch_info["gpu"]
    gpu, reason = _nvml_probe(torch_gpu.uuid if torch_gpu else None)
    if gpu is None and torch_gpu is None:
        if device == "cuda":
            raise UserError(f"--device cuda: no NVIDIA GPU found ({reason})")
        notes.append(f"No NVIDIA GPU found ({reason}): planning for the CPU.")
        return _cpu_probe(notes, torch_info)
    if gpu is None:
        notes.append(f"NVML cannot describe the GPU ({reason}): its facts come from torch "
                     "(no power limit, clock or driver version).")
        gpu = {"count": torch_info["cuda_count"] or 1, "by_uuid": False, "name": None, "memory": None,
               "free": None, "power_w": None, "clock": None, "driver": None, "cuda": None, "capability": None,
               "mig": False}
    else:
        if torch_gpu is not None and not gpu["by_uuid"]:
            notes.append("NVML's GPU was matched to torch's by index, not UUID (torch or NVML gave none that "
                         "match): with several GPUs NVML's facts may describe another GPU than torch uses.")
        if torch_gpu is not None and (gpu["name"] is None or gpu["memory"] is None):
            notes.append("NVML cannot report the GPU's name or memory here: torch's figures are used.")

    mig = _is_mig(gpu["mig"], gpu["name"] or "", torch_gpu.name if torch_gpu else "")
    name, memory, free = gpu["name"], gpu["memory"], gpu["free"]
    if torch_gpu is not None:
        if name is None or (mig and re.search(r"\bMIG\b", torch_gpu.name)):
            name = torch_gpu.name  # torch names the slice ("... MIG 1g.10gb") where NVML may name the whole GPU
        if memory is None or mig:  # a slice has its share of the memory; NVML may report the whole GPU's
            free, memory = _torch_memory() or (None, torch_gpu.memory_bytes)
    name = name or "NVIDIA GPU (no name from NVML)"

    if not torch_info["cuda_available"]:
        why = (
            f"torch {torch_info['torch_version']} is a CPU-only build"
            if torch_info["torch_version"] and not torch_info["torch_cuda_version"]
            else "torch cannot use it"
        )
        if device == "auto":
            notes.append(
                f"Found {gpu['count']}× {name}, but {why}: planning for the CPU "
                "(install a CUDA build of torch to use the GPU)."
            )
            return _cpu_probe(notes, torch_info)
        notes.append(f"Found {gpu['count']}× {name}, but {why}: training on it will fail.")

    capability = (torch_gpu.capability if torch_gpu else None) or gpu["capability"]
    bf16 = capability is not None and capability >= BF16_MIN_CAPABILITY
    if capability is not None and not bf16:
        notes.append(f"{name} (compute capability {capability[0]}.{capability[1]}) has no bf16: training in fp16 "
                     "autocast with a grad scaler.")

    count = gpu["count"]
    if torch_info["cuda_count"] is not None and torch_info["cuda_count"] != count:
        notes.append(
            f"NVML sees {count} GPUs, torch sees {torch_info['cuda_count']} (CUDA_VISIBLE_DEVICES): "
            f"using torch's count."
        )
        count = torch_info["cuda_count"]
    sm_count = torch_gpu.sm_count if torch_gpu else None
    if mig:
        notes.append(f"{name} is a MIG slice ({sm_count or 'unknown'} SMs): its peak is the whole GPU's "
                     "scaled to its share of the SMs, or measured where the SM counts are unknown.")
    elif match_gpu(name) is None:
        notes.append(f"{name} is not in the peak FLOP/s table: its peak will be measured.")
    return HardwareProbe(
        device="cuda",
        name=name,
        count=count,
        memory_bytes=memory or 0,
        free_memory_bytes=free or 0,
        power_limit_w=gpu["power_w"],
        sm_clock_max_mhz=gpu["clock"],
        driver_version=gpu["driver"],
        cuda_version=gpu["cuda"],
        compute_capability=f"{capability[0]}.{capability[1]}" if capability else None,
        bf16_supported=bf16,  # torch >= 2.4 says True on a V100 too (emulation): the capability decides
        sm_count=sm_count,
        mig=mig,
        **_host(torch_info, notes),
    )
