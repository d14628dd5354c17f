"""Where text comes from: resolve a data spec to a source, and read it as batches of documents.

Spec syntax (checked in this order, see `resolve_source`):

1. ``builtin:NAME`` -- a corpus shipped with Python. Only ``builtin:pydoc`` exists: the prose of Python's
   bundled documentation (`pydoc_data.topics.topics`, one document per topic), always available offline.
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

Documents (the unit that the end-of-text token separates and that the validation split holds out):

- plain-text files are cut into paragraph-aligned chunks: a document ends at the first blank line at or
  after `DOC_TARGET_CHARS` (4,096) characters; if there is none before `DOC_MAX_CHARS` (16,384), at the
  last line break before that, else hard at that length. A whole file is too coarse a unit to hold out
  (a corpus may be one file), single paragraphs too fine (tiny documents make the end-of-text token a
  large share of the tokens); a few KB keeps context for training and gives the split enough units.
  Story corpora separated by blank lines (TinyStories) get several whole stories per document.
- structured files: one row of the text column is one document.
- ``builtin:pydoc``: one topic is one document.
Every document loses its leading blank lines and trailing whitespace; documents with no text are dropped.
Line endings of plain-text files are normalized (``\\r\\n`` -> ``\\n``) and a UTF-8 byte-order mark is
dropped.

Non-UTF-8 input: a plain-text file whose invalid bytes are at most 1% of its size is decoded with
U+FFFD replacement characters and a warning says how many bytes were replaced (a stray Latin-1 ``é`` in an
English text should not stop a run); more than 1%, a NUL byte in the first 8 KB or a UTF-16 byte-order mark
means the file is in another encoding or binary, and it is refused with the numbers (replacing
every accented letter of a Latin-1 French text would train a model on garbage).
"""

from __future__ import annotations

import codecs
import contextlib
import glob as globlib
import json
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

from oneday.errors import UserError

log = logging.getLogger(__name__)

PLAIN_KINDS = ("txt", "raw", "md")
STRUCTURED_KINDS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}
KINDS = (*PLAIN_KINDS, *STRUCTURED_KINDS)
BUILTINS = ("pydoc",)

DOC_TARGET_CHARS = 4096
DOC_MAX_CHARS = 16384
# Column names that hold the text, in order of preference (compared case-insensitively).
TEXT_COLUMN_NAMES = ("text", "content", "story", "body", "document", "article", "passage", "raw_content")
MAX_INVALID_SHARE = 0.01
READ_BLOCK_BYTES = 16 << 20
ROWS_PER_BATCH = 1000
HUB_CHECK_SECONDS = 3.0

_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
_TRUE = {"1", "ON", "YES", "TRUE"}

# Decoding with a counting error handler: invalid bytes become U+FFFD and are counted, so the reader can
# warn with the number (or refuse a file that is mostly invalid). The count is global; readers take
# differences around each decode call, which is exact for the sequential reading done here.
_INVALID_BYTES = [0]
_COUNT_REPLACE = "oneday.count-replace"


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _INVALID_BYTES[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error(_COUNT_REPLACE, _count_replace)


@dataclass(frozen=True)
class SourceFile:
    path: Path
    rel: str  # path relative to the spec's root, with '/' separators: part of the cache key
    kind: str  # one of KINDS (the suffix without the dot)
    size: int


@dataclass
class ReadStats:
    """What one pass over a source found; the pass that tokenizes fills the numbers reported in meta.json."""

    documents: int = 0
    invalid_bytes: int = 0
    files_with_invalid_bytes: int = 0
    empty_rows: int = 0
    text_columns: Counter[str] = field(default_factory=Counter)


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
            return sum(len(t.encode("utf-8")) for t in _builtin_texts(self.hub_name or "pydoc"))
        return None

    def identity(self, progress_task: Any | None = None) -> dict[str, Any]:
        """The content part of the cache key: every file's bytes (hashed), or the hub revision."""
        import xxhash

        if self.kind == "builtin":
            h = xxhash.xxh3_128()
            for text in _builtin_texts(self.hub_name or "pydoc"):
                h.update(text.encode("utf-8"))
                h.update(b"\0")
            return {"builtin": self.hub_name, "xxh3_128": h.hexdigest()}
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
            for doc in docs:
                batch.append(doc)
                chars += len(doc)
            stats.documents += len(docs)
            if chars >= batch_chars:
                yield batch, consumed
                batch, chars, consumed = [], 0, 0
        if batch or consumed:
            yield batch, consumed

    def _iter_documents(self, *, work_dir: Path, stats: ReadStats,
                        quiet: bool) -> Iterator[tuple[list[str], int]]:
        if self.kind == "builtin":
            texts = _builtin_texts(self.hub_name or "pydoc")
            docs = [d for d in (clean_document(t) for t in texts) if d]
            yield docs, sum(len(t.encode("utf-8")) for t in texts)
            return
        if self.kind == "hub":
            yield from _iter_hub(self, work_dir=work_dir, stats=stats)
            return
        for f in self.files:
            if f.kind in PLAIN_KINDS:
                yield from _iter_plain(f, stats=stats, quiet=quiet)
            else:
                yield from _iter_structured(f, text_column=self.text_column, work_dir=work_dir, stats=stats)


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
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "data"


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
        texts = _builtin_texts(name)
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        return Source(spec=spec, kind="builtin", description=f"builtin:{name} ({len(texts)} topics, Python {py})",
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


def clean_document(text: str) -> str:
    """Drop leading blank lines and trailing whitespace (keeping the first line's indentation)."""
    return _LEADING_BLANK_LINES.sub("", text, count=1).rstrip()


def _document_end(text: str, pos: int, final: bool) -> int | None:
    """Where the document starting at `pos` ends, or None if more text is needed to decide."""
    n = len(text)
    lo, hi = pos + DOC_TARGET_CHARS, pos + DOC_MAX_CHARS
    if lo >= n:
        return n if final else None
    m = _BLANK_LINES.search(text, lo - 1, min(hi, n))
    if m:
        return m.end()
    if n < hi:
        return n if final else None
    nl = text.rfind("\n", lo, hi)
    return nl + 1 if nl >= 0 else hi


def split_documents(text: str, *, final: bool) -> tuple[list[str], str]:
    """Cut text into paragraph-aligned documents (module docstring); return them and the undecided rest.

    The cuts do not depend on how the text arrived in blocks: a cut is made only when the text seen
    decides it, and the rest is carried into the next call.
    """
    docs: list[str] = []
    pos = 0
    while pos < len(text):
        end = _document_end(text, pos, final)
        if end is None:
            break
        doc = clean_document(text[pos:end])
        if doc:
            docs.append(doc)
        pos = end
    return docs, text[pos:]


def _builtin_texts(name: str) -> list[str]:
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    raise UserError(f"unknown builtin corpus builtin:{name}")


def _iter_plain(f: SourceFile, *, stats: ReadStats, quiet: bool) -> Iterator[tuple[list[str], int]]:
    """Read a plain-text file in blocks, decode (counting invalid bytes), and cut it into documents."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors=_COUNT_REPLACE)
    invalid = 0
    rest = ""
    try:
        with open(f.path, "rb") as fh:
            first = True
            while True:
                block = fh.read(READ_BLOCK_BYTES)
                if first:
                    _refuse_binary(f, block)
                    if block.startswith(codecs.BOM_UTF8):
                        block = block[len(codecs.BOM_UTF8):]
                    first = False
                final = not block
                before = _INVALID_BYTES[0]
                text = decoder.decode(block, final=final)
                invalid += _INVALID_BYTES[0] - before
                if invalid > 1024 and invalid > MAX_INVALID_SHARE * f.size:
                    raise _not_utf8(f, invalid)
                text = rest + text
                if not final and text.endswith("\r"):  # a \r\n split between blocks
                    text, carry = text[:-1], "\r"
                else:
                    carry = ""
                docs, rest = split_documents(text.replace("\r\n", "\n"), final=final)
                rest += carry
                yield docs, len(block)
                if final:
                    break
    except OSError as exc:
        raise UserError(f"cannot read {f.path}: {exc.strerror or exc}") from None
    if invalid:
        if invalid > MAX_INVALID_SHARE * f.size:
            raise _not_utf8(f, invalid)
        stats.invalid_bytes += invalid
        stats.files_with_invalid_bytes += 1
        if not quiet:
            log.warning("data: %s is not valid UTF-8: replaced %d invalid bytes (of %d) with U+FFFD",
                        f.path, invalid, f.size)


def _refuse_binary(f: SourceFile, head: bytes) -> None:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{f.path} is UTF-16 text, not UTF-8; convert it (iconv -f UTF-16 -t UTF-8)")
    if b"\0" in head[:8192]:
        raise UserError(f"{f.path} is not text (it contains NUL bytes)")


def _not_utf8(f: SourceFile, invalid: int) -> UserError:
    return UserError(f"{f.path} is not UTF-8 text: {invalid} of {f.size} bytes are invalid "
                     f"(more than {MAX_INVALID_SHARE:.0%}); convert it, e.g. iconv -f latin1 -t utf-8")


# ----------------------------------------------------------------------------------------------------
# Structured files and hub datasets (through `datasets`, streaming: no Arrow copy of the data is written)


@contextlib.contextmanager
def _quiet_datasets_json_logger() -> Iterator[None]:
    """`datasets` logs its own 'Failed to load JSON' line before raising; our error says it better."""
    logger = logging.getLogger("datasets.packaged_modules.json.json")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _pick_column(columns: list[str], string_columns: list[str], *, where: str, text_column: str | None) -> str:
    """The text column: the one asked for, else a conventional name, else the only string column."""
    listing = ", ".join(columns) if columns else "none"
    if text_column:
        if text_column not in columns:
            raise UserError(f"{where} has no column {text_column!r}; its columns are: {listing}")
        if text_column not in string_columns:
            raise UserError(f"column {text_column!r} of {where} does not hold text; its text columns are: "
                            + (", ".join(string_columns) or "none"))
        return text_column
    by_lower = {c.lower(): c for c in string_columns}
    for name in TEXT_COLUMN_NAMES:
        if name in by_lower:
            return by_lower[name]
    if len(string_columns) == 1:
        return string_columns[0]
    if not string_columns:
        raise UserError(f"{where} has no text column; its columns are: {listing}")
    raise UserError(f"{where} has several text columns ({', '.join(string_columns)}); choose one with "
                    "--text-column")


def _columns_of(ds: Any) -> tuple[list[str], list[str]] | None:
    """(all columns, string columns) of a streaming dataset, or None when it has no rows."""
    features = getattr(ds, "features", None)
    if features:
        strings = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        return list(features), strings
    first = next(iter(ds), None)
    if first is None:
        return None
    return list(first), [c for c, v in first.items() if isinstance(v, str)]


def _iter_dataset_texts(ds: Any, *, where: str, text_column: str | None,
                        stats: ReadStats) -> Iterator[list[str]]:
    cols = _columns_of(ds)
    if cols is None:
        return
    column = _pick_column(*cols, where=where, text_column=text_column)
    stats.text_columns[column] += 1
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=ROWS_PER_BATCH):
        docs = []
        for value in batch[column]:
            row += 1
            if value is None:
                stats.empty_rows += 1
                continue
            if not isinstance(value, str):
                raise UserError(f"{where}, row {row}: column {column!r} holds {type(value).__name__}, not text")
            doc = clean_document(value)
            if doc:
                docs.append(doc)
            else:
                stats.empty_rows += 1
        yield docs


def _iter_structured(f: SourceFile, *, text_column: str | None, work_dir: Path,
                     stats: ReadStats) -> Iterator[tuple[list[str], int]]:
    import datasets

    try:
        with _quiet_datasets_json_logger():
            ds = datasets.load_dataset(STRUCTURED_KINDS[f.kind], data_files=str(f.path), split="train",
                                       streaming=True, cache_dir=str(work_dir / "hf-datasets"))
            taken = 0
            for docs in _iter_dataset_texts(ds, where=str(f.path), text_column=text_column, stats=stats):
                nbytes = sum(len(d) for d in docs)
                taken += nbytes
                yield docs, nbytes
            yield [], max(0, f.size - taken)
    except UserError:
        raise
    except Exception as exc:  # datasets/pyarrow/pandas parse errors: name the file (and line, for JSON)
        log.debug("data: reading %s failed", f.path, exc_info=True)
        located = _locate_json_error(f) if f.kind in ("json", "jsonl") else None
        if located:
            raise UserError(located) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read {f.path} as {f.kind}: {first}") from None


def _locate_json_error(f: SourceFile) -> str | None:
    """The first line of a JSON/JSONL file that does not parse, as an error message naming file and line."""
    with open(f.path, "rb") as fh:
        if f.kind == "json":
            data = fh.read()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[:exc.start].count(b"\n") + 1
                return f"{f.path}, line {line}: not UTF-8"
            if text.lstrip().startswith(("[", "{")):
                try:
                    json.loads(text)
                    return None
                except json.JSONDecodeError as exc:
                    if exc.msg != "Extra data":  # several values: JSON lines in a .json file
                        return f"{f.path}, line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
            fh.seek(0)
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except UnicodeDecodeError:
                return f"{f.path}, line {lineno}: not UTF-8"
            except json.JSONDecodeError as exc:
                return f"{f.path}, line {lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
            if not isinstance(value, dict):
                return f"{f.path}, line {lineno}: a JSON {type(value).__name__}, not an object"
    return None


def _iter_hub(src: Source, *, work_dir: Path, stats: ReadStats) -> Iterator[tuple[list[str], int]]:
    import datasets

    where = src.description
    try:
        ds = datasets.load_dataset(src.hub_name, src.hub_config, split=src.hub_split, streaming=True,
                                   revision=src.hub_revision, cache_dir=str(work_dir / "hf-datasets"))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {where}: {first}") from None
    for docs in _iter_dataset_texts(ds, where=where, text_column=src.text_column, stats=stats):
        yield docs, sum(len(d) for d in docs)
