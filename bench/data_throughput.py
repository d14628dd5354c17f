"""Data pipeline throughput: `prepare_data` on a corpus, and its tokenizing step vs `datasets.map`.

    python bench/data_throughput.py [--data CORPUS] [--vocab-size 8192] [--repeat 3]
    python bench/data_throughput.py --scale-gb 0.05 0.2 [1 4] [--workers N] [--shard-tokens 10000000]

`--scale-gb`: the sharded pipeline at scale. For each size, a plain-text corpus of that many GB is generated in a
temporary folder (the `--data` corpus repeated, each copy's paragraphs in another seeded order so documents
differ), a tokenizer is trained once on the `--data` corpus (so the figures are the tokenizing pipeline's), and
`prepare_data` runs in a fresh process with `--workers` encoding processes (default: all cores). Printed: tokens,
seconds, tokens/s in all and per worker, peak RSS of the main process and of the largest worker (the goal: flat
in the corpus size, under 2 GB), the time to the first finished shard, and the extrapolation to 10B tokens on
16 cores (the lesser of 16 × tokens per CPU-second of main + workers, robust to other load on a shared machine,
and the main process's own tokens per CPU-second: it reads, cuts and writes for every worker). Needs disk for
the corpus and its tokens (~1.5× the size); run the larger sizes only on an idle machine.

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
import shutil
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
    parser.add_argument("--scale-gb", type=float, nargs="*", default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--shard-tokens", type=int, default=10_000_000)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    if args.scale_gb:
        _scale(args)
        return

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


def _make_corpus(source_dir: str, out: Path, gigabytes: float) -> int:
    """Write ~`gigabytes` of text: the source's paragraphs, each copy shuffled with its own seed."""
    import random

    src = resolve_source(source_dir)
    paragraphs = [p for batch, _ in src.iter_batches(batch_chars=BATCH_CHARS, work_dir=out.parent, stats=ReadStats(),
                                                     quiet=True) for d in batch for p in d.split("\n\n") if p.strip()]
    target = int(gigabytes * 1e9)
    written = 0
    with open(out, "w", encoding="utf-8") as fh:
        for copy in itertools.count():
            random.Random(copy).shuffle(paragraphs)
            block = "\n\n".join(paragraphs) + "\n\n"
            fh.write(block)
            written += len(block.encode("utf-8"))
            if written >= target:
                return written
    return written


def _child(job: dict[str, Any]) -> None:
    """One preparation in this fresh process; prints its figures as JSON."""
    import resource

    from oneday.data import shards

    first_shard: list[float] = []
    real_close = shards.ShardWriter._close
    started = time.perf_counter()

    def timed_close(self: Any, *, final: bool) -> None:
        real_close(self, final=final)
        if not first_shard:
            first_shard.append(time.perf_counter() - started)

    shards.ShardWriter._close = timed_close  # type: ignore[method-assign]
    c0 = time.process_time()
    prepared = data_mod.prepare_data(job["data"], tokenizer=job["tokenizer"], cache_dir=job["cache"],
                                     shard_tokens=job["shard_tokens"], workers=job["workers"])
    seconds = time.perf_counter() - started
    meta = prepared.metadata()
    print(json.dumps({
        "tokens": prepared.train_tokens + prepared.val_tokens, "seconds": seconds,
        "tokenize_seconds": meta["seconds"]["tokenize"], "workers": meta["workers"], "shards": meta["shards"],
        "main_cpu_seconds": time.process_time() - c0,
        "worker_cpu_seconds": resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime,
        "first_shard_seconds": first_shard[0] if first_shard else None,
        "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def _scale(args: argparse.Namespace) -> None:
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = data_mod.prepare_data(args.data, vocab_size=args.vocab_size, cache_dir=Path(tmp) / "tok")
        print(f"tokenizer: trained on {tokenizer.source}, vocab {tokenizer.vocab_size}; cores: {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        for gb in args.scale_gb:
            corpus = Path(tmp) / f"corpus-{gb:g}gb.txt"
            t0 = time.perf_counter()
            size = _make_corpus(args.data, corpus, gb)
            made = time.perf_counter() - t0
            job = {"data": str(corpus), "tokenizer": str(tokenizer.tokenizer_dir), "cache": str(Path(tmp) / "c"),
                   "shard_tokens": args.shard_tokens, "workers": args.workers}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            workers = max(1, r["workers"])
            rate = r["tokens"] / r["tokenize_seconds"]
            per_worker = rate / workers
            cpu = r["main_cpu_seconds"] + r["worker_cpu_seconds"]
            per_cpu_second = r["tokens"] / cpu
            main_rate = r["tokens"] / max(r["main_cpu_seconds"], 1e-9)  # the reader/writer: one process
            ten_b_hours = 10e9 / min(per_cpu_second * 16, main_rate) / 3600
            print(f"{gb:g} GB ({size / 1e9:.2f} GB text, made in {made:.0f} s): {r['tokens']:,} tokens in "
                  f"{r['shards']} shards, {r['seconds']:.0f} s end to end (tokenizing {r['tokenize_seconds']:.0f} s)"
                  f" = {rate:,.0f} tokens/s with {r['workers']} workers, {per_worker:,.0f} per worker; "
                  f"main process CPU {r['main_cpu_seconds']:.0f} s ({r['main_cpu_seconds'] / r['seconds']:.0%} of "
                  f"wall); peak RSS main {r['main_peak_rss_mb']:,.0f} MB, largest worker "
                  f"{r['worker_peak_rss_mb']:,.0f} MB; first shard ({args.shard_tokens:,} tokens) after "
                  f"{r['first_shard_seconds'] or float('nan'):.0f} s; 10B tokens on 16 cores: ~{ten_b_hours:.1f} h "
                  f"(the lesser of 16 × the rate per CPU-second and the main process's {main_rate:,.0f} tokens per "
                  "CPU-second: it reads, cuts and writes for all workers)")
            shutil.rmtree(Path(tmp) / "c", ignore_errors=True)
            corpus.unlink()


if __name__ == "__main__":
    main()
