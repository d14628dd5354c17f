"""Hardware probe and peak FLOP/s: on this CPU-only machine, and against a simulated NVML."""

from __future__ import annotations

import sys
import time
import types
from collections import namedtuple

import pytest

from oneday.devices import match_gpu, measure_peak_flops, normalize_dtype, peak_flops
from oneday.errors import UserError
from oneday.planner import hardware
from oneday.planner.hardware import HardwareProbe, probe_hardware, resolve_peak_flops
from tests.factories import no_gpu


@no_gpu
def test_probe_without_gpu_describes_the_cpu() -> None:
    probe = probe_hardware()
    assert isinstance(probe, HardwareProbe)
    assert probe.device == "cpu"
    assert probe.count == 1
    assert probe.cpu_cores >= 1 and probe.memory_bytes > 0
    assert probe.torch_version and probe.torch_threads and probe.torch_threads >= 1
    assert any("No NVIDIA GPU" in note and "CPU" in note for note in probe.notes)
    assert probe.power_limit_w is None and probe.compute_capability is None


@no_gpu
def test_probe_cuda_without_gpu_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"--device cuda: no NVIDIA GPU found \(NVMLError_LibraryNotFound"):
        probe_hardware("cuda")


def test_probe_cpu_forced_and_bad_device() -> None:
    probe = probe_hardware("cpu")
    assert probe.device == "cpu"
    assert all(isinstance(flag, str) for flag in probe.cpu_flags)
    with pytest.raises(UserError, match="--device tpu"):
        probe_hardware("tpu")


@pytest.mark.parametrize(
    ("nvml_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("Tesla T4", "T4"),
    ],
)
def test_match_gpu_names(nvml_name: str, key: str) -> None:
    entry = match_gpu(nvml_name)
    assert entry is not None and entry.key == key


@pytest.mark.parametrize(
    "nvml_name",
    ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA GeForce GTX 1080", "AMD EPYC"],
)
def test_unknown_names_are_not_guessed(nvml_name: str) -> None:
    assert match_gpu(nvml_name) is None
    assert peak_flops(nvml_name, "bf16") is None


def test_peak_flops_values() -> None:
    flops, source = peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert flops == 989.4e12 and "H100" in source and "dense" in source
    assert peak_flops("NVIDIA H100 80GB HBM3", "tf32")[0] == 494.7e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32")[0] == 66.9e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
    assert peak_flops("NVIDIA H200", "bf16")[0] == pytest.approx(989e12, rel=1e-3)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312e12
    assert peak_flops("NVIDIA A100-PCIE-40GB", "tf32")[0] == 156e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32")[0] == 19.5e12
    assert peak_flops("NVIDIA L4", "bf16")[0] == 121e12
    assert peak_flops("NVIDIA L40S", "bf16")[0] == pytest.approx(362e12, rel=1e-3)
    assert peak_flops("NVIDIA A10G", "bf16")[0] == 70e12
    assert peak_flops("NVIDIA GeForce RTX 4090", "bf16")[0] == pytest.approx(165e12, rel=0.01)
    assert "FP32 accumulate" in peak_flops("NVIDIA GeForce RTX 3090", "bf16")[1]
    assert peak_flops("Tesla V100-SXM2-16GB", "fp16")[0] == 125e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 on Volta
    assert peak_flops("Tesla T4", "fp16")[0] == 65e12
    with pytest.raises(UserError, match="dtype"):
        normalize_dtype("int8")


# --- a simulated NVML ------------------------------------------------------------------------------
def _fake_pynvml(*, count: int = 8, name: str | bytes = "NVIDIA H100 80GB HBM3", fail_init: bool = False):
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    memory = namedtuple("memory", "total free used")
    mod.NVMLError = NVMLError
    mod.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    mod.NVML_CLOCK_SM = 1
    calls: list[str] = []

    def init() -> None:
        if fail_init:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        calls.append("init")

    def not_supported(*_args):
        raise NVMLError_NotSupported("Not Supported")

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: calls.append("shutdown")
    mod.nvmlDeviceGetCount = lambda: count
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetHandleByUUID = lambda u: ("handle", u)
    mod.nvmlDeviceGetName = lambda h: name
    mod.nvmlDeviceGetMemoryInfo = lambda h: memory(total=85520809984, free=84500000000, used=1020809984)
    mod.nvmlDeviceGetPowerManagementLimit = lambda h: 700000
    mod.nvmlDeviceGetMaxClockInfo = lambda h, kind: 1980 if kind == 1 else 0
    mod.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    mod.nvmlSystemGetCudaDriverVersion = lambda: 12040
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    mod.not_supported = not_supported
    mod.calls = calls
    return mod


def test_simulated_nvml_gives_a_cuda_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    probe = probe_hardware("cuda")
    assert probe.device == "cuda"
    assert probe.name == "NVIDIA H100 80GB HBM3"
    assert probe.count == 8
    assert probe.memory_bytes == 85520809984 and probe.free_memory_bytes == 84500000000
    assert probe.power_limit_w == 700.0
    assert probe.sm_clock_max_mhz == 1980
    assert probe.driver_version == "550.54.15"
    assert probe.cuda_version == "12.4"
    assert probe.compute_capability == "9.0"
    assert probe.bf16_supported
    assert fake.calls == ["init", "shutdown"]
    # the torch here is a CPU build: the probe says so instead of failing
    assert not probe.torch_cuda_available
    assert any("CPU-only build" in note for note in probe.notes)
    assert resolve_peak_flops(probe, "bf16") == peak_flops(probe.name, "bf16")


def test_simulated_nvml_auto_without_cuda_torch_plans_for_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    probe = probe_hardware("auto")
    assert probe.device == "cpu"
    assert any("8× NVIDIA H100 80GB HBM3" in note and "CUDA build" in note for note in probe.notes)


def test_simulated_nvml_auto_with_cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(name=b"Tesla T4", count=1)
    fake.nvmlDeviceGetPowerManagementLimit = fake.not_supported
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (7, 5)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = hardware._torch_info()
    info.update(cuda_available=True, torch_cuda_version="12.4")
    monkeypatch.setattr(hardware, "_torch_info", lambda: dict(info))
    probe = probe_hardware()
    assert probe.device == "cuda" and probe.name == "Tesla T4" and probe.count == 1
    assert probe.power_limit_w is None  # not supported → None, not a crash
    assert probe.compute_capability == "7.5" and not probe.bf16_supported
    assert any("no bf16" in note for note in probe.notes)


def test_simulated_nvml_zero_gpus_or_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count=0))
    assert probe_hardware().device == "cpu"
    with pytest.raises(UserError, match="0 GPUs"):
        probe_hardware("cuda")
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    with pytest.raises(UserError, match="NVMLError_LibraryNotFound"):
        probe_hardware("cuda")


def test_cuda_visible_devices_selects_the_nvml_handle(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml()
    seen = []
    fake.nvmlDeviceGetName = lambda h: seen.append(h) or "NVIDIA A100-SXM4-80GB"
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    probe_hardware("cuda")
    assert seen == [("handle", 3)]


def test_measured_cpu_matmul_is_quick_and_plausible() -> None:
    t0 = time.perf_counter()
    flops = measure_peak_flops("cpu", "fp32", seconds=0.3)
    elapsed = time.perf_counter() - t0
    assert 1e8 < flops < 1e14
    assert elapsed < 2.0


def test_resolve_peak_flops_on_cpu_measures() -> None:
    probe = probe_hardware("cpu")
    flops, source = resolve_peak_flops(probe, "fp32", seconds=0.2)
    assert flops > 0 and source.startswith("measured")
