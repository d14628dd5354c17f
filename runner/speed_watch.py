"""Is the run as fast as its plan measured? A warning while it trains, a line in its summary when it was not.

A plan's tokens (and the loss predicted on them) are its measured tokens/s × its training seconds. The seconds
hold, since the schedule is keyed to the clock, but the speed is the machine's: a GPU that throttles, another
job on the same GPU or CPU, a shared host whose speed drifts all make the run train another number of tokens
than the plan promised. (On the 2-core development machines a fixed CPU step, timed back to back with nothing
else running, moved by 48% within 11 minutes: `bench/step_parity.py`.) The run cannot undo that, but it can
say so while there is time to look, and say afterwards why the prediction missed.

- `SpeedWatch` (an observer of the loop's step records, rank 0): once every window of steps has run more than
  `WARN_SLOWER` below the plan's speed for `WINDOW_SECONDS` of training, it warns, once per session, with the
  tokens the run reaches at that speed.
- `speed_note`: the summary's line when the whole run's mean speed missed the plan's by more than
  `NOTE_TOLERANCE` (either way).

Only when the run trains under the conditions the plan measured (`outputs.measured_as_planned`: its device, its
number of ranks, its thread count): a plan run elsewhere was never timed there. Pure Python.
"""

from __future__ import annotations

import logging
from typing import Any

from oneday.formats import human_count
from oneday.runner.records import NullObserver

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60.0
"""Training seconds of slowness before the warning: a slow window (an evaluation's aftermath, a burst of other
work) is not worth one; a minute of them is."""
WARN_SLOWER = 0.10
NOTE_TOLERANCE = 0.05


class SpeedWatch(NullObserver):
    """Warns once per session when every logged window of the last `window_seconds` of training or more ran
    more than `warn_slower` below `planned_tokens_per_s` (module docstring): a blip that recovers (an
    evaluation's aftermath, a burst of other work) is not worth a warning; a minute of slowness is. The speed is
    measured between step records, each a window of steps, from the session's first record on (the steps before
    it include the first, warm-up steps)."""

    def __init__(self, *, planned_tokens_per_s: float, planned_train_seconds: float, planned_tokens: int,
                 device: str, window_seconds: float = WINDOW_SECONDS, warn_slower: float = WARN_SLOWER) -> None:
        self.planned_tokens_per_s = planned_tokens_per_s
        self.planned_train_seconds = planned_train_seconds
        self.planned_tokens = planned_tokens
        self.device = device
        self.window_seconds = window_seconds
        self.warn_slower = warn_slower
        self.warned = False
        self._last: tuple[float, int] | None = None  # (training seconds, tokens) at the last record
        self._slow_since: tuple[float, int] | None = None  # where the current stretch of slow windows began

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self._last = self._slow_since = None  # a resumed session may train on another machine, at another speed
        self.warned = False

    def on_step(self, record: Any) -> None:
        now = (record.train_elapsed, record.tokens)
        last, self._last = self._last, now
        if last is None or self.warned or not self.planned_tokens_per_s > 0 or now[0] <= last[0]:
            return
        limit = (1.0 - self.warn_slower) * self.planned_tokens_per_s
        if (now[1] - last[1]) / (now[0] - last[0]) >= limit:
            self._slow_since = None
            return
        self._slow_since = self._slow_since or last
        start, start_tokens = self._slow_since
        span = now[0] - start
        if span < self.window_seconds:
            return
        self.warned = True
        speed = (now[1] - start_tokens) / span
        reach = now[1] + speed * max(0.0, self.planned_train_seconds - now[0])
        log.warning(
            "training at %s tok/s for the last %.0f s, %.0f%% below the %s tok/s the plan measured: at this speed "
            "the run ends near %s tokens, not the planned %s, and above its predicted loss (the schedule is keyed "
            "to the clock: it still ends on time). Is something else using this %s?",
            f"{speed:,.0f}", span, 100 * (1.0 - speed / self.planned_tokens_per_s),
            f"{self.planned_tokens_per_s:,.0f}", human_count(reach), human_count(self.planned_tokens),
            "GPU, or is it throttled" if self.device == "cuda" else "CPU",
        )


def speed_note(*, mean_tokens_per_s: float, planned_tokens_per_s: float, tokens: int, planned_tokens: int,
               tolerance: float = NOTE_TOLERANCE) -> str | None:
    """The summary's line when the run's mean speed missed the plan's by more than `tolerance`, else None."""
    if not (planned_tokens_per_s > 0 and mean_tokens_per_s > 0):
        return None
    ratio = mean_tokens_per_s / planned_tokens_per_s
    if abs(ratio - 1.0) <= tolerance:
        return None
    direction = "below" if ratio < 1 else "above"
    return (f"trained at {mean_tokens_per_s:,.0f} tok/s, {abs(ratio - 1):.0%} {direction} the "
            f"{planned_tokens_per_s:,.0f} tok/s the plan measured: {tokens:,} tokens against the {planned_tokens:,} "
            "planned (and the loss predicted on them); the machine ran at another speed than when it was planned")


__all__ = ["NOTE_TOLERANCE", "WARN_SLOWER", "WINDOW_SECONDS", "SpeedWatch", "speed_note"]
