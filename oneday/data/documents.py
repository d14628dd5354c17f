"""Reading a source as documents: the unit that the end-of-text token separates and the validation split holds out.

Documents (the unit that the end-of-text token separates and that the validation split holds out):

- plain-text files are cut into paragraph-aligned chunks: a document ends at the first blank line at or
  after `DOC_TARGET_CHARS` (4,096) characters; if there is none before `DOC_MAX_CHARS` (16,384), at the
  last line break before that, else hard at that length. A whole file is too coarse a unit to hold out
  (a corpus may be one file), single paragraphs too fine (tiny documents make the end-of-text token a
  large share of the tokens); a few KB keeps context for training and gives the split enough units.
  Story corpora separated by blank lines (TinyStories) get several whole stories per document.
- structured files: one row of the text column is one document.
- ``builtin:pydoc``: one topic of Python's bundled documentation (`pydoc_data.topics`) is one document; then,
  for every module of the standard library (`stdlib_files`: its own `.py` files and, where the Python build
  installs them, its test suites; installed packages left out; sorted by path), its prose -- the docstrings
  of the module, its classes and functions, its sentence-like string literals (messages: four words or more,
  mostly letters) and its full-line comments, read with `ast` (nothing imported), in source order -- cut
  into documents as plain text is. Offline, deterministic for a Python build, and ~6 MB of prose on 3.11
  (0.46 MB of topics, 2.95 MB of the library's docstrings and comments, 0.67 MB of its messages, 1.9 MB of
  its test suites' prose): ~1.45M tokens at a vocabulary of 8192, more than the README's 3-minute CPU demo
  trains on (~1.1M on an idle 2-core machine; the topics alone are 97k tokens).
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

import ast
import codecs
import functools
import json
import logging
import os
import re
import sys
import sysconfig
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneday.errors import UserError
from oneday.logs import quieted

if TYPE_CHECKING:
    from oneday.data.sources import Source

log = logging.getLogger(__name__)

STRUCTURED_KINDS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}
"""Structured file kinds and the `datasets` builder that reads each."""

DOC_TARGET_CHARS = 4096
DOC_MAX_CHARS = 16384
# Column names that hold the text, in order of preference (compared case-insensitively).
TEXT_COLUMN_NAMES = ("text", "content", "story", "body", "document", "article", "passage", "raw_content")
MAX_INVALID_SHARE = 0.01
READ_BLOCK_BYTES = 16 << 20
ROWS_PER_BATCH = 1000
# builtin:pydoc: its extraction rules' version (in the cache key), the stdlib folders left out, a full-line
# comment, and what makes a comment prose (a run of letters; rules of dashes and commented-out code are not).
BUILTIN_VERSION = 2
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})
_COMMENT_LINE = re.compile(r"^[ \t]*#+(?P<text>.*)$")
_PROSE = re.compile(r"[A-Za-z]{3,}[ ,.;:]+[A-Za-z]{2,}")
_WORD = re.compile(r"[A-Za-z]+")
# a string literal is a sentence (an error message, a help text) with this many words, mostly letters and spaces
_MESSAGE_WORDS = 4
_MESSAGE_LETTER_SHARE = 0.8
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
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


def pydoc_topics() -> list[str]:
    """The bundled documentation topics (`pydoc_data.topics`), in the order of their names."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def stdlib_files() -> list[Path]:
    """The standard library's own modules (`.py` under `sysconfig`'s stdlib), sorted by path.

    Skipped: installed packages (`site-packages`, `dist-packages`), caches and hidden folders. The test suites
    (`test`, `tests`, `idle_test`) are kept where the build installs them: their comments explain behaviour in
    plain English. The order is the sorted relative path, so the corpus does not depend on the file system's
    order.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("."))
        found.extend(Path(dirpath) / n for n in filenames if n.endswith(".py") and not n.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def module_prose(source: bytes, *, name: str) -> str:
    """A module's prose without importing it: its docstrings (module, classes, functions; `ast`), its
    sentence-like string literals (`_is_message`; each once, f-string parts not) and its full-line comments,
    in source order, headed by the module's name. Empty when it has none (or does not parse: a file of another
    Python version)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    pieces: list[tuple[int, str]] = []
    not_messages: set[int] = set()  # docstrings (already taken) and the pieces of f-strings
    seen: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                where = getattr(node, "lineno", 0)
                title = "" if isinstance(node, ast.Module) else f"{node.name}: "
                pieces.append((where, title + doc.strip()))
                not_messages.add(id(node.body[0].value))  # type: ignore[attr-defined]
        elif isinstance(node, ast.JoinedStr):
            not_messages.update(id(v) for v in node.values)
        # ast.walk visits a node before its children: a docstring or f-string piece is marked before it comes
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in not_messages:
            text = node.value.strip()
            if text not in seen and _is_message(text):
                seen.add(text)
                pieces.append((node.lineno, text))
    text = source.decode("utf-8", errors="replace")
    block: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        comment = _COMMENT_LINE.match(line)
        words = comment["text"].strip() if comment else ""
        if words and _PROSE.search(words) and not words.startswith(("!", "-*-", "pylint", "type:", "noqa")):
            if not block:
                start = lineno
            block.append(words)
            continue
        if block:
            pieces.append((start, " ".join(block)))
            block = []
    if block:
        pieces.append((start, " ".join(block)))
    if not pieces:
        return ""
    pieces.sort(key=lambda p: p[0])
    # a docstring may spell a lone surrogate ("\udc80": tests of the codecs), which no tokenizer can encode
    return (name + "\n\n" + "\n\n".join(p for _, p in pieces)).encode("utf-8", "replace").decode("utf-8")


def _is_message(text: str) -> bool:
    """A string literal that reads as a sentence: `_MESSAGE_WORDS` words or more, a run of prose, and mostly
    letters and spaces (not a format string, a regular expression or a table of data)."""
    if len(_WORD.findall(text)) < _MESSAGE_WORDS or not _PROSE.search(text):
        return False
    if not all(ch.isprintable() or ch in "\n\t" for ch in text):  # control characters, lone surrogates
        return False
    return sum(ch.isalpha() or ch == " " for ch in text) >= _MESSAGE_LETTER_SHARE * len(text)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or path.stem


def iter_builtin(name: str) -> Iterator[tuple[list[str], int]]:
    """(documents, source bytes) of a builtin corpus (module docstring), streamed a module at a time."""
    if name not in ("pydoc",):
        raise UserError(f"unknown builtin corpus builtin:{name}")
    topics = pydoc_topics()
    yield [d for d in (clean_document(t) for t in topics) if d], sum(len(t.encode("utf-8")) for t in topics)
    yield from _stdlib_documents(builtin_identity(name)[0])


@functools.lru_cache(maxsize=1)
def _stdlib_documents(identity: str) -> tuple[tuple[list[str], int], ...]:
    """The stdlib's prose as (documents, source bytes) per module, kept for the process (keyed by the
    identity, so a changed stdlib is read again): parsing ~700 modules takes ~5-15 s, the prose is ~3.5 MB,
    and a process that prepares the corpus twice (two cache folders, tests) parses it once."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in stdlib_files():
        try:
            source = path.read_bytes()
        except OSError:
            continue  # unreadable files are also left out of the identity (`builtin_identity`)
        docs, _ = split_documents(module_prose(source, name=_module_name(path, root)), final=True)
        out.append((docs, len(source)))
    log.debug("data: read the prose of %d stdlib modules (%s)", len(out), identity)
    return tuple(out)


@functools.cache
def builtin_identity(name: str) -> tuple[str, int, int]:
    """(xxh3_128 of what decides the corpus, source bytes, modules), without parsing anything: the pydoc
    topics, every stdlib module's path and bytes, the extraction rules' version and the Python version."""
    import xxhash

    if name not in ("pydoc",):
        raise UserError(f"unknown builtin corpus builtin:{name}")
    digest = xxhash.xxh3_128()
    digest.update(f"builtin:{name} v{BUILTIN_VERSION} {sys.version_info[:2]}".encode())
    total = 0
    for text in pydoc_topics():
        raw = text.encode("utf-8")
        digest.update(raw + b"\0")
        total += len(raw)
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = 0
    for path in stdlib_files():
        try:
            source = path.read_bytes()
        except OSError:
            continue
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + source + b"\0")
        total += len(source)
        modules += 1
    return digest.hexdigest(), total, modules


def read_plain(f: SourceFile, *, stats: ReadStats, quiet: bool) -> Iterator[tuple[list[str], int]]:
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


def read_structured(f: SourceFile, *, text_column: str | None, work_dir: Path,
                     stats: ReadStats) -> Iterator[tuple[list[str], int]]:
    import datasets

    try:
        # `datasets` logs its own "Failed to load JSON" line before raising; the error raised here says it better.
        with quieted("datasets.packaged_modules.json.json", logging.CRITICAL):
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


def read_hub(src: Source, *, work_dir: Path, stats: ReadStats) -> Iterator[tuple[list[str], int]]:
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


__all__ = [
    "DOC_MAX_CHARS",
    "DOC_TARGET_CHARS",
    "ReadStats",
    "SourceFile",
    "builtin_identity",
    "clean_document",
    "iter_builtin",
    "module_prose",
    "read_hub",
    "read_plain",
    "read_structured",
    "split_documents",
]
