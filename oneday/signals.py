"""Signal handlers for the length of a block: the one installer that `run`, `tune` and `ui` share."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

Handler = Callable[[int, Any], None]


@contextlib.contextmanager
def handling(signals: Iterable[signal.Signals], handler: Handler) -> Iterator[bool]:
    """Route `signals` to `handler` while the block runs, then put the previous handlers back.

    Python only lets the main thread install handlers; elsewhere (a notebook's worker thread, a test runner's
    thread) nothing is installed and the block runs as it is. Yields whether the handlers were installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield True
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_raised = [0]  # interrupts raised by `raise_interrupt` in this process


def raise_interrupt(signum: int, frame: Any) -> None:
    """A handler that turns the signal into `KeyboardInterrupt`, so it unwinds like Ctrl-C."""
    _raised[0] += 1
    raise KeyboardInterrupt


def interrupts_raised() -> int:
    """How many interrupts `raise_interrupt` has raised so far. torch.save turns a KeyboardInterrupt raised
    inside its writer into `RuntimeError: unexpected pos`; a saver compares this count before and after a
    failure to tell an interrupt from a real write error."""
    return _raised[0]


__all__ = ["handling", "interrupts_raised", "raise_interrupt"]
