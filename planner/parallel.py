"""The data-parallel efficiency, measured where the GPUs are (docs/design.md, Several GPUs).

A plan for K GPUs (`oneday plan --gpus K`) rests on K × one GPU's tokens/s × an efficiency: the share of one
GPU's speed each keeps while DDP all-reduces the gradients. The probe times one GPU; `measure_data_parallel`
then times the chosen shape on all K at once, in K processes (NCCL on GPUs, gloo on CPUs, as `oneday run`
under torchrun):

1. *alone*: every rank trains the plan's step (its micro-batch × grad_accum) on its own GPU, at the same time,
   with no collective: one GPU's speed with K busy beside it (host, PCIe and power shared as in the run);
2. *together*: the same model wrapped for DDP exactly as the run wraps it (`runner.step.wrap_data_parallel`,
   compiled after wrapping when the plan compiles), gradients all-reduced on the last micro-step.

efficiency = mean alone step time / mean together step time (at most 1). Each phase warms up
(`WARMUP_STEPS`: the first compiled step compiles) and then times `TIMED_STEPS` steps between barriers. The
processes are started with `spawn` (the planner's own process already holds a CUDA context) and must finish
within the time the planner gives; the first rank's error ends them all at once (the others may be waiting for
it in a collective). Either way `ParallelMeasureError`, and the plan keeps the assumed efficiency, saying why.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneday.errors import UserError, first_line
from oneday.models.spec import ModelSpec
from oneday.paths import write_atomic

log = logging.getLogger(__name__)

WARMUP_STEPS = {False: 1, True: 2}  # by compile: a compiled step's first call compiles
TIMED_STEPS = 3


class ParallelMeasureError(UserError):
    """The data-parallel measurement did not finish (a rank failed, or it ran out of its time)."""


@dataclass(frozen=True)
class ParallelTiming:
    """Mean seconds per optimizer step of the same step on each of `ranks` ranks: `alone` without a collective,
    `together` under DDP."""

    ranks: int
    backend: str
    alone_seconds: float
    together_seconds: float

    def efficiency(self) -> float:
        return min(1.0, self.alone_seconds / self.together_seconds)

    def sentence(self) -> str:
        return (f"measured here: the step took {self.alone_seconds:.3g} s on each GPU alone and "
                f"{self.together_seconds:.3g} s on {self.ranks} under DDP ({self.backend})")


def measure_data_parallel(
    spec: ModelSpec,
    *,
    ranks: int,
    micro_batch: int,
    grad_accum: int,
    device: str,
    dtype: str,
    compile: bool,
    threads: int | None,
    tokens: Any,
    timeout_seconds: float,
) -> ParallelTiming:
    """Time `spec`'s training step on `ranks` ranks, alone and under DDP (module docstring). `tokens`: the
    training sample the batches are windows of (None: uniform random tokens). ParallelMeasureError when a rank
    fails or the ranks do not finish within `timeout_seconds`."""
    import torch.multiprocessing as mp

    if ranks < 2:
        raise ValueError(f"ranks must be >= 2, got {ranks}")
    job = {"spec": spec, "ranks": ranks, "micro_batch": micro_batch, "grad_accum": grad_accum, "device": device,
           "dtype": dtype, "compile": compile, "threads": threads, "tokens": tokens, "port": _free_port()}
    with tempfile.TemporaryDirectory(prefix="oneday-parallel-") as tmp:
        job["out"] = tmp
        context = mp.spawn(_rank, args=(job,), nprocs=ranks, join=False)
        deadline = time.monotonic() + timeout_seconds
        try:
            while not context.join(timeout=0.5):
                failed = _first_error(Path(tmp), ranks)  # the others may wait for it in a collective: stop them
                if failed is not None:
                    raise ParallelMeasureError(failed)
                if time.monotonic() > deadline:
                    raise ParallelMeasureError(f"the {ranks} ranks did not finish within {timeout_seconds:.0f} s")
        except mp.ProcessRaisedException as exc:  # a failure outside the worker's own handler
            raise ParallelMeasureError(f"a rank failed: {first_line(exc)}") from None
        except mp.ProcessExitedException as exc:
            raise ParallelMeasureError(f"a rank exited: {first_line(exc)}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        written = [Path(tmp) / f"rank{r}.json" for r in range(ranks)]
        if not all(path.exists() for path in written):
            raise ParallelMeasureError(f"rank {next(r for r, p in enumerate(written) if not p.exists())} "
                                       "ended without a result")
        failed = _first_error(Path(tmp), ranks)
        if failed is not None:
            raise ParallelMeasureError(failed)
        results = [json.loads(path.read_text()) for path in written]
    timing = ParallelTiming(
        ranks=ranks, backend=results[0]["backend"],
        alone_seconds=sum(r["alone"] for r in results) / ranks,
        together_seconds=sum(r["together"] for r in results) / ranks,
    )
    log.info("measured %s on %d ranks (%s): %.4f s a step alone, %.4f s under DDP, efficiency %.1f%%",
             spec.label(), ranks, timing.backend, timing.alone_seconds, timing.together_seconds,
             100 * timing.efficiency())
    return timing


def _first_error(out: Path, ranks: int) -> str | None:
    """"rank r: <its error>" for the first rank that wrote an error to `out`, or None."""
    for rank in range(ranks):
        path = out / f"rank{rank}.json"
        if path.exists():
            error = json.loads(path.read_text()).get("error")
            if error:
                return f"rank {rank}: {error}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank(rank: int, job: dict[str, Any]) -> None:
    """One rank of `measure_data_parallel`: writes {"backend", "alone", "together"} or {"error"} to
    `<out>/rank<r>.json` (a rank's error is a sentence for the plan's reasons, not a traceback)."""
    out = Path(job["out"]) / f"rank{rank}.json"
    try:
        result = _time_rank(rank, job)
    except Exception as exc:  # every failure becomes the plan's reason for keeping the assumed efficiency
        result = {"error": first_line(exc)}
    write_atomic(out, json.dumps(result))  # the planner polls for these: never half a file


def _time_rank(rank: int, job: dict[str, Any]) -> dict[str, Any]:
    from datetime import timedelta

    import torch
    import torch.distributed as torch_dist

    from oneday.data.windows import ProbeBatches
    from oneday.models.build import build_model, param_groups
    from oneday.runner.step import (
        LMLoss,
        TrainStep,
        autocast,
        grad_scaler,
        keep_freed_memory,
        make_optimizer,
        wrap_data_parallel,
    )

    spec: ModelSpec = job["spec"]
    ranks, device, compile = job["ranks"], job["device"], job["compile"]
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
        keep_freed_memory()
        if job["threads"]:
            torch.set_num_threads(job["threads"])
    backend = "nccl" if cuda else "gloo"
    torch_dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{job['port']}", rank=rank,
                                  world_size=ranks, timeout=timedelta(minutes=5))
    try:
        model = build_model(spec, seed=0, device=dev)
        model.train()
        optimizer = make_optimizer(param_groups(model, spec, lr=1e-4, weight_decay=0.1), lr=1e-4,
                                   betas=(0.9, 0.95))
        loss = LMLoss(model)
        precision, scaler = autocast(device, job["dtype"]), grad_scaler(device, job["dtype"])
        draw = ProbeBatches(job["tokens"], seq_len=spec.seq_len, vocab_size=spec.vocab_size, rank=rank,
                            world_size=ranks)
        batch = torch.from_numpy(draw(job["micro_batch"] * job["grad_accum"])).to(dev)

        def steady_seconds(net: Any, *, ddp: bool) -> float:
            step = TrainStep(net, params=model.parameters(), optimizer=optimizer, grad_accum=job["grad_accum"],
                             grad_clip=1.0, precision=precision, ddp=ddp, scaler=scaler)
            for _ in range(WARMUP_STEPS[compile]):
                step(batch)
            if cuda:
                torch.cuda.synchronize()
            torch_dist.barrier()  # every rank starts timing together: the "alone" steps overlap as in a run
            started = time.perf_counter()
            for _ in range(TIMED_STEPS):
                step(batch)
            if cuda:
                torch.cuda.synchronize()
            return (time.perf_counter() - started) / TIMED_STEPS

        alone = steady_seconds(torch.compile(loss) if compile else loss, ddp=False)
        ddp_net = wrap_data_parallel(loss, device=dev)
        together = steady_seconds(torch.compile(ddp_net) if compile else ddp_net, ddp=True)
        return {"backend": backend, "alone": alone, "together": together}
    finally:
        # DDP's reducer freed while its process group lives: freed after `destroy_process_group` (when this frame
        # returns), gloo's teardown hung one rank in about half the runs of tests/test_parallel.py.
        ddp_net = None
        gc.collect()
        torch_dist.destroy_process_group()


__all__ = ["TIMED_STEPS", "WARMUP_STEPS", "ParallelMeasureError", "ParallelTiming", "measure_data_parallel"]
