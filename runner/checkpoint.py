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
checkpoints untouched. "Newest" means last written: the manifest numbers the saves of a store (`sequence`),
so a stray or copied folder with a higher step number never outranks the checkpoint just written. After a save
the newest `keep` whole checkpoints are kept; a folder that is not whole (its files do not match its manifest)
is renamed `<name>.bad` once and never looked at again. `latest()` returns the newest checkpoint that loads in
full, and falls back to an older one (with a warning saying which and why) when a newer one is corrupt.
Everything is loaded with `weights_only=True`, so a checkpoint cannot run code.

Background writes (`save_async`). Writing a 1.1B model's weights and moments (13 GB) at 200 MB/s takes over a
minute, and training would stand still for it. `save_async` only copies the state to host memory (pinned
buffers, reused, when the tensors live on CUDA; a clone on the CPU) — the snapshot, the one part training
waits for — and writes that copy in a background thread, through the same temp folder, fsyncs, manifest and
rename as `save`. One write at a time: the next save (background or not) first waits for the previous one, and
`wait()` joins it and raises its failure (a full disk: the same one-line `CheckpointError`) once, so the loop
reports it at the next checkpoint or at the end. A crash or kill during a background write leaves only a
`.tmp-…` folder, removed by the next save: the previous checkpoint stays whole.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import _remove_duplicate_names, load_file, save_file

from oneday import signals
from oneday.errors import UserError
from oneday.paths import fsync, write_failed_for_space

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
        # Shapes first: load_state_dict would copy what fits, then raise a traceback on what does not.
        misfits = [f"{k} {tuple(v.shape)} vs {tuple(current[k].shape)}" for k, v in self.model_state.items()
                   if k in current and v.shape != current[k].shape]
        if misfits:
            raise CheckpointError(f"{self.path}: the weights do not fit this model ({len(misfits)} tensors of "
                                  f"another shape, e.g. {misfits[0]})")
        missing, unexpected = raw.load_state_dict(self.model_state, strict=False)
        # A tied head was saved once under one name; the other name shares its storage and is filled with it.
        loaded = {current[k].data_ptr() for k in self.model_state if k in current}
        missing = [k for k in missing if current[k].data_ptr() not in loaded]
        if missing or unexpected:
            raise CheckpointError(
                f"{self.path}: the weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        if optimizer is not None:
            try:
                optimizer.load_state_dict(self.optimizer_state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{self.path}: the optimizer state does not fit ({_one_line(exc)})") from None


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError("manifest.json is not an object")
    return manifest


def _sequence(path: Path) -> int:
    """The save number its manifest records (0 for none: an unreadable manifest, or a format-1 one without it)."""
    try:
        return int(_read_manifest(path).get("sequence", 0))
    except (OSError, ValueError, TypeError):
        return 0


def _is_whole(path: Path) -> bool:
    """The manifest is readable and of this format, and every file has the size it records (no loading)."""
    try:
        manifest = _read_manifest(path)
        return manifest.get("format_version") == FORMAT_VERSION and all(
            (path / name).stat().st_size == manifest["sizes"][name] for name in FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}".rstrip(": ")


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped module's state dict with each shared tensor once (a tied LM head), as `save_model` writes
    it; the names of the dropped aliases are returned in the safetensors metadata by `_write`."""
    tensors = dict(unwrap(model).state_dict())
    for _kept, aliases in _remove_duplicate_names(tensors).items():
        for alias in aliases:
            del tensors[alias]
    return tensors


def _host_copy(value: Any, buffers: dict[str, torch.Tensor], key: str) -> Any:
    """`value` with every tensor copied to host memory (into reused pinned `buffers[key…]` when it is on CUDA,
    whose allocation is slow): a snapshot training can run on from. Other values are kept as they are (they
    are not mutated in place)."""
    if isinstance(value, torch.Tensor):
        source = value.detach()
        if not source.is_cuda:  # a clone, freed after the write: host memory is not held for the whole run
            return source.clone()
        buffer = buffers.get(key)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            buffers[key] = buffer
        buffer.copy_(source, non_blocking=True)
        return buffer
    if isinstance(value, dict):
        return {k: _host_copy(v, buffers, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v, buffers, f"{key}/{i}") for i, v in enumerate(value))
    return value


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint's content in host memory, ready to write without the live model."""

    model: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[str, Any] = field(repr=False)
    state: dict[str, Any] = field(repr=False)


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
        self._writer: threading.Thread | None = None
        self._written: Path | None = None
        self._failure: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # host buffers reused by every snapshot

    def folders(self) -> list[Path]:
        """Checkpoint folders, oldest written first (by the manifest's `sequence`, then the step number; a folder
        without a readable manifest sorts first: it is the least trusted)."""
        found = [p for p in self.directory.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: (_sequence(p), int(_NAME.match(p.name).group(1))))  # type: ignore[union-attr]

    def _prune(self, just_written: Path) -> None:
        """Keep the newest `keep` whole checkpoints (the one just written among them); move a folder that is not
        whole aside as `<name>.bad`, so it is reported once and never trusted again."""
        whole: list[Path] = []
        for path in self.folders():
            if path == just_written or _is_whole(path):
                whole.append(path)
                continue
            aside = path.with_name(f"{path.name}.bad")
            for n in range(1, 1000):
                if not aside.exists():
                    break
                aside = path.with_name(f"{path.name}.bad-{n}")
            try:
                os.replace(path, aside)
            except OSError as exc:
                logger.warning("checkpoint %s is not whole and could not be moved aside (%s)", path, exc.strerror)
            else:
                logger.warning("checkpoint %s is not whole (its files do not match its manifest): moved to %s",
                               path, aside.name)
        for old in whole[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def save(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
        """Write a checkpoint for `state["step"]` atomically, prune to `keep`, return its folder.

        Raises `CheckpointError` when the disk is full or the folder unwritable; the temp folder is removed
        and earlier checkpoints stay as they were. A background write still running is waited for first (and
        its failure raised: call `wait()` before to report it apart).
        """
        self.wait()
        return self._write(Snapshot(model=model_tensors(model), optimizer=optimizer.state_dict(), state=state))

    def snapshot(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
                 ) -> Snapshot:
        """The checkpoint's content copied to host memory (module docstring); waits for a pending write first,
        since that write reads the buffers this copy reuses."""
        self.wait()
        snap = Snapshot(model=_host_copy(model_tensors(model), self._buffers, "model"),
                        optimizer=_host_copy(optimizer.state_dict(), self._buffers, "optimizer"),
                        state=_host_copy(state, self._buffers, "state"))
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
        return snap

    def save_async(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
                   ) -> Path:
        """Snapshot now, write in the background (module docstring); returns the folder it will be. Raises the
        previous background write's `CheckpointError` (that write is over; call again to save this one)."""
        snap = self.snapshot(model=model, optimizer=optimizer, state=state)

        def write() -> None:
            try:
                self._written = self._write(snap)
            except BaseException as exc:  # reported by wait(), in the training thread
                self._failure = exc

        # Not a daemon: a process that exits (after an error, say) finishes the write before it goes.
        self._writer = threading.Thread(target=write, name="oneday-checkpoint")
        self._writer.start()
        return self.directory / f"step-{int(state['step']):08d}"

    @property
    def writing(self) -> bool:
        """A background write is under way."""
        return self._writer is not None and self._writer.is_alive()

    def wait(self) -> Path | None:
        """Join the pending background write: its folder, None when there was none; raises its failure once."""
        writer, self._writer = self._writer, None
        if writer is None:
            return None
        writer.join()
        failure, self._failure = self._failure, None
        if isinstance(failure, CheckpointError):
            raise failure
        if failure is not None:
            raise CheckpointError(f"{self.directory}: the background checkpoint write failed "
                                  f"({_one_line(failure)})") from failure
        return self._written

    def _write(self, snap: Snapshot) -> Path:
        """Write `snap` atomically (module docstring), prune to `keep`, return its folder."""
        state = snap.state
        step = int(state["step"])
        interrupts = signals.interrupts_raised()
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-{final.name}-{os.getpid()}"
        for stale in self.directory.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir()
            save_file({k: v.contiguous() for k, v in snap.model.items()}, str(tmp / "model.safetensors"),
                      metadata={"format": "pt"})
            fsync(tmp / "model.safetensors")
            _torch_save(snap.optimizer, tmp / "optimizer.pt")
            _torch_save(state, tmp / "state.pt")
            manifest = {"format_version": FORMAT_VERSION, "step": step,
                        "sequence": max((_sequence(p) for p in self.folders()), default=0) + 1,
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
            written = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if signals.interrupts_raised() != interrupts:  # Ctrl-C inside torch.save, disguised as a write error
                raise KeyboardInterrupt from None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
            # torch.save reports a full disk as "RuntimeError: ... unexpected pos": ask the file system instead
            full = write_failed_for_space(exc, self.directory, needed=written)
            previous = self.folders()
            kept = f"the last good checkpoint {previous[-1].name} is kept" if previous else "no earlier checkpoint"
            raise CheckpointError(
                f"{self.directory}: cannot write checkpoint {final.name} ({reason}"
                f"{'; the disk is full' if full else ''}); {kept}"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(final)
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
        manifest = _read_manifest(path)
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
        return next(self._loadable(), None)

    def restore_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                       ) -> Checkpoint | None:
        """Restore the newest checkpoint that loads in full *and fits* `model` (and `optimizer`) into them; None
        when there is nothing to restore. Newer ones that do not load or fit are skipped with a warning (and
        listed in `skipped`). Raises `CheckpointError` when checkpoints load but none fits: they belong to
        another model, and training over them would throw them away."""
        misfits: list[str] = []
        for checkpoint in self._loadable():
            try:
                checkpoint.restore(model, optimizer)
            except CheckpointError as exc:
                logger.warning("%s; falling back to an older one", exc)
                misfits.append(f"{checkpoint.path.name}: {str(exc).split(': ', 1)[-1]}")
                continue
            return replace(checkpoint, skipped=(*misfits, *checkpoint.skipped))
        if misfits:
            raise CheckpointError(f"{self.directory}: no checkpoint fits this model ({misfits[0]}); "
                                  "resume with the model that wrote them or use a new run folder")
        return None

    def _loadable(self) -> Iterator[Checkpoint]:
        """Checkpoints that load in full, newest first; each lists the unreadable newer ones it stands in for."""
        skipped: list[str] = []
        for path in reversed(self.folders()):
            try:
                checkpoint = self.load(path)
            except Exception as exc:  # any failure means "not loadable": say why in one line, no traceback
                reason = _one_line(exc)
                logger.warning("checkpoint %s is unreadable (%s); falling back to an older one", path, reason)
                skipped.append(f"{path.name}: {reason}")
                continue
            yield replace(checkpoint, skipped=tuple(skipped))
            skipped = []
        if skipped:
            logger.warning("no loadable checkpoint in %s: starting from scratch", self.directory)

__all__ = ["FILES", "Checkpoint", "CheckpointError", "CheckpointStore", "Snapshot", "capture_rng", "model_tensors",
           "restore_rng", "unwrap"]
