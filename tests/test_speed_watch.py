"""`runner.speed_watch`: the run says when it trains slower than its plan measured (pure, milliseconds)."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

from oneday.runner.outputs import measured_as_planned
from oneday.runner.records import StepRecord
from oneday.runner.speed_watch import SpeedWatch, speed_note
from tests.factories import make_plan


def record(elapsed: float, tokens: int) -> StepRecord:
    return StepRecord(step=0, tokens=tokens, lr=1e-3, loss=5.0, grad_norm=1.0, tokens_per_s=0.0, mfu=0.0,
                      train_elapsed=elapsed, budget_fraction=0.0, epoch=0.0)


def watch(**kwargs) -> SpeedWatch:
    return SpeedWatch(planned_tokens_per_s=10_000.0, planned_train_seconds=600.0, planned_tokens=6_000_000,
                      device="cpu", **kwargs)


def feed(w: SpeedWatch, speeds: list[float], *, every: float = 10.0, start: float = 0.0, tokens: int = 0) -> None:
    """A record every `every` training seconds, each window at the next speed."""
    elapsed = start
    w.on_step(record(elapsed, tokens))
    for speed in speeds:
        elapsed += every
        tokens += int(speed * every)
        w.on_step(record(elapsed, tokens))


def test_a_minute_slower_than_planned_warns_once_with_the_tokens_the_run_will_reach(caplog):
    w = watch()
    with caplog.at_level(logging.WARNING, logger="oneday.runner.speed_watch"):
        feed(w, [8_000.0] * 12)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and w.warned
    # warned after a minute of slow windows (8k: 20% below), reaching 8k × 600 s = 4.80M
    assert "8,000 tok/s for the last 60 s, 20% below the 10,000 tok/s the plan measured" in warnings[0]
    assert "ends near 4.8M tokens, not the planned 6M" in warnings[0]


def test_slowness_shorter_than_a_minute_or_a_small_shortfall_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="oneday.runner.speed_watch"):
        feed(watch(), ([5_000.0] * 5 + [10_000.0]) * 5)  # 50 s at half speed, then on plan for a window: again
        feed(watch(), [9_200.0] * 30)  # 8% below: within the tolerance
        feed(watch(), [12_000.0] * 30)  # faster is not a problem worth a warning
    assert caplog.records == []


def test_the_window_slides_so_a_late_slowdown_still_warns(caplog):
    w = watch()
    with caplog.at_level(logging.WARNING, logger="oneday.runner.speed_watch"):
        feed(w, [10_000.0] * 30 + [7_000.0] * 6)
    assert len(caplog.records) == 1
    assert "7,000 tok/s for the last 60 s, 30% below" in caplog.records[0].getMessage()


def test_a_resumed_session_watches_its_own_speed_again(caplog):
    w = watch()
    with caplog.at_level(logging.WARNING, logger="oneday.runner.speed_watch"):
        feed(w, [8_000.0] * 7)
        w.on_start(step=100, tokens=560_000, resumed=True)
        assert not w.warned
        feed(w, [10_000.0] * 3, start=70.0, tokens=560_000)  # the new session's first records: no minute yet
        feed(w, [7_000.0] * 7, start=100.0, tokens=860_000)
    assert len(caplog.records) == 2


def test_the_summary_note_says_how_far_the_speed_missed_either_way():
    note = speed_note(mean_tokens_per_s=8_500.0, planned_tokens_per_s=10_000.0, tokens=5_100_000,
                      planned_tokens=6_000_000)
    assert note is not None and note.startswith("trained at 8,500 tok/s, 15% below the 10,000 tok/s the plan measured")
    assert "5,100,000 tokens against the 6,000,000 planned" in note
    assert "above" in speed_note(mean_tokens_per_s=11_000.0, planned_tokens_per_s=10_000.0, tokens=1, planned_tokens=1)
    assert speed_note(mean_tokens_per_s=10_400.0, planned_tokens_per_s=10_000.0, tokens=1, planned_tokens=1) is None
    assert speed_note(mean_tokens_per_s=0.0, planned_tokens_per_s=10_000.0, tokens=0, planned_tokens=1) is None


def test_the_speed_is_held_to_the_plan_only_where_the_plan_measured_it():
    plan = make_plan(threads=1)  # a CPU plan, one rank, one thread

    def session(plan=plan, device="cpu", threads=1, ranks=None):
        return SimpleNamespace(plan=plan, device=device, spec=replace(plan.train, threads=threads),
                               dist=SimpleNamespace(world_size=ranks) if ranks else None)

    assert measured_as_planned(session())
    assert not measured_as_planned(session(threads=2))  # `oneday run --threads 2`
    assert not measured_as_planned(session(device="cuda"))  # `--device cuda` on a CPU plan
    assert not measured_as_planned(session(ranks=2))  # under torchrun on two ranks
    two = replace(plan, train=replace(plan.train, world_size=2))
    assert measured_as_planned(session(plan=two, ranks=2))
