"""`oneday ui` and `oneday compare`: not built yet (issue #6)."""

from __future__ import annotations

from oneday.console import guard
from oneday.errors import NotBuiltError

HELP = "Start the MLflow UI on the runs' tracking store to compare runs. (not built yet)"
COMPARE_HELP = "Compare runs in the terminal: budget, params, tokens, loss, predicted vs achieved. (not built yet)"


@guard
def ui() -> None:
    raise NotBuiltError("`oneday ui` is not built yet (issue #6); run `mlflow ui --backend-store-uri sqlite:///mlflow.db`")


@guard
def compare() -> None:
    raise NotBuiltError("`oneday compare` is not built yet (issue #6)")
