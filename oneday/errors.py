"""Errors shared by every part of oneday.

A `UserError` is something the person running oneday caused and can fix (a missing file, a bad value).
The CLI prints its message as one line and exits with code 2; no traceback unless `--debug`.
Library code raises it with a message that names the problem (the file, the field, the value).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message is shown as one line."""

    exit_code = 2

