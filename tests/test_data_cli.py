"""`oneday data prepare` through the real CLI app, and the import cost of the CLI."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneday.cli import app
from tests.factories import one_error_line

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that no path in a table wraps


def _args(cache: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "--data", "builtin:pydoc", "--vocab-size", "300", "--cache-dir", str(cache), *extra]


def test_prepare_prints_table_then_uses_cache(tmp_path: Path) -> None:
    first = runner.invoke(app, _args(tmp_path))
    assert first.exit_code == 0, first.output
    for word in ("prepared data", "builtin:pydoc", "documents", "train", "bytes/token", "uint16", "fresh",
                 "tokens/s", str(tmp_path)):
        assert word in first.stdout, word
    second = runner.invoke(app, _args(tmp_path))
    assert second.exit_code == 0, second.output
    assert "hit: nothing prepared" in second.stdout


def test_prepare_json(tmp_path: Path) -> None:
    result = runner.invoke(app, _args(tmp_path, "--json"))
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert meta["from_cache"] is False
    assert meta["train_tokens"] > 0 and meta["val_tokens"] > 0
    assert Path(meta["directory"], "train-00000.bin").stat().st_size == 2 * meta["train_tokens"]
    assert Path(meta["tokenizer_dir"]).is_dir()
    again = json.loads(runner.invoke(app, _args(tmp_path, "--json")).stdout)
    assert again["from_cache"] is True and again["key"] == meta["key"]


def test_missing_path_exit_code_2_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.txt"
    result = runner.invoke(app, ["data", "prepare", "--data", str(missing), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "no such file or directory" in lines[0] and "such.txt" in lines[0]
    assert "Traceback" not in result.output


def _plan(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["plan", "--minutes", "30", "--data", "builtin:pydoc", "--device", "cpu", "--cache-dir", str(cache),
            "--out", str(out), *extra]


@pytest.mark.parametrize("command", ["data", "plan"])
def test_vocab_size_too_large_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    from oneday.data import prepare as data_mod

    def boom(*args, **kwargs):  # the Rust trainer asked for 10^9 tokens aborts the process: refuse before it
        raise AssertionError("refused before the tokenizer is trained")

    monkeypatch.setattr(data_mod, "train_tokenizer", boom)
    cache = tmp_path / "cache"
    args = _args(cache) if command == "data" else _plan(cache, tmp_path / "plan.json")
    result = runner.invoke(app, [*args, "--vocab-size", "1000000000"])  # the last --vocab-size wins
    assert result.exit_code == 2, result.output
    assert "vocab size 1,000,000,000 is too large" in one_error_line(result.stderr)
    assert not cache.exists() and not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("command", ["data", "plan"])
def test_read_only_cache_dir_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    cache = tmp_path / "cache"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # as on a read-only file system (we run as root: chmod would not refuse)
        if Path(path) == cache or cache in Path(path).parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    result = runner.invoke(app, _args(cache) if command == "data" else _plan(cache, tmp_path / "plan.json"))
    assert result.exit_code == 2, result.output
    assert f"error: cannot write to {cache}: read-only file system" in one_error_line(result.stderr)
    assert not cache.exists() and not (tmp_path / "plan.json").exists()


def test_cli_import_is_light() -> None:
    code = "import sys, oneday.cli; print(sorted(m for m in ('torch', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_cache_path_through_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "cachefile").write_text("x")
    result = runner.invoke(app, ["data", "prepare", "--data", "builtin:pydoc", "--cache-dir",
                                 str(tmp_path / "cachefile")])
    assert result.exit_code == 2
    assert "cannot write to" in one_error_line(result.stderr) and "not a directory" in result.stderr


def test_a_corpus_that_fails_to_read_leaves_no_empty_cache_folders(tmp_path: Path) -> None:
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 100)
    result = runner.invoke(app, ["data", "prepare", "--data", str(tmp_path / "blob.txt"), "--cache-dir",
                                 str(tmp_path / "cache")])
    assert result.exit_code == 2 and "not text" in one_error_line(result.stderr)
    assert not (tmp_path / "cache").exists()


def test_plan_passes_hub_config_split_and_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`oneday plan --config --split --max-tokens` reach the planner (which records them in the plan's data)."""
    from oneday.planner import make

    seen: dict = {}

    def fake_make_plan(**kwargs):
        seen.update(kwargs)
        raise make.UserError("stop here")

    monkeypatch.setattr(make, "make_plan", fake_make_plan)
    result = runner.invoke(app, ["plan", "--minutes", "5", "--data", "hf:someone/big", "--config", "en",
                                 "--split", "train", "--max-tokens", "100000000", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 2 and "stop here" in result.stderr
    assert (seen["config"], seen["split"], seen["max_tokens"]) == ("en", "train", 100_000_000)
    assert "--config en --split train --max-tokens 100000000" in seen["command"]


def test_a_plan_prepares_its_hub_data_again_with_config_split_and_cap(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan made on one machine names config, split and cap, so another machine prepares the same tokens."""
    from oneday.data import plan_data
    from oneday.plan import DataInfo

    info = DataInfo(source="hub:someone/big (en) split train", key="k", path=str(tmp_path / "cache/data/k"),
                    tokenizer="t", vocab_size=8192, train_tokens=1000, val_tokens=100, bytes_per_token=4.0,
                    spec="hf:someone/big", config="en", split="train", max_tokens=100_000_000)
    asked: dict = {}

    def fake_prepare(spec, **kwargs):
        asked.update(spec=spec, **kwargs)
        raise plan_data.UserError("offline")

    monkeypatch.setattr(plan_data, "prepare_data", fake_prepare)
    with pytest.raises(plan_data.UserError, match="preparing hf:someone/big again failed"):
        plan_data.load_plan_data(info)
    assert (asked["config"], asked["split"], asked["max_tokens"]) == ("en", "train", 100_000_000)
    assert DataInfo(**{**info.__dict__, "config": None, "split": None, "max_tokens": None}).max_tokens is None
