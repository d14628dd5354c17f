"""Device facts: the datasheet peak FLOP/s of GPUs by dtype, and a timed matmul for everything else.

MFU is always computed against the figure for the device and dtype in use, never a single hard-coded GPU
(nanoGPT issues #182/#464 show an H100 at "104% MFU" against an A100's peak). `peak_flops` reads the vendors'
datasheets (dense, no 2:4 sparsity) from `PEAK_FLOPS_TABLE`; `measure_peak_flops` times a large matmul for
devices the table does not know (CPUs included): an achievable rather than a datasheet peak. The planner
(`planner.hardware.resolve_peak_flops`) and the runner (a plan run on other hardware) both read this table.

torch is imported inside the function that needs it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from oneday.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peak FLOP/s of one GPU model by dtype (dense tensor-core figures for bf16/fp16/tf32,
    CUDA-core figure for fp32). `pattern` is matched against the NVML name, case-insensitively.

    `sm_count` is the whole GPU's number of streaming multiprocessors, with `sm_source` its citation: a MIG
    slice's peak is the whole GPU's scaled by its share of them (`mig_peak_flops`). Only GPUs that can be split
    into MIG slices need it; it is None elsewhere, and for the B200, whose SM count NVIDIA's datasheet omits.
    """

    key: str
    pattern: str
    flops: dict[str, float]
    source: str
    sm_count: int | None = None
    sm_source: str = ""


_H100_SXM = "NVIDIA H100 Tensor Core GPU datasheet (SXM5): dense = half the with-sparsity figures"
_H100_NVL = "NVIDIA H100 NVL datasheet (2024, per GPU): dense = half the with-sparsity figures"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet: dense = half the with-sparsity figures"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (40GB/80GB, SXM4 and PCIe): dense figures"
_ADA_DC = "NVIDIA {} datasheet: dense = half the with-sparsity figures"
_HOPPER_SMS = "NVIDIA H100 Tensor Core GPU Architecture whitepaper: H100 SXM5 132 SMs, H100 PCIe 114 SMs"
_HOPPER_LIKE_SXM = (
    "the {} uses GH100 in the H100 SXM5 configuration, 132 SMs (NVIDIA H100 Tensor Core GPU Architecture "
    "whitepaper; 132 SMs x 128 FP32 lanes x 2 x the boost clock gives the datasheet's FP32 figure)"
)
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
            "NVIDIA GH200 Grace Hopper datasheet (H100 GPU): dense = half the with-sparsity figures",
            132, _HOPPER_LIKE_SXM.format("GH200")),
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
            _H200 + " (H200 NVL column)", 132, _HOPPER_LIKE_SXM.format("H200")),
    GpuPeak("H200 SXM", r"\bH200\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 67e12},
            _H200 + " (H200 SXM column)", 132, _HOPPER_LIKE_SXM.format("H200")),
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
            _H100_NVL, 132, _HOPPER_LIKE_SXM.format("H100 NVL")),
    GpuPeak("H100 PCIe", r"\bH100\b.*(\bPCIe\b|HBM2e)",
            {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
            "NVIDIA H100 Tensor Core GPU datasheet (PCIe): dense = half the with-sparsity figures", 114, _HOPPER_SMS),
    GpuPeak("H100 SXM", r"\bH100\b", {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
            _H100_SXM, 132, _HOPPER_SMS),
    GpuPeak("A100", r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}, _A100,
            108, "NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs (A100 40GB/80GB, SXM4 and PCIe)"),
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

@dataclass(frozen=True)
class GpuModel:
    """A GPU one can plan for without having it (`oneday plan --what-if KEY`): the name NVML would report
    (matched to `PEAK_FLOPS_TABLE` by `match_gpu`), its memory with the source, and its MFU class
    (`oneday.planner.throughput.MFU_CLASSES`). Memory is the datasheet's figure taken as GiB: NVML reports
    79.6 GiB on an "80GB" H100 and 140.4 GiB on a "141GB" H200, so the datasheet GB are close to GiB."""

    key: str
    name: str
    memory_gib: float
    memory_source: str
    mfu_class: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)


# Only GPUs with bf16 (the GPU runs need it; V100 and T4 are refused by the probe too).
GPU_MODELS: tuple[GpuModel, ...] = (
    GpuModel("b200", "NVIDIA B200", 180, "NVIDIA HGX B200 datasheet: 180 GB HBM3e per GPU", "blackwell"),
    GpuModel("gh200", "NVIDIA GH200 480GB", 96, "NVIDIA GH200 datasheet: 96 GB HBM3", "hopper"),
    GpuModel("h200", "NVIDIA H200", 141, "NVIDIA H200 datasheet (SXM): 141 GB HBM3e", "hopper"),
    GpuModel("h200-nvl", "NVIDIA H200 NVL", 141, "NVIDIA H200 datasheet (NVL): 141 GB HBM3e", "hopper"),
    GpuModel("h100", "NVIDIA H100 80GB HBM3", 80, "NVIDIA H100 datasheet (SXM5): 80 GB HBM3", "hopper"),
    GpuModel("h100-pcie", "NVIDIA H100 PCIe", 80, "NVIDIA H100 datasheet (PCIe): 80 GB HBM2e", "hopper"),
    GpuModel("h100-nvl", "NVIDIA H100 NVL", 94, "NVIDIA H100 NVL datasheet: 94 GB HBM3", "hopper"),
    GpuModel("a100-80gb", "NVIDIA A100-SXM4-80GB", 80, "NVIDIA A100 datasheet: 80 GB HBM2e", "ampere"),
    GpuModel("a100-40gb", "NVIDIA A100-SXM4-40GB", 40, "NVIDIA A100 datasheet: 40 GB HBM2", "ampere"),
    GpuModel("l40s", "NVIDIA L40S", 48, "NVIDIA L40S datasheet: 48 GB GDDR6", "ada"),
    GpuModel("l40", "NVIDIA L40", 48, "NVIDIA L40 datasheet: 48 GB GDDR6", "ada"),
    GpuModel("l4", "NVIDIA L4", 24, "NVIDIA L4 datasheet: 24 GB GDDR6", "l4"),
    GpuModel("a10g", "NVIDIA A10G", 24, "AWS EC2 G5: 24 GB per A10G", "ampere-small"),
    GpuModel("a10", "NVIDIA A10", 24, "NVIDIA A10 datasheet: 24 GB GDDR6", "ampere-small"),
    GpuModel("rtx6000-ada", "NVIDIA RTX 6000 Ada Generation", 48, "NVIDIA RTX 6000 Ada datasheet: 48 GB GDDR6",
             "ada"),
    GpuModel("rtx-a6000", "NVIDIA RTX A6000", 48, "NVIDIA RTX A6000 datasheet: 48 GB GDDR6", "ampere-small"),
    GpuModel("rtx4090", "NVIDIA GeForce RTX 4090", 24, "NVIDIA GeForce RTX 4090 specifications: 24 GB GDDR6X",
             "geforce"),
    GpuModel("rtx3090", "NVIDIA GeForce RTX 3090", 24, "NVIDIA GeForce RTX 3090 specifications: 24 GB GDDR6X",
             "geforce"),
)
"""`match_gpu(name)` finds every one of them in `PEAK_FLOPS_TABLE` (tests/test_what_if.py checks)."""


def _squash(text: str) -> str:
    return re.sub(r"[\s_-]+", "", text.lower())


def gpu_model(key: str) -> GpuModel | None:
    """The `GPU_MODELS` entry for a name as a person types it ("h100", "A100-80GB", "rtx 4090"), or None."""
    wanted = _squash(key)
    return next((g for g in GPU_MODELS if _squash(g.key) == wanted), None)


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


def mig_peak_flops(name: str, dtype: str, *, slice_sm_count: int | None) -> tuple[float, str] | None:
    """Peak dense FLOP/s of a MIG slice of the GPU `name` that has `slice_sm_count` SMs, with its source.

    A slice runs a share of the GPU's SMs at the GPU's clocks, and tensor throughput is per SM, so its peak is
    the datasheet figure × slice SMs / whole-GPU SMs (NVIDIA Multi-Instance GPU User Guide: a GPU instance owns
    its SMs exclusively). None when the table lacks the figure or either SM count (measure instead).
    """
    entry = match_gpu(name)
    found = peak_flops(name, dtype)
    if entry is None or found is None or not entry.sm_count or not slice_sm_count:
        return None
    flops, source = found
    share = min(1.0, slice_sm_count / entry.sm_count)
    return flops * share, (
        f"{source}; scaled to a MIG slice: {slice_sm_count} of {entry.sm_count} SMs ({entry.sm_source})"
    )


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


# --- host facts -----------------------------------------------------------------------------------
def read_text(path: str) -> str | None:
    """A small system file (/proc, /sys), or None when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def host_memory() -> tuple[int, int]:
    """(total, available) bytes: /proc/meminfo, capped by a cgroup v2/v1 memory limit if lower."""
    total = available = 0
    text = read_text("/proc/meminfo")
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
        raw = (read_text(path) or "").strip()
        if raw.isdigit() and 0 < int(raw) < total:
            limit = int(raw)
            used_raw = (
                read_text("/sys/fs/cgroup/memory.current")
                or read_text("/sys/fs/cgroup/memory/memory.usage_in_bytes")
                or ""
            ).strip()
            used = int(used_raw) if used_raw.isdigit() else 0
            total, available = limit, min(available, max(0, limit - used))
            break
    return total, available


__all__ = ["GPU_MODELS", "PEAK_FLOPS_TABLE", "GpuModel", "GpuPeak", "gpu_model", "host_memory", "match_gpu",
           "measure_peak_flops", "mig_peak_flops", "normalize_dtype", "peak_flops", "read_text"]
