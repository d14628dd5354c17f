"""Where oneday keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ONEDAY_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: the flag, else `$ONEDAY_CACHE`, else `~/.cache/oneday`."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "oneday"
