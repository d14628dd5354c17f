"""`oneday eval`: lm-evaluation-harness scores of a run's final model, offline.

The hub is unreachable in tests, so the tasks are lm_eval's own custom tasks: a task YAML over a JSONL file the
test writes (20 four-way multiple-choice items). Scoring is checked against a model whose preference is known
(a test double that always prefers one answer string), and end to end on a tiny real model through the CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneday.cli import app
from oneday.errors import UserError
from tests.factories import make_plan

lm_eval_model = pytest.importorskip("lm_eval.api.model")

ITEMS = 20
YES_GOLD = 7  # items whose right answer is "yes"
runner = CliRunner()


def write_task(folder: Path, *, name: str = "oneday_mc", dataset: str | None = None) -> Path:
    """A task YAML over a local JSONL file: ITEMS questions with choices yes/no/maybe/never, the gold answer
    "yes" for the first YES_GOLD items and another choice for the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    with data.open("w") as handle:
        for i in range(ITEMS):
            answer = 0 if i < YES_GOLD else 1 + i % 3
            handle.write(json.dumps({"question": f"Is {i} a number?", "choices": ["yes", "no", "maybe", "never"],
                                     "answer": answer}) + "\n")
    source = (f"dataset_path: {dataset}\n" if dataset else
              f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n")
    path = folder / f"{name}.yaml"
    path.write_text(f"task: {name}\n{source}output_type: multiple_choice\ntest_split: test\n"
                    "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder with a tiny saved model (random weights) and a byte-level BPE tokenizer trained in memory,
    as `oneday run` leaves it (final/ via `save_final`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from oneday.models.build import build_model
    from oneday.runner.outputs import save_final

    root = tmp_path_factory.mktemp("eval")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["Is 3 a number? yes no maybe never"] * 10, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(root / "tok")
    model = build_model(make_plan().model, seed=0)
    save_final(model, tokenizer_dir=root / "tok", out=root / "run" / "final", eot_id=0)
    return root / "run"


class PrefersYes(lm_eval_model.LM):
    """An lm_eval model whose log-likelihood of a continuation is 0 for "yes" and -1 for anything else."""

    def loglikelihood(self, requests):
        return [(0.0 if request.args[1].strip() == "yes" else -1.0, False) for request in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def test_scores_are_lm_evals_own_for_a_model_that_always_answers_yes(run_dir, tmp_path, monkeypatch):
    from oneday.evaluate import harness

    logged = {}

    class FakeClient:
        def __init__(self, tracking_uri):
            logged["uri"] = tracking_uri

        def log_batch(self, run_id, metrics, synchronous):
            logged["run_id"] = run_id
            logged["metrics"] = {metric.key: metric.value for metric in metrics}

    import mlflow.tracking

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", FakeClient)
    (run_dir / "run.json").write_text(json.dumps({"mlflow": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                             "experiment": "oneday/test", "run_id": "abc123"}}))
    task = write_task(tmp_path / "tasks")
    result = harness.evaluate_run(run_dir, tasks=[str(task)], model_factory=lambda final, device: PrefersYes())
    (score,) = result.scores
    assert score.task == "oneday_mc" and score.items == ITEMS
    assert score.metrics["acc"] == pytest.approx(YES_GOLD / ITEMS)  # right exactly where the gold is "yes"
    assert score.chance == pytest.approx(0.25)
    assert logged == {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "run_id": "abc123",
                      "metrics": {"eval/oneday_mc/acc": pytest.approx(0.35),
                                  "eval/oneday_mc/acc_stderr": pytest.approx(score.metrics["acc_stderr"])}}
    assert result.mlflow_run_id == "abc123" and result.mlflow_note is None
    written = json.loads((run_dir / "eval.json").read_text())
    assert written["kind"] == "oneday-eval" and written["scores"]["oneday_mc"]["metrics"]["acc"] == 0.35
    (run_dir / "run.json").unlink()

    # --limit 10: the first 10 items, of which the first 7 have the gold answer "yes"
    limited = harness.evaluate_run(run_dir, tasks=[str(task)], limit=10,
                                   model_factory=lambda final, device: PrefersYes())
    assert limited.scores[0].items == 10 and limited.scores[0].metrics["acc"] == pytest.approx(0.7)
    assert limited.mlflow_note and "records no MLflow run" in limited.mlflow_note


def test_cli_scores_the_real_saved_model_on_a_task_from_include_path(run_dir, tmp_path):
    write_task(tmp_path / "tasks", name="oneday_local")
    result = runner.invoke(app, ["eval", str(run_dir), "--tasks", "oneday_local", "--include-path",
                                 str(tmp_path / "tasks"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    score = data["scores"]["oneday_local"]
    assert score["items"] == ITEMS and score["chance"] == pytest.approx(0.25)
    assert 0.0 <= score["metrics"]["acc"] <= 1.0 and score["primary"] == "acc"
    assert data["device"] == "cpu" and data["seconds_per_1000_items"] > 0
    # a later evaluation of another task keeps this one in eval.json
    (tmp_path / "other").mkdir()
    other = write_task(tmp_path / "other", name="oneday_other")
    assert runner.invoke(app, ["eval", str(run_dir), "--tasks", str(other), "--limit", "2", "--json"]).exit_code == 0
    kept = json.loads((run_dir / "eval.json").read_text())["scores"]
    assert {"oneday_local", "oneday_other"} <= set(kept)


def error_of(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return result.exit_code, lines[0]


def test_a_run_folder_without_a_final_model_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    code, line = error_of(["eval", str(tmp_path / "run")])
    assert code == 2 and "holds no final model" in line and str(tmp_path / "run") in line


def test_an_unknown_task_names_close_matches(run_dir):
    code, line = error_of(["eval", str(run_dir), "--tasks", "hellaswg"])
    assert code == 2 and "unknown task 'hellaswg'" in line and "hellaswag" in line


@pytest.mark.parametrize("args, expected", [
    (["--limit", "0"], "--limit: must be >= 1"),
    (["--tasks", ","], "--tasks: no task named"),
    (["--device", "tpu"], "--device: must be cpu"),
    (["--tasks", "nowhere/task.yaml"], "no such task file"),
])
def test_bad_options_are_one_line(run_dir, args, expected):
    code, line = error_of(["eval", str(run_dir), *args])
    assert code == 2 and expected in line


def test_a_foreign_eval_json_is_never_overwritten(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "final", copy / "final")
    (copy / "eval.json").write_text("mine")
    code, line = error_of(["eval", str(copy), "--tasks", str(write_task(tmp_path / "t"))])
    assert code == 2 and "not written by `oneday eval`" in line
    assert (copy / "eval.json").read_text() == "mine"


def test_task_data_not_cached_offline_is_one_line_naming_the_task_and_the_fix(run_dir, tmp_path):
    task = write_task(tmp_path / "hub", name="hub_task", dataset="oneday-test/not-cached")
    with pytest.raises(UserError) as raised:
        from oneday.evaluate.harness import evaluate_run

        evaluate_run(run_dir, tasks=[str(task)], model_factory=lambda final, device: PrefersYes())
    message = str(raised.value)
    assert "\n" not in message and "hub_task" in message and "oneday-test/not-cached" in message
    assert "HF_HUB_OFFLINE=0" in message and "huggingface-cli download" in message


def test_the_cli_does_not_import_lm_eval_or_torch():
    code = "import sys, oneday.cli; print(any(m in sys.modules for m in ('lm_eval', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------------------------------------
# `oneday run --eval`: checked before training, time kept at the end of the budget when it fits

def test_run_eval_is_checked_before_any_training(tmp_path):
    from oneday.evaluate.harness import check_eval_request

    with pytest.raises(UserError, match=r"--eval: unknown task 'hellaswg' \(did you mean hellaswag"):
        check_eval_request(["hellaswg"])
    with pytest.raises(UserError, match="--eval-limit: must be >= 1"):
        check_eval_request(["hellaswag"], limit=0)
    assert check_eval_request(["hellaswag", "piqa"], limit=5).tasks == ("hellaswag", "piqa")
    code, line = error_of(["run", str(tmp_path / "missing-plan.json"), "--eval", "hellaswg"])
    assert code == 2 and "--eval: unknown task 'hellaswg'" in line
    code, line = error_of(["run", str(tmp_path / "missing-plan.json"), "--eval", "default", "--eval-limit", "0"])
    assert code == 2 and "--eval-limit: must be >= 1" in line


def test_run_eval_keeps_the_benchmarks_time_when_it_fits_a_quarter_of_the_budget():
    from dataclasses import replace

    from oneday.evaluate.harness import EvalRequest
    from oneday.runner import costs
    from oneday.runner.run import _benchmark_reserve

    plan = make_plan(budget_seconds=3600.0)
    fast = replace(plan, prediction=replace(plan.prediction, tokens_per_s=1e6))
    small = EvalRequest(tasks=("piqa", "arc_easy"), limit=100)
    expected = costs.benchmark_seconds(small.tasks, limit=100, forward_tokens_per_s=3e6, task_index=True)
    assert _benchmark_reserve(fast, small) == pytest.approx(expected) and expected < 900
    assert _benchmark_reserve(fast, None) == 0.0
    local = EvalRequest(tasks=("tasks/mine.yaml",), limit=20)  # no lm_eval task index to build
    assert _benchmark_reserve(fast, local) == pytest.approx(
        costs.benchmark_seconds(local.tasks, limit=20, forward_tokens_per_s=3e6, task_index=False))
    assert _benchmark_reserve(fast, local) < expected - costs.TASK_INDEX_SECONDS + 1
    slow = replace(plan, prediction=replace(plan.prediction, tokens_per_s=100.0))  # hours of scoring: after
    assert _benchmark_reserve(slow, EvalRequest(tasks=("hellaswag",))) == 0.0


def test_run_eval_failure_after_training_is_a_warning_not_a_failed_run(run_dir, tmp_path, caplog):
    from oneday.evaluate.harness import EvalRequest
    from oneday.runner.run import _run_benchmarks

    hub_task = write_task(tmp_path / "hub", name="hub_task2", dataset="oneday-test/not-cached")
    with caplog.at_level("WARNING"):
        _run_benchmarks(run_dir, EvalRequest(tasks=(str(hub_task),)), device="cpu", interrupted=False,
                        within_budget=True, charged=lambda: 10.0, budget_seconds=60.0)
    assert "--eval: no benchmarks" in caplog.text and "hub_task2" in caplog.text


def test_compare_shows_the_benchmark_scores_beside_val_loss():
    from rich.console import Console

    from oneday.commands.compare import comparison_table
    from oneday.compare.readers import RunRecord
    from oneday.compare.runs import Comparison, row_from_record

    record = RunRecord(run_id="r1", experiment_id="1", name="demo", status="FINISHED", start_time_ms=None,
                       tags={"oneday.kind": "run"}, params={},
                       metrics={"val/loss": 4.2, "eval/hellaswag/acc": 0.27, "eval/hellaswag/acc_norm": 0.29,
                                "eval/hellaswag/acc_stderr": 0.01, "eval/piqa/acc": 0.61})
    row = row_from_record(record)
    assert row.benchmarks == {"hellaswag/acc": 0.27, "hellaswag/acc_norm": 0.29, "piqa/acc": 0.61}
    assert row.benchmark("hellaswag") == ("acc_norm", 0.29) and row.benchmark("arc_easy") is None
    console = Console(width=200, record=True)
    console.print(comparison_table(Comparison(tracking_uri="sqlite://", experiment="oneday/test",
                                              experiment_id="1", rows=(row,), sort="val_loss")))
    text = console.export_text()
    assert "hellaswag" in text and "0.290" in text and "0.610" in text
