"""Checkpoints: atomic saves, keep-k pruning, fallback past a corrupt newest one, weights_only, tied weights."""

from __future__ import annotations

import errno
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from oneday.errors import UserError
from oneday.models.build import build_model, param_groups
from oneday.runner import checkpoint as checkpoint_module
from oneday.runner.checkpoint import CheckpointError, CheckpointStore, capture_rng, restore_rng
from tests.factories import tiny_model

torch.set_num_threads(1)


def _model_and_optimizer(*, tied: bool = False, seed: int = 0):
    spec = tiny_model(tied_embeddings=tied, vocab_size=128, seq_len=16)
    model = build_model(spec, seed=seed)
    optimizer = torch.optim.AdamW(param_groups(model, spec, lr=1e-3, weight_decay=0.1), fused=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids).logits.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _state(step: int) -> dict:
    return {"step": step, "tokens": step * 100, "cursor": step * 4, "lr_scale": 1.0, "rng": capture_rng()}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_weights_optimizer_state(tmp_path: Path, tied: bool) -> None:
    model, optimizer = _model_and_optimizer(tied=tied)
    store = CheckpointStore(tmp_path, keep=2)
    path = store.save(model=model, optimizer=optimizer, state=_state(12))
    assert path.name == "step-00000012"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.pt", "state.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"

    fresh, fresh_opt = _model_and_optimizer(tied=tied, seed=1)
    assert not _same_weights(model, fresh)
    ckpt = store.latest()
    assert ckpt is not None and ckpt.step == 12 and ckpt.state["tokens"] == 1200 and ckpt.skipped == ()
    ckpt.restore(fresh, fresh_opt)
    assert _same_weights(model, fresh)
    if tied:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    a, b = optimizer.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key, value in a["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, b["state"][key][name])


def test_uncompiled_names_without_wrapper_prefixes(tmp_path: Path) -> None:
    from safetensors import safe_open

    model, optimizer = _model_and_optimizer()

    class Wrapped(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    path = CheckpointStore(tmp_path, keep=1).save(model=Wrapped(model), optimizer=optimizer, state=_state(1))
    with safe_open(path / "model.safetensors", framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and not any(k.startswith(("_orig_mod", "module.")) for k in keys)


def test_files_load_with_weights_only(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    path = CheckpointStore(tmp_path, keep=1).save(model=model, optimizer=optimizer, state=_state(3))
    for name in ("optimizer.pt", "state.pt"):
        torch.load(path / name, weights_only=True)  # raises if anything needs arbitrary unpickling


def test_rng_states_round_trip_through_weights_only(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = capture_rng()
    torch.save(saved, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_keeps_the_newest_k(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 5, 20, 100):
        store.save(model=model, optimizer=optimizer, state=_state(step))
    assert [p.name for p in store.folders()] == ["step-00000020", "step-00000100"]
    store.save(model=model, optimizer=optimizer, state=_state(100))  # the same step again replaces it
    assert [p.name for p in store.folders()] == ["step-00000020", "step-00000100"]


def test_crash_mid_save_leaves_previous_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)
    store.save(model=model, optimizer=optimizer, state=_state(10))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing the optimizer state

    monkeypatch.setattr(checkpoint_module, "_torch_save", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(model=model, optimizer=optimizer, state=_state(20))
    monkeypatch.undo()
    assert [p.name for p in store.folders()] == ["step-00000010"]
    assert store.latest().step == 10
    # a temp folder left by a real crash (no cleanup ran) is never mistaken for a checkpoint, and is cleared
    (tmp_path / ".tmp-step-00000030-999").mkdir()
    (tmp_path / ".tmp-step-00000030-999" / "model.safetensors").write_bytes(b"partial")
    assert store.latest().step == 10
    store.save(model=model, optimizer=optimizer, state=_state(40))
    assert not list(tmp_path.glob(".tmp-*"))


def test_disk_full_is_a_clear_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)
    store.save(model=model, optimizer=optimizer, state=_state(10))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"disk is full.*step-00000010 is kept") as info:
        store.save(model=model, optimizer=optimizer, state=_state(20))
    assert isinstance(info.value, UserError)
    assert "No space left on device" in str(info.value)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*")), "temp folder not cleaned"
    assert store.latest().step == 10


def test_truncated_newest_falls_back_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=3)
    for step in (10, 20):
        store.save(model=model, optimizer=optimizer, state=_state(step))
    newest = tmp_path / "step-00000020" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="oneday.runner.checkpoint"):
        ckpt = store.latest()
    assert ckpt is not None and ckpt.step == 10
    assert len(ckpt.skipped) == 1 and ckpt.skipped[0].startswith("step-00000020: ")
    assert "step-00000020" in caplog.text and "optimizer.pt" in caplog.text and "truncated" in caplog.text
    assert "Traceback" not in caplog.text


def test_corrupt_file_of_the_right_size_also_falls_back(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=3)
    for step in (10, 20):
        store.save(model=model, optimizer=optimizer, state=_state(step))
    weights = tmp_path / "step-00000020" / "model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # same size, garbage header
    ckpt = store.latest()
    assert ckpt.step == 10 and ckpt.skipped[0].startswith("step-00000020: ")
    # nothing loadable at all: None, not an exception
    (tmp_path / "step-00000010" / "manifest.json").write_text(json.dumps({"format_version": 99}))
    assert store.latest() is None


def test_wrong_model_is_refused(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=1)
    store.save(model=model, optimizer=optimizer, state=_state(1))
    other = build_model(tiny_model(vocab_size=128, seq_len=16, n_layer=3))
    with pytest.raises(CheckpointError, match="do not fit"):
        store.latest().restore(other)


def test_unwritable_folder_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot create"):
        CheckpointStore(blocker / "ckpt", keep=1)


def test_pruning_keeps_the_newest_written_not_the_highest_step(tmp_path: Path) -> None:
    """A stray higher-numbered folder (copied in, or left by another run) used to outrank the checkpoint just
    written: with keep=1 the fresh one was deleted at once, and a corrupt stray was kept forever."""
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=1)
    store.save(model=model, optimizer=optimizer, state=_state(10))
    stray = tmp_path / "step-99999999"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"garbage")
    path = store.save(model=model, optimizer=optimizer, state=_state(20))
    assert path.exists(), "the checkpoint just written was pruned"
    assert [p.name for p in store.folders()] == ["step-00000020"]
    assert (tmp_path / "step-99999999.bad" / "model.safetensors").read_bytes() == b"garbage", "not moved aside"
    assert store.latest().step == 20
    store.save(model=model, optimizer=optimizer, state=_state(30))  # moved aside once: not touched again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-99999999.bad"]


def test_a_whole_stray_with_a_higher_step_is_older_than_a_new_save(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)
    store.save(model=model, optimizer=optimizer, state=_state(500))
    store.save(model=model, optimizer=optimizer, state=_state(7))  # e.g. a new run after the folder was reused
    assert [p.name for p in store.folders()] == ["step-00000500", "step-00000007"]
    assert store.latest().step == 7


def test_a_checkpoint_of_another_shape_falls_back_to_one_that_fits(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=3)
    store.save(model=model, optimizer=optimizer, state=_state(10))
    wide = build_model(tiny_model(vocab_size=128, seq_len=16, d_model=32, n_head=2, d_ff=96))
    wide_opt = torch.optim.AdamW(wide.parameters())
    store.save(model=wide, optimizer=wide_opt, state=_state(20))
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    restored = store.restore_latest(fresh, fresh_opt)
    assert restored.step == 10 and restored.skipped[0].startswith("step-00000020: ")
    assert _same_weights(model, fresh)
    # only checkpoints of another shape: refused in one line, nothing restored
    only_wide = CheckpointStore(tmp_path / "wide", keep=1)
    only_wide.save(model=wide, optimizer=wide_opt, state=_state(5))
    with pytest.raises(CheckpointError, match="no checkpoint fits this model") as info:
        only_wide.restore_latest(fresh, fresh_opt)
    assert "\n" not in str(info.value) and "another shape" in str(info.value)


def test_a_full_disk_reported_by_torch_as_unexpected_pos_says_disk_full(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)
    store.save(model=model, optimizer=optimizer, state=_state(10))

    def torch_on_a_full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 960")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 4096})())
    with pytest.raises(CheckpointError, match=r"unexpected pos.*the disk is full.*step-00000010 is kept"):
        store.save(model=model, optimizer=optimizer, state=_state(20))


def test_a_second_ctrl_c_inside_torch_save_is_an_interrupt_not_a_write_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save turns a KeyboardInterrupt raised in its writer into "RuntimeError: unexpected pos": the user
    who pressed Ctrl-C twice got exit 2 and a misleading checkpoint error instead of 130 "interrupted"."""
    from oneday import signals

    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)

    def ctrl_c_inside_torch(*args, **kwargs):
        try:
            signals.raise_interrupt(2, None)
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    monkeypatch.setattr(torch, "save", ctrl_c_inside_torch)
    with pytest.raises(KeyboardInterrupt):
        store.save(model=model, optimizer=optimizer, state=_state(20))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tied", [False, True])
def test_a_background_save_writes_the_snapshot_not_what_training_did_since(tmp_path: Path, tied: bool) -> None:
    model, optimizer = _model_and_optimizer(tied=tied)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    store = CheckpointStore(tmp_path, keep=2)
    path = store.save_async(model=model, optimizer=optimizer, state=_state(12))
    with torch.no_grad():  # training goes on while the write runs
        for p in model.parameters():
            p.add_(1.0)
        for s in optimizer.state.values():
            s["exp_avg"].add_(1.0)
    assert store.wait() == path and path.name == "step-00000012"
    assert store.wait() is None  # nothing pending any more
    fresh, fresh_opt = _model_and_optimizer(tied=tied, seed=1)
    store.latest().restore(fresh, fresh_opt)
    assert all(torch.equal(expected[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, fresh_opt.state.values(), strict=True))
    if tied:
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    # the next background save waits for this one; the sequence goes on
    store.save_async(model=model, optimizer=optimizer, state=_state(13))
    store.save(model=model, optimizer=optimizer, state=_state(14))
    assert [p.name for p in store.folders()] == ["step-00000013", "step-00000014"]


def test_a_failed_background_write_is_reported_once_at_the_next_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _model_and_optimizer()
    store = CheckpointStore(tmp_path, keep=2)
    store.save(model=model, optimizer=optimizer, state=_state(10))
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    store.save_async(model=model, optimizer=optimizer, state=_state(20))  # returns: the failure comes later
    with pytest.raises(CheckpointError, match=r"disk is full.*step-00000010 is kept") as info:
        store.wait()
    assert "\n" not in str(info.value)
    assert store.wait() is None
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*")) and store.latest().step == 10


_KILLED_MID_WRITE = """
import sys, time, torch
from oneday.runner import checkpoint as checkpoint_module
from oneday.runner.checkpoint import CheckpointStore
model = torch.nn.Linear(64, 64)
optimizer = torch.optim.AdamW(model.parameters())
model(torch.ones(2, 64)).sum().backward()
optimizer.step()
store = CheckpointStore(sys.argv[1], keep=3)
store.save(model=model, optimizer=optimizer, state={"step": 10})
def stuck(obj, path):
    path.write_bytes(b"partial")
    print("writing", flush=True)
    time.sleep(60)
checkpoint_module._torch_save = stuck
store.save_async(model=model, optimizer=optimizer, state={"step": 20})
time.sleep(60)
"""


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint_whole(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait()
    assert list(tmp_path.glob(".tmp-step-00000020-*")), "the write should have been under way"
    store = CheckpointStore(tmp_path, keep=3)
    assert [p.name for p in store.folders()] == ["step-00000010"] and store.latest().step == 10
    model, optimizer = torch.nn.Linear(64, 64), torch.optim.AdamW(torch.nn.Linear(64, 64).parameters())
    store.latest().restore(model)  # whole: it loads
    store.save_async(model=model, optimizer=optimizer, state={"step": 30})
    store.wait()
    assert not list(tmp_path.glob(".tmp-*")) and store.latest().step == 30


def test_the_cost_model_charges_a_background_checkpoint_its_snapshot_and_the_final_one_its_write() -> None:
    from oneday.runner import costs

    params = 1_100_000_000  # 13.2 GB of weights and moments
    write = costs.checkpoint_write_seconds(params)
    assert write == pytest.approx(0.5 + 13.2e9 / 200e6)
    snapshot = costs.checkpoint_snapshot_seconds(params)
    assert costs.checkpoint_seconds(params, every_seconds=1800) == pytest.approx(snapshot)
    assert costs.checkpoint_seconds(params, every_seconds=1800) < write / 4
    # checkpoints closer together than a write takes: the rest of the previous write is waited for
    assert costs.checkpoint_seconds(params, every_seconds=60) == pytest.approx(
        costs.checkpoint_snapshot_seconds(params) + write - 60)
