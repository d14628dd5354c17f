"""DDP on the CPU: two gloo processes with torchrun's environment variables train the tiny model together."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from oneday.data.windows import WindowSampler
from oneday.models.build import build_model, param_groups
from oneday.runner.checkpoint import CheckpointStore
from oneday.runner.distributed import init_distributed
from oneday.runner.loop import NullObserver, train
from tests.test_loop import MODEL, SPEC, TRAIN, VAL, FakeClock

WORLD = 2
SPEC_DDP = replace(SPEC, micro_batch=2, grad_accum=1)


def _train(tmp: Path, spec, *, clock, train_dt: float, dist, stop=None, deadline: float = 1e12, name: str):
    model = build_model(MODEL, seed=0)
    model.register_forward_pre_hook(lambda module, args: clock.advance(train_dt if module.training else 0.1))
    if stop is not None:  # this rank's "SIGINT" arrives once its clock passes 7 s
        model.register_forward_pre_hook(lambda module, args: stop.set() if clock() >= 7 else None)
    store = CheckpointStore(tmp / f"{name}-rank{dist.rank if dist else 0}", keep=2)
    result = train(
        model=model, param_groups=param_groups(model, MODEL, lr=spec.lr, weight_decay=spec.weight_decay), spec=spec,
        train_tokens=TRAIN, val_tokens=VAL, val_bytes_per_token=3.0, checkpoints=store, deadline=deadline,
        flops_per_token=MODEL.flops_per_token(), peak_flops=1e11, clock=clock, observer=NullObserver(), stop=stop,
        dist=dist, log_every=2,
    )
    return result, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = init_distributed(timeout_seconds=60)
    assert dist is not None and dist.backend == "gloo" and dist.world_size == WORLD
    seen: list[list[int]] = []
    original = WindowSampler.starts

    def recording(self, cursor, n, *, rank=0, world_size=1):
        out = original(self, cursor, n, rank=rank, world_size=world_size)
        seen.append(out.tolist())
        return out

    WindowSampler.starts = recording  # type: ignore[method-assign]
    out: dict = {}
    # 1. a fixed step budget
    result, weights = _train(Path(tmp), replace(SPEC_DDP, max_steps=4), clock=FakeClock(), train_dt=1.0, dist=dist,
                             name="steps")
    out["steps"] = {"result": result, "weights": weights, "starts": list(seen)}
    # 2. a deadline, with rank 1's clock running 3× faster: rank 0's clock decides for both
    result, _ = _train(Path(tmp), SPEC_DDP, clock=FakeClock(), train_dt=1.0 if rank == 0 else 3.0, dist=dist,
                       deadline=40.0, name="clock")
    out["clock"] = {"steps": result.steps, "lr": result.final_lr}
    # 3. only rank 1 is asked to stop: both stop at the same step
    stop = threading.Event() if rank == 1 else None
    result, _ = _train(Path(tmp), replace(SPEC_DDP, max_steps=50), clock=FakeClock(), train_dt=1.0, dist=dist,
                       stop=stop, name="stop")
    out["stop"] = {"steps": result.steps, "interrupted": result.interrupted}
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("ddp")
    context = mp.spawn(_worker, args=(str(tmp), _free_port()), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 240 s")
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_read_disjoint_windows(ddp_run) -> None:
    _, outs = ddp_run
    per_rank = [np.array(o["steps"]["starts"]) for o in outs]  # [steps, micro_batch] window offsets
    assert per_rank[0].shape == per_rank[1].shape == (4, SPEC_DDP.micro_batch)
    assert not set(per_rank[0].ravel()) & set(per_rank[1].ravel())
    # together they read exactly what one process reads for the same global batch
    single = WindowSampler(TRAIN, seq_len=SPEC.seq_len, seed=SPEC.seed)
    for step in range(4):
        expected = single.starts(step * WORLD * SPEC_DDP.micro_batch, WORLD * SPEC_DDP.micro_batch)
        assert np.array_equal(np.concatenate([per_rank[0][step], per_rank[1][step]]), expected)


def test_replicas_agree_and_match_gradient_accumulation(ddp_run, tmp_path: Path) -> None:
    _, outs = ddp_run
    w0, w1 = outs[0]["steps"]["weights"], outs[1]["steps"]["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "replicas diverged"
    assert outs[0]["steps"]["result"].steps == outs[1]["steps"]["result"].steps == 4
    # two ranks × micro-batch 2 == one process × 2 accumulation steps of micro-batch 2 (same windows)
    torch.set_num_threads(1)
    _, single = _train(tmp_path, replace(SPEC_DDP, max_steps=4, grad_accum=2), clock=FakeClock(), train_dt=1.0,
                       dist=None, name="single")
    for k in w0:
        torch.testing.assert_close(w0[k], single[k], rtol=1e-4, atol=1e-6)


def test_only_rank_zero_evaluates_and_checkpoints(ddp_run) -> None:
    tmp, outs = ddp_run
    r0, r1 = outs[0]["steps"]["result"], outs[1]["steps"]["result"]
    assert r0.final_val_loss is not None and r1.final_val_loss is None
    assert r0.checkpoint is not None and r1.checkpoint is None
    assert [p.name for p in CheckpointStore(tmp / "steps-rank0", keep=2).folders()] == ["step-00000004"]
    assert CheckpointStore(tmp / "steps-rank1", keep=2).folders() == []


def test_stop_decisions_are_agreed(ddp_run) -> None:
    _, outs = ddp_run
    clock0, clock1 = outs[0]["clock"], outs[1]["clock"]
    assert clock0 == clock1, "ranks stopped at different steps or used different LRs"
    assert clock0["steps"] > 25  # rank 0's clock ruled: rank 1's alone would have stopped ~3× sooner
    assert clock0["lr"] == SPEC.lr * SPEC.final_lr_fraction
    stop0, stop1 = outs[0]["stop"], outs[1]["stop"]
    assert stop0 == stop1 and stop0["interrupted"] and 0 < stop0["steps"] < 50
