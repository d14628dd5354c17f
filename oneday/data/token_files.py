"""Token files: a corpus tokenized into one flat file, then split into train and validation by whole documents.

Validation split: documents are ordered by a hash of their text (so the choice is deterministic, does not
depend on file order, and identical documents land on the same side) and taken in that order until the
validation set holds ``min(max(65,536, 0.5% of all tokens), 10% of all tokens, 10,000,000)`` tokens, skipping
documents that would overshoot that target by more than half. The 65,536 is for the standard error of a val loss:
the loss of a window of 256 tokens varies between windows by about 0.3-0.5 nats on small models, so 256 windows
(65,536 tokens) give a mean with a standard error of about 0.02-0.03 nats -- small enough to tell apart two runs
whose losses differ by 0.1 -- where 8,192 tokens (32 windows) gave 0.05-0.09; every evaluation logs its own
standard error (`val_loss_se`, over the validation batches: `oneday.runner.step.evaluate_with_se`). The 10%
keeps a small corpus mostly for training; 0.5% is plenty for a 10 GB corpus (~12M tokens, capped at 10M:
evaluation reads a fixed subset anyway). A corpus with fewer than 10 documents or fewer than 81,920 tokens
(where even 8,192 validation tokens would exceed 10%) is refused as too small to split.

Speed: documents are encoded in batches of ~2M characters with the `tokenizers` library's
`encode_batch_fast` (Rust, all cores), and each batch becomes one numpy array (ids flattened with
`np.fromiter`, end-of-text tokens put in with `np.insert`) appended to the token file; nothing iterates
over tokens in Python, and no Arrow copy of the text or the ids is written. The Rust encoder is the
bottleneck -- the same one `datasets.map(batched=True)` calls through transformers -- so the tokenizing
step runs at parity with `datasets.map` (bench/data_throughput.py measures both: 251k against 287k tokens/s
of wall time, 376k against 342k per CPU-second, on a 2-core machine under load).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from oneday.data.tokenizer import MAX_VOCAB_SIZE
from oneday.errors import UserError

log = logging.getLogger(__name__)

UINT16_MAX_VOCAB = 2**16

VAL_FRACTION = 0.005
VAL_MIN_TOKENS = 8192  # the least held out (at 10% of the smallest corpus that is split)
VAL_TARGET_TOKENS = 65536  # held out where the corpus allows (module docstring: the standard error)
VAL_MAX_TOKENS = 10_000_000
VAL_MAX_SHARE = 0.10
VAL_OVERSHOOT = 1.5
MIN_DOCUMENTS = 10

MOVE_CHUNK_TOKENS = 8 << 20


def choose_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype that holds every id below `vocab_size` (uint16 halves disk and I/O)."""
    if vocab_size <= UINT16_MAX_VOCAB:
        return "uint16"
    if vocab_size <= MAX_VOCAB_SIZE:
        return "uint32"
    raise UserError(f"vocabulary of {vocab_size:,} tokens does not fit in uint32 token files")


def val_target(total_tokens: int) -> int:
    """Validation tokens to hold out of a corpus of `total_tokens` (module docstring)."""
    wanted = max(VAL_TARGET_TOKENS, math.ceil(VAL_FRACTION * total_tokens))
    return max(VAL_MIN_TOKENS, min(VAL_MAX_TOKENS, wanted, int(VAL_MAX_SHARE * total_tokens)))


def choose_validation(doc_tokens: np.ndarray, doc_hashes: np.ndarray, *,
                      corpus_tokens: int | None = None) -> np.ndarray:
    """Indices (ascending) of the documents held out for validation; the rules are in the module docstring.

    `corpus_tokens`: the whole corpus's (estimated) size when these documents are only its first shard; the
    target is then `val_target(corpus_tokens)`, at most half of these documents.

    Raises UserError when the corpus is too small to split, or its documents too large to hold out about
    the target without taking much more.
    """
    ndocs = len(doc_tokens)
    total = int(doc_tokens.sum(dtype=np.int64))
    min_total = math.ceil(VAL_MIN_TOKENS / VAL_MAX_SHARE)
    if ndocs < MIN_DOCUMENTS or max(total, corpus_tokens or 0) < min_total:
        raise UserError(f"corpus too small to hold out a validation set: {ndocs:,} documents, {total:,} tokens; "
                        f"need at least {MIN_DOCUMENTS} documents and {min_total:,} tokens")
    target = val_target(total) if corpus_tokens is None else min(val_target(corpus_tokens), total // 2)
    cap = int(target * VAL_OVERSHOOT)
    order = np.argsort(doc_hashes, kind="stable")
    chosen: list[int] = []
    taken = 0
    for start in range(0, ndocs, 65536):
        idx = order[start:start + 65536]
        for i, n in zip(idx.tolist(), doc_tokens[idx].tolist(), strict=True):
            if taken + n <= cap:
                chosen.append(i)
                taken += n
                if taken >= target:
                    return np.sort(np.asarray(chosen, dtype=np.int64))
    raise UserError(f"cannot hold out ~{target:,} validation tokens by whole documents: the documents are too "
                    f"large (largest {int(doc_tokens.max()):,} of {total:,} tokens); split them into smaller ones")




def _move(mm: np.ndarray, src: int, end: int, dst: int) -> None:
    """Copy mm[src:end] to mm[dst:...] (dst <= src) in chunks, so memory stays bounded."""
    if src == dst:
        return
    for start in range(src, end, MOVE_CHUNK_TOKENS):
        stop = min(end, start + MOVE_CHUNK_TOKENS)
        mm[dst + (start - src):dst + (stop - src)] = mm[start:stop]


def split_token_file(all_path: Path, *, train_path: Path, val_path: Path, doc_tokens: np.ndarray,
                      val_idx: np.ndarray, dtype: str) -> None:
    """Write the validation documents to val.bin, compact the rest in place, and rename it train.bin.

    In place, so a 10 GB corpus needs no second 10 GB copy on disk; only the validation documents
    (at most VAL_MAX_TOKENS * 1.5 tokens) are copied.
    """
    offsets = np.concatenate([[0], np.cumsum(doc_tokens, dtype=np.int64)])
    total = int(offsets[-1])
    mm = np.memmap(all_path, dtype=dtype, mode="r+", shape=(total,))
    with open(val_path, "wb") as f:
        for i in val_idx.tolist():
            f.write(mm[offsets[i]:offsets[i + 1]].data)
    write = read = 0
    for i in val_idx.tolist():
        start = int(offsets[i])
        _move(mm, read, start, write)
        write += start - read
        read = int(offsets[i + 1])
    _move(mm, read, total, write)
    write += total - read
    mm.flush()
    del mm
    os.truncate(all_path, write * np.dtype(dtype).itemsize)
    os.replace(all_path, train_path)


__all__ = ["MIN_DOCUMENTS", "VAL_FRACTION", "VAL_MAX_SHARE", "VAL_MAX_TOKENS", "VAL_MIN_TOKENS", "VAL_OVERSHOOT",
           "VAL_TARGET_TOKENS", "choose_dtype", "choose_validation", "split_token_file",
           "val_target"]
