"""The training loop on a tiny CPU model: step budget, bitwise resume, a fake clock, bad steps and rollbacks."""

from __future__ import annotations

import itertools
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from oneday.errors import UserError
from oneday.models.build import build_model, param_groups
from oneday.plan import TrainSpec
from oneday.runner.checkpoint import CheckpointStore
from oneday.runner.faults import INJECT_NAN_ENV, INJECT_OOM_ENV
from oneday.runner.loop import MAX_ROLLBACKS, DivergedError, train
from oneday.runner.pacing import Pacer
from oneday.runner.records import EvalRecord, LoopResult, NullObserver, StepRecord
from oneday.runner.step import is_glibc
from tests.factories import tiny_model

torch.set_num_threads(1)

MODEL = tiny_model(vocab_size=256, seq_len=32)
SPEC = TrainSpec(
    budget_seconds=1000.0, train_seconds=1000.0, seq_len=32, micro_batch=4, grad_accum=2, lr=3e-3,
    planned_tokens=100_000, planned_steps=1000, device="cpu", precision="fp32", threads=1,
    warmup_fraction=0.1, cooldown_fraction=0.3, final_lr_fraction=0.1, eval_every_seconds=1e9,
    eval_tokens=256, checkpoint_every_seconds=1e9, keep_checkpoints=3, seed=5,
)
_rng = np.random.default_rng(0)
# A little structure (token t is often followed by t + 1) so that the loss can fall.
_base = _rng.integers(0, 256, 30_000)
TRAIN = np.where(_rng.random(30_000) < 0.5, (np.roll(_base, 1) + 1) % 256, _base).astype(np.uint16)
VAL = _rng.integers(0, 256, 2_000).astype(np.uint16)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class Recorder(NullObserver):
    def __init__(self, *, stop: threading.Event | None = None, stop_at: int | None = None,
                 crash_at: int | None = None) -> None:
        self.steps: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self.events: list[tuple[str, str, int]] = []
        self.starts: list[dict] = []
        self.stop, self.stop_at, self.crash_at = stop, stop_at, crash_at

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self.starts.append({"step": step, "tokens": tokens, "resumed": resumed})

    def on_step(self, record: StepRecord) -> None:
        self.steps.append(record)
        if self.stop_at is not None and record.step >= self.stop_at:
            self.stop.set()
        if self.crash_at is not None and record.step >= self.crash_at:
            raise RuntimeError("simulated crash")

    def on_eval(self, record: EvalRecord) -> None:
        self.evals.append(record)

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        self.events.append((kind, message, step))


class TimedStore(CheckpointStore):
    """A store whose saves take `save_dt` seconds on the fake clock."""

    def __init__(self, directory: Path, *, keep: int, clock: FakeClock, save_dt: float) -> None:
        super().__init__(directory, keep=keep)
        self.clock, self.save_dt = clock, save_dt

    def save(self, **kwargs):
        self.clock.advance(self.save_dt)
        return super().save(**kwargs)

    def save_async(self, **kwargs):
        self.clock.advance(self.save_dt)
        return super().save_async(**kwargs)


def _run(
    tmp: Path, spec: TrainSpec, *, clock=None, train_dt: float = 1.0, eval_dt: float = 0.1, save_dt: float = 0.0,
    deadline: float = 1e12, observer=None, stop=None, store: CheckpointStore | None = None, log_every: int = 1,
    plan_hash: str = "plan-a",
) -> tuple[LoopResult, torch.nn.Module]:
    """Build the tiny model (same seed every time) and train it; a fake clock advances per forward pass."""
    model = build_model(MODEL, seed=0)
    clock = clock if clock is not None else FakeClock()
    model.register_forward_pre_hook(lambda module, args: clock.advance(train_dt if module.training else eval_dt))
    store = store or TimedStore(tmp / "ckpt", keep=spec.keep_checkpoints, clock=clock, save_dt=save_dt)
    result = train(
        model=model, param_groups=param_groups(model, MODEL, lr=spec.lr, weight_decay=spec.weight_decay), spec=spec,
        train_tokens=TRAIN, val_tokens=VAL, val_bytes_per_token=3.0, checkpoints=store, deadline=deadline,
        flops_per_token=MODEL.flops_per_token(), peak_flops=1e11, clock=clock, observer=observer, stop=stop,
        plan_hash=plan_hash, log_every=log_every,
    )
    return result, model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_budget_run(tmp_path: Path) -> None:
    recorder = Recorder()
    result, model = _run(tmp_path, replace(SPEC, max_steps=30, eval_every_seconds=20.0), observer=recorder,
                         log_every=5)
    assert result.steps == 30 and not result.interrupted
    assert result.tokens == 30 * SPEC.tokens_per_step()
    assert [r.step for r in recorder.steps] == [5, 10, 15, 20, 25, 30]
    assert recorder.steps[-1].loss < recorder.steps[0].loss, "the loss should fall"
    assert result.final_lr == pytest.approx(SPEC.lr * SPEC.final_lr_fraction)
    assert result.final_val_loss is not None and np.isfinite(result.final_val_loss)
    assert result.final_val_bpb == pytest.approx(result.final_val_loss / np.log(2) / 3.0)
    assert [e.final for e in recorder.evals][-1] and len(recorder.evals) >= 2  # periodic and final
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000030"
    assert result.skipped_steps == result.rollbacks == result.resumes == 0
    assert result.mfu > 0 and result.mean_tokens_per_s > 0
    assert recorder.starts == [{"step": 0, "tokens": 0, "resumed": False}]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_interrupt_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    spec = replace(SPEC, max_steps=12)
    _, full = _run(tmp_path / "full", spec)

    stop = threading.Event()
    first, _ = _run(tmp_path / "split", spec, observer=Recorder(stop=stop, stop_at=5), stop=stop)
    assert first.interrupted and 5 <= first.steps < 12
    assert first.final_val_loss is None
    assert [e.kind for e in first.events][-2:] == ["interrupt", "checkpoint"]

    recorder = Recorder()
    second, resumed = _run(tmp_path / "split", spec, observer=recorder)
    assert second.steps == 12 and second.resumes == 1 and not second.interrupted
    assert recorder.starts == [{"step": first.steps, "tokens": first.tokens, "resumed": True}]
    assert recorder.events[0][0] == "resume"
    assert _bitwise_equal(_weights(full), _weights(resumed))


def test_crash_resume_from_older_checkpoint_is_bitwise_identical(tmp_path: Path) -> None:
    """A crash after periodic checkpoints; the newest checkpoint is then found truncated."""
    spec = replace(SPEC, max_steps=14, checkpoint_every_seconds=5.0)  # ~every 2-3 steps of 2 fake seconds
    _, full = _run(tmp_path / "full", spec)

    crashing = CheckpointStore(tmp_path / "crash" / "ckpt", keep=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "crash", spec, observer=Recorder(crash_at=10), store=crashing)
    crashing.wait()  # a background write the crash left running (a process would finish it before exiting)
    store = CheckpointStore(tmp_path / "crash" / "ckpt", keep=3)
    folders = store.folders()
    assert len(folders) >= 2
    newest = folders[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])

    recorder = Recorder()
    result, resumed = _run(tmp_path / "crash", spec, observer=recorder)
    kinds = [kind for kind, _, _ in recorder.events]
    assert kinds[:2] == ["checkpoint-fallback", "resume"]
    assert folders[-1].name in recorder.events[0][1]
    assert result.steps == 14
    assert _bitwise_equal(_weights(full), _weights(resumed))


def test_fake_clock_final_lr_and_deadline(tmp_path: Path) -> None:
    clock = FakeClock()
    spec = replace(SPEC, eval_every_seconds=20.0, checkpoint_every_seconds=40.0, planned_steps=500)  # prior 2 s
    deadline = 200.0
    recorder = Recorder()
    _run(tmp_path, spec, clock=clock, train_dt=1.0, eval_dt=0.5, save_dt=3.0, deadline=deadline, observer=recorder)
    assert clock() <= deadline, f"finished at {clock()} after the deadline {deadline}"
    assert clock() >= 0.9 * deadline, f"finished at {clock()}, wasting the budget"
    lrs = [r.lr for r in recorder.steps]
    assert lrs[-1] == SPEC.lr * SPEC.final_lr_fraction, "the last step must end the schedule"
    peak = lrs.index(max(lrs))
    assert all(b <= a for a, b in itertools.pairwise(lrs[peak:])), "LR rose again after warmup"
    assert sum(1 for r in recorder.steps if r.lr < SPEC.lr) > 10, "no visible cooldown"
    assert recorder.evals[-1].final and any(not e.final for e in recorder.evals)
    assert "checkpoint" in [kind for kind, _, _ in recorder.events]


def test_a_checkpoint_on_cadence_even_when_less_than_an_interval_is_left(tmp_path: Path) -> None:
    """A 100 s run with a 60 s cadence: the periodic checkpoint at 60 s is written (a kill at 90 s must not
    lose everything), although less than one interval of training is left after it."""
    clock, recorder = FakeClock(), Recorder()
    spec = replace(SPEC, checkpoint_every_seconds=60.0, planned_steps=100, train_seconds=100.0)
    _run(tmp_path, spec, clock=clock, train_dt=1.0, save_dt=1.0, deadline=100.0, observer=recorder)
    saved = [(message, step) for kind, message, step in recorder.events if kind == "checkpoint"]
    assert len(saved) == 2 and "final" not in saved[0][0] and "final" in saved[1][0]
    assert 25 <= saved[0][1] <= 31  # 2 s a step (two micro-batches)


def test_no_periodic_checkpoint_when_the_end_comes_sooner_than_one_takes() -> None:
    spec = replace(SPEC, checkpoint_every_seconds=60.0, planned_steps=100, train_seconds=100.0)
    due = {}
    for cost in (1.0, 45.0):
        pacer = Pacer(spec, deadline=100.0, eval_seconds=0.1, checkpoint_seconds=cost, train_elapsed=0.0, now=0.0)
        due[cost] = pacer.due(now=61.0, train_elapsed=61.0, step_seconds=1.0, step=61, stop=False).checkpoint
    assert due == {1.0: True, 45.0: False}


def test_horizon_shrinks_when_evals_are_slow(tmp_path: Path) -> None:
    spec = replace(SPEC, eval_every_seconds=20.0, planned_steps=500)
    runs = {}
    for name, eval_dt in (("fast", 0.05), ("slow", 2.0)):
        clock, recorder = FakeClock(), Recorder()
        result, _ = _run(tmp_path / name, spec, clock=clock, train_dt=1.0, eval_dt=eval_dt, deadline=200.0,
                         observer=recorder)
        assert clock() <= 200.0
        assert recorder.steps[-1].lr == SPEC.lr * SPEC.final_lr_fraction
        runs[name] = (result, {r.step: r for r in recorder.steps})
    fast, slow = runs["fast"], runs["slow"]
    assert slow[0].steps < fast[0].steps
    # at the same step, the slow-eval run is further through its (shorter) schedule
    at = 40
    assert slow[1][at].budget_fraction > fast[1][at].budget_fraction
    assert slow[1][at].lr <= fast[1][at].lr


def test_train_seconds_caps_the_horizon(tmp_path: Path) -> None:
    clock = FakeClock()
    spec = replace(SPEC, train_seconds=30.0, planned_steps=15)
    result, _ = _run(tmp_path, spec, clock=clock, train_dt=1.0, deadline=10_000.0)
    assert result.train_seconds <= 30.0 + 1e-9
    assert result.steps == 16  # 15 timed steps of 2 s plus the untimed warm-up step
    assert result.final_lr == SPEC.lr * SPEC.final_lr_fraction


def test_nan_step_is_skipped_without_touching_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = replace(SPEC, max_steps=6)
    stop = threading.Event()
    stopped, at_stop = _run(tmp_path / "a", spec, observer=Recorder(stop=stop, stop_at=3), stop=stop)
    k = stopped.steps
    assert k < 5

    monkeypatch.setenv(INJECT_NAN_ENV, f"{k + 1}-")  # every step after the first run stopped goes bad
    recorder = Recorder()
    result, skipped_rest = _run(tmp_path / "b", spec, observer=recorder)
    assert result.steps == 6 and result.skipped_steps == 6 - k and result.rollbacks == 0
    skips = [step for kind, message, step in recorder.events if kind == "skip" and "update skipped" in message]
    assert skips == list(range(k + 1, 7))
    assert np.isfinite(recorder.steps[k - 1].loss) and np.isnan(recorder.steps[k].loss)
    # the skipped updates changed nothing: the same weights as the run that stopped after step k
    assert _bitwise_equal(_weights(at_stop), _weights(skipped_rest))


def test_repeated_nans_roll_back_with_halved_lr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_NAN_ENV, "8-10")
    spec = replace(SPEC, max_steps=16, checkpoint_every_seconds=9.0)
    recorder = Recorder()
    result, _ = _run(tmp_path, spec, observer=recorder)
    assert result.skipped_steps == 3 and result.rollbacks == 1
    rollbacks = [(message, step) for kind, message, step in recorder.events if kind == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0][1] == 10 and "halved to 0.5" in rollbacks[0][0]
    by_step = {r.step: r for r in recorder.steps}
    # from step 11 on, the LR is half of what the step-keyed schedule gives
    from oneday.runner.schedule import lr_multiplier

    expected = SPEC.lr * 0.5 * lr_multiplier(12 / 16, warmup_fraction=0.1, cooldown_fraction=0.3,
                                             cooldown_shape="1-sqrt", final_lr_fraction=0.1)
    assert by_step[12].lr == pytest.approx(expected)
    final = CheckpointStore(tmp_path / "ckpt", keep=3).latest()
    assert final.step == 16 and final.state["lr_scale"] == 0.5 and final.state["rollbacks"] == 1


def test_nans_without_a_checkpoint_keep_skipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_NAN_ENV, "2-")
    result, model = _run(tmp_path, replace(SPEC, max_steps=8), log_every=3)
    assert result.skipped_steps == 7 and result.rollbacks == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_rollbacks_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_NAN_ENV, "3-")
    spec = replace(SPEC, max_steps=100, checkpoint_every_seconds=1.0)
    recorder = Recorder()
    with pytest.raises(DivergedError, match=r"lower train\.lr") as info:
        _run(tmp_path, spec, observer=recorder)
    assert isinstance(info.value, UserError)
    assert sum(1 for kind, _, _ in recorder.events if kind == "rollback") == MAX_ROLLBACKS


def test_resume_refuses_another_plans_checkpoints(tmp_path: Path) -> None:
    spec = replace(SPEC, max_steps=2)
    _run(tmp_path, spec, plan_hash="plan-a")
    with pytest.raises(UserError, match="another plan"):
        _run(tmp_path, spec, plan_hash="plan-b")


def test_a_finished_run_resumed_does_nothing_more(tmp_path: Path) -> None:
    spec = replace(SPEC, max_steps=3)
    _, first = _run(tmp_path, spec)
    result, again = _run(tmp_path, spec)
    assert result.steps == 3 and result.resumes == 1
    assert _bitwise_equal(_weights(first), _weights(again))


def test_out_of_memory_halves_the_micro_batch_and_retries_the_same_windows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card that fits 2 windows a micro-batch, a plan of 4 × 2: the run goes on at 2 × 4, the same global batch,
    and trains exactly what a plan of 2 × 4 would have (the failed step's windows retried, not skipped)."""
    spec = replace(SPEC, max_steps=5, checkpoint_every_seconds=3.0)
    _, planned_small = _run(tmp_path / "small", replace(spec, micro_batch=2, grad_accum=4))
    monkeypatch.setenv(INJECT_OOM_ENV, "2")
    recorder = Recorder()
    result, model = _run(tmp_path / "oom", spec, observer=recorder)
    assert result.steps == 5 and not result.interrupted
    assert result.tokens == 5 * spec.tokens_per_step()  # the global batch is unchanged
    assert result.micro_batch_changes == ("oom: micro-batch 4→2, accumulation 2→4",)
    oom = [message for kind, message, _ in recorder.events if kind == "oom"]
    assert len(oom) == 1 and oom[0].startswith("oom: micro-batch 4→2, accumulation 2→4 at step 1")
    assert _bitwise_equal(_weights(planned_small), _weights(model))


def test_out_of_memory_later_in_the_run_and_at_micro_batch_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INJECT_OOM_ENV, "1@3")  # step 3 only (a spike), twice halved: 4 → 2 → 1
    result, _ = _run(tmp_path / "late", replace(SPEC, max_steps=4))
    assert result.steps == 4 and result.tokens == 4 * SPEC.tokens_per_step()
    assert result.micro_batch_changes == ("oom: micro-batch 4→2, accumulation 2→4",
                                          "oom: micro-batch 2→1, accumulation 4→8")
    monkeypatch.setenv(INJECT_OOM_ENV, "0")  # nothing fits
    with pytest.raises(UserError, match=r"micro-batch 1 .*the model does not fit"):
        _run(tmp_path / "none", replace(SPEC, max_steps=2))


def test_a_failed_background_checkpoint_write_is_reported_and_training_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from oneday.runner import checkpoint as checkpoint_module

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_torch_save", full)
    recorder = Recorder()
    result, _ = _run(tmp_path, replace(SPEC, max_steps=6, checkpoint_every_seconds=3.0), observer=recorder)
    assert result.steps == 6
    errors = [message for kind, message, _ in recorder.events if kind == "checkpoint-error"]
    assert errors and all("the disk is full" in m and "\n" not in m for m in errors)
    assert any(m.endswith("(a background write)") for m in errors)  # the last one, joined at the end
    assert errors[-1].endswith("(the final checkpoint)")


def test_a_resume_on_a_smaller_card_goes_on_at_a_smaller_micro_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = replace(SPEC, max_steps=6)
    stop = threading.Event()
    first, _ = _run(tmp_path, spec, observer=Recorder(stop=stop, stop_at=3), stop=stop)
    assert first.interrupted and first.micro_batch_changes == ()
    monkeypatch.setenv(INJECT_OOM_ENV, "2")  # the resumed session's card fits half the micro-batch
    recorder = Recorder()
    second, _ = _run(tmp_path, spec, observer=recorder)
    assert second.steps == 6 and second.resumes == 1 and not second.interrupted
    assert second.tokens == 6 * spec.tokens_per_step()
    assert [kind for kind, _, _ in recorder.events][:2] == ["resume", "oom"]
    assert second.micro_batch_changes == ("oom: micro-batch 4→2, accumulation 2→4",)


KEPT_RSS_SCRIPT = """
import sys
import torch
from oneday.runner.step import keep_freed_memory

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
before = rss_mb()
block = torch.ones(40_000_000)  # 160 MB: over glibc's largest mmap threshold (32 MB)
del block
print(rss_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or not is_glibc(),
                    reason="glibc on Linux only")
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_step(tmp_path: Path) -> None:
    """Without it, glibc hands a large freed tensor back to the kernel and the next step faults it in again
    (45% of a small CPU step's time went to the kernel); with it, the freed block stays in the heap."""
    import subprocess
    import sys

    def grown_mb(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", KEPT_RSS_SCRIPT, mode], capture_output=True, text=True,
                             check=True)
        return float(out.stdout.strip())

    assert grown_mb("default") < 20
    assert grown_mb("keep") > 140
