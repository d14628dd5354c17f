"""Data pipeline throughput: `prepare_data` on a corpus, and its tokenizing step vs `datasets.map`.

    python bench/data_throughput.py [--data CORPUS] [--vocab-size 8192] [--repeat 3]

The default corpus is the development machines' English text (`../shared/data` beside the checkout, outside
this repository: ~7.8 MB in 12 files); pass `--data` anywhere else.

1. Prepares the corpus into a fresh temporary cache (tokenizer training included): seconds, tokens,
   tokens/s, and the time of each phase.
2. Tokenizes the very same documents with the very same tokenizer three ways, best of `--repeat` runs,
   alternating so that load from other processes hits all alike (wall and CPU seconds are printed; on a
   shared 2-core machine trust the CPU seconds more):
   - oneday: the batch encoder of `prepare_data` + numpy packing (what `prepare_data` runs);
   - datasets in memory: `Dataset.from_dict` + `.map(batched=True, keep_in_memory=True)`, ids flattened
     through Arrow chunks into numpy (the fastest `datasets` way);
   - datasets on disk: `load_dataset("json")` + `.map(batched=True)` writing its Arrow cache file, then
     flattened (the usual `datasets` pipeline).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from oneday.data import prepare as data_mod
from oneday.data.documents import ReadStats
from oneday.data.sources import resolve_source
from oneday.data.tokenizer import BATCH_CHARS, batch_encoder

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA.resolve()))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        prepared = data_mod.prepare_data(args.data, vocab_size=args.vocab_size, cache_dir=Path(tmp) / "cache")
        seconds = time.perf_counter() - t0
        meta = prepared.metadata()
        tokens = prepared.train_tokens + prepared.val_tokens
        print(f"source        {prepared.source}")
        print(f"text          {prepared.text_bytes / 1e6:.2f} MB, "
              f"{prepared.train_documents + prepared.val_documents} documents, vocab {prepared.vocab_size}")
        print(f"prepare_data  {seconds:.2f} s end to end, {tokens:,} tokens, {tokens / seconds:,.0f} tokens/s; "
              f"phases (s): {meta['seconds']}")
        print(f"  tokenize    {meta['seconds']['tokenize']:.2f} s = {meta['tokens_per_second']:,} tokens/s "
              "(read + cut + encode + write)")

        source = resolve_source(args.data)
        docs = [d for batch, _ in source.iter_batches(batch_chars=BATCH_CHARS, work_dir=Path(tmp),
                                                      stats=ReadStats(), quiet=True) for d in batch]
        jsonl = Path(tmp) / "docs.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(prepared.tokenizer_dir)
        ways: dict[str, Callable[[], tuple[int, float, float]]] = {
            "oneday encoder + numpy": lambda: _ours(tok, docs, prepared.eot_id, prepared.dtype),
            "datasets.map in memory": lambda: _datasets_in_memory(tok, docs, prepared.eot_id, prepared.dtype),
            "datasets load+map on disk": lambda: _datasets_on_disk(tok, jsonl, Path(tmp), prepared.eot_id,
                                                                   prepared.dtype),
        }
        runs: dict[str, list[tuple[int, float, float]]] = {k: [] for k in ways}
        for _ in range(args.repeat):
            for name, fn in ways.items():
                runs[name].append(fn())
        counts = {r[0] for rs in runs.values() for r in rs}
        assert len(counts) == 1, f"the ways disagree on the token count: {counts}"
        n = counts.pop()
        print(f"tokenizing the same {len(docs)} documents ({n:,} tokens), best of {args.repeat}:")
        for name, rs in runs.items():
            wall, cpu = min(r[1] for r in rs), min(r[2] for r in rs)
            print(f"  {name:27s} {wall:6.2f} s wall {n / wall:>11,.0f} tokens/s | {cpu:6.2f} s CPU "
                  f"{n / cpu:>11,.0f} tokens/CPU-s | all wall: {[round(r[1], 2) for r in rs]}")


def _ours(tok: Any, docs: list[str], eot_id: int, dtype: str) -> tuple[int, float, float]:
    encode = batch_encoder(tok)
    t0, c0 = time.perf_counter(), time.process_time()
    parts, batch, chars = [], [], 0
    for d in [*docs, None]:
        if d is not None:
            batch.append(d)
            chars += len(d)
        if batch and (d is None or chars >= BATCH_CHARS):
            ids = encode(batch)
            lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
            parts.append(np.insert(flat, np.cumsum(lens), eot_id))
            batch, chars = [], 0
    out = np.concatenate(parts)
    return len(out), time.perf_counter() - t0, time.process_time() - c0


def _flatten(column: Any, dtype: str) -> np.ndarray:
    import pyarrow.compute as pc

    chunks = column.chunks if hasattr(column, "chunks") else [column]
    return np.concatenate([pc.list_flatten(c).to_numpy() for c in chunks]).astype(dtype)


def _map_fn(tok: Any, eot_id: int) -> Callable[[dict[str, list[str]]], dict[str, list[list[int]]]]:
    return lambda b: {"ids": [[*x, eot_id] for x in tok(b["text"], add_special_tokens=False)["input_ids"]]}


def _datasets_in_memory(tok: Any, docs: list[str], eot_id: int, dtype: str) -> tuple[int, float, float]:
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    t0, c0 = time.perf_counter(), time.process_time()
    mapped = ds.map(_map_fn(tok, eot_id), batched=True, remove_columns=["text"], keep_in_memory=True)
    flat = _flatten(mapped.data.column("ids"), dtype)
    return len(flat), time.perf_counter() - t0, time.process_time() - c0


def _datasets_on_disk(tok: Any, jsonl: Path, tmp: Path, eot_id: int, dtype: str) -> tuple[int, float, float]:
    import datasets

    datasets.disable_progress_bars()
    cache = Path(tempfile.mkdtemp(dir=tmp))
    t0, c0 = time.perf_counter(), time.process_time()
    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(cache))
    mapped = ds.map(_map_fn(tok, eot_id), batched=True, remove_columns=["text"])
    flat = _flatten(mapped.data.column("ids"), dtype)
    return len(flat), time.perf_counter() - t0, time.process_time() - c0


if __name__ == "__main__":
    main()
