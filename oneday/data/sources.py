"""Where text comes from: resolve a data spec to a `Source` (files, a builtin corpus, a hub dataset).

Spec syntax (checked in this order, see `resolve_source`):

1. ``builtin:NAME`` -- a corpus shipped with Python. Only ``builtin:pydoc`` exists: the prose of Python's
   bundled documentation (`pydoc_data.topics.topics`, one document per topic) and of its standard library
   (docstrings, comments and messages, test suites included, `oneday.data.documents.iter_builtin`), always
   available offline.
2. ``hf:NAME`` -- a Hugging Face hub dataset, explicitly (``hf:roneneldan/TinyStories``).
3. An existing path -- a file (``.txt``/``.raw``/``.md`` plain text, ``.jsonl``/``.json``/``.parquet``/``.csv``
   structured; a file named explicitly with another suffix is read as plain text, with a warning) or a
   directory (searched recursively for those kinds only; hidden entries are skipped).
4. A spec with glob characters (``*``, ``?``, ``[``) -- the files it matches (``**`` recurses); directories it
   matches are searched as in 3.
5. Something that looks like a path (starts with ``/``, ``.``, ``~``, has a data-file suffix, more than one
   ``/``, or its parent directory exists) but does not exist -- an error naming it.
6. Anything else, e.g. ``roneneldan/TinyStories`` -- a hub dataset name, as in 2.

A hub dataset needs the hub: with ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE``/``TRANSFORMERS_OFFLINE``)
or no TCP connection to the endpoint within 3 s, it fails at once with one line. Otherwise the split is
streamed (``datasets.load_dataset(..., streaming=True)`` at the revision looked up first, which goes
into the cache key), so nothing is downloaded beyond what is read.

Reading a source as documents: `oneday.data.documents`.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oneday.data.documents import (
    STRUCTURED_KINDS,
    ReadStats,
    SourceFile,
    builtin_identity,
    iter_builtin,
    read_hub,
    read_plain,
    read_structured,
)
from oneday.errors import UserError

log = logging.getLogger(__name__)

PLAIN_KINDS = ("txt", "raw", "md")
KINDS = (*PLAIN_KINDS, *STRUCTURED_KINDS)
BUILTINS = ("pydoc",)

HUB_CHECK_SECONDS = 3.0

_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}











@dataclass
class Source:
    """A resolved data spec: what will be read, and how to describe and identify it."""

    spec: str
    kind: str  # "builtin", "local" or "hub"
    description: str
    files: list[SourceFile] = field(default_factory=list)
    files_per_kind: dict[str, int] = field(default_factory=dict)
    text_column: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str | None = None
    hub_revision: str | None = None

    @property
    def total_bytes(self) -> int | None:
        """Bytes on disk to read (None for a hub dataset, whose size is not known before reading)."""
        if self.kind == "local":
            return sum(f.size for f in self.files)
        if self.kind == "builtin":
            return builtin_identity(self.hub_name or "pydoc")[1]
        return None

    def identity(self, progress_task: Any | None = None) -> dict[str, Any]:
        """The content part of the cache key: every file's bytes (hashed), or the hub revision."""
        import xxhash

        if self.kind == "builtin":
            return {"builtin": self.hub_name, "xxh3_128": builtin_identity(self.hub_name or "pydoc")[0]}
        if self.kind == "hub":
            return {"hub": self.hub_name, "config": self.hub_config, "split": self.hub_split,
                    "revision": self.hub_revision, "text_column": self.text_column}
        entries = []
        for f in self.files:
            h = xxhash.xxh3_128()
            try:
                with open(f.path, "rb") as fh:
                    while block := fh.read(8 << 20):
                        h.update(block)
                        if progress_task is not None:
                            progress_task.advance(len(block))
            except OSError as exc:
                raise UserError(f"cannot read {f.path}: {exc.strerror or exc}") from None
            entries.append({"path": f.rel, "kind": f.kind, "size": f.size, "xxh3_128": h.hexdigest()})
        return {"files": entries, "text_column": self.text_column}

    def iter_batches(self, *, batch_chars: int, work_dir: Path, stats: ReadStats,
                     quiet: bool = False) -> Iterator[tuple[list[str], int]]:
        """Yield (documents, source bytes consumed) in batches of about `batch_chars` characters.

        `quiet` silences per-file warnings (a tokenizer-training pass reads the files before the pass
        that tokenizes them; warnings once are enough). `work_dir` receives `datasets`' lock files, so
        nothing is written under ~/.cache/huggingface.
        """
        batch: list[str] = []
        chars = 0
        consumed = 0
        for docs, nbytes in self._iter_documents(work_dir=work_dir, stats=stats, quiet=quiet):
            consumed += nbytes
            stats.documents += len(docs)
            for doc in docs:  # a 16 MB block of a text file makes many batches: encoding memory follows a batch
                batch.append(doc)
                chars += len(doc)
                if chars >= batch_chars:
                    yield batch, consumed
                    batch, chars, consumed = [], 0, 0
        if batch or consumed:
            yield batch, consumed

    def _iter_documents(self, *, work_dir: Path, stats: ReadStats,
                        quiet: bool) -> Iterator[tuple[list[str], int]]:
        if self.kind == "builtin":
            yield from iter_builtin(self.hub_name or "pydoc")
            return
        if self.kind == "hub":
            yield from read_hub(self, work_dir=work_dir, stats=stats)
            return
        for f in self.files:
            if f.kind in PLAIN_KINDS:
                yield from read_plain(f, stats=stats, quiet=quiet)
            else:
                yield from read_structured(f, text_column=self.text_column, work_dir=work_dir, stats=stats)


# ----------------------------------------------------------------------------------------------------
# Resolving a spec


def hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now (an offline variable, or no connection in 3 s), else None.

    `datasets` and `huggingface_hub` retry for ~47 s before failing when the hub is unreachable; this
    check answers at once (the environment) or within `HUB_CHECK_SECONDS` (a TCP connect to the
    endpoint, or to the proxy when one is configured; DNS included, run in a thread so a slow resolver
    cannot stretch it).
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlparse(proxy or endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=HUB_CHECK_SECONDS):
                result.append(None)
        except OSError as exc:
            result.append(f"cannot reach {host}:{port}: {exc.strerror or exc}")

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_SECONDS)
    if not result:
        return f"cannot reach {host}:{port} within {HUB_CHECK_SECONDS:.0f} s"
    return result[0]


def _looks_like_path(spec: str) -> bool:
    if spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    suffix = Path(spec).suffix.lower().lstrip(".")
    if suffix in KINDS:
        return True
    parent = os.path.dirname(spec)
    return bool(parent) and os.path.isdir(parent)


def _kinds_summary(files_per_kind: dict[str, int]) -> str:
    return ", ".join(f"{n} .{k}" for k, n in sorted(files_per_kind.items(), key=lambda kv: (-kv[1], kv[0])))


def _walk(root: Path) -> tuple[list[Path], int]:
    """Files of a known kind under `root` (recursive, hidden entries skipped), and the count of others."""
    taken: list[Path] = []
    other = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            if Path(name).suffix.lower().lstrip(".") in KINDS:
                taken.append(Path(dirpath) / name)
            else:
                other += 1
    return taken, other


def _source_file(path: Path, root: Path, *, kind: str | None = None) -> SourceFile:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    rel = path.name if path == root else path.relative_to(root).as_posix()
    return SourceFile(path=path, rel=rel, kind=kind or path.suffix.lower().lstrip("."), size=size)


def _local_source(spec: str, paths: list[Path], root: Path, *, description: str, text_column: str | None,
                  other: int) -> Source:
    files = [_source_file(p, root) for p in paths]
    if not files:
        extra = f" (found {other} other files)" if other else ""
        raise UserError(f"no text files under {spec}{extra}: looked for {', '.join('.' + k for k in KINDS)}")
    nonempty = [f for f in files if f.size > 0]
    if not nonempty:
        raise UserError(f"no text in {spec}: all {len(files)} files are empty")
    per_kind = dict(Counter(f.kind for f in nonempty))
    desc = description.format(n=len(nonempty), s="" if len(nonempty) == 1 else "s",
                              kinds=_kinds_summary(per_kind))
    return Source(spec=spec, kind="local", description=desc, files=nonempty, files_per_kind=per_kind,
                  text_column=text_column)


def short_name(spec: str) -> str:
    """A data spec's short name, for plan names and MLflow experiments: `builtin:pydoc` -> pydoc,
    `hf:roneneldan/TinyStories` -> TinyStories, `../x/corpus.txt` -> corpus, `/d/books.jsonl.gz` -> books,
    `corpus/*.jsonl` -> corpus (a glob is named after its folder); `data` when nothing is left."""
    text = spec.strip()
    for prefix in ("builtin:", "hf:"):
        text = text.removeprefix(prefix)
    parts = [p for p in re.split(r"[/\\]", text) if p not in ("", ".", "..")]
    while parts and re.search(r"[*?\[\]]", parts[-1]):
        parts.pop()
    base = re.sub(r"\.(gz|zst|bz2|xz)$", "", parts[-1] if parts else "", flags=re.IGNORECASE)
    if Path(base).suffix.lower() in (".txt", ".raw", ".md", ".jsonl", ".json", ".parquet", ".csv"):
        base = Path(base).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.")[:60] or "data"  # plan names stay folder names


def resolve_source(spec: str, *, text_column: str | None = None, config: str | None = None,
                   split: str | None = None) -> Source:
    """Turn a data spec into a `Source` (see the module docstring for the syntax); no text is read yet."""
    spec = spec.strip()
    if not spec:
        raise UserError("empty data spec: give a file, directory, glob, builtin:pydoc or a hub dataset name")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise UserError(f"unknown builtin corpus {spec!r}; available: "
                            + ", ".join(f"builtin:{b}" for b in BUILTINS))
        _warn_hub_only(config, split, spec)
        modules = builtin_identity(name)[2]
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        return Source(spec=spec, kind="builtin",
                      description=f"builtin:{name} (docs topics and {modules} stdlib modules' prose, Python {py})",
                      files_per_kind={"builtin": 1}, hub_name=name)
    if spec.startswith("hf:"):
        return _hub_source(spec, spec.removeprefix("hf:"), text_column=text_column, config=config, split=split)
    path = Path(spec).expanduser()
    if path.is_dir():
        _warn_hub_only(config, split, spec)
        taken, other = _walk(path)
        src = _local_source(spec, taken, path, description=f"{{n}} file{{s}} under {spec} ({{kinds}})",
                            text_column=text_column, other=other)
        log.info("data: taking %s", src.description)
        return src
    if path.is_file():
        _warn_hub_only(config, split, spec)
        if path.stat().st_size == 0:
            raise UserError(f"{spec} is empty")
        kind = path.suffix.lower().lstrip(".")
        if kind not in KINDS:
            log.warning("data: %s has no known suffix (%s); reading it as plain text", spec, ", ".join(KINDS))
            kind = "txt"
        f = _source_file(path, path, kind=kind)
        return Source(spec=spec, kind="local", description=f"{spec} (1 .{kind})", files=[f],
                      files_per_kind={kind: 1}, text_column=text_column)
    if _GLOB_CHARS.search(spec):
        _warn_hub_only(config, split, spec)
        matches = sorted(Path(m) for m in globlib.glob(os.path.expanduser(spec), recursive=True))
        if not matches:
            raise UserError(f"no files match {spec}")
        taken: list[Path] = []
        other = 0
        for m in matches:
            if m.is_dir():
                sub, n_other = _walk(m)
                taken.extend(sub)
                other += n_other
            elif m.suffix.lower().lstrip(".") in KINDS:
                taken.append(m)
            else:
                other += 1
        taken = sorted(set(taken))
        root = Path(os.path.commonpath([str(p.parent) for p in taken])) if taken else Path(".")
        src = _local_source(spec, taken, root, description=f"{{n}} file{{s}} matching {spec} ({{kinds}})",
                            text_column=text_column, other=other)
        log.info("data: taking %s", src.description)
        return src
    if _looks_like_path(spec):
        raise UserError(f"no such file or directory: {spec}")
    return _hub_source(spec, spec, text_column=text_column, config=config, split=split)


def _warn_hub_only(config: str | None, split: str | None, spec: str) -> None:
    if config or split:
        log.warning("data: --config/--split apply to hub datasets only; ignored for %s", spec)


def _hub_source(spec: str, name: str, *, text_column: str | None, config: str | None,
                split: str | None) -> Source:
    """A hub dataset, after checking at once that the hub can be reached and the dataset exists."""
    if not _HUB_NAME.match(name):
        raise UserError(f"{spec!r} is neither an existing path nor a valid Hugging Face dataset name")
    reason = hub_offline_reason()
    if reason:
        raise UserError(f"{spec!r} is not a local path, and the Hugging Face hub is not available ({reason}); "
                        "give a file, directory or glob, or builtin:pydoc")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        info = HfApi().dataset_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise UserError(f"no dataset {name!r} on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise UserError(f"cannot look up dataset {name!r} on the hub: {str(exc).splitlines()[0]}") from None
    split = split or "train"
    desc = f"hub:{name}" + (f" ({config})" if config else "") + f" split {split}"
    return Source(spec=spec, kind="hub", description=desc, files_per_kind={"hub": 1}, text_column=text_column,
                  hub_name=name, hub_config=config, hub_split=split, hub_revision=info.sha)


# ----------------------------------------------------------------------------------------------------
# Documents
















# ----------------------------------------------------------------------------------------------------
# Structured files and hub datasets (through `datasets`, streaming: no Arrow copy of the data is written)














