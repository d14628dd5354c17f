"""`oneday plan` through the CLI: a plan written and shown, --json, --explain, and bad input (exit 2, one line)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from oneday.plan import SCHEMA_VERSION, Plan, load_plan, save_plan
from tests.factories import invoke_cli, no_gpu, one_error_line
from tests.factories import make_plan as factory_plan


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "oneday-plan-data-cache"  # shared with test_make_plan


def _plan_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["plan", "--minutes", "1", "--data", "builtin:pydoc", "--vocab-size", "512", "--device", "cpu",
            "--probe-seconds", "2", "--cache-dir", str(cache), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def written(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli") / "plan.json"
    code, stdout, stderr = invoke_cli(*_plan_args(cache, out))
    assert code == 0, stderr
    return out, stdout


def test_plan_prints_the_table_and_writes_the_file(written: tuple[Path, str]) -> None:
    out, stdout = written
    plan = load_plan(out)
    for header in ("shape", "N", "total", "tok/s", "MFU", "micro", "tokens", "epochs", "loss (band)"):
        assert header in stdout
    assert "▶" in stdout and "measured" in stdout
    chosen = next(c for c in plan.candidates if c.chosen)
    marked = next(line for line in stdout.splitlines() if "▶" in line)
    assert f"{chosen.n_layer}×{chosen.d_model}" in marked
    for label in ("model", "batch", "LR", "schedule", "tokens", "predicted loss", "time"):
        assert any(line.startswith(label) for line in stdout.splitlines()), label
    t = plan.train
    assert f"{t.micro_batch} × {t.grad_accum} × {t.seq_len} = {t.tokens_per_step():,}" in stdout
    assert f"written to {out}" in " ".join(stdout.split())
    assert "• Chose" in stdout and "• Reserved" in stdout
    assert plan.provenance.command.startswith("oneday plan --minutes 1 --data builtin:pydoc --vocab-size 512")
    assert plan.provenance.probe_seconds < 6  # --probe-seconds 2, plus the peak FLOP/s and one shape's overrun


def test_json_prints_only_the_plan(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    code, stdout, stderr = invoke_cli(*_plan_args(cache, out, "--json", "--probe-seconds", "1", "--name", "js"))
    assert code == 0, stderr
    plan = Plan.from_dict(json.loads(stdout))
    assert plan.name == "js"
    assert load_plan(out) == plan
    assert "written to" in stderr


def test_explain_reprints_without_measuring(written: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    import oneday.planner.make as make
    import oneday.planner.measure as measure

    def boom(*args, **kwargs):
        raise AssertionError("--explain must not measure")

    monkeypatch.setattr(make, "make_plan", boom)
    monkeypatch.setattr(measure, "probe_throughput", boom)
    out, first = written
    started = time.perf_counter()
    code, stdout, stderr = invoke_cli("plan", "--explain", str(out))
    assert code == 0, stderr
    assert time.perf_counter() - started < 10
    def rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if "×" in line and ("measured" in line or "modelled" in line)]

    assert rows(stdout) == rows(first)
    assert "• Chose" in stdout and "predicted loss" in stdout
    code, stdout, _ = invoke_cli("plan", "--explain", str(out), "--json")
    assert code == 0 and Plan.from_dict(json.loads(stdout)) == load_plan(out)


# --------------------------------------------------------------------------------------------------
# Bad input: exit code 2 and one line, before any probing
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def no_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    import oneday.planner.make as make

    real = make.make_plan

    def guarded(**kwargs):
        raise AssertionError("must fail before make_plan probes anything")

    monkeypatch.setattr(make, "make_plan", guarded)
    monkeypatch.setattr(make, "_real_make_plan", real, raising=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hours", "0"], "--hours: the budget must be more than 0"),
        (["--hours", "-1"], "--hours: the budget must be more than 0"),
        (["--hours", "20000"], "maximum of 10,000 hours"),
        (["--minutes", "0"], "--minutes: the budget must be more than 0"),
        (["--hours", "1", "--minutes", "5"], "exactly one of --hours or --minutes (not both)"),
        ([], "exactly one of --hours or --minutes"),
    ],
)
def test_budget_flags(tmp_path: Path, no_probing: None, args: list[str], message: str) -> None:
    out = tmp_path / "plan.json"
    code, stdout, stderr = invoke_cli("plan", *args, "--data", "builtin:pydoc", "--out", str(out))
    assert code == 2
    assert message in one_error_line(stderr)
    assert not out.exists() and stdout == ""


def test_data_is_required(tmp_path: Path, no_probing: None) -> None:
    code, _, stderr = invoke_cli("plan", "--minutes", "5", "--out", str(tmp_path / "plan.json"))
    assert code == 2 and "--data is required" in one_error_line(stderr)


def _fails(cache: Path, tmp_path: Path, *args: str) -> str:
    out = tmp_path / "plan.json"
    started = time.perf_counter()
    code, _, stderr = invoke_cli("plan", "--cache-dir", str(cache), "--out", str(out), *args)
    assert code == 2, stderr
    assert not out.exists()
    assert time.perf_counter() - started < 20
    return one_error_line(stderr)


def test_missing_data_path(cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus"
    assert str(missing) in _fails(cache, tmp_path, "--minutes", "5", "--data", str(missing), "--device", "cpu")


def test_budget_too_small(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    line = _fails(cache, tmp_path, "--minutes", "0.01", "--data", "builtin:pydoc", "--device", "cpu")
    assert "budget too small" in line and "0.6 s" in line
    assert not cache.exists()


def test_compile_on_a_cpu_is_refused_before_any_work(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    line = _fails(cache, tmp_path, "--minutes", "5", "--data", "builtin:pydoc", "--device", "cpu", "--compile")
    assert "--compile: CPU plans train without torch.compile" in line
    assert not cache.exists()


@no_gpu
def test_device_cuda_without_gpu(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    line = _fails(cache, tmp_path, "--minutes", "5", "--data", "builtin:pydoc", "--device", "cuda")
    assert "--device cuda" in line and "no NVIDIA GPU" in line
    assert not cache.exists()


def test_seq_len_too_long(tmp_path: Path) -> None:
    line = _fails(tmp_path / "cache", tmp_path, "--minutes", "5", "--data", "builtin:pydoc", "--seq-len", "100000")
    assert "--seq-len: 100000 is above the model family's maximum of 32768" in line


@pytest.mark.parametrize("where", ["missing-folder", "parent-is-a-file", "read-only-fs"])
def test_unwritable_out_fails_fast(tmp_path: Path, no_probing: None, where: str) -> None:
    if where == "missing-folder":
        out = tmp_path / "missing" / "plan.json"
    elif where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "plan.json"
    else:
        out = Path("/proc/oneday-plan.json")  # read-only even for root
    cache = tmp_path / "cache"
    started = time.perf_counter()
    code, stdout, stderr = invoke_cli("plan", "--minutes", "5", "--data", "builtin:pydoc", "--device", "cpu",
                                   "--cache-dir", str(cache), "--out", str(out))
    assert code == 2
    assert "--out" in one_error_line(stderr)
    assert time.perf_counter() - started < 5
    assert not out.exists() and not cache.exists() and stdout == ""


def test_explain_newer_schema(tmp_path: Path) -> None:
    raw = factory_plan().to_dict()
    raw["schema_version"] = SCHEMA_VERSION + 1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    code, _, stderr = invoke_cli("plan", "--explain", str(path))
    assert code == 2
    assert "made by a newer oneday" in one_error_line(stderr)


def test_explain_hand_edited_plan(tmp_path: Path) -> None:
    raw = factory_plan().to_dict()
    raw["train"]["micro_batch"] = 0
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    code, _, stderr = invoke_cli("plan", "--explain", str(path))
    assert code == 2
    assert "train.micro_batch: must be >= 1" in one_error_line(stderr)


def test_explain_a_factory_plan(tmp_path: Path) -> None:
    path = save_plan(factory_plan(), tmp_path / "plan.json")
    code, stdout, stderr = invoke_cli("plan", "--explain", str(path))
    assert code == 0, stderr
    assert "▶" in stdout and "2×64" in stdout


def test_explain_takes_no_budget(tmp_path: Path) -> None:
    path = save_plan(factory_plan(), tmp_path / "plan.json")
    code, _, stderr = invoke_cli("plan", "--explain", str(path), "--hours", "1")
    assert code == 2 and "--explain shows a saved plan" in one_error_line(stderr)


@pytest.mark.parametrize("name", ["../x", "/abs/plan", ".hidden"])
def test_a_name_that_is_not_one_folder_name_is_refused_before_any_work(tmp_path: Path, name: str) -> None:
    code, _, err = invoke_cli("plan", "--minutes", "5", "--data", "builtin:pydoc", "--name", name,
                           "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "plan.json"))
    assert code == 2 and "--name: must " in one_error_line(err)
    assert list(tmp_path.iterdir()) == []
