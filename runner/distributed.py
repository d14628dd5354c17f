"""Data-parallel training under `torchrun` (docs/design.md, Training).

`oneday run` started by `torchrun --nproc-per-node N` gets RANK, WORLD_SIZE and LOCAL_RANK in its environment;
`init_distributed()` joins the process group (NCCL on GPUs, gloo on CPU) and returns a `DistInfo` that the
training loop takes. Inside `train()` the model is wrapped in DDP, each rank reads its own windows, rank 0
alone evaluates, checkpoints and reports, and every stop/eval/checkpoint decision is rank 0's (the clock's
owner), sent to all ranks each step, so that all ranks take the same steps with the same learning rates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: Literal["nccl", "gloo"]

    def device(self) -> str:
        """The device this rank trains on: its own GPU under NCCL, the CPU under gloo."""
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


def init_distributed(*, timeout_seconds: float | None = None) -> DistInfo | None:
    """Join the torchrun process group, or return None for a single process (no WORLD_SIZE, or 1).

    Rendezvous uses torchrun's MASTER_ADDR/MASTER_PORT (the default `env://` init method). `timeout_seconds`
    bounds how long a collective waits for a missing rank (torch's default: 10 min NCCL, 30 min gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend: Literal["nccl", "gloo"] = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        timeout = None if timeout_seconds is None else timedelta(seconds=timeout_seconds)
        torch_dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


__all__ = ["DistInfo", "init_distributed"]
