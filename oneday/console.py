"""Rich output for the CLI: consoles, the error guard, and a rich `Progress`. Only the CLI imports this."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from oneday.errors import UserError

console = Console()
err_console = Console(stderr=True)


def end_live_frame() -> None:
    """Call after a live display on `err_console` stops: rich ends its last frame with a newline only on a
    terminal, so in a log file or a pipe the next line would run on from the table's bottom border."""
    if not err_console.is_terminal:
        err_console.line()


# Set by the root callback (`oneday --debug ...`).
state = {"debug": False}

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(*, debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=debug, show_time=False, markup=False)],
        force=True,
    )
    for noisy in ("urllib3", "filelock", "fsspec", "httpx", "alembic", "mlflow", "git", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def guard(fn: F) -> F:
    """Turn a `UserError` into one red line on stderr and exit code 2 (a traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if state["debug"]:
                raise
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, amount: float = 1.0) -> None:
        self._progress.advance(self._id, amount)

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        self._progress.update(self._id, completed=completed, total=total, description=description)


class RichProgress:
    """`oneday.progress.Progress` drawn with rich bars on stderr."""

    @contextmanager
    def task(self, description: str, *, total: float | None = None, unit: str = "") -> Iterator[_RichTask]:
        columns = [
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn() if unit == "" else TextColumn(f"{{task.completed:,.0f}} {unit}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=err_console, transient=False) as progress:
            task_id = progress.add_task(description, total=total)
            yield _RichTask(progress, task_id)
            if progress.tasks[0].total is None:
                progress.update(task_id, total=progress.tasks[0].completed)
