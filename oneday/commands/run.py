"""`oneday run` and `oneday sample`: not built yet (issue #4)."""

from __future__ import annotations

from oneday.console import guard
from oneday.errors import NotBuiltError

HELP = "Train the planned model to the deadline: resumable, logged to MLflow. (not built yet)"
SAMPLE_HELP = "Generate text from a trained run's saved model. (not built yet)"


@guard
def run() -> None:
    raise NotBuiltError("`oneday run` is not built yet (issue #4)")


@guard
def sample() -> None:
    raise NotBuiltError("`oneday sample` is not built yet (issue #4)")
