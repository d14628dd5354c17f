"""Does the data loader keep up? Tokens/s of `WindowSampler.batch` (what the loop calls once a step), alone
and through `Prefetcher` (the next batches made in a background thread), against what a GPU trains.

An H200 trains a 124M model at about 0.5-1M tokens/s; the host must make batches faster than that, with room
to spare. Measured here: the batches of `--steps` steps of `--windows` windows of `--seq-len` tokens, from a
random token array of `--tokens` tokens (in memory), or from a prepared token file (`--file`, a flat uint16/
uint32 array read as a memmap, as the loop reads it). With `--consume-ms` the main thread also spends that long
per step (the loop's own host work), which is what a prefetch thread could hide.

    python bench/sampler_throughput.py                         # 1024-token windows, 512 a step (524k tokens)
    python bench/sampler_throughput.py --consume-ms 20
    python bench/sampler_throughput.py --file DATA/train.bin --dtype uint16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oneday.data.windows import Prefetcher, WindowSampler  # noqa: E402

H200_124M_TOKENS_PER_S = (0.5e6, 1.0e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=512, help="windows a step (default 512: 524k tokens)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64_000_000, help="random tokens in memory (default 64M)")
    parser.add_argument("--file", type=Path, default=None, help="a flat token file, read as a memmap")
    parser.add_argument("--dtype", default="uint16")
    parser.add_argument("--consume-ms", type=float, default=0.0, help="host work a step besides the batch")
    parser.add_argument("--depth", type=int, default=2, help="batches made ahead (default 2)")
    args = parser.parse_args()

    if args.file is not None:
        tokens = np.memmap(args.file, dtype=np.dtype(args.dtype), mode="r")
    else:
        tokens = np.random.default_rng(0).integers(0, 50304, args.tokens, dtype=np.uint16)
    per_step = args.windows * args.seq_len

    def run(make) -> float:
        started = time.perf_counter()
        for i in range(args.steps):
            make(i * args.windows)
            if args.consume_ms:
                time.sleep(args.consume_ms / 1e3)  # the loop's host work (the GIL is released while sleeping)
        return args.steps * per_step / (time.perf_counter() - started)

    plain = WindowSampler(tokens, seq_len=args.seq_len, seed=0)
    run(lambda c: plain.batch(c, args.windows))  # warm the page cache and the epoch order alike for both
    without = run(lambda c: plain.batch(c, args.windows))
    prefetcher = Prefetcher(WindowSampler(tokens, seq_len=args.seq_len, seed=0), n=args.windows,
                            stride=args.windows, depth=args.depth)
    try:
        with_prefetch = run(prefetcher.batch)
    finally:
        prefetcher.close()
    low, high = H200_124M_TOKENS_PER_S
    print(f"{len(tokens) / 1e6:.0f}M tokens ({'memmap ' + str(args.file) if args.file else 'in memory'}), "
          f"{args.windows} windows of {args.seq_len} + 1 tokens a step, {args.steps} steps, "
          f"host work {args.consume_ms:g} ms a step")
    print(f"without prefetch: {without / 1e6:6.2f}M tokens/s")
    print(f"with prefetch:    {with_prefetch / 1e6:6.2f}M tokens/s (depth {args.depth})")
    print(f"an H200 on a 124M model trains {low / 1e6:g}-{high / 1e6:g}M tokens/s: "
          f"the loader without prefetch makes {without / high:.0f}-{without / low:.0f}x that")


if __name__ == "__main__":
    main()
