"""DDP on the CPU: two gloo processes with torchrun's environment variables train the tiny model together, fit a
plan to the ranks, compile the DDP module (not the other way round), and refuse a run folder they do not share."""

from __future__ import annotations

import json
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
from torch import nn

from oneday.data.windows import WindowSampler
from oneday.errors import UserError
from oneday.models.build import build_model, param_groups
from oneday.runner import distributed
from oneday.runner.checkpoint import CheckpointStore
from oneday.runner.distributed import check_shared_run_dir, fit_to_world, in_turns, init_distributed, long_wait_group
from oneday.runner.loop import NullObserver, train
from oneday.runner.step import LMLoss
from tests.test_loop import MODEL, SPEC, TRAIN, VAL, FakeClock

WORLD = 2
PLAN_SPEC = replace(SPEC, micro_batch=2, grad_accum=2)  # a plan made for one process: 2 × 2 windows a step
SPEC_DDP, NOTE = fit_to_world(PLAN_SPEC, WORLD)  # each of 2 ranks: 2 × 1
ACCUM_PLAN = replace(SPEC, micro_batch=2, grad_accum=4, max_steps=3)  # on 2 ranks: 2 × 2, under no_sync once


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


def _refusal(check) -> str | None:
    try:
        check()
    except UserError as exc:
        return str(exc)
    return None


def _start_up_checks(rank: int, tmp: Path, dist) -> dict:
    """The runner's start-up checks, with each rank shown the folders the test chooses for it."""
    group = long_wait_group(60)
    out: dict = {}
    shared = tmp / "shared"
    if rank == 0:
        (shared / "checkpoints" / "step-00000003").mkdir(parents=True)
        (shared / "checkpoints" / "step-00000003" / "manifest.json").write_text(json.dumps({"sequence": 1}))
    torch.distributed.barrier(group=group)
    out["shared"] = _refusal(lambda: check_shared_run_dir(dist, group, root=shared, checkpoints=shared / "checkpoints"))
    out["marker_left"] = (shared / distributed.RANK_CHECK_NAME).exists()
    # each node its own folder of the same name: rank 1 never sees rank 0's nonce
    own = tmp / f"node{rank}" / "run"
    own.mkdir(parents=True)
    out["unshared"] = _refusal(lambda: check_shared_run_dir(dist, group, root=own, checkpoints=own / "checkpoints"))
    # the folder is shared but rank 1 lists other checkpoints (a stale view): it would resume elsewhere
    theirs = shared / "checkpoints" if rank == 0 else tmp / "stale"
    out["stale"] = _refusal(lambda: check_shared_run_dir(dist, group, root=shared, checkpoints=theirs))

    # data in turns: rank 0 first, then each node's first rank (rank 1 plays a second node's), then the rest
    made = tmp / "prepared-by-rank0"
    node = replace(dist, local_rank=0)

    def prepare() -> tuple[str, float]:
        if rank == 0:
            made.write_text("data")
            return "made", 5.0
        return ("found" if made.exists() else "missing"), 2.0

    def unreadable_on_rank1() -> tuple[str, float]:
        if rank == 1:
            raise UserError("data: /nowhere cannot be read")
        return "ok", 0.0

    out["turns"] = in_turns(node, group, prepare)
    out["failed"] = _refusal(lambda: in_turns(dist, group, unreadable_on_rank1))
    return out


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
    # 4. accumulation on each rank: gradients stay local on all but the last micro-step (no_sync)
    skipped_syncs = []
    no_sync = nn.parallel.DistributedDataParallel.no_sync

    def counting(self):
        skipped_syncs.append(1)
        return no_sync(self)

    nn.parallel.DistributedDataParallel.no_sync = counting  # type: ignore[method-assign]
    result, weights = _train(Path(tmp), fit_to_world(ACCUM_PLAN, WORLD)[0], clock=FakeClock(), train_dt=1.0,
                             dist=dist, name="accum")
    nn.parallel.DistributedDataParallel.no_sync = no_sync  # type: ignore[method-assign]
    out["accum"] = {"tokens": result.tokens, "weights": weights, "no_sync": len(skipped_syncs)}
    # 5. with compile on: what torch.compile is given (not compiled: slow on the CPU, and not what is tested)
    compiled: list[nn.Module] = []
    real_compile = torch.compile
    torch.compile = lambda module, **kwargs: compiled.append(module) or module  # type: ignore[assignment]
    try:
        _train(Path(tmp), replace(SPEC_DDP, max_steps=1, compile=True), clock=FakeClock(), train_dt=1.0, dist=dist,
               name="compile")
    finally:
        torch.compile = real_compile
    out["compiled"] = [(type(m).__name__, type(getattr(m, "module", None)).__name__) for m in compiled]
    out["checks"] = _start_up_checks(rank, Path(tmp), dist)
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
    while not context.join(timeout=1):
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
    _, single = _train(tmp_path, replace(PLAN_SPEC, max_steps=4), clock=FakeClock(), train_dt=1.0,
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


def test_a_plan_for_one_process_keeps_its_global_batch_on_two_ranks() -> None:
    assert (SPEC_DDP.grad_accum, SPEC_DDP.world_size) == (1, 2)
    assert SPEC_DDP.tokens_per_step() == PLAN_SPEC.tokens_per_step()
    assert NOTE is not None and "grad_accum per rank 2 -> 1" in NOTE
    assert fit_to_world(PLAN_SPEC, 1) == (PLAN_SPEC, None)
    # and back: a plan sized for 2 ranks run by one process accumulates both ranks' micro-batches
    assert fit_to_world(SPEC_DDP, 1)[0] == PLAN_SPEC


def test_a_plan_whose_accumulation_cannot_be_shared_is_refused() -> None:
    with pytest.raises(UserError, match=r"1 rank\(s\) × grad_accum 3 = 3 micro-batches .* 2 ranks cannot share"):
        fit_to_world(replace(SPEC, grad_accum=3), 2)
    with pytest.raises(UserError, match="4 ranks"):
        fit_to_world(replace(SPEC, grad_accum=3, world_size=2), 4)
    assert fit_to_world(replace(SPEC, grad_accum=3, world_size=2), 3)[0].grad_accum == 2


def test_accumulation_under_ddp_matches_one_process(ddp_run, tmp_path: Path) -> None:
    _, outs = ddp_run
    fitted = fit_to_world(ACCUM_PLAN, WORLD)[0]
    assert fitted.grad_accum == 2
    assert all(o["accum"]["no_sync"] == 3 for o in outs)  # 3 steps × (2 - 1) micro-steps without all-reduce
    assert outs[0]["accum"]["tokens"] == 3 * ACCUM_PLAN.tokens_per_step()  # every rank's tokens counted
    torch.set_num_threads(1)
    _, single = _train(tmp_path, ACCUM_PLAN, clock=FakeClock(), train_dt=1.0, dist=None, name="single")
    for k, w in outs[0]["accum"]["weights"].items():
        torch.testing.assert_close(w, single[k], rtol=1e-4, atol=1e-6)
        assert torch.equal(w, outs[1]["accum"]["weights"][k])


def test_compile_wraps_ddp_which_wraps_the_loss(ddp_run) -> None:
    _, outs = ddp_run
    for o in outs:
        assert o["compiled"] == [("DistributedDataParallel", LMLoss.__name__)]


def test_the_loop_keeps_the_global_batch_of_a_spec_sized_for_other_ranks(tmp_path: Path) -> None:
    # a spec sized for 2 ranks, trained by one process (a study, a bench): 2 micro-batches per step, not 1
    result, _ = _train(tmp_path, replace(SPEC_DDP, max_steps=2), clock=FakeClock(), train_dt=1.0, dist=None,
                       name="unfitted")
    assert result.tokens == 2 * SPEC_DDP.tokens_per_step() == 2 * PLAN_SPEC.tokens_per_step()


def test_every_rank_refuses_a_run_folder_it_does_not_share(ddp_run) -> None:
    _, outs = ddp_run
    host = socket.gethostname()
    c0, c1 = outs[0]["checks"], outs[1]["checks"]
    assert c0["shared"] is None and c1["shared"] is None
    assert not c0["marker_left"]
    assert c0["unshared"] == c1["unshared"]  # every rank says the same one line
    assert c0["unshared"].startswith(f"rank 1 on {host} does not see the run folder")
    assert "filesystem shared by every node" in c0["unshared"] and "\n" not in c0["unshared"]
    assert c0["stale"] == c1["stale"]
    assert "rank 1" in c0["stale"] and "no checkpoint" in c0["stale"] and "step-00000003 (save 1)" in c0["stale"]


def test_data_is_loaded_in_turns_and_a_failure_is_everyones(ddp_run) -> None:
    _, outs = ddp_run
    assert outs[0]["checks"]["turns"] == ("made", 7.0)  # rank 0 prepared (5 s), then node 2's first rank (2 s)
    assert outs[1]["checks"]["turns"] == ("found", 7.0)  # ... which found it: rank 0 went first
    host = socket.gethostname()
    failed = f"rank 1 on {host}: data: /nowhere cannot be read"
    assert outs[0]["checks"]["failed"] == outs[1]["checks"]["failed"] == failed
