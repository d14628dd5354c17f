"""The LR schedule's shape and the clock projection that ends the cooldown at the deadline."""

from __future__ import annotations

import itertools
import math

import pytest

from oneday.runner.schedule import clock_progress, lr_multiplier, train_seconds_left

SHAPES = ("1-sqrt", "linear", "cosine")


def _m(p: float, shape: str = "1-sqrt", *, warmup: float = 0.1, cooldown: float = 0.2, final: float = 0.0) -> float:
    return lr_multiplier(p, warmup_fraction=warmup, cooldown_fraction=cooldown, cooldown_shape=shape,
                         final_lr_fraction=final)


@pytest.mark.parametrize("shape", SHAPES)
def test_values_at_landmarks(shape: str) -> None:
    assert _m(0.0, shape) == 0.0
    assert _m(0.05, shape) == pytest.approx(0.5)
    assert _m(0.1, shape) == 1.0
    assert _m(0.5, shape) == 1.0
    assert _m(0.8, shape) == 1.0  # the cooldown starts here
    assert _m(1.0, shape, final=0.1) == 0.1
    assert _m(1.0, shape) == 0.0
    assert _m(-3.0, shape) == 0.0 and _m(7.0, shape, final=0.25) == 0.25  # clamped


def test_cooldown_formulas_at_midpoint() -> None:
    f = 0.1
    x = 0.5  # halfway through the cooldown: progress 0.9
    assert _m(0.9, "1-sqrt", final=f) == pytest.approx(f + (1 - f) * (1 - math.sqrt(x)))
    assert _m(0.9, "linear", final=f) == pytest.approx(f + (1 - f) * 0.5)
    assert _m(0.9, "cosine", final=f) == pytest.approx(f + (1 - f) * 0.5)
    # 1-sqrt drops faster early in the cooldown than linear (Hägele et al. 2024)
    assert _m(0.82, "1-sqrt") < _m(0.82, "linear")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("final", [0.0, 0.1])
def test_continuous_and_monotone_after_warmup(shape: str, final: float) -> None:
    n = 20_000
    values = [_m(i / n, shape, final=final) for i in range(n + 1)]
    jumps = [abs(b - a) for a, b in itertools.pairwise(values)]
    assert max(jumps) < 0.02, "the curve jumps"
    after_warmup = values[int(0.1 * n) :]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(after_warmup))
    cooldown = values[int(0.8 * n) + 1 :]
    assert all(b < a for a, b in itertools.pairwise(cooldown)), "not strictly decreasing in cooldown"


def test_no_warmup_no_cooldown() -> None:
    assert _m(0.0, warmup=0.0, cooldown=0.0) == 1.0
    assert _m(0.999, warmup=0.0, cooldown=0.0) == 1.0
    assert _m(1.0, warmup=0.0, cooldown=0.0, final=0.3) == 0.3


def test_bad_shape_rejected() -> None:
    with pytest.raises(ValueError, match="cooldown_shape"):
        _m(0.5, "step")


def test_train_seconds_left_reserves_overheads() -> None:
    kwargs = dict(eval_every_seconds=100.0, checkpoint_every_seconds=1000.0, safety=1.0, final_safety=1.0)
    assert train_seconds_left(now=0, deadline=1000, eval_seconds=0, checkpoint_seconds=0, **kwargs) == 1000
    # 1000 s left: final eval 10 + final save 20 + one periodic save 20, evals at 10 per 100 train-seconds
    left = train_seconds_left(now=0, deadline=1000, eval_seconds=10, checkpoint_seconds=20, **kwargs)
    assert left == pytest.approx((1000 - 10 - 20 - 20) / 1.1)
    assert left + 10 * left / 100 + 10 + 20 + 20 == pytest.approx(1000)
    assert train_seconds_left(now=2000, deadline=1000, eval_seconds=1, checkpoint_seconds=1, **kwargs) == 0.0
    # slack and a larger final safety factor come off the top
    tighter = train_seconds_left(now=0, deadline=1000, eval_seconds=10, checkpoint_seconds=20, slack_seconds=5,
                                 **{**kwargs, "final_safety": 1.5})
    assert tighter == pytest.approx((1000 - 1.5 * 30 - 20 - 5) / 1.1)
    # slower evals leave less time to train
    slow = train_seconds_left(now=0, deadline=1000, eval_seconds=30, checkpoint_seconds=20, **kwargs)
    assert slow < left


def test_clock_progress_ends_exactly_at_one() -> None:
    # 10 s trained, 1 s per step, 5.5 s left: 5 steps fit, the next ends at 11 of a 15 s horizon
    progress, steps = clock_progress(train_elapsed=10.0, step_seconds=1.0, train_left=5.5)
    assert steps == 5 and progress == pytest.approx(11 / 15)
    assert clock_progress(train_elapsed=14.0, step_seconds=1.0, train_left=1.2) == (1.0, 1)
    assert clock_progress(train_elapsed=15.0, step_seconds=1.0, train_left=0.9)[1] == 0
    # k·dt / dt must not floor to k − 1 through rounding
    assert clock_progress(train_elapsed=0.0, step_seconds=0.1, train_left=0.3)[1] == 3
    with pytest.raises(ValueError):
        clock_progress(train_elapsed=0.0, step_seconds=0.0, train_left=1.0)


def test_projected_run_walks_the_schedule_to_the_final_value() -> None:
    """Simulate the loop's projection with a fixed step time: progress climbs to exactly 1 at the last step."""
    elapsed, dt, budget = 0.0, 0.7, 50.0
    seen = []
    while True:
        progress, steps = clock_progress(train_elapsed=elapsed, step_seconds=dt, train_left=budget - elapsed)
        if steps < 1:
            break
        seen.append(progress)
        elapsed += dt
    assert len(seen) == int(budget / dt)
    assert seen[-1] == 1.0
    assert all(b > a for a, b in itertools.pairwise(seen))
    assert elapsed <= budget
