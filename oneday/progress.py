"""A small progress interface, so the library reports long work without depending on rich.

Library functions take `progress: Progress | None`; the CLI passes a rich implementation
(`oneday.console.RichProgress`), tests and other callers pass nothing (or `NULL_PROGRESS`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol


class Task(Protocol):
    def advance(self, amount: float = 1.0) -> None: ...

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None: ...


class Progress(Protocol):
    def task(self, description: str, *, total: float | None = None,
             unit: str = "") -> AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, amount: float = 1.0) -> None:
        pass

    def update(self, *, completed: float | None = None, total: float | None = None,
               description: str | None = None) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    @contextmanager
    def task(self, description: str, *, total: float | None = None, unit: str = "") -> Iterator[Task]:
        yield _NullTask()


NULL_PROGRESS = NullProgress()
