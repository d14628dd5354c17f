"""Training windows: without replacement per epoch, seeded, cursor-addressed, disjoint per rank; fixed val set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from oneday.data.windows import WindowSampler, val_batches, val_windows
from oneday.errors import UserError

SEQ = 8


def _tokens(n: int = 1000) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)  # token value = its offset, so windows are easy to check


def test_windows_are_consecutive_tokens() -> None:
    sampler = WindowSampler(_tokens(), seq_len=SEQ, seed=0)
    batch = sampler.batch(0, 5)
    assert batch.shape == (5, SEQ + 1) and batch.dtype == np.int64
    assert (np.diff(batch, axis=1) == 1).all()


def test_no_repeats_within_an_epoch_and_phase_stride() -> None:
    sampler = WindowSampler(_tokens(1000), seq_len=SEQ, seed=3)
    n = sampler.windows_per_epoch
    assert n == (1000 - SEQ) // SEQ
    for epoch in range(3):
        starts = sampler.starts(epoch * n, n)
        assert len(set(starts.tolist())) == n, "a window repeats within an epoch"
        phase = starts.min() % SEQ
        assert ((starts - phase) % SEQ == 0).all(), "windows overlap"
        assert starts.max() + SEQ + 1 <= 1000
        assert sampler.epoch(epoch * n) == epoch and sampler.epoch(epoch * n + n - 1) == epoch
    # later epochs use another order (and usually another phase)
    assert not np.array_equal(sampler.starts(0, n), sampler.starts(n, n))


def test_deterministic_given_seed_and_cursor_arithmetic() -> None:
    a = WindowSampler(_tokens(), seq_len=SEQ, seed=7)
    b = WindowSampler(_tokens(), seq_len=SEQ, seed=7)
    c = WindowSampler(_tokens(), seq_len=SEQ, seed=8)
    assert np.array_equal(a.batch(0, 40), b.batch(0, 40))
    assert not np.array_equal(a.batch(0, 40), c.batch(0, 40))
    # reading 40 windows at once == reading them in pieces from the cursor, across an epoch boundary too
    n = a.windows_per_epoch
    whole = a.batch(n - 10, 30)
    pieces = np.concatenate([b.batch(n - 10, 7), b.batch(n - 3, 13), b.batch(n + 10, 10)])
    assert np.array_equal(whole, pieces)


def test_ranks_take_disjoint_slices_of_the_global_batch() -> None:
    sampler = WindowSampler(_tokens(), seq_len=SEQ, seed=1)
    world, n, cursor = 3, 4, 17
    per_rank = [sampler.starts(cursor, n, rank=r, world_size=world) for r in range(world)]
    flat = np.concatenate(per_rank)
    assert len(set(flat.tolist())) == world * n
    assert np.array_equal(flat, sampler.starts(cursor, world * n))  # the union is what one process reads
    with pytest.raises(ValueError):
        sampler.starts(0, 1, rank=3, world_size=3)


def test_reads_a_memmap_without_loading_it(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    _tokens(5000).astype(np.uint16).tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    sampler = WindowSampler(tokens, seq_len=SEQ, seed=0)
    batch = sampler.batch(123, 16)
    assert batch.dtype == np.int64 and (np.diff(batch, axis=1) == 1).all()
    assert isinstance(sampler.tokens, np.memmap)  # held as the memmap, not a copy


def test_too_little_data_is_a_user_error() -> None:
    with pytest.raises(UserError, match="too few"):
        WindowSampler(_tokens(SEQ + 3), seq_len=SEQ, seed=0)
    with pytest.raises(UserError, match="too few"):
        val_windows(_tokens(SEQ), seq_len=SEQ, max_tokens=100)


def test_val_windows_are_fixed_spread_over_the_whole_set_and_capped() -> None:
    """A capped validation set samples every part of the held-out data, not its first documents (a prefix of
    ../shared/data's scored 4.10 where the whole set scored 4.55)."""
    val = _tokens(100)  # 12 windows of SEQ = 8
    windows = val_windows(val, seq_len=SEQ, max_tokens=40)
    assert windows.shape == (5, SEQ + 1)
    assert np.array_equal(windows[:, 0], np.array([0, 2, 4, 7, 9]) * SEQ)  # ⌊k·12/5⌋
    assert np.array_equal(windows, val_windows(val, seq_len=SEQ, max_tokens=40))
    every = val_windows(val, seq_len=SEQ, max_tokens=10**6)
    assert len(every) == (100 - 1) // SEQ and np.array_equal(every[:, 0], np.arange(12) * SEQ)
    assert len(set(windows[:, 0].tolist())) == 5  # no target scored twice
    batches = val_batches(val, seq_len=SEQ, max_tokens=40, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]


def test_the_prefetcher_returns_exactly_the_sampler_batches_in_order_and_from_any_cursor() -> None:
    from oneday.data.windows import Prefetcher

    tokens = np.arange(5_000, dtype=np.uint16)
    plain = WindowSampler(tokens, seq_len=16, seed=3)
    prefetcher = Prefetcher(WindowSampler(tokens, seq_len=16, seed=3), n=6, stride=12, rank=1, world_size=2, depth=3)
    try:
        cursors = [0, 12, 24, 36, 36, 48, 600, 612, 12]  # a retry (36 again), a resume far ahead, one back
        for cursor in cursors:
            assert np.array_equal(prefetcher.batch(cursor), plain.batch(cursor, 6, rank=1, world_size=2))
    finally:
        prefetcher.close()
