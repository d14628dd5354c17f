"""The data-parallel efficiency, measured on two gloo ranks of the CPU (`planner.parallel`): the same code that
times the chosen shape on K GPUs under NCCL, with the device simulated by the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from oneday.models.spec import ModelSpec
from oneday.planner.parallel import ParallelMeasureError, measure_data_parallel

TINY = ModelSpec(n_layer=1, d_model=32, n_head=2, d_ff=64, vocab_size=256, seq_len=32)


def _measure(**overrides):
    job = {"ranks": 2, "micro_batch": 2, "grad_accum": 2, "device": "cpu", "dtype": "fp32", "compile": False,
           "threads": 1, "tokens": np.arange(4096, dtype=np.int64) % 256, "timeout_seconds": 180.0}
    return measure_data_parallel(TINY, **{**job, **overrides})


def test_two_ranks_time_the_step_alone_and_under_ddp() -> None:
    timing = _measure()
    assert timing.ranks == 2 and timing.backend == "gloo"
    assert timing.alone_seconds > 0 and timing.together_seconds > 0
    assert 0 < timing.efficiency() <= 1
    assert "on 2 under DDP (gloo)" in timing.sentence()


def test_a_failing_rank_is_one_line_naming_it() -> None:
    """Token ids past the vocabulary: every rank's forward fails; the error names a rank, in one line."""
    with pytest.raises(ParallelMeasureError) as err:
        _measure(tokens=np.full(4096, 10_000, dtype=np.int64))
    assert str(err.value).startswith("rank 0: ") and "\n" not in str(err.value)


def test_ranks_that_run_out_of_time_are_stopped() -> None:
    with pytest.raises(ParallelMeasureError, match="did not finish within 0 s"):
        _measure(timeout_seconds=0.2)
