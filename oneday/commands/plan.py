"""`oneday plan`: not built yet (issue #3)."""

from __future__ import annotations

from oneday.console import guard
from oneday.errors import NotBuiltError

HELP = "Measure this machine and choose the best model, batch, LR and schedule for a time budget. (not built yet)"


@guard
def plan() -> None:
    raise NotBuiltError("`oneday plan` is not built yet (issue #3)")
