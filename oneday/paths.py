"""Where oneday keeps things on disk, and how it writes a file so that no reader sees half of it."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from oneday.errors import UserError

CACHE_ENV = "ONEDAY_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: the flag, else `$ONEDAY_CACHE`, else `~/.cache/oneday`."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "oneday"


def check_output_path(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Fail fast (before any probing) when `path` cannot be written: its folder is missing or not a
    folder, `path` is a folder, or a file cannot be created there (read-only folder or file system).
    Creates and removes a temporary file to find out; writes nothing else."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path}: is a folder; give a file name such as {path / 'plan.json'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{option} {path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".check", dir=parent)
    except OSError as exc:
        raise UserError(f"{option} {path}: cannot write in {parent} ({exc.strerror or exc})") from None
    os.close(fd)
    Path(tmp).unlink(missing_ok=True)
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a part."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"{path}: the folder {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise UserError(f"{path}: cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_failed_for_space(exc: BaseException, directory: Path, *, needed: int = 0) -> bool:
    """Whether a failed write into `directory` was for want of space: ENOSPC, or (libraries that hide the errno,
    like torch.save's "unexpected pos") a file system with less room than `needed` bytes, or under 1 MiB."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < max(needed, 1 << 20)
    except OSError:
        return False


def fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (before and after a rename that must survive a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["CACHE_ENV", "cache_dir", "check_output_path", "fsync", "write_atomic", "write_failed_for_space"]
