"""`oneday plan --what-if`: plans for hardware that is not in the machine (planner/what_if.py), and plans for
several GPUs. Nothing is probed: the datasheet table, the device class's MFU model (or saved measurements) and
the data (prepared or assumed) go through the same `make.plan_for` as the real path."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from oneday.devices import GPU_MODELS, match_gpu, peak_flops
from oneday.errors import UserError
from oneday.plan import Plan, load_plan, save_plan
from oneday.planner.decide import SAFE_MEMORY_FRACTION, batch_and_lr, estimate_memory_bytes
from oneday.planner.policy import CUDA_MEMORY_FRACTION, CUDA_MEMORY_RESERVED
from oneday.planner.settle import split_batch
from oneday.planner.throughput import DATA_PARALLEL_EFFICIENCY, MFU_CLASSES
from oneday.planner.what_if import parse_token_count, parse_what_if, what_if_plan
from oneday.runner.preflight import check_hardware
from tests.factories import invoke_cli, one_error_line, tiny_model


def _what_if(tmp_path: Path, *args: str) -> Plan:
    out = tmp_path / "plan.json"
    code, _, stderr = invoke_cli("plan", "--out", str(out), *args)
    assert code == 0, stderr
    return load_plan(out)


def _fails(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "plan.json"
    code, _, stderr = invoke_cli("plan", "--out", str(out), *args)
    assert code == 2, stderr
    assert not out.exists()
    return one_error_line(stderr)


def _memory_limit(plan: Plan) -> float:
    return CUDA_MEMORY_FRACTION * plan.hardware.memory_bytes - CUDA_MEMORY_RESERVED


def test_every_what_if_gpu_has_a_peak_memory_and_an_mfu_class() -> None:
    for gpu in GPU_MODELS:
        assert match_gpu(gpu.name) is not None, gpu.key
        assert peak_flops(gpu.name, "bf16") is not None, gpu.key  # GPU runs need bf16
        assert gpu.memory_bytes > 8 * 2**30 and gpu.memory_source
        assert gpu.mfu_class in MFU_CLASSES
    for mfu_class in MFU_CLASSES.values():
        assert 0 < mfu_class.mfu_max <= 0.75 and mfu_class.source


@pytest.mark.parametrize("gpu", ["h200", "a100-80gb", "rtx4090", "l4"])
@pytest.mark.parametrize("hours", ["1", "24"])
def test_what_if_plans_say_so_and_fit_the_memory(tmp_path: Path, gpu: str, hours: str) -> None:
    started = time.perf_counter()
    plan = _what_if(tmp_path, "--hours", hours, "--what-if", gpu, "--data-tokens", "10B")
    assert time.perf_counter() - started < 10  # nothing is probed or measured
    entry = parse_what_if(gpu)[0]
    assert plan.hardware.name == entry.name and plan.hardware.count == 1
    assert plan.hardware.memory_bytes == entry.memory_bytes
    assert plan.hardware.peak_flops == peak_flops(entry.name, "bf16")[0]
    what_if = plan.provenance.what_if
    assert what_if is not None and what_if["gpu"] == entry.key and what_if["throughput"].startswith("assumed")
    assert 0 < what_if["assumed_mfu"] <= MFU_CLASSES[entry.mfu_class].mfu_max
    assert plan.reasons[0].startswith("What-if plan") and f"MFU {what_if['assumed_mfu']:.1%}" in plan.reasons[0]
    assert any("Throughput assumed" in r for r in plan.reasons)
    assert plan.train.device == "cuda" and plan.train.precision == "bf16" and plan.train.world_size == 1
    # the chosen shape at the plan's micro-batch fits within the safe share of the GPU's memory
    need = estimate_memory_bytes(plan.model, plan.train.micro_batch, activation_bytes=2)
    assert need <= SAFE_MEMORY_FRACTION * _memory_limit(plan)
    # the assumed corpus
    assert plan.data.assumed and plan.data.train_tokens == 10**10 and plan.data.path == ""
    assert plan.data.vocab_size == 8192 and plan.name.startswith("10B-tokens-")


def test_more_hours_and_a_faster_gpu_train_more() -> None:
    tokens = {}
    for gpu in ("l4", "h200"):
        for hours in (1, 24):
            plan = what_if_plan(what_if=gpu, hours=hours, data_tokens=10**10)
            tokens[gpu, hours] = plan.prediction.tokens
            assert plan.model.params_scaling() > 10e6
    assert tokens["h200", 24] > tokens["h200", 1] and tokens["l4", 24] > tokens["l4", 1]
    assert tokens["h200", 24] > 3 * tokens["l4", 24]


def test_data_tokens_vocab_and_a_small_corpus_repeats(tmp_path: Path) -> None:
    plan = _what_if(tmp_path, "--hours", "24", "--what-if", "h200", "--data-tokens", "100M", "--vocab-size", "4096")
    assert plan.data.assumed and plan.data.train_tokens == 10**8 and plan.data.vocab_size == 4096
    assert plan.model.vocab_size >= 4096
    assert plan.prediction.epochs > 4 and any("too small for this budget" in r for r in plan.reasons)


def test_what_if_with_prepared_data(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    cache = tmp_path_factory.getbasetemp() / "oneday-plan-data-cache"  # shared with test_make_plan
    plan = _what_if(tmp_path, "--hours", "1", "--what-if", "l4", "--data", "builtin:pydoc", "--vocab-size", "512",
                    "--cache-dir", str(cache))
    assert not plan.data.assumed and Path(plan.data.path).is_dir() and plan.data.spec == "builtin:pydoc"
    assert plan.provenance.what_if is not None


def test_eight_gpus_split_the_batch_across_ranks(tmp_path: Path) -> None:
    plan = _what_if(tmp_path, "--hours", "24", "--what-if", "h100x8", "--data-tokens", "10B")
    one = _what_if(tmp_path, "--hours", "24", "--what-if", "h100", "--data-tokens", "10B")
    t = plan.train
    assert plan.hardware.count == 8 and t.world_size == 8 and plan.provenance.what_if["count"] == 8
    assert t.tokens_per_step() == t.micro_batch * t.grad_accum * 8 * t.seq_len
    assert plan.prediction.data_parallel_efficiency == DATA_PARALLEL_EFFICIENCY
    assert any("Planned for 8 GPUs" in r and f"{DATA_PARALLEL_EFFICIENCY:.0%}" in r for r in plan.reasons)
    # eight GPUs buy ~8 × 0.9 the compute of one: more tokens and a larger model
    compute = plan.prediction.tokens * plan.model.flops_per_token()
    assert compute > 6 * one.prediction.tokens * one.model.flops_per_token()
    assert plan.prediction.tokens > one.prediction.tokens
    assert plan.model.params_scaling() > one.model.params_scaling()
    chosen = next(c for c in plan.candidates if c.chosen)
    assert plan.prediction.tokens_per_s == pytest.approx(chosen.tokens_per_s)
    # the global batch is what one GPU's plan would take for this model and these tokens, split across the ranks
    single = batch_and_lr(spec=plan.model, tokens=plan.prediction.tokens, max_micro_batch=chosen.micro_batch)
    assert single.global_batch_tokens() <= t.tokens_per_step() < single.global_batch_tokens() + 8 * t.seq_len * (
        t.grad_accum)
    assert t.grad_accum == -(-single.grad_accum // 8) and t.micro_batch <= chosen.micro_batch
    # --gpus 8 with a bare name is the same plan
    again = _what_if(tmp_path, "--hours", "24", "--what-if", "h100", "--gpus", "8", "--data-tokens", "10B")
    assert again.train == t and again.model == plan.model


def test_split_batch_keeps_the_global_batch() -> None:
    spec = tiny_model(seq_len=128)
    bl = batch_and_lr(spec=spec, tokens=5e8, max_micro_batch=16)
    sequences = bl.micro_batch * bl.grad_accum
    for ranks in (2, 3, 8):
        split = split_batch(bl, ranks=ranks, max_micro_batch=16)
        assert split.world_size == ranks and split.micro_batch <= 16
        per_rank = split.micro_batch * split.grad_accum
        assert sequences <= per_rank * ranks < sequences + ranks * split.grad_accum
        assert split.lr == bl.lr and split.steps() <= bl.steps()
    assert split_batch(bl, ranks=1, max_micro_batch=16) is bl


def _measured_source(tmp_path: Path, *, speedup: float) -> tuple[Path, Plan]:
    """A plan 'made on a real H200' (a what-if plan with its candidates marked measured at `speedup` × the
    assumed tokens/s, and no what-if in its provenance), saved."""
    made = what_if_plan(what_if="h200", hours=24, data_tokens=10**10)
    candidates = tuple(replace(c, measured=True, tokens_per_s=c.tokens_per_s * speedup) if c.micro_batch else c
                       for c in made.candidates)
    real = replace(made, candidates=candidates, provenance=replace(made.provenance, what_if=None))
    return save_plan(real, tmp_path / "measured.json"), real


def test_throughput_file_measurements_are_used(tmp_path: Path) -> None:
    path, real = _measured_source(tmp_path, speedup=1.5)
    plan = _what_if(tmp_path, "--hours", "24", "--what-if", "h200", "--data-tokens", "10B", "--throughput", str(path))
    chosen = next(c for c in plan.candidates if c.chosen)
    measured = {(c.n_layer, c.d_model): c for c in real.candidates if c.measured}
    assert chosen.measured
    assert chosen.tokens_per_s == pytest.approx(measured[chosen.n_layer, chosen.d_model].tokens_per_s)
    assert plan.prediction.tokens_per_s == pytest.approx(chosen.tokens_per_s)
    assert plan.provenance.what_if["throughput"].startswith("measured on NVIDIA H200")
    assert str(path) in plan.reasons[0]


def test_throughput_file_of_a_several_gpu_plan_is_taken_per_gpu(tmp_path: Path) -> None:
    """A plan made for 8 GPUs lists their aggregate tokens/s; a what-if for one takes one GPU's share of it."""
    _, real = _measured_source(tmp_path, speedup=1.0)
    eight = replace(real, train=replace(real.train, world_size=8),
                    prediction=replace(real.prediction, data_parallel_efficiency=0.9))
    path = save_plan(eight, tmp_path / "eight.json")
    plan = what_if_plan(what_if="h200", hours=24, data_tokens=10**10, throughput=path)
    chosen = next(c for c in plan.candidates if c.chosen)
    listed = {(c.n_layer, c.d_model): c.tokens_per_s for c in eight.candidates if c.measured}
    assert chosen.measured and chosen.tokens_per_s == pytest.approx(listed[chosen.n_layer, chosen.d_model] / 7.2)


def test_throughput_from_another_gpu_is_scaled_by_the_peaks(tmp_path: Path) -> None:
    spec = tiny_model(seq_len=1024, vocab_size=8192)
    fields = {k: getattr(spec, k) for k in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "seq_len")}
    raw = {"device": "NVIDIA A100-SXM4-80GB", "peak_flops": 312e12,
           "measurements": [{**fields, "micro_batch": 8, "tokens_per_s": 1e6, "peak_memory_bytes": 2**30},
                            {**fields, "n_layer": 4, "micro_batch": 8, "tokens_per_s": 6e5}]}
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps(raw))
    plan = what_if_plan(what_if="h100", hours=1, data_tokens=10**9, throughput=path)
    assert "scaled to this GPU" in plan.provenance.what_if["throughput"]
    assert "× 3.17" in plan.provenance.what_if["throughput"]  # 989.4 / 312


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--what-if", "h1000", "--data-tokens", "1B"], "--what-if 'h1000': unknown GPU; known: b200,"),
        (["--what-if", "h100x0", "--data-tokens", "1B"], "the number of GPUs must be >= 1"),
        (["--what-if", "h100x8", "--gpus", "4", "--data-tokens", "1B"], "two different GPU counts"),
        (["--what-if", "h100", "--gpus", "0", "--data-tokens", "1B"], "--gpus: must be at least 1, got 0"),
        (["--gpus", "0", "--data", "builtin:pydoc"], "--gpus: must be at least 1, got 0"),
        (["--what-if", "h100", "--data-tokens", "0"], "--data-tokens: must be at least 1 token"),
        (["--what-if", "h100", "--data-tokens", "lots"], "--data-tokens: expected a number of tokens"),
        (["--what-if", "h100", "--data-tokens", "1B", "--data", "builtin:pydoc"], "exactly one of --data or "),
        (["--data-tokens", "1B", "--data", "builtin:pydoc"], "--data-tokens: only with --what-if"),
        (["--what-if", "h100"], "--data is required"),
        (["--what-if", "h100", "--device", "cpu", "--data-tokens", "1B"], "it takes no --device"),
        (["--what-if", "h100", "--data-tokens", "1B", "--seq-len", "8"], "--seq-len: 8 is below the minimum"),
    ],
)
def test_bad_what_if_requests(tmp_path: Path, args: list[str], message: str) -> None:
    assert message in _fails(tmp_path, "--hours", "1", *args)


def test_bad_throughput_files(tmp_path: Path) -> None:
    base = ["--hours", "1", "--what-if", "h100", "--data-tokens", "1B", "--throughput"]
    assert "no such file" in _fails(tmp_path, *base, str(tmp_path / "missing.json"))
    assert "cannot read it" in _fails(tmp_path, *base, str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    assert "not valid JSON" in _fails(tmp_path, *base, str(tmp_path / "bad.json"))
    (tmp_path / "empty.json").write_text(json.dumps({"device": "x", "peak_flops": 1e12, "measurements": []}))
    assert "non-empty list" in _fails(tmp_path, *base, str(tmp_path / "empty.json"))
    save_plan(what_if_plan(what_if="l4", hours=1, data_tokens=10**9), tmp_path / "what-if.json")
    assert "what-if plan holds no measurements" in _fails(tmp_path, *base, str(tmp_path / "what-if.json"))
    assert "--throughput: only with --what-if" in _fails(
        tmp_path, "--hours", "1", "--data", "builtin:pydoc", "--throughput", str(tmp_path / "bad.json"))


def test_make_plan_refuses_more_gpus_than_the_machine_has(tmp_path: Path) -> None:
    from oneday.planner.make import make_plan

    with pytest.raises(UserError, match="--gpus 2: this machine has no GPU; plan for GPUs it lacks with --what-if"):
        make_plan(hours=1, data="builtin:pydoc", device="cpu", gpus=2, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------
# oneday run refuses a what-if plan on other hardware, unless --force
# --------------------------------------------------------------------------------------------------
def test_run_refuses_a_what_if_plan_on_other_hardware(tmp_path_factory: pytest.TempPathFactory,
                                                        tmp_path: Path) -> None:
    cache = tmp_path_factory.getbasetemp() / "oneday-plan-data-cache"
    plan = _what_if(tmp_path, "--minutes", "3", "--what-if", "l4", "--data", "builtin:pydoc", "--vocab-size", "512",
                    "--cache-dir", str(cache))
    run_dir = tmp_path / "run"
    code, _, stderr = invoke_cli("run", str(tmp_path / "plan.json"), "--device", "cpu", "--run-dir", str(run_dir))
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert "what-if plan for 1 × NVIDIA L4; this machine has 1 × CPU" in line and "--force" in line
    assert not run_dir.exists()
    # the check itself: the same GPU passes, another count or GPU does not, --force passes
    check_hardware(plan, device="cuda", name="NVIDIA L4", count=1, force=False)
    with pytest.raises(UserError, match="this machine has 2 × NVIDIA L4"):
        check_hardware(plan, device="cuda", name="NVIDIA L4", count=2, force=False)
    with pytest.raises(UserError, match="what-if plan"):
        check_hardware(plan, device="cuda", name="NVIDIA H100 80GB HBM3", count=1, force=False)
    check_hardware(plan, device="cpu", name="CPU", count=1, force=True)


def test_run_refuses_a_plan_on_assumed_data_even_with_force(tmp_path: Path) -> None:
    _what_if(tmp_path, "--hours", "1", "--what-if", "l4", "--data-tokens", "1B")
    run_dir = tmp_path / "run"
    code, _, stderr = invoke_cli("run", str(tmp_path / "plan.json"), "--force", "--run-dir", str(run_dir))
    assert code == 2 and "the tokens were assumed" in one_error_line(stderr)
    assert not run_dir.exists()


def test_parse_token_count() -> None:
    assert parse_token_count("10B") == 10**10 and parse_token_count("100m") == 10**8
    assert parse_token_count("5e8") == 5 * 10**8 and parse_token_count("12345") == 12345
    with pytest.raises(UserError):
        parse_token_count("-3")


def test_what_if_needs_no_torch() -> None:
    """A what-if plan neither probes nor measures: torch is never imported (it may not even be a CUDA build)."""
    import subprocess
    import sys

    code = ("import sys; from oneday.planner.what_if import what_if_plan; "
            "what_if_plan(what_if='h100x8', hours=24, data_tokens=10**10); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
