"""Errors shared by every part of oneday.

A `UserError` is something the person running oneday caused and can fix (a missing file, a bad value).
The CLI prints its message as one line and exits with code 2; no traceback unless `--debug`.
Library code raises it with a message that names the problem (the file, the field, the value).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message is shown as one line."""

    exit_code = 2



def first_line(exc: BaseException, *, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none), cut to `limit` characters:
    what a one-line error or warning quotes of an exception raised by a library."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
