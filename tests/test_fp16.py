"""fp16 with a grad scaler, for GPUs without bf16 (compute capability < 8.0): the step, the loop's checkpoint of the
scaler, the plan. On this CPU the scaler runs enabled on a float32 model: the same code path minus the cast."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oneday.errors import UserError
from oneday.models.build import build_model, param_groups
from oneday.runner.checkpoint import CheckpointStore
from oneday.runner.faults import PoisonedLoss
from oneday.runner.step import LMLoss, TrainStep, autocast, grad_scaler, make_optimizer
from tests.factories import make_plan, tiny_model

SPEC = tiny_model()


def _step(*, scaler: torch.amp.GradScaler | None,
          poisoned_step: int | None = None) -> tuple[TrainStep, torch.nn.Module]:
    model = build_model(SPEC, seed=0)
    optimizer = make_optimizer(param_groups(model, SPEC, lr=1e-3, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.95))
    net: torch.nn.Module = LMLoss(model)
    if poisoned_step is not None:
        net = PoisonedLoss(net, lambda step: step == poisoned_step, first_step=0, grad_accum=2)
    return TrainStep(net, params=model.parameters(), optimizer=optimizer, grad_accum=2, grad_clip=1.0,
                     scaler=scaler), model


def _batches(count: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, SPEC.vocab_size, (4, SPEC.seq_len + 1), generator=gen) for _ in range(count)]


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_precision_factories() -> None:
    assert autocast("cuda", "fp16").keywords["dtype"] is torch.float16  # type: ignore[attr-defined]
    assert autocast("cuda", "bf16").keywords["dtype"] is torch.bfloat16  # type: ignore[attr-defined]
    assert isinstance(grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    assert grad_scaler("cuda", "bf16") is None and grad_scaler("cpu", "fp32") is None


def test_a_scaled_step_trains_as_an_unscaled_one() -> None:
    """The loss is scaled before backward and the gradients unscaled before clipping: with a power-of-two scale
    the update is bitwise the unscaled one, and the reported gradient norm is the true one."""
    plain, plain_model = _step(scaler=None)
    scaled, scaled_model = _step(scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    for batch in _batches(3):
        a, b = plain(batch), scaled(batch)
        assert torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(_weights(plain_model), _weights(scaled_model), strict=True))


def test_an_overflow_is_skipped_by_the_scaler_and_is_not_a_bad_step() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # scaled gradients overflow
    step, model = _step(scaler=scaler)
    before = _weights(model)
    loss, _norm, bad = step(_batches(1)[0]).tolist()
    assert math.isfinite(loss) and bad == 0.0  # the scaler's business: no skip event, no rollback
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(model), strict=True))
    assert scaler.get_scale() == 2.0**126  # backed off
    step(_batches(2)[1])
    assert {int(s["step"]) for s in step.optimizer.state.values()} == {1}  # 2 steps, 1 skipped


def test_a_nan_loss_under_the_scaler_is_a_bad_step_and_skipped() -> None:
    step, model = _step(scaler=torch.amp.GradScaler("cpu", init_scale=256.0), poisoned_step=2)
    batches = _batches(3)
    step(batches[0])
    before = _weights(model)
    assert step(batches[1]).tolist()[2] == 1.0
    assert all(torch.equal(x, y) for x, y in zip(before, _weights(model), strict=True))
    assert step(batches[2]).tolist()[2] == 0.0


def test_the_loop_checkpoints_and_resumes_the_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from oneday.runner import loop
    from tests.test_loop import MODEL, TRAIN, VAL, FakeClock
    from tests.test_loop import SPEC as LOOP_SPEC

    made: list[torch.amp.GradScaler] = []

    def scaler_on_cpu(device: str, precision: str) -> torch.amp.GradScaler:
        made.append(torch.amp.GradScaler("cpu", init_scale=1.0, growth_factor=2.0, growth_interval=1))
        return made[-1]  # doubles after every good step

    monkeypatch.setattr(loop, "grad_scaler", scaler_on_cpu)
    store = CheckpointStore(tmp_path / "ckpt", keep=2)

    def run(steps: int) -> None:
        model = build_model(MODEL, seed=0)
        clock = FakeClock()
        model.register_forward_pre_hook(lambda module, args: clock.advance(1.0))
        spec = replace(LOOP_SPEC, max_steps=steps)
        loop.train(model=model, param_groups=param_groups(model, MODEL, lr=spec.lr, weight_decay=spec.weight_decay),
                   spec=spec, train_tokens=TRAIN, val_tokens=VAL, val_bytes_per_token=3.0, checkpoints=store,
                   deadline=1e12, flops_per_token=MODEL.flops_per_token(), peak_flops=1e11, clock=clock,
                   plan_hash="plan-a")

    run(4)
    assert store.latest_state()["grad_scaler"]["scale"] == 16.0
    run(6)  # resumed at step 4: the scale goes on from 16, not from 1
    assert made[-1].get_scale() == 64.0


def test_fp16_is_refused_on_the_cpu() -> None:
    with pytest.raises(UserError, match=r"train\.precision"):
        make_plan(device="cpu", precision="fp16")
