"""Logging helpers for the library (the CLI's rich handler is set up in `oneday.console`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quieted(name: str, level: int) -> Iterator[None]:
    """Only `level` and above from logger `name` while the block runs: for lines that would say again, or worse,
    what oneday reports itself."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


__all__ = ["quieted"]
