"""Data-parallel training under `torchrun` (docs/design.md, Training).

`oneday run` started by `torchrun --nproc-per-node N` gets RANK, WORLD_SIZE and LOCAL_RANK in its environment;
`init_distributed()` joins the process group (NCCL on GPUs, gloo on CPU) and returns a `DistInfo` that the
training loop takes. Inside `train()` the model is wrapped in DDP, each rank reads its own windows, rank 0
alone evaluates, checkpoints and reports, and every stop/eval/checkpoint decision is rank 0's (the clock's
owner), sent to all ranks each step, so that all ranks take the same steps with the same learning rates.

Before training, the runner (`run.py`) fits the plan to the ranks it got (`fit_to_world`: the plan's global batch
is kept, its accumulation re-divided), lets rank 0, then one rank per node, then the rest load the data while the
others wait on a gloo group with a timeout of hours (`long_wait_group`: preparing a corpus outlasts NCCL's 10
minutes), and checks that every rank sees rank 0's run folder and its newest checkpoint
(`check_shared_run_dir`): only rank 0 writes checkpoints and every rank resumes from them, so a node without
the shared folder would restart at step 0 with its own data position and empty Adam state, silently.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as torch_dist

from oneday.errors import UserError, first_line
from oneday.paths import write_atomic
from oneday.plan import TrainSpec

T = TypeVar("T")
log = logging.getLogger(__name__)

LONG_WAIT_SECONDS = 24 * 3600.0
"""How long a rank waits for the others while data is prepared or checked: preparing a large corpus takes hours
(torch's default is 10 min on NCCL, 30 min on gloo). A rank that fails does not leave the others waiting this
long: its error reaches them through the same collective (`gather_or_refuse`)."""

RANK_CHECK_NAME = ".oneday.ranks"
"""The file rank 0 writes into the run folder (and removes) so that every rank can show it sees the same one."""


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


def long_wait_group(seconds: float = LONG_WAIT_SECONDS) -> Any:
    """A gloo process group of all ranks whose collectives wait `seconds`: for the waits around data preparation
    and the start-up checks (CPU objects; never the GPU)."""
    return torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))


def fit_to_world(spec: TrainSpec, world_size: int) -> tuple[TrainSpec, str | None]:
    """`spec` for `world_size` ranks, and a note when it had to change.

    The plan's global batch (micro_batch · grad_accum · world_size sequences; micro_batch and grad_accum per
    rank) is what its LR and step count were chosen for, so it is kept: the micro-batches of one step,
    grad_accum · spec.world_size, are shared out over the ranks. A count the ranks cannot share evenly is refused
    rather than trained at another batch size with the same LR.
    """
    planned = spec.world_size
    if world_size == planned:
        return spec, None
    micro_batches = spec.grad_accum * planned
    if micro_batches % world_size:
        raise UserError(
            f"train.grad_accum: the plan is sized for {planned} rank(s) × grad_accum {spec.grad_accum} = "
            f"{micro_batches} micro-batches per step, which {world_size} ranks cannot share evenly; run it on a "
            f"number of ranks that divides {micro_batches}, or make a plan for {world_size} ranks"
        )
    per_rank = micro_batches // world_size
    note = (f"plan sized for {planned} rank(s) run on {world_size}: grad_accum per rank {spec.grad_accum} -> "
            f"{per_rank}, the global batch of {spec.tokens_per_step():,} tokens kept")
    return replace(spec, grad_accum=per_rank, world_size=world_size), note


def gather_or_refuse(dist: DistInfo, group: Any, *, error: str | None = None, payload: Any = None
                     ) -> list[tuple[str, Any]]:
    """All-gather each rank's (host, payload); when a rank reports an `error`, every rank raises it as one
    `UserError` naming that rank and its host (so no rank is left waiting for one that gave up)."""
    entries: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(entries, (socket.gethostname(), error, payload), group=group)
    for rank, (host, err, _) in enumerate(entries):
        if err is not None:
            raise UserError(f"rank {rank} on {host}: {err}")
    return [(host, value) for host, _, value in entries]


def in_turns(dist: DistInfo, group: Any, work: Callable[[], tuple[T, float]]) -> tuple[T, float]:
    """`work()` -> (result, seconds it spent preparing) on every rank, in turns: rank 0 first, then the first
    rank of each node (which finds rank 0's result on a shared filesystem, or makes its own), then every other
    rank, while the rest wait on `group`. An error on any rank is every rank's `UserError`
    (`gather_or_refuse`). Returns (this rank's result, the preparing seconds of the slowest rank of each turn,
    summed: the time every rank spent waiting for preparation)."""
    result: Any = None
    done = False
    total = 0.0
    for mine in (dist.rank == 0, dist.local_rank == 0, True):
        error: str | None = None
        seconds = 0.0
        if mine and not done:
            try:
                (result, seconds), done = work(), True
            except Exception as exc:  # any rank's failure ends every rank, in one line
                if not isinstance(exc, UserError):
                    log.exception("rank %d failed", dist.rank)
                error = first_line(exc)
        took = gather_or_refuse(dist, group, error=error, payload=seconds)
        total += max(value for _, value in took)
    return result, total


def check_shared_run_dir(dist: DistInfo, group: Any, *, root: Path, checkpoints: Path) -> None:
    """Refuse, on every rank, a run folder that some rank does not share with rank 0 (module docstring).

    Rank 0 (which holds the run lock) writes a fresh nonce into it; every rank reads it back and names the newest
    checkpoint it would resume from; the answers are all-gathered and compared with rank 0's."""
    marker = root / RANK_CHECK_NAME
    error = None
    if dist.rank == 0:
        try:
            write_atomic(marker, secrets.token_hex(16))
        except UserError as exc:
            error = str(exc)
    gather_or_refuse(dist, group, error=error)  # also the barrier: no rank reads before the nonce is written
    try:
        seen = _read_text(marker)
        views = gather_or_refuse(dist, group, payload=(str(root.absolute()), seen, _newest_checkpoint(checkpoints)))
    finally:
        if dist.rank == 0:
            marker.unlink(missing_ok=True)
    host0, (root0, seen0, newest0) = views[0]
    for rank, (host, (where, nonce, newest)) in enumerate(views):
        if nonce != seen0:
            raise UserError(
                f"rank {rank} on {host} does not see the run folder {root0} that rank 0 on {host0} writes "
                f"(it looked in {where}); the run folder must be on a filesystem shared by every node: only rank 0 "
                "writes checkpoints, and every rank resumes from them"
            )
        if newest != newest0:
            raise UserError(
                f"rank {rank} on {host} would resume from {newest or 'no checkpoint'} in {where}, rank 0 on "
                f"{host0} from {newest0 or 'no checkpoint'}; the run folder must be on a filesystem shared by "
                "every node, with every node seeing the same files"
            )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _newest_checkpoint(directory: Path) -> str | None:
    """'<name> (save <sequence>)' of the newest checkpoint folder in `directory` (what a resume starts from),
    or None. Reads names and manifests only: nothing is loaded, nothing created."""
    from oneday.runner.checkpoint import CheckpointStore

    if not directory.is_dir():
        return None
    folders = CheckpointStore(directory, keep=1).folders()
    if not folders:
        return None
    try:
        sequence = json.loads((folders[-1] / "manifest.json").read_text(encoding="utf-8")).get("sequence")
    except (OSError, ValueError, AttributeError):
        sequence = None
    return f"{folders[-1].name} (save {sequence})"


__all__ = ["LONG_WAIT_SECONDS", "DistInfo", "check_shared_run_dir", "fit_to_world", "gather_or_refuse",
           "in_turns", "init_distributed", "long_wait_group"]
