"""Atomic, pruned training checkpoints that load with `weights_only=True` (docs/design.md, Training).

Layout of one checkpoint, `<directory>/step-00001234/`:

    model.safetensors   the weights of the *uncompiled*, unwrapped module (no `_orig_mod.`/`module.` prefixes);
                        a tied LM head is stored once (safetensors refuses shared tensors)
    optimizer.pt        `optimizer.state_dict()`
    state.pt            the loop's state: plain Python values and tensors (step, tokens, seconds, data cursor,
                        counters, lr_scale, plan hash, RNG states), see `oneday.runner.state`
    manifest.json       format version and the byte size of each file above, written last

A save writes into `.tmp-step-…/`, fsyncs every file and the folder, then renames it into place and fsyncs
the parent: a reader sees the whole checkpoint or none of it, and a crash mid-save leaves the previous
checkpoints untouched. Only the newest `keep` are kept. `latest()` returns the newest checkpoint that loads
in full, and falls back to an older one (with a warning saying which and why) when a newer one is corrupt.
Everything is loaded with `weights_only=True`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from oneday.errors import UserError
from oneday.paths import fsync

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.pt", "state.pt")
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(UserError):
    """A checkpoint could not be written (disk full, no permission) or none could be read."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`.module`) and `torch.compile` (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# --- RNG states as tensors and plain lists, so that `torch.load(weights_only=True)` accepts them ----------------
def capture_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint, fully read and checked by `CheckpointStore.latest()`."""

    path: Path
    step: int
    state: dict[str, Any]
    model_state: dict[str, torch.Tensor] = field(repr=False)
    optimizer_state: dict[str, Any] = field(repr=False)
    # Newer checkpoints that did not load, as "step-…: reason", newest first.
    skipped: tuple[str, ...] = ()

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Load the weights into `model` (any wrapper) and, if given, the state into `optimizer`."""
        raw = unwrap(model)
        current = raw.state_dict()
        missing, unexpected = raw.load_state_dict(self.model_state, strict=False)
        # A tied head was saved once under one name; the other name shares its storage and is filled with it.
        loaded = {current[k].data_ptr() for k in self.model_state if k in current}
        missing = [k for k in missing if current[k].data_ptr() not in loaded]
        if missing or unexpected:
            raise CheckpointError(
                f"{self.path}: the weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        if optimizer is not None:
            optimizer.load_state_dict(self.optimizer_state)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


class CheckpointStore:
    """The checkpoints of one run in `directory`, newest `keep` kept."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"{self.directory}: cannot create the checkpoint folder ({exc.strerror})") from None

    def folders(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        found = [p for p in self.directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Write a checkpoint for `state["step"]` atomically, prune to `keep`, return its folder.

        Raises `CheckpointError` when the disk is full or the folder unwritable; the temp folder is removed
        and earlier checkpoints stay as they were.
        """
        step = int(state["step"])
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        for stale in self.directory.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir()
            save_model(unwrap(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            fsync(tmp / "model.safetensors")
            _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            _torch_save(state, tmp / "state.pt")
            manifest = {"format_version": FORMAT_VERSION, "step": step,
                        "sizes": {name: (tmp / name).stat().st_size for name in FILES}}
            with open(tmp / "manifest.json", "w", encoding="utf-8") as handle:
                json.dump(manifest, handle)
                handle.flush()
                os.fsync(handle.fileno())
            fsync(tmp)
            if final.exists():  # the same step saved again (e.g. interrupted right after a periodic save)
                trash = self.directory / f".trash-{final.name}-{os.getpid()}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync(self.directory)
        except (OSError, RuntimeError, SafetensorError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
            full = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
            previous = self.folders()
            kept = f"the last good checkpoint {previous[-1].name} is kept" if previous else "no earlier checkpoint"
            raise CheckpointError(
                f"{self.directory}: cannot write checkpoint {final.name} ({reason}"
                f"{'; the disk is full' if full else ''}); {kept}"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.folders()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> Checkpoint:
        """Read and check one checkpoint folder; raises on anything missing, truncated or unreadable."""
        state = self._checked_state(path)
        model_state = load_file(path / "model.safetensors", device="cpu")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        return Checkpoint(path=path, step=int(state["step"]), state=state, model_state=model_state,
                          optimizer_state=optimizer_state)

    def latest_state(self) -> dict[str, Any] | None:
        """The loop's state (`state.pt`) of the newest checkpoint that looks whole (its files have the sizes its
        manifest records), read without the weights or the optimizer: what a run needs to know before it builds
        the model. Should that checkpoint's weights turn out corrupt, the loop falls back to an older one."""
        for path in reversed(self.folders()):
            try:
                return self._checked_state(path)
            except Exception as exc:  # any failure means "not whole": the next older one may be
                logger.debug("checkpoint %s does not look whole: %s", path, _one_line(exc))
        return None

    def _checked_state(self, path: Path) -> dict[str, Any]:
        """`state.pt` of `path`, after checking the manifest's format and every file's size."""
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        for name in FILES:
            size, expected = (path / name).stat().st_size, manifest["sizes"][name]
            if size != expected:
                raise ValueError(f"{name} is {size} bytes, expected {expected} (truncated?)")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if int(state["step"]) != int(manifest["step"]):
            raise ValueError(f"state.pt holds step {state['step']}, the folder step {manifest['step']}")
        return state

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that loads in full, or None; unreadable newer ones are skipped with a warning."""
        skipped: list[str] = []
        for path in reversed(self.folders()):
            try:
                checkpoint = self.load(path)
            except Exception as exc:  # any failure means "not loadable": say why in one line, no traceback
                reason = _one_line(exc)
                logger.warning("checkpoint %s is unreadable (%s); falling back to an older one", path, reason)
                skipped.append(f"{path.name}: {reason}")
                continue
            return replace(checkpoint, skipped=tuple(skipped))
        if skipped:
            logger.warning("no loadable checkpoint in %s: starting from scratch", self.directory)
        return None


__all__ = ["FILES", "Checkpoint", "CheckpointError", "CheckpointStore", "capture_rng", "restore_rng", "unwrap"]
