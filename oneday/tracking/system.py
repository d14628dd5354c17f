"""System metrics beside the training metrics: each GPU through NVML, this process's memory and CPU share.

NVML is optional: with no driver `nvmlInit()` raises `NVMLError_LibraryNotFound`, and GPU sampling is off.
Names: system/gpu_<i>_utilization_percentage, system/gpu_<i>_memory_usage_megabytes (and _percentage),
system/gpu_<i>_power_usage_watts, system/process_rss_megabytes, system/process_cpu_percentage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


class SystemSampler:
    """GPU utilization/memory/power through NVML when `gpu`; process RSS and CPU share otherwise (or also).

    NVML is optional: with no driver `nvmlInit()` raises `NVMLError_LibraryNotFound`, and GPU sampling is off.
    """

    def __init__(self, *, gpu: bool) -> None:
        self._handles: list[tuple[int, Any]] = []
        self._nvml: Any = None
        if gpu:
            try:
                import pynvml

                pynvml.nvmlInit()
                count = pynvml.nvmlDeviceGetCount()
                self._handles = [(i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]  # this node's
                self._nvml = pynvml
            except Exception as exc:  # no driver, no library: just no GPU metrics
                log.debug("NVML unavailable, no GPU system metrics: %s", exc)
        self._last_cpu: tuple[float, float] | None = None

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for index, handle in self._handles:
            nv = self._nvml
            prefix = f"system/gpu_{index}_"
            with contextlib.suppress(Exception):
                out[prefix + "utilization_percentage"] = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            with contextlib.suppress(Exception):
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                out[prefix + "memory_usage_megabytes"] = mem.used / 2**20
                out[prefix + "memory_usage_percentage"] = 100.0 * mem.used / max(mem.total, 1)
            with contextlib.suppress(Exception):
                out[prefix + "power_usage_watts"] = nv.nvmlDeviceGetPowerUsage(handle) / 1000.0
        rss = process_rss_bytes()
        if rss is not None:
            out["system/process_rss_megabytes"] = rss / 2**20
        times = os.times()
        now = time.monotonic()
        cpu = times.user + times.system
        if self._last_cpu is not None:
            wall = now - self._last_cpu[0]
            if wall > 0:
                out["system/process_cpu_percentage"] = 100.0 * (cpu - self._last_cpu[1]) / wall
        self._last_cpu = (now, cpu)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


def process_rss_bytes() -> int | None:
    """Resident set size of this process (Linux /proc), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            pages = int(handle.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


__all__ = ["SystemSampler", "process_rss_bytes"]
