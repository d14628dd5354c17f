"""Training windows drawn without replacement in a seeded order, addressed by one integer cursor.

The train set is one flat array of token ids (a read-only memmap for large corpora). A window is
seq_len + 1 consecutive tokens (inputs and the next-token targets). Each epoch cuts the array into
non-overlapping windows at stride seq_len, shifted by a random phase in [0, seq_len) so that later epochs see
other window boundaries, and visits them in a random permutation; both are seeded by (seed, epoch). Window
number `cursor` overall is therefore a pure function of (seed, cursor): the data position a checkpoint stores
is that one integer, and a resumed run reads exactly the windows an uninterrupted run would have read.

Distributed: a global step of W ranks consumes W·n consecutive cursor positions; rank r takes the r-th
block of n, so ranks read disjoint windows and the union is what one process would read.

Windows are gathered by fancy indexing on the memmap, which touches only their pages: the corpus is never
copied into RAM.

`Prefetcher` makes the next batches in a background thread. A batch is a pure function of its cursor, so
the prefetched ones are exactly those the loop would have read, and a resume needs nothing more than the
cursor. Measured (`bench/sampler_throughput.py`, a 2-core machine at load 8): the sampler alone makes
18-35M tokens/s of 1024-token windows, 18-70x what an H200 trains a 124M model on (0.5-1M tokens/s), and
the loop's host work runs ahead of the GPU anyway: the loop does not use it. It pays where the host has
other work a step (30 ms: 10M tokens/s without, 15M with).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from oneday.errors import UserError


class WindowSampler:
    """Windows of `seq_len + 1` tokens from `tokens`, without replacement within an epoch."""

    def __init__(self, tokens: np.ndarray, *, seq_len: int, seed: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a flat array, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = int(seed)
        # Every phase p ∈ [0, seq_len) must fit the same count n: p + n·seq_len + 1 <= len, worst p = seq_len − 1.
        self.windows_per_epoch = (len(tokens) - seq_len) // seq_len
        if self.windows_per_epoch < 1:
            raise UserError(
                f"the training set has {len(tokens)} tokens, too few for one window of seq_len + 1 = "
                f"{seq_len + 1} tokens at every offset (need at least {2 * seq_len})"
            )
        self._order: dict[int, tuple[int, np.ndarray]] = {}

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        """(phase, permutation of window indices) for `epoch`, cached for the two most recent epochs."""
        if epoch not in self._order:
            rng = np.random.default_rng([self.seed, epoch])
            phase = int(rng.integers(0, self.seq_len))
            perm = rng.permutation(self.windows_per_epoch)
            if len(self._order) >= 2:  # a batch spans at most two epochs
                del self._order[min(self._order)]
            self._order[epoch] = (phase, perm)
        return self._order[epoch]

    def epoch(self, cursor: int) -> int:
        """The epoch window number `cursor` belongs to (0 for the first pass over the data)."""
        return cursor // self.windows_per_epoch

    def starts(self, cursor: int, n: int, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Token offsets of the `n` windows rank `rank` reads from the W·n windows starting at `cursor`."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        first = cursor + rank * n
        positions = np.arange(first, first + n, dtype=np.int64)
        epochs = positions // self.windows_per_epoch
        out = np.empty(n, dtype=np.int64)
        for epoch in np.unique(epochs):
            phase, perm = self._epoch_order(int(epoch))
            mask = epochs == epoch
            out[mask] = phase + perm[positions[mask] % self.windows_per_epoch] * self.seq_len
        return out

    def batch(self, cursor: int, n: int, *, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """int64 array [n, seq_len + 1]: this rank's share of the W·n windows starting at `cursor`."""
        starts = self.starts(cursor, n, rank=rank, world_size=world_size)
        index = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)[None, :]
        return np.asarray(self.tokens[index], dtype=np.int64)


class Prefetcher:
    """`sampler.batch(cursor, n, …)` for the cursors a loop reads (`cursor`, `cursor + stride`, …), up to
    `depth` of them made ahead in one background thread. Asking for another cursor (a resume, a retry) drops
    what was made ahead and starts again from there; the result is the same either way."""

    def __init__(self, sampler: WindowSampler, *, n: int, stride: int, rank: int = 0, world_size: int = 1,
                 depth: int = 2) -> None:
        self.sampler, self.n, self.stride, self.rank, self.world_size = sampler, n, stride, rank, world_size
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oneday-prefetch")
        self._ahead: dict[int, Future[np.ndarray]] = {}

    def _make(self, cursor: int) -> np.ndarray:
        return self.sampler.batch(cursor, self.n, rank=self.rank, world_size=self.world_size)

    def batch(self, cursor: int) -> np.ndarray:
        """The batch at `cursor` (what `sampler.batch` returns), then the next `depth` queued."""
        made = self._ahead.pop(cursor, None)
        if made is None:
            for future in self._ahead.values():  # the sampler's epoch cache is not shared with a running worker
                future.cancel()
                if not future.cancelled():
                    future.result()
            self._ahead.clear()
            result = self._make(cursor)
        else:
            result = made.result()
        for k in range(1, self.depth + 1):
            ahead = cursor + k * self.stride
            if ahead not in self._ahead:
                self._ahead[ahead] = self._pool.submit(self._make, ahead)
        return result

    def close(self) -> None:
        """Stop the thread (what it was making is dropped)."""
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._pool.shutdown(wait=True)


class ProbeBatches:
    """The windows a throughput measurement trains on (`planner.timing`, `planner.parallel`): the next ones the
    run's own `WindowSampler` gives over a training sample, this rank's share of each; uniform random tokens
    when there is no sample, or one too short for a window at every offset (a what-if's assumed data)."""

    def __init__(self, tokens: np.ndarray | None, *, seq_len: int, vocab_size: int, rank: int = 0,
                 world_size: int = 1) -> None:
        usable = tokens is not None and len(tokens) >= 2 * seq_len
        self.sampler = WindowSampler(tokens, seq_len=seq_len, seed=0) if usable else None
        self.rng = np.random.default_rng([0, rank])
        self.seq_len, self.vocab_size, self.rank, self.world_size = seq_len, vocab_size, rank, world_size
        self.cursor = 0

    def __call__(self, n: int) -> np.ndarray:
        """int64 [n, seq_len + 1]: the next n windows of this rank."""
        if self.sampler is None:
            return self.rng.integers(0, self.vocab_size, (n, self.seq_len + 1), dtype=np.int64)
        rows = self.sampler.batch(self.cursor, n, rank=self.rank, world_size=self.world_size)
        self.cursor += n * self.world_size
        return rows


VAL_WINDOWS_SCHEME = "spread"
"""How `val_windows` picks its windows; kept with a calibration (`planner.calibration.data_fingerprint`), whose
losses were scored this way: a fit scored on other windows is not reused."""


def val_windows(val_tokens: np.ndarray, *, seq_len: int, max_tokens: int) -> np.ndarray:
    """The fixed validation set: n windows spread evenly over the whole validation array, int64 [n, seq_len + 1].

    The array holds A = (len − 1) // seq_len back-to-back windows (window j covers tokens [j·seq_len,
    j·seq_len + seq_len + 1)); window k of the set is window ⌊k·A / n⌋, so every target is scored at most once and
    n = A takes them all. n is the largest count with n·seq_len <= max_tokens (at least one). Spread, not the
    first n: the held-out documents differ, and a prefix scores one of them. On ../shared/data the same model
    scored 4.104 on the first 16k validation tokens, 4.230 on the first 32k and 4.548 on all 66k; spread over
    the whole set, 16k scored 4.540 and 32k 4.557.
    """
    available = (len(val_tokens) - 1) // seq_len
    if available < 1:
        raise UserError(
            f"the validation set has {len(val_tokens)} tokens, too few for one window of {seq_len + 1} tokens"
        )
    n = max(1, min(available, max_tokens // seq_len))
    starts = np.arange(n, dtype=np.int64) * available // n * seq_len
    index = starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
    return np.asarray(val_tokens[index], dtype=np.int64)


def val_batches(val_tokens: np.ndarray, *, seq_len: int, max_tokens: int, batch_size: int = 8) -> list[np.ndarray]:
    """`val_windows` cut into batches of at most `batch_size` windows (the last may be smaller)."""
    windows = val_windows(val_tokens, seq_len=seq_len, max_tokens=max_tokens)
    return [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]


__all__ = ["VAL_WINDOWS_SCHEME", "Prefetcher", "ProbeBatches", "WindowSampler", "val_batches", "val_windows"]
