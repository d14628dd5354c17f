"""`oneday tune`: not built yet (issue #5)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oneday.console import guard
from oneday.errors import NotBuiltError

HELP = "Tune LR and schedule with Optuna on short μP proxy runs, and write a tuned plan. (not built yet)"


@guard
def tune(plan: Annotated[Path, typer.Argument(help="The plan.json to tune.")]) -> None:
    raise NotBuiltError("`oneday tune` is not built yet (issue #5: the tuner); use the planner's LR for now")
