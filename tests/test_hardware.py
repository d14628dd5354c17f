"""Hardware probe and peak FLOP/s: on this CPU-only machine, and against a simulated NVML."""

from __future__ import annotations

import sys
import time
import types
from collections import namedtuple
from dataclasses import replace
from pathlib import Path

import pytest

from oneday.devices import match_gpu, measure_peak_flops, mig_peak_flops, normalize_dtype, peak_flops
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


# --- a simulated NVML and a simulated CUDA torch ----------------------------------------------------
H100_UUID = "2a3b4c5d-0000-1111-2222-333344445555"
A100_UUID = "9f8e7d6c-0000-1111-2222-333344445555"


def _fake_pynvml(
    *,
    count: int = 8,
    name: str | bytes = "NVIDIA H100 80GB HBM3",
    fail_init: bool = False,
    uuids: tuple[str, ...] = (),
    mig_mode: tuple[int, int] = (0, 0),
):
    """A stand-in for nvidia-ml-py: `count` GPUs named `name`; GPU i has UUID "GPU-" + uuids[i] where given."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_NotFound(NVMLError):
        pass

    memory = namedtuple("memory", "total free used")
    mod.NVMLError = NVMLError
    mod.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    mod.NVML_CLOCK_SM = 1
    mod.NVML_DEVICE_MIG_ENABLE = 1
    calls: list[str] = []

    def init() -> None:
        if fail_init:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        calls.append("init")

    def not_supported(*_args):
        raise NVMLError_NotSupported("Not Supported")

    def uuid_of(handle) -> str:
        index = handle[1]
        if not isinstance(index, int) or index >= len(uuids):
            raise NVMLError_NotSupported("Not Supported")
        return f"GPU-{uuids[index]}"

    def handle_by_uuid(uuid: str):
        known = [f"GPU-{u}" for u in uuids]
        if uuid not in known:
            raise NVMLError_NotFound("Not Found")
        return ("handle", known.index(uuid))

    mod.nvmlInit = init
    mod.nvmlShutdown = lambda: calls.append("shutdown")
    mod.nvmlDeviceGetCount = lambda: count
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetHandleByUUID = handle_by_uuid
    mod.nvmlDeviceGetUUID = uuid_of
    mod.nvmlDeviceGetName = lambda h: name
    mod.nvmlDeviceGetMemoryInfo = lambda h: memory(total=85520809984, free=84500000000, used=1020809984)
    mod.nvmlDeviceGetPowerManagementLimit = lambda h: 700000
    mod.nvmlDeviceGetMaxClockInfo = lambda h, kind: 1980 if kind == 1 else 0
    mod.nvmlSystemGetDriverVersion = lambda: b"550.54.15"
    mod.nvmlSystemGetCudaDriverVersion = lambda: 12040
    mod.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    mod.nvmlDeviceGetMigMode = lambda h: mig_mode
    mod.nvmlDeviceIsMigDeviceHandle = lambda h: False
    mod.not_supported = not_supported
    mod.memory = memory
    mod.calls = calls
    return mod


def _fake_cuda_torch(
    monkeypatch: pytest.MonkeyPatch,
    *,
    name: str = "NVIDIA H100 80GB HBM3",
    count: int = 1,
    total: int = 85_000_000_000,
    free: int = 80_000_000_000,
    sms: int = 132,
    capability: tuple[int, int] = (9, 0),
    uuid: str | None = H100_UUID,
) -> None:
    """Make this CPU build of torch report a CUDA GPU (device 0) with these facts."""
    import torch

    props = types.SimpleNamespace(name=name, total_memory=total, multi_processor_count=sms, major=capability[0],
                                  minor=capability[1], uuid=uuid)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (free, total))
    # torch >= 2.4 answers True on a V100 too (bf16 emulation): the probe must not trust it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.version, "cuda", "12.4")


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
    fake = _fake_pynvml(name=b"NVIDIA L4", count=1, uuids=(A100_UUID,))
    fake.nvmlDeviceGetPowerManagementLimit = fake.not_supported
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (8, 9)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _fake_cuda_torch(monkeypatch, name="NVIDIA L4", capability=(8, 9), sms=58, uuid=A100_UUID)
    probe = probe_hardware()
    assert probe.device == "cuda" and probe.name == "NVIDIA L4" and probe.count == 1
    assert probe.power_limit_w is None  # not supported → None, not a crash
    assert probe.compute_capability == "8.9" and probe.bf16_supported
    assert probe.memory_bytes == 85520809984  # NVML's figure where NVML answers
    assert probe.sm_count == 58 and not probe.mig
    assert probe.notes == ()


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


# --- NVML missing or failing: torch describes the GPU ---------------------------------------------
def test_without_nvml_torch_describes_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    _fake_cuda_torch(monkeypatch, name="NVIDIA A100-SXM4-80GB", capability=(8, 0), sms=108, count=2,
                     total=81_000_000_000, free=79_000_000_000)
    for device in ("auto", "cuda"):
        probe = probe_hardware(device)
        assert probe.device == "cuda" and probe.torch_cuda_available
        assert probe.name == "NVIDIA A100-SXM4-80GB" and probe.count == 2
        assert probe.memory_bytes == 81_000_000_000 and probe.free_memory_bytes == 79_000_000_000
        assert probe.compute_capability == "8.0" and probe.bf16_supported and probe.sm_count == 108
        assert probe.power_limit_w is None and probe.driver_version is None
        assert any("NVML cannot describe the GPU (NVMLError_LibraryNotFound" in note and "torch" in note
                   for note in probe.notes)
    assert resolve_peak_flops(probe, "bf16") == peak_flops("NVIDIA A100-SXM4-80GB", "bf16")


def test_nvml_name_and_memory_not_supported_come_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(count=1, uuids=(H100_UUID,))
    fake.nvmlDeviceGetName = fake.not_supported
    fake.nvmlDeviceGetMemoryInfo = fake.not_supported
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _fake_cuda_torch(monkeypatch, total=85_000_000_000, free=80_000_000_000)
    probe = probe_hardware()
    assert probe.device == "cuda" and probe.name == "NVIDIA H100 80GB HBM3"
    assert probe.memory_bytes == 85_000_000_000 and probe.free_memory_bytes == 80_000_000_000
    assert probe.power_limit_w == 700.0 and probe.driver_version == "550.54.15"  # what NVML could say, it said
    assert any("NVML cannot report the GPU's name or memory" in note for note in probe.notes)


# --- MIG slices ------------------------------------------------------------------------------------
MIG_NAME = "NVIDIA H100 80GB HBM3 MIG 1g.10gb"


@pytest.mark.parametrize("signal", ["nvml-mig-mode", "visible-mig-uuid", "name"])
def test_mig_slice_peak_is_scaled_by_its_share_of_the_sms(monkeypatch: pytest.MonkeyPatch, signal: str) -> None:
    fake = _fake_pynvml(count=1, uuids=(H100_UUID,), mig_mode=(1, 1) if signal == "nvml-mig-mode" else (0, 0))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    torch_name = MIG_NAME if signal == "name" else "NVIDIA H100 80GB HBM3"
    if signal == "visible-mig-uuid":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-5e6f7a8b-0000-1111-2222-333344445555")
    _fake_cuda_torch(monkeypatch, name=torch_name, sms=16, total=10_200_000_000, free=9_800_000_000)
    probe = probe_hardware()
    assert probe.device == "cuda" and probe.mig and probe.sm_count == 16
    assert probe.memory_bytes == 10_200_000_000 and probe.free_memory_bytes == 9_800_000_000  # the slice's
    flops, source = resolve_peak_flops(probe, "bf16")
    assert flops == pytest.approx(989.4e12 * 16 / 132)
    assert "MIG slice: 16 of 132 SMs" in source and "whitepaper" in source
    assert any("MIG slice" in note for note in probe.notes)


def test_mig_slice_without_sm_counts_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "measure_peak_flops", lambda device, dtype, seconds: 1.5e14)
    probe = replace(probe_hardware("cpu"), device="cuda", name="NVIDIA B200 MIG 1g.23gb", mig=True, sm_count=18)
    flops, source = resolve_peak_flops(probe, "bf16")
    assert flops == 1.5e14 and source.startswith("measured") and "MIG slice" in source
    unknown_slice = replace(probe, name=MIG_NAME, sm_count=None)
    assert resolve_peak_flops(unknown_slice, "bf16")[0] == 1.5e14
    assert mig_peak_flops(MIG_NAME, "bf16", slice_sm_count=None) is None
    assert mig_peak_flops("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16", slice_sm_count=42)[0] == pytest.approx(
        312e12 * 42 / 108)


# --- NVML and CUDA devices matched by UUID ---------------------------------------------------------
def test_nvml_handle_is_the_one_with_torchs_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML orders by PCI bus (A100 first), CUDA fastest first (H100 is torch's device 0)
    fake = _fake_pynvml(count=2, uuids=(A100_UUID, H100_UUID))
    names = {0: "NVIDIA A100-SXM4-80GB", 1: "NVIDIA H100 80GB HBM3"}
    fake.nvmlDeviceGetName = lambda h: names[h[1]]
    fake.nvmlDeviceGetMemoryInfo = lambda h: fake.memory(total=(h[1] + 1) * 10**10, free=(h[1] + 1) * 10**10, used=0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _fake_cuda_torch(monkeypatch, count=2, uuid=H100_UUID)
    probe = probe_hardware()
    assert probe.name == "NVIDIA H100 80GB HBM3" and probe.memory_bytes == 2 * 10**10
    assert not any("by index" in note for note in probe.notes)


def test_without_uuids_nvml_is_matched_by_index_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(count=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _fake_cuda_torch(monkeypatch, count=2, uuid=None)
    probe = probe_hardware()
    assert probe.device == "cuda" and probe.name == "NVIDIA H100 80GB HBM3"
    assert any("matched to torch's by index, not UUID" in note for note in probe.notes)


# --- GPUs without bf16: fp16 with a grad scaler ---------------------------------------------------
def _v100(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_pynvml(count=1, name="Tesla V100-SXM2-16GB", uuids=(H100_UUID,))
    fake.nvmlDeviceGetCudaComputeCapability = lambda h: (7, 0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _fake_cuda_torch(monkeypatch, name="Tesla V100-SXM2-16GB", capability=(7, 0), sms=80)


def test_gpu_without_bf16_is_probed_for_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    _v100(monkeypatch)
    for device in ("cuda", "auto"):
        probe = probe_hardware(device)
        assert probe.device == "cuda" and probe.compute_capability == "7.0" and not probe.bf16_supported
        assert any("Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16: training in fp16 autocast with a "
                   "grad scaler" in note for note in probe.notes)
    assert resolve_peak_flops(probe, "fp16") == peak_flops("Tesla V100-SXM2-16GB", "fp16")


def test_plan_on_a_gpu_without_bf16_trains_in_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12 §4: a V100 (compute capability 7.0) was refused; it plans fp16 with a grad scaler now."""
    from types import SimpleNamespace

    import oneday.data.prepare as prepare
    from oneday.planner import measure
    from oneday.planner.make import make_plan
    from tests.simulated_device import SimulatedGpu

    _v100(monkeypatch)
    memory = 16 * 2**30
    probe = replace(probe_hardware("cuda"), memory_bytes=memory, free_memory_bytes=memory - 2**30)
    gpu = SimulatedGpu(peak_flops=125e12, free_memory_bytes=probe.free_memory_bytes)
    monkeypatch.setattr(hardware, "probe_hardware", lambda device="auto": probe)
    data = SimpleNamespace(vocab_size=8192, train_tokens=10**10, val_tokens=10**7, source="simulated",
                           key="0" * 16, directory=Path("/nonexistent"), tokenizer_dir=Path("/nonexistent"),
                           bytes_per_token=lambda: 4.0)
    monkeypatch.setattr(prepare, "prepare_data", lambda *a, **k: data)
    monkeypatch.setattr(measure, "measure_one", gpu.measure_one)
    plan = make_plan(hours=1, data="simulated", device="cuda", clock=gpu.clock, auto_calibrate=False)
    assert plan.hardware.device == "cuda" and plan.train.device == "cuda"
    assert plan.train.precision == "fp16" and plan.hardware.dtype == "fp16"
    assert plan.hardware.peak_flops == 125e12  # the datasheet's fp16 tensor figure
    assert any("fp16 autocast with a grad scaler (this GPU has no bf16" in reason for reason in plan.reasons)
