"""What `run_plan` checks before it creates anything: the model fits the device, the disk holds its saves.

A hand-edited or foreign plan can ask for a model no machine holds (d_model 2^20): without these checks it
fails deep inside an allocation with a traceback, after the run folder and the MLflow run exist. Both checks
use the same estimates the planner sized the plan with, so a plan from `oneday plan` always passes them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from oneday.devices import host_memory, match_gpu
from oneday.errors import UserError
from oneday.formats import human_bytes
from oneday.plan import Plan, TrainSpec
from oneday.runner import costs

log = logging.getLogger(__name__)


def check_memory(plan: Plan, spec: TrainSpec, *, device_memory_bytes: int) -> None:
    """Refuse a model whose training step cannot fit `device_memory_bytes` (the GPU's, or the host's RAM on a
    CPU): `ModelSpec.estimate_train_memory_bytes` at the plan's micro-batch, activations in bf16 or fp32."""
    activation_bytes = 2 if spec.precision in ("bf16", "fp16") else 4
    need = plan.model.estimate_train_memory_bytes(micro_batch=spec.micro_batch, activation_bytes=activation_bytes)
    if device_memory_bytes > 0 and need > device_memory_bytes:
        where = "this GPU" if spec.device == "cuda" else "this machine's RAM"
        raise UserError(
            f"plan model: training it needs about {human_bytes(need)} ({plan.model.params_total():,} parameters, "
            f"micro-batch {spec.micro_batch}), more than the {human_bytes(device_memory_bytes)} of {where}; "
            "make a plan for this machine with `oneday plan`"
        )


def check_hardware(plan: Plan, *, device: str, name: str, count: int, force: bool) -> None:
    """Refuse a what-if plan (`oneday plan --what-if`) on hardware other than the one it was made for: its sizes
    rest on that hardware's datasheet and assumed throughput. The GPU is compared by its entry in the datasheet
    table (`devices.match_gpu`; the name itself when the table lacks it), then the count. `force` runs it
    anyway. A plan whose data was only assumed (--data-tokens) has nothing to train on and is always refused."""
    if plan.data.assumed:
        raise UserError(
            "plan data: the tokens were assumed (oneday plan --data-tokens), nothing was prepared; make the plan "
            "with --data"
        )
    if plan.provenance.what_if is None or force:
        return
    planned = plan.hardware

    def gpu(text: str) -> str:
        entry = match_gpu(text)
        return entry.key if entry is not None else text

    if device != planned.device or gpu(name) != gpu(planned.name) or count != planned.count:
        raise UserError(
            f"this is a what-if plan for {planned.count} × {planned.name}; this machine has {count} × {name}: "
            "make a plan here with `oneday plan`, or pass --force to run it anyway"
        )


def device_memory_bytes(device: str, device_name: str) -> int:
    """Total memory of the torch device `device_name` (`cuda:1`), or of the host for the CPU; 0 if unknown."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device_name)).total_memory)
    return host_memory()[0]


def this_hardware(device: str) -> tuple[str, int]:
    """(name, count) of what the run trains on: the CUDA GPUs torch sees, or this CPU."""
    if device == "cuda":
        import torch

        return str(torch.cuda.get_device_name(0)), int(torch.cuda.device_count())
    return "CPU", 1


def check_disk(root: Path, *, params: int, keep: int) -> None:
    """Refuse a run whose folder's file system cannot hold one checkpoint and the final model; warn when it
    cannot hold the `keep` checkpoints the plan keeps (a checkpoint is written before the older one goes)."""
    existing = next((p for p in (root, *root.parents) if p.exists()), Path("."))
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    one = costs.checkpoint_bytes(params)
    need = one + costs.model_bytes(params)
    if free < need:
        raise UserError(
            f"{root}: {human_bytes(free)} free, but a checkpoint and the final model need {human_bytes(need)} "
            "(disk full?); free some space or pass another --run-dir"
        )
    if free < (keep + 1) * one + costs.model_bytes(params):
        log.warning("%s: %s free holds fewer than the %d checkpoints the plan keeps (%s each)", root,
                    human_bytes(free), keep, human_bytes(one))


__all__ = ["check_disk", "check_hardware", "check_memory", "device_memory_bytes", "this_hardware"]
