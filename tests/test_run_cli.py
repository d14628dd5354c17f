"""`oneday run` / `oneday sample` on bad input: one line on stderr, exit code 2, nothing trained."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneday.cli import app
from oneday.plan import save_plan
from tests.factories import make_plan, one_error_line

runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr



def cuda_plan():
    plan = make_plan()
    return replace(
        plan,
        hardware=replace(plan.hardware, device="cuda", name="NVIDIA H200", dtype="bf16", peak_flops=989e12),
        train=replace(plan.train, device="cuda", precision="bf16", compile=True),
    )


def test_invalid_plan_names_the_field(tmp_path: Path) -> None:
    raw = make_plan().to_dict()
    raw["train"]["lr"] = -1
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    code, _, err = _invoke("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == 2
    assert "train.lr: must be in (0, 1)" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_missing_plan_file(tmp_path: Path) -> None:
    code, _, err = _invoke("run", str(tmp_path / "nope.json"))
    assert code == 2
    assert "no such plan file" in one_error_line(err)


def test_cuda_plan_on_a_cpu_machine_is_refused(tmp_path: Path) -> None:
    path = save_plan(cuda_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == 2
    line = one_error_line(err)
    assert "this plan was made for cuda (NVIDIA H200)" in line
    assert "--device cpu" in line
    assert not (tmp_path / "run").exists()


def test_bad_device_and_threads(tmp_path: Path) -> None:
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--device", "tpu", "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "--device" in one_error_line(err)
    code, _, err = _invoke("run", str(path), "--threads", "0", "--run-dir", str(tmp_path / "run"))
    assert code == 2


def test_run_dir_of_a_different_plan_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"plan_hash": "0123456789abcdef"}))
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(run_dir))
    assert code == 2
    line = one_error_line(err)
    assert "different plan" in line and "--force" in line
    assert (run_dir / "checkpoints" / "step-00000010").is_dir()  # untouched


def test_run_dir_of_a_different_plan_detected_from_its_plan_copy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000010").mkdir(parents=True)
    save_plan(make_plan(lr=1e-3), run_dir / "plan.json")
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(run_dir))
    assert code == 2 and "different plan" in one_error_line(err)


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_unwritable_run_dir(tmp_path: Path, kind: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    run_dir = blocker if kind == "file" else blocker / "run"
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(run_dir))
    assert code == 2
    line = one_error_line(err)
    assert str(run_dir) in line
    assert "not a folder" in line or "cannot create" in line


def test_sample_missing_or_unfinished_run(tmp_path: Path) -> None:
    code, _, err = _invoke("sample", str(tmp_path / "nope"))
    assert code == 2 and "no such run folder" in one_error_line(err)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = _invoke("sample", str(tmp_path / "run"))
    assert code == 2 and "has not finished" in one_error_line(err)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A run folder whose final/ holds a tiny model as `save_pretrained` writes it (weights in model.safetensors)."""
    from oneday.models.build import build_model
    from tests.factories import tiny_model

    run_dir = tmp_path_factory.mktemp("sample") / "run"
    build_model(tiny_model()).save_pretrained(run_dir / "final", safe_serialization=True)
    return run_dir


def test_sample_truncated_weights_name_the_file(saved_model: Path, tmp_path: Path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(saved_model, run_dir)
    weights = run_dir / "final" / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)
    code, _, err = _invoke("sample", str(run_dir))
    assert code == 2
    line = one_error_line(err)
    assert f"{weights}: truncated ({size // 2:,} bytes where its header says {size:,})" in line
    weights.write_bytes(b"\xff" * 6)
    code, _, err = _invoke("sample", str(run_dir))
    assert code == 2 and f"{weights}: truncated or corrupt" in one_error_line(err)


@pytest.mark.parametrize(("option", "value"), [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-inf"), ("--temperature", "-0.5"),
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"), ("--seed", "-1"), ("--seed", str(2**64)),
])
def test_sample_refuses_out_of_range_options(saved_model: Path, option: str, value: str) -> None:
    code, out, err = _invoke("sample", str(saved_model), option, value)
    assert code == 2 and out == ""
    assert f"{option}: must be" in one_error_line(err)


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, oneday.cli; print(any(m in sys.modules for m in ('torch', 'mlflow', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_non_empty_folder_without_a_run_is_refused_unless_force(tmp_path: Path) -> None:
    """A user's folder used to be accepted; the final save then renamed its final/ away and deleted it."""
    run_dir = tmp_path / "mine"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "notes.txt").write_text("precious")
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(run_dir))
    assert code == 2
    line = one_error_line(err)
    assert str(run_dir) in line and "holds no oneday run" in line and "--force" in line
    # with --force oneday trains beside the user's files, but never over a name it writes (final/ here)
    code, _, err = _invoke("run", str(path), "--run-dir", str(run_dir), "--force")
    assert code == 2 and "did not write" in one_error_line(err) and "final" in one_error_line(err)
    assert sorted(p.name for p in run_dir.rglob("*")) == ["final", "notes.txt"], "something was written"
    assert (run_dir / "final" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("name", ["../../escape", "/abs/path", ".hidden", "a\\b", "x" * 121, "tab\there"])
def test_a_plan_name_that_is_not_one_folder_name_is_refused(tmp_path: Path, name: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.loads(make_plan().to_json())
    raw["name"] = name
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    code, _, err = _invoke("run", str(path))
    assert code == 2 and "plan.json: name: must " in one_error_line(err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cwd", "plan.json"]


def test_an_absurd_model_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    plan = make_plan()
    huge = replace(plan, model=replace(plan.model, d_model=2**20, n_head=2**10, d_ff=2**22, n_layer=10**4))
    path = save_plan(huge, tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == 2
    line = one_error_line(err)
    assert "plan model: training it needs about" in line and "more than the" in line
    assert not (tmp_path / "run").exists()


def test_a_disk_without_room_for_a_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from oneday.runner import preflight

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, _, err = _invoke("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == 2 and "free, but a checkpoint and the final model need" in one_error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (("plan", "--minutes", "abc"), "'--minutes'"),
    (("run", "plan.json", "--threads", "0"), "'--threads'"),
    (("plan", "--no-such-option"), "--no-such-option"),
])
def test_usage_errors_are_one_line(args: tuple[str, ...], expected: str) -> None:
    code, _, err = _invoke(*args)
    assert code == 2
    line = one_error_line(err)
    assert expected in line and "--help" in line and "╭" not in err and "Usage:" not in err


def test_an_error_naming_a_path_with_brackets_prints_it_as_is(tmp_path: Path) -> None:
    """Rich markup in the error line used to eat `[/x]`-like parts of a path (or raise a MarkupError)."""
    missing = tmp_path / "[/bold]odd[red]" / "plan.json"
    code, _, err = _invoke("run", str(missing))
    assert code == 2 and "[/bold]odd[red]" in one_error_line(err)
