"""Throughput measurement on this CPU: real training steps of tiny shapes, within a time bound."""

from __future__ import annotations

import time

import pytest

from oneday.errors import UserError
from oneday.models.spec import ModelSpec
from oneday.planner.ladder import candidate_shapes
from oneday.planner.measure import measure_order, probe_throughput
from oneday.planner.throughput import Measurement, fit_throughput
from oneday.planner.timing import CPU_MAX_TOKENS_PER_MICRO_BATCH


@pytest.fixture(scope="module")
def ladder() -> list[ModelSpec]:
    import oneday.models.build  # noqa: F401  (torch and transformers load once, outside the timed tests)

    # tiny shapes (vocab 512, seq 64): a training step takes milliseconds
    specs = candidate_shapes(vocab_size=512, seq_len=64, min_params=4e4, max_params=6e5)
    assert len(specs) >= 3
    return specs


def test_measure_order_spreads_over_the_ladder() -> None:
    assert measure_order(0) == []
    assert measure_order(1) == [0]
    assert measure_order(2) == [0, 1]
    assert measure_order(3) == [0, 2, 1]
    order = measure_order(9)
    assert order[:3] == [0, 8, 4]
    assert sorted(order[3:]) == [2, 6]
    assert len(measure_order(20, limit=5)) == 5
    assert len(set(measure_order(20, limit=20))) == 20


def test_measures_at_least_two_shapes_within_the_bound(ladder: list[ModelSpec]) -> None:
    seconds = 3.0
    started = time.perf_counter()
    measurements = probe_throughput(
        ladder, device="cpu", dtype="fp32", compile=False, seconds=seconds, memory_limit_bytes=4 << 30, threads=1,
    ).measurements
    elapsed = time.perf_counter() - started
    assert len(measurements) >= 2
    assert all(isinstance(m, Measurement) for m in measurements)
    assert all(m.tokens_per_s > 0 and m.micro_batch >= 1 and m.seconds_measured > 0 for m in measurements)
    assert len({(m.spec.n_layer, m.spec.d_model) for m in measurements}) == len(measurements)
    # the smallest shape is always among them, and the bound holds (slack: a shape in progress finishes)
    assert measurements[0].spec == ladder[0]
    assert elapsed < seconds + 2.0, elapsed
    # the planner can fit its throughput model on them
    model = fit_throughput(measurements, peak_flops=1e11)
    assert model.tokens_per_s(ladder[-1]) > 0


def test_probe_details_and_cpu_micro_batch_rule(ladder: list[ModelSpec]) -> None:
    probe = probe_throughput(
        ladder[:2], device="cpu", dtype="fp32", compile=False, seconds=2.0, memory_limit_bytes=4 << 30,
        threads=1, peak_flops=1e11,
    )
    assert probe.seconds > 0 and probe.device == "cpu" and not probe.compile
    for t in probe.timings:
        m = t.measurement
        assert m.micro_batch * m.spec.seq_len <= CPU_MAX_TOKENS_PER_MICRO_BATCH
        assert m.peak_memory_bytes == m.spec.estimate_train_memory_bytes(micro_batch=m.micro_batch)
        assert t.memory_source.startswith("estimate")
        assert t.mfu is not None and 0 < t.mfu == pytest.approx(m.mfu(1e11))
        assert t.forward_tokens_per_s > 0 and t.step_seconds > 0 and t.timed_steps >= 2
        assert t.compile_seconds == 0.0
    assert probe.timing_for(ladder[0]) is probe.timings[0]
    assert probe.nearest(ladder[-1]).spec in ladder[:2]


def test_a_tiny_bound_still_measures_the_smallest(ladder: list[ModelSpec]) -> None:
    probe = probe_throughput(
        ladder, device="cpu", dtype="fp32", compile=False, seconds=0.05, memory_limit_bytes=4 << 30, threads=1,
    )
    assert [t.spec for t in probe.timings][:1] == [ladder[0]]
    assert len(probe.timings) < len(ladder)
    assert any("used up" in s or "would take" in s or "out of time" in s for s in probe.skipped)


def test_memory_limit_drops_shapes_or_refuses(ladder: list[ModelSpec]) -> None:
    small = ladder[0].estimate_train_memory_bytes(micro_batch=1)
    with pytest.raises(UserError, match="not even the smallest shape"):
        probe_throughput(ladder, device="cpu", dtype="fp32", compile=False, seconds=1.0,
                           memory_limit_bytes=small // 2, threads=1)
    # room for the smallest at micro-batch 1 (with the margin) but not for the largest
    limit = int(1.3 * small)
    assert ladder[-1].estimate_train_memory_bytes(micro_batch=1) * 1.25 > limit
    probe = probe_throughput(ladder, device="cpu", dtype="fp32", compile=False, seconds=1.0,
                             memory_limit_bytes=limit, threads=1)
    assert probe.timings[0].measurement.micro_batch == 1
    assert any("not to fit" in s for s in probe.skipped)


def test_bad_settings_are_refused(ladder: list[ModelSpec]) -> None:
    kwargs = dict(compile=False, seconds=1.0, memory_limit_bytes=1 << 30, threads=1)
    with pytest.raises(UserError, match="bf16 on the CPU"):
        probe_throughput(ladder, device="cpu", dtype="bf16", **kwargs)
    with pytest.raises(UserError, match="expected cpu or cuda"):
        probe_throughput(ladder, device="tpu", dtype="fp32", **kwargs)
    with pytest.raises(ValueError):
        probe_throughput([], device="cpu", dtype="fp32", **kwargs)


def test_thread_count_is_restored(ladder: list[ModelSpec]) -> None:
    import torch

    before = torch.get_num_threads()
    probe_throughput(ladder[:1], device="cpu", dtype="fp32", compile=False, seconds=0.5,
                       memory_limit_bytes=1 << 30, threads=1)
    assert torch.get_num_threads() == before


def test_cuda_micro_batch_search_simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA search on a simulated GPU: memory grows with the micro-batch, OOM past a hard limit."""
    import torch

    from oneday.planner import timing

    spec = ModelSpec(n_layer=2, d_model=128, n_head=2, d_ff=320, vocab_size=512, seq_len=1024)
    state = {"peak": 0.0, "base": 2e9, "per": 1e9, "oom": 20e9}

    def step(micro: int) -> None:
        memory = state["base"] + state["per"] * micro
        if memory > state["oom"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        state["peak"] = max(state["peak"], memory)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: state.update(peak=0.0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: int(state["peak"]))

    class Optimizer:
        def zero_grad(self, set_to_none: bool = True) -> None:
            pass

    def search(limit: float) -> tuple[int, str]:
        return timing.cuda_micro_batch(
            spec, step=step, batch=lambda m: m, optimizer=Optimizer(), memory_limit_bytes=int(limit),
            activation_bytes=2, deadline=float("inf"), clock=time.perf_counter,
        )

    # the estimate allows the cap (128 sequences of 1024): OOM, halve ... 16 runs but above the limit, 8 fits
    assert search(15e9)[0] == 8
    # a small model: the cap of 2^17 tokens is reached
    state.update(base=1e8, per=1e7)
    micro, reason = search(15e9)
    assert micro == 128 and "cap" in reason
    # the estimate starts low (a tight limit) and the search climbs: 128 would need 1.38e8 > 1e8, 64 fits
    state.update(base=1e7, per=1e6, oom=1e12)
    assert search(1e8)[0] == 64
    # nothing fits
    state.update(base=30e9, oom=20e9)
    assert search(15e9)[0] == 0
    assert timing.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"))
    assert not timing.is_oom(RuntimeError("shape mismatch"))


def test_fastest_cpu_threads_measures_both_counts_and_picks_the_faster() -> None:
    from oneday.planner.timing import fastest_cpu_threads

    spec = ModelSpec(n_layer=1, d_model=64, n_head=1, d_ff=192, vocab_size=256, seq_len=32)
    assert fastest_cpu_threads(spec, max_threads=1) == (1, {})
    threads, speeds = fastest_cpu_threads(spec, max_threads=2, tokens=128)
    assert set(speeds) == {1, 2} and all(v > 0 for v in speeds.values())
    assert speeds[threads] == max(speeds.values())
