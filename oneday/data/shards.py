"""Sharded token files: a corpus tokenized by a pool of processes into shards of ~100M tokens, resumably.

Layout of a cache entry (`oneday.data.prepare`): ``train-00000.bin``, ``train-00001.bin``, ... -- flat token ids
(uint16 when the vocabulary fits, else uint32, no header: the nanoGPT ``.bin`` format, ``np.memmap`` reads
it), every document followed by the end-of-text token; ``val.bin`` the same; ``manifest.json`` -- every shard's
name, tokens, documents, text bytes and xxh3_64 checksum, and the validation file's.

- Shards end at document boundaries once they hold `shard_tokens` (default `SHARD_TOKENS`, 100M: 200 MB of
  uint16, the size llm.c's FineWeb shards have).
- Memory is bounded by one shard whatever the corpus size: ids go to disk as each batch is encoded; the only
  per-document table is the first shard's (tokens, bytes and a hash per document: ~20 bytes each), from which
  the validation set is held out (`oneday.data.token_files.choose_validation`). When the whole corpus fits in
  the first shard, the rule is exactly the whole-corpus one; otherwise the target is `val_target` of the
  corpus's estimated size (its bytes × the first shard's tokens per byte; for a hub split of unknown size, of
  the first shard), taken from the first shard's documents.
- Encoding runs in a pool of processes (`workers`, default all cores) when the corpus is large enough to pay
  for starting them (`POOL_MIN_BYTES`); batches are read and cut into documents in the main process, encoded
  in the workers (the Rust encoder and the conversion of its ids to numpy, which is Python-bound), and
  written in order, with at most 2 × workers batches in flight.
- Resumable: finished shards and a ``progress.json`` (the shards, the validation file, how many documents of
  the source they hold) stay in the entry's partial folder when preparation is interrupted; the next call
  with the same key keeps them, skips that many documents of the source (read again, not encoded) and goes on.
- `ShardedTokens` reads the shards as one flat array: the window sampler (`oneday.data.windows`) indexes it as
  it indexes a memmap, so the exact-resume cursor is the same across shard boundaries.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oneday.data.documents import ReadStats
from oneday.data.sources import Source
from oneday.data.token_files import choose_validation, split_token_file
from oneday.data.tokenizer import BATCH_CHARS, batch_encoder
from oneday.errors import UserError
from oneday.progress import Progress as ProgressBar

log = logging.getLogger(__name__)

SHARD_TOKENS = 100_000_000
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
VAL_FILE = "val.bin"
HEAD_FILE = "head.bin"
POOL_MIN_BYTES = 64 << 20  # below this, starting processes costs more than it saves


def shard_name(index: int) -> str:
    return f"train-{index:05d}.bin"


# ----------------------------------------------------------------------------------------------------
# Reading


class ShardedTokens:
    """Shards read as one flat read-only array: `len`, `ndim`, `dtype`, integer/array indexing, `np.asarray`."""

    ndim = 1

    def __init__(self, paths: list[Path], counts: list[int], dtype: str) -> None:
        self.paths = paths
        self.counts = counts
        self.dtype = np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.counts[i],))
        return self._maps[i]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, stride = index.indices(len(self))
            if stride != 1:
                return self[np.arange(start, stop, stride)]
            return self._read(start, stop)
        flat = np.asarray(index, dtype=np.int64)
        shape = flat.shape
        flat = flat.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        which = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.size, dtype=self.dtype)
        for i in np.unique(which).tolist():
            mask = which == i
            out[mask] = self._shard(i)[flat[mask] - self.offsets[i]]
        return out.reshape(shape) if shape else out[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as one array, from the shards that hold them only (the probe reads the head)."""
        pieces = [self._shard(i)[max(start, lo) - lo:min(stop, hi) - lo]
                  for i, (lo, hi) in enumerate(itertools.pairwise(self.offsets.tolist()))
                  if lo < stop and start < hi]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = np.concatenate([np.asarray(self._shard(i)) for i in range(len(self.paths))])
        return whole.astype(dtype) if dtype is not None else whole

    def __eq__(self, other: object) -> Any:  # elementwise, as an array's
        return np.asarray(self) == other

    __hash__ = None  # type: ignore[assignment]

    def max(self) -> Any:
        return max(self._shard(i).max() for i in range(len(self.paths)))


def open_tokens(paths: list[Path], counts: list[int], dtype: str) -> Any:
    """One memmap for one shard (exactly what earlier layouts gave), else `ShardedTokens`."""
    if len(paths) == 1:
        return np.memmap(paths[0], dtype=dtype, mode="r", shape=(counts[0],))
    return ShardedTokens(paths, counts, dtype)


# ----------------------------------------------------------------------------------------------------
# Encoding in a pool

_WORKER_ENCODE: list[Callable[[list[str]], list[list[int]]]] = []


def _worker_init(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    enc = Tokenizer.from_str(tokenizer_json)
    enc.no_truncation()
    enc.no_padding()
    enc.encode_special_tokens = True
    encode = getattr(enc, "encode_batch_fast", enc.encode_batch)
    _WORKER_ENCODE.append(lambda docs: [e.ids for e in encode(docs, add_special_tokens=False)])


def _to_arrays(ids: list[list[int]], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
    return lens, flat


def _worker_encode(docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    return _to_arrays(_WORKER_ENCODE[0](docs), dtype)


def pool_workers(requested: int | None, total_bytes: int | None) -> int:
    """Processes to encode with: `requested`, else all cores for a large (or unknown-size) corpus, else none."""
    if requested is not None:
        return max(0, requested)
    if total_bytes is not None and total_bytes < POOL_MIN_BYTES:
        return 0
    return os.cpu_count() or 1


def encoded(batches: Iterator[tuple[list[str], int]], *, encode: Callable[[list[str]], list[list[int]]],
            tokenizer_json: str | None, dtype: str,
            workers: int) -> Iterator[tuple[list[str], int, np.ndarray, np.ndarray]]:
    """(documents, source bytes, token counts, flat ids) per batch, in order; in `workers` processes when > 0."""
    if workers <= 0 or tokenizer_json is None:
        for docs, consumed in batches:
            lens, flat = _to_arrays(encode(docs), dtype) if docs else (np.zeros(0, np.int64), np.zeros(0, dtype))
            yield docs, consumed, lens, flat
        return
    import multiprocessing

    env = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}  # one core per worker: no oversubscription
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # fork where there is one: spawn would import the caller's __main__ again, which a script without an
        # `if __name__ == "__main__"` guard does not survive; the workers use only numpy and tokenizers.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_worker_init, initargs=(tokenizer_json,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    pending: deque[tuple[list[str], int, Future[tuple[np.ndarray, np.ndarray]]]] = deque()
    try:
        for docs, consumed in batches:
            pending.append((docs, consumed, pool.submit(_worker_encode, docs, dtype)))
            if len(pending) >= 2 * workers:
                d, c, fut = pending.popleft()
                yield d, c, *fut.result()
        while pending:
            d, c, fut = pending.popleft()
            yield d, c, *fut.result()
    finally:
        for _, _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------
# Writing, resumably


@dataclass
class ShardRecord:
    name: str
    tokens: int
    documents: int
    text_bytes: int
    xxh3_64: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tokens": self.tokens, "documents": self.documents,
                "text_bytes": self.text_bytes, "xxh3_64": self.xxh3_64}


@dataclass
class Progress:
    """What a partial preparation has finished: kept in `PROGRESS_FILE`, so an interrupted one goes on."""

    key: str
    shards: list[ShardRecord] = field(default_factory=list)
    val: ShardRecord | None = None
    documents_read: int = 0  # documents of the source the finished shards (and the validation set) hold
    max_id: int = 0

    def save(self, folder: Path) -> None:
        data = {"key": self.key, "shards": [s.as_dict() for s in self.shards],
                "val": self.val.as_dict() if self.val else None, "documents_read": self.documents_read,
                "max_id": self.max_id}
        tmp = folder / (PROGRESS_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, folder / PROGRESS_FILE)

    @classmethod
    def load(cls, folder: Path, key: str) -> Progress | None:
        """The progress saved in `folder`, when it is for `key` and its shards are intact; else None."""
        from oneday.data.prepare import file_checksum

        try:
            data = json.loads((folder / PROGRESS_FILE).read_text(encoding="utf-8"))
            if data["key"] != key:
                return None
            shards = [ShardRecord(**s) for s in data["shards"]]
            val = ShardRecord(**data["val"]) if data["val"] else None
            for record in [*shards, *([val] if val else [])]:
                if file_checksum(folder / record.name) != record.xxh3_64:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(key=key, shards=shards, val=val, documents_read=int(data["documents_read"]),
                   max_id=int(data["max_id"]))


def skip_documents(batches: Iterator[tuple[list[str], int]], skip: int) -> Iterator[tuple[list[str], int]]:
    """The batches after the first `skip` documents (read, not encoded: resuming a preparation)."""
    for docs, consumed in batches:
        if skip >= len(docs):
            skip -= len(docs)
            continue
        yield docs[skip:], consumed
        skip = 0


class ShardWriter:
    """Documents' ids into shards cut at document boundaries; the first shard keeps a per-document table."""

    def __init__(self, folder: Path, *, dtype: str, eot_id: int, shard_tokens: int, progress: Progress,
                 on_first_shard: Callable[[Path, np.ndarray, np.ndarray, np.ndarray, bool], tuple[
                     ShardRecord, ShardRecord]]) -> None:
        self.folder = folder
        self.dtype = dtype
        self.eot_id = eot_id
        self.shard_tokens = shard_tokens
        self.progress = progress
        self.on_first_shard = on_first_shard  # (head path, doc tokens, bytes, hashes, final) -> (train, val)
        self._file: Any = None
        self._tokens = self._docs = self._bytes = 0
        self._table: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_docs = 0

    @property
    def _head(self) -> bool:
        return self.progress.val is None

    def _path(self) -> Path:
        return self.folder / (HEAD_FILE if self._head else shard_name(len(self.progress.shards)))

    def write(self, docs: list[str], lens: np.ndarray, flat: np.ndarray) -> None:
        """Append a batch of encoded documents, closing shards as they fill."""
        import xxhash

        if len(docs) == 0:
            return
        if flat.size:
            self.progress.max_id = max(self.progress.max_id, int(flat.max()))
        sizes = lens + 1
        ends = np.cumsum(lens)
        tokens = np.insert(flat, ends, self.eot_id)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        raw = [d.encode("utf-8") for d in docs]
        nbytes = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        first = 0
        while first < len(docs):
            room = self.shard_tokens - self._tokens
            cum = np.cumsum(sizes[first:])
            take = min(len(docs) - first, int(np.searchsorted(cum, room)) + 1)
            last = first + take
            if self._file is None:
                self._file = open(self._path(), "wb")  # noqa: SIM115 (closed in _close)
            self._file.write(tokens[starts[first]:starts[last]].data)
            if self._head:
                hashes = np.fromiter(map(xxhash.xxh3_64_intdigest, raw[first:last]), dtype=np.uint64, count=take)
                self._table.append((sizes[first:last], nbytes[first:last], hashes))
            self._tokens += int(starts[last] - starts[first])
            self._docs += take
            self._bytes += int(nbytes[first:last].sum())
            self._pending_docs += take
            first = last
            if self._tokens >= self.shard_tokens:
                self._close(final=False)

    def has_text(self) -> bool:
        return bool(self._table) or bool(self.progress.shards)

    def finish(self) -> None:
        if self._file is not None or self._head:
            self._close(final=True)

    def _close(self, *, final: bool) -> None:
        from oneday.data.prepare import file_checksum

        if self._file is not None:
            self._file.close()
            self._file = None
        if self._head:
            if not self._table:
                raise UserError("no text to prepare")
            doc_tokens, doc_bytes, hashes = (np.concatenate(parts) for parts in zip(*self._table, strict=True))
            train, val = self.on_first_shard(self.folder / HEAD_FILE, doc_tokens, doc_bytes, hashes, final)
            self._table = []
            self.progress.val = val
            if train.tokens:
                self.progress.shards.append(train)
        else:
            name = shard_name(len(self.progress.shards))
            self.progress.shards.append(ShardRecord(name, self._tokens, self._docs, self._bytes,
                                                    file_checksum(self.folder / name)))
        self.progress.documents_read += self._pending_docs
        self._tokens = self._docs = self._bytes = self._pending_docs = 0
        self.progress.save(self.folder)

    def abandon(self) -> None:
        """Drop the shard being written (an interruption): the finished ones and their progress stay."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._path().unlink(missing_ok=True)


def tokenize_into_shards(source: Source, tok: Any, state: Progress, *, eot_id: int, dtype: str,
                         work_dir: Path, stats: ReadStats, progress: ProgressBar, max_tokens: int | None,
                         shard_tokens: int, workers: int | None) -> None:
    """Encode the source (after the documents `state` already holds) into shards (module docstring)."""
    from oneday.data.prepare import file_checksum

    consumed_bytes = [0]

    def split_first_shard(head: Path, doc_tokens: np.ndarray, doc_bytes: np.ndarray, hashes: np.ndarray,
                          final: bool) -> tuple[ShardRecord, ShardRecord]:
        estimate = None
        if not final:  # a larger corpus: size the validation set for all of it (module docstring of shards)
            total = source.total_bytes
            head_tokens = int(doc_tokens.sum())
            head_bytes = max(1, int(doc_bytes.sum()))
            estimate = head_tokens if not total else max(head_tokens, int(head_tokens * total / head_bytes))
        val_idx = choose_validation(doc_tokens, hashes, corpus_tokens=estimate)
        train_path = work_dir / shard_name(0)
        split_token_file(head, train_path=train_path, val_path=work_dir / VAL_FILE, doc_tokens=doc_tokens,
                         val_idx=val_idx, dtype=dtype)
        in_val = np.zeros(len(doc_tokens), dtype=bool)
        in_val[val_idx] = True
        train = ShardRecord(shard_name(0), int(doc_tokens[~in_val].sum()), int((~in_val).sum()),
                            int(doc_bytes[~in_val].sum()), file_checksum(train_path))
        val = ShardRecord(VAL_FILE, int(doc_tokens[in_val].sum()), int(in_val.sum()), int(doc_bytes[in_val].sum()),
                          file_checksum(work_dir / VAL_FILE))
        return train, val

    writer = ShardWriter(work_dir, dtype=dtype, eot_id=eot_id, shard_tokens=shard_tokens, progress=state,
                         on_first_shard=split_first_shard)
    written = sum(r.tokens for r in state.shards) + (state.val.tokens if state.val else 0)
    backend = getattr(tok, "backend_tokenizer", None)
    batch_chars = BATCH_CHARS if max_tokens is None else min(BATCH_CHARS, max(1 << 16, 2 * max_tokens))
    batches = skip_documents(source.iter_batches(batch_chars=batch_chars, work_dir=work_dir, stats=stats),
                             state.documents_read)
    stream = encoded(batches, encode=batch_encoder(tok), tokenizer_json=backend.to_str() if backend else None,
                     dtype=dtype, workers=pool_workers(workers, source.total_bytes))
    try:
        with contextlib.closing(stream), progress.task("tokenizing", total=source.total_bytes, unit="B") as task:
            for docs, consumed, lens, flat in stream:
                consumed_bytes[0] += consumed
                capped = False
                if max_tokens is not None and len(docs):
                    keep = int(np.searchsorted(np.cumsum(lens + 1), max_tokens - written)) + 1
                    if keep < len(docs):
                        docs, flat, lens = docs[:keep], flat[:int(lens[:keep].sum())], lens[:keep]
                    written += int((lens + 1).sum())
                    capped = written >= max_tokens
                writer.write(docs, lens, flat)
                task.advance(consumed)
                if capped:
                    log.info("data: stopped reading %s at %d tokens (--max-tokens %d)", source.description,
                             written, max_tokens)
                    break
        if state.val is None and not writer.has_text():
            raise UserError(f"no text in {source.description}")
        writer.finish()
    except BaseException:
        writer.abandon()
        raise


__all__ = ["MANIFEST_FILE", "SHARD_TOKENS", "ShardRecord", "ShardWriter", "ShardedTokens", "encoded", "open_tokens",
           "pool_workers", "shard_name", "skip_documents", "tokenize_into_shards"]
