"""`prepare_data`: a corpus in, a cache entry of flat token files out.

`prepare_data(spec)` reads a corpus (see `oneday.data.sources` for the spec syntax and what a document
is), trains a byte-level BPE tokenizer on it or loads a given one, tokenizes every document, holds out a
validation set by whole documents, and writes a cache entry ``<cache>/data/<key>/``:

- ``train.bin``, ``val.bin`` -- flat token ids (uint16 when the vocabulary fits, else uint32), every
  document followed by the end-of-text token (so token counts include one end-of-text token per document);
- ``tokenizer/`` -- the tokenizer, loadable with ``AutoTokenizer.from_pretrained``;
- ``meta.json`` -- counts, bytes per token, settings, timings (`PreparedData.metadata()`) and the xxh3_64
  checksum of each token file, checked whenever the entry is opened (`load_prepared`): a token file changed
  after it was written (same size, other bytes) is refused, and `prepare_data` prepares the entry again.

The key hashes everything that decides the output (the bytes of every file taken, or the hub dataset's
name, config, split and revision; the tokenizer's files or training settings; the text column; the
document and split rules; `TOKENS_VERSION`), so preparing the same input again does no work, and a changed
file gets a new entry. An entry is built in a temporary directory beside it and renamed into place only
when complete; a failure removes the temporary directory, so a cache entry is never half-written. A cache
that cannot be written (a read-only or full file system, no permission) is one line naming it.

The tokenizer is trained or loaded by `oneday.data.tokenizer`.

How tokens are written and split: `oneday.data.token_files`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oneday.data.documents import DOC_MAX_CHARS, DOC_TARGET_CHARS, ReadStats
from oneday.data.shards import (
    MANIFEST_FILE,
    SHARD_TOKENS,
    VAL_FILE,
    open_tokens,
    pool_workers,
    shard_name,
    tokenize_into_shards,
)
from oneday.data.shards import Progress as ShardProgress
from oneday.data.sources import Source, resolve_source
from oneday.data.token_files import (
    MIN_DOCUMENTS,
    VAL_FRACTION,
    VAL_MAX_SHARE,
    VAL_MAX_TOKENS,
    VAL_MIN_TOKENS,
    VAL_OVERSHOOT,
    VAL_TARGET_TOKENS,
    choose_dtype,
)
from oneday.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    TokenizerRef,
    auto_tokenizer,
    check_vocab_fits_corpus,
    check_vocab_size,
    eot_id_of,
    package_version,
    resolve_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from oneday.errors import UserError
from oneday.paths import cache_dir as resolve_cache_dir
from oneday.paths import fsync
from oneday.processes import pid_alive
from oneday.progress import NULL_PROGRESS, Progress

log = logging.getLogger(__name__)

# Two versions: TOKENS_VERSION is in the cache key and says how the token files are made (a change gives every
# entry a new key); FORMAT_VERSION is the entry's layout, checked by `load_prepared` (version 2 added the
# checksums), so an entry of an older layout is prepared again under the same key and the plans that name it
# keep working.
TOKENS_VERSION = 2  # 2: shards, the validation set of 65,536 tokens where the corpus allows
FORMAT_VERSION = 3  # 3: train-NNNNN.bin shards and manifest.json
META_FILE = "meta.json"
OWNER_FILE = "owner"
CHECKSUM_FIELD = "xxh3_64"
CHECKSUM_CHUNK_BYTES = 8 << 20
TOKENIZER_SUBDIR = "tokenizer"
MIN_MAX_TOKENS = 81_920  # --max-tokens below this leaves a corpus too small to split (token_files)
_TMP_NAME = re.compile(r"^\.tmp-[0-9a-f]+-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")


@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus in the cache: where its files are and what they hold.

    Token counts include the end-of-text token that follows every document. `from_cache` says whether
    this call found the entry already prepared (it is not part of equality).
    """

    directory: Path
    key: str
    source: str
    tokenizer_dir: Path
    vocab_size: int
    eot_id: int
    dtype: str
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    text_bytes: int
    val_text_bytes: int
    shards: tuple[tuple[str, int], ...] = ()  # (file name, tokens) of each training shard, in order
    from_cache: bool = field(default=False, compare=False)

    def bytes_per_token(self) -> float:
        """UTF-8 text bytes per token over both splits (end-of-text tokens counted as tokens)."""
        return self.text_bytes / (self.train_tokens + self.val_tokens)

    def val_bytes_per_token(self) -> float:
        """Validation text bytes per validation token: val bits per byte = val loss (nats) / ln 2 / this."""
        return self.val_text_bytes / self.val_tokens

    def train_array(self) -> Any:
        """The training tokens, memory-mapped read-only (nothing is loaded until indexed): one memmap for one
        shard, else the shards as one flat array (`oneday.data.shards.ShardedTokens`)."""
        return open_tokens([self.directory / name for name, _ in self.shards], [n for _, n in self.shards],
                           self.dtype)

    def val_array(self) -> np.ndarray:
        """The validation tokens, memory-mapped read-only."""
        return np.memmap(self.directory / VAL_FILE, dtype=self.dtype, mode="r")

    def metadata(self) -> dict[str, Any]:
        """The entry's meta.json (counts, settings, timings), as written when it was prepared."""
        return json.loads((self.directory / META_FILE).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------------
# The cache


def file_checksum(path: Path) -> str:
    """The xxh3_64 of a file's bytes (hex), read in 8 MB chunks so memory stays bounded.

    xxh3 hashes at memory speed, so reading the file is the cost (measured on 100 MB: 0.03-0.07 s from the page
    cache, 0.4 s from a cold 250 MB/s disk): checking a 1 GB token file on every load costs about a second.
    """
    import xxhash

    digest = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while block := handle.read(CHECKSUM_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _content_key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _remove_stale_temps(root: Path) -> None:
    """Remove temporary build directories left by killed processes of this host (a crash cannot clean up)."""
    host = _host()
    for entry in root.glob(".tmp-*"):
        m = _TMP_NAME.match(entry.name)
        if m and m["host"] == host and not pid_alive(int(m["pid"])):
            log.info("data: removing %s, left by a process that no longer runs", entry)
            shutil.rmtree(entry, ignore_errors=True)


# What a file system says when it cannot store what is written: these come only from writing.
_WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})
# These come from reading too (a source file that is not ours to read, a path through a file): the cache's only
# when they name it.
_ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST})


@contextmanager
def _cache_write_errors(cache: Path) -> Iterator[None]:
    """Turn a failure to write the cache (read-only, full, not permitted) into one line naming the cache.

    Other OSErrors (a source that cannot be read, a bug) pass through unchanged. The caller removes what it
    wrote before the error reaches here.
    """
    try:
        yield
    except OSError as exc:
        named = Path(os.path.abspath(exc.filename)) if isinstance(exc.filename, (str, os.PathLike)) else None
        place = Path(os.path.abspath(cache))
        in_cache = named is not None and (named == place or place in named.parents or named in place.parents)
        if not ((exc.errno in _WRITE_ERRNOS and (named is None or in_cache))
                or (exc.errno in _ACCESS_ERRNOS and in_cache)):
            raise
        reason = os.strerror(exc.errno)
        raise UserError(f"cannot write to {cache}: {reason[:1].lower()}{reason[1:]}") from None


def _work_dir(root: Path, key: str) -> Path:
    """Where to build the entry: ``.partial-<key>`` (kept when interrupted, continued by the next call), or a
    private temporary folder while another live process of this host owns the partial one."""
    partial = root / f".partial-{key}"
    owner = partial / OWNER_FILE
    try:
        partial.mkdir(exist_ok=True)
        host, pid = owner.read_text().split() if owner.exists() else ("", "0")
    except ValueError:
        host, pid = "", "0"
    if host and (host != _host() or (int(pid) != os.getpid() and pid_alive(int(pid)))):
        return Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{_host()}-{os.getpid()}-", dir=root))
    owner.write_text(f"{_host()} {os.getpid()}\n")
    return partial


def _publish(tmp: Path, entry: Path) -> None:
    """Rename the finished build into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, entry)
    except OSError:
        if (entry / META_FILE).exists():
            log.info("data: %s was prepared by another process meanwhile; using it", entry)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def load_prepared(directory: str | os.PathLike[str]) -> PreparedData:
    """Open a prepared cache entry; UserError if it is missing, from another format version, or incomplete."""
    directory = Path(directory).expanduser()
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserError(f"no prepared data at {directory} ({META_FILE} is missing)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {meta_path}: {exc}") from None
    if meta.get("format_version") != FORMAT_VERSION:  # 1: no checksums, written before they were
        raise UserError(f"prepared data at {directory} has format version {meta.get('format_version')}, "
                        f"this oneday reads {FORMAT_VERSION}; prepare it again")
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
        records = [*manifest["shards"], manifest["val"]]
        for record in records:
            path = directory / record["name"]
            size = path.stat().st_size if path.is_file() else None
            if size != record["tokens"] * itemsize:
                raise UserError(f"prepared data at {directory} is incomplete: {record['name']} has "
                                f"{'no file' if size is None else f'{size} bytes'}, "
                                f"expected {record['tokens'] * itemsize}")
        for record in records:  # the same size is not the same tokens (a shuffled or overwritten file)
            if file_checksum(directory / record["name"]) != record[CHECKSUM_FIELD]:
                raise UserError(f"{directory / record['name']} changed after it was prepared (its {CHECKSUM_FIELD} "
                                f"checksum is not the one in {MANIFEST_FILE}); prepare the data again")
        tokenizer_dir = directory / meta["tokenizer"]["path"]
        if not tokenizer_dir.is_dir():
            raise UserError(f"prepared data at {directory} is incomplete: no tokenizer directory")
        return PreparedData(
            directory=directory, key=meta["key"], source=meta["source"], tokenizer_dir=tokenizer_dir,
            vocab_size=meta["vocab_size"], eot_id=meta["eot_id"], dtype=meta["dtype"],
            train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"],
            train_documents=meta["train_documents"], val_documents=meta["val_documents"],
            text_bytes=meta["text_bytes"], val_text_bytes=meta["val_text_bytes"],
            shards=tuple((r["name"], int(r["tokens"])) for r in manifest["shards"]),
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"prepared data at {directory} is incomplete: cannot read {MANIFEST_FILE} ({exc})") from None
    except (KeyError, TypeError) as exc:
        raise UserError(f"{meta_path} lacks field {exc}; prepare the data again") from None


# ----------------------------------------------------------------------------------------------------
# The entry point


def prepare_data(spec: str, *, tokenizer: str | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                 text_column: str | None = None, config: str | None = None, split: str | None = None,
                 max_tokens: int | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 progress: Progress | None = None, shard_tokens: int = SHARD_TOKENS,
                 workers: int | None = None) -> PreparedData:
    """Prepare `spec` into cached token files (module docstring), or return the cached entry at once.

    `tokenizer`: a local tokenizer directory or a hub name; None trains a byte-level BPE of `vocab_size`
    tokens on the data. `text_column` picks the column of structured files (default: a column named
    text/content/story/body/document..., else the only string column). `config` and `split` apply to hub
    datasets. `max_tokens` caps the tokens taken (the first documents up to it; the source is read no further,
    so a streamed hub split is never downloaded whole). `cache_dir` overrides `$ONEDAY_CACHE` and ~/.cache/oneday.
    `shard_tokens` sizes the training shards; `workers` the encoding processes (default: all cores for a corpus
    of 64 MB or more, else none; `oneday.data.shards`). An interrupted preparation keeps its finished shards in
    ``<cache>/data/.partial-<key>`` and the next call continues from them.
    """
    started = time.perf_counter()
    progress = progress or NULL_PROGRESS
    if max_tokens is not None and max_tokens < MIN_MAX_TOKENS:
        raise UserError(f"--max-tokens: at least {MIN_MAX_TOKENS:,} (the smallest corpus with a validation set), "
                        f"got {max_tokens:,}")
    check_vocab_size(vocab_size, training=tokenizer is None)
    source = resolve_source(spec, text_column=text_column, config=config, split=split)
    if tokenizer is None:
        check_vocab_fits_corpus(vocab_size, source)  # before training: the trainer reserves memory for it all
    tok_ref = resolve_tokenizer(tokenizer, vocab_size)
    if tok_ref.origin != "trained" and vocab_size != DEFAULT_VOCAB_SIZE:
        log.info("data: --vocab-size is ignored with a given tokenizer")

    t0 = time.perf_counter()
    if source.kind == "local":
        with progress.task(f"reading {len(source.files)} file{'s' * (len(source.files) != 1)}",
                           total=source.total_bytes, unit="B") as task:
            source_identity = source.identity(task)
    else:
        source_identity = source.identity()
    hash_seconds = time.perf_counter() - t0
    settings = {
        "documents": {"target_chars": DOC_TARGET_CHARS, "max_chars": DOC_MAX_CHARS},
        "shard_tokens": shard_tokens,
        "validation": {"fraction": VAL_FRACTION, "min_tokens": VAL_MIN_TOKENS, "target_tokens": VAL_TARGET_TOKENS,
                       "max_tokens": VAL_MAX_TOKENS,
                       "max_share": VAL_MAX_SHARE, "overshoot": VAL_OVERSHOOT, "min_documents": MIN_DOCUMENTS},
    }
    key_parts = {"format": TOKENS_VERSION, "source": source_identity, "tokenizer": tok_ref.identity,
                 "settings": settings}
    if max_tokens is not None:  # only when given: uncapped entries keep the keys they had
        key_parts["max_tokens"] = max_tokens
    key = _content_key(key_parts)

    cache = resolve_cache_dir(cache_dir)
    root = cache / "data"
    entry = root / key
    if (entry / META_FILE).exists():
        try:
            prepared = load_prepared(entry)
        except UserError as exc:
            log.warning("data: %s; preparing it again", exc)
            broken = entry.with_name(f".tmp-{key}-{_host()}-{os.getpid()}-broken")
            with _cache_write_errors(cache):
                os.rename(entry, broken)
            shutil.rmtree(broken, ignore_errors=True)
        else:
            log.info("data: %s is already prepared (%s); nothing to do", source.description, entry)
            return dataclasses.replace(prepared, source=source.description, from_cache=True)

    created = [folder for folder in (cache, root) if not folder.exists()]  # removed again if nothing gets in
    with _cache_write_errors(cache):
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(root)
        tmp = _work_dir(root, key)
        try:
            meta = _build(source, tok_ref, spec=spec, key=key, vocab_size=vocab_size, settings=settings,
                          work_dir=tmp, progress=progress, max_tokens=max_tokens, shard_tokens=shard_tokens,
                          workers=workers)
            meta["seconds"]["hash"] = round(hash_seconds, 3)
            meta["seconds"]["total"] = round(time.perf_counter() - started, 3)
            shutil.rmtree(tmp / "hf-datasets", ignore_errors=True)
            for name in (OWNER_FILE, "progress.json"):
                (tmp / name).unlink(missing_ok=True)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            token_files = [*(shard_name(i) for i in range(meta["shards"])), VAL_FILE]
            for name in (*token_files, MANIFEST_FILE, META_FILE, "."):
                fsync(tmp / name)  # a crash after the rename must not leave a short token file
            _publish(tmp, entry)
        except KeyboardInterrupt:
            if tmp.name.startswith(".partial-") and (tmp / "progress.json").exists():
                log.warning("data: interrupted; the finished shards stay in %s, and preparing %s again goes on "
                            "from them", tmp, spec)
                (tmp / OWNER_FILE).unlink(missing_ok=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
            raise
    prepared = load_prepared(entry)
    log.info("data: prepared %s -> %s: %d train + %d val tokens, %.2f bytes/token, %.0f s",
             source.description, entry, prepared.train_tokens, prepared.val_tokens,
             prepared.bytes_per_token(), meta["seconds"]["total"])
    return prepared


def _build(source: Source, tok_ref: TokenizerRef, *, spec: str, key: str, vocab_size: int,
           settings: dict[str, Any], work_dir: Path, progress: Progress, max_tokens: int | None,
           shard_tokens: int, workers: int | None) -> dict[str, Any]:
    """Do the work into `work_dir`: tokenizer, token shards; return the metadata (written by the caller).

    A `work_dir` left by an interrupted preparation of the same key (`shards.Progress`) is continued: its
    tokenizer and finished shards are kept.
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    resumed = ShardProgress.load(work_dir, key) if (work_dir / TOKENIZER_SUBDIR).is_dir() else None
    if resumed is None:
        for leftover in work_dir.iterdir():  # a partial preparation that cannot be continued: ours, start over
            if leftover.name not in (OWNER_FILE, "hf-datasets"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    if resumed is not None:
        tok = auto_tokenizer(str(work_dir / TOKENIZER_SUBDIR))
    elif tok_ref.origin == "trained":
        tok = train_tokenizer(source, vocab_size=vocab_size, work_dir=work_dir, progress=progress,
                              max_tokens=max_tokens)
    elif tok_ref.loaded is not None:
        tok = tok_ref.loaded
    else:
        tok = auto_tokenizer(tok_ref.name or "")
    name = tok_ref.name or "trained byte-level BPE"
    eot_id = eot_id_of(tok, name)
    tokenizer_dir = work_dir / TOKENIZER_SUBDIR
    if resumed is None:
        save_tokenizer(tok, tokenizer_dir)
    backend = getattr(tok, "backend_tokenizer", None)
    id_space = max(len(tok), backend.get_vocab_size(with_added_tokens=True) if backend is not None else 0)
    dtype = choose_dtype(id_space)
    seconds["tokenizer"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    stats = ReadStats()
    state = resumed if resumed is not None else ShardProgress(key=key)
    shards_before = len(state.shards)
    tokenize_into_shards(source, tok, state, eot_id=eot_id, dtype=dtype, work_dir=work_dir, stats=stats,
                          progress=progress, max_tokens=max_tokens, shard_tokens=shard_tokens, workers=workers)
    seconds["tokenize"] = round(time.perf_counter() - t0, 3)
    vocab = len(tok)
    if state.max_id >= vocab:
        log.warning("data: the tokenizer produced id %d, beyond its length %d; reporting vocab size %d",
                    state.max_id, vocab, state.max_id + 1)
        vocab = state.max_id + 1
    assert state.val is not None
    val = state.val
    train_tokens = sum(r.tokens for r in state.shards)
    total_tokens = train_tokens + val.tokens
    val_tokens = val.tokens
    text_bytes = sum(r.text_bytes for r in state.shards) + val.text_bytes
    val_text_bytes = val.text_bytes
    train_documents = sum(r.documents for r in state.shards)
    ndocs = train_documents + val.documents
    manifest = {"format_version": FORMAT_VERSION, "dtype": dtype, "eot_id": eot_id, "shard_tokens": shard_tokens,
                "shards": [r.as_dict() for r in state.shards], "val": val.as_dict()}
    (work_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if shards_before:
        log.info("data: resumed an interrupted preparation: kept %d finished shard(s)", shards_before)
    if stats.invalid_bytes:
        log.warning("data: %d invalid UTF-8 bytes in %d file(s) were replaced with U+FFFD",
                    stats.invalid_bytes, stats.files_with_invalid_bytes)
    log.info("data: tokenized %d documents into %d tokens in %.1f s (%.0f tokens/s)", ndocs, total_tokens,
             seconds["tokenize"], total_tokens / max(seconds["tokenize"], 1e-9))
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "source": source.description,
        "spec": spec,
        "spec_absolute": os.path.abspath(os.path.expanduser(spec)) if source.kind == "local" else spec,
        "source_kind": source.kind,
        "files": len(source.files),
        "files_per_kind": source.files_per_kind,
        "text_columns": dict(stats.text_columns),
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train_documents": train_documents,
        "val_documents": val.documents,
        "shards": len(state.shards),
        "source_bytes": source.total_bytes,  # on disk (compressed for parquet); None for a hub split
        "capped": max_tokens is not None and total_tokens >= max_tokens,
        "shards_resumed": shards_before,
        "text_bytes": text_bytes,
        "val_text_bytes": val_text_bytes,
        "bytes_per_token": text_bytes / total_tokens,
        "val_bytes_per_token": val_text_bytes / val_tokens,
        "vocab_size": vocab,
        "eot_id": eot_id,
        "dtype": dtype,
        "tokenizer": {"path": TOKENIZER_SUBDIR, "origin": tok_ref.origin, "name": tok_ref.name,
                      "class": type(tok).__name__},
        "invalid_bytes_replaced": stats.invalid_bytes,
        "empty_rows_skipped": stats.empty_rows,
        "settings": {
            "vocab_size_requested": vocab_size if tok_ref.origin == "trained" else None,
            "text_column": source.text_column,
            "max_tokens": max_tokens,
            "hub": {"name": source.hub_name, "config": source.hub_config, "split": source.hub_split,
                    "revision": source.hub_revision} if source.kind == "hub" else None,
            "tokenizer_training": tok_ref.identity if tok_ref.origin == "trained" else None,
            **settings,
        },
        "seconds": seconds,
        "tokens_per_second": round(total_tokens / max(seconds["tokenize"], 1e-9)),
        "workers": pool_workers(workers, source.total_bytes),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "oneday_version": package_version("oneday"),
    }

