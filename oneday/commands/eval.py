"""`oneday eval`: a thin wrapper over `oneday.evaluate.harness.evaluate_run` (lm-evaluation-harness scores).

lm_eval and torch are imported only when the command runs, so `oneday --help` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from oneday.console import console, guard
from oneday.formats import human_seconds, number_or

HELP = ("Score a run's final model on standard benchmarks (HellaSwag, ARC-Easy, PIQA, WinoGrande, LAMBADA) "
        "through lm-evaluation-harness, with the chance level beside each score; written to RUN/eval.json and "
        "the run's MLflow run.")


def scores_table(title: str, scores: Sequence[Any]) -> Table:
    """One row per task: its headline metric, the chance level, accuracy and stderr, the items scored; green
    where the model beats chance."""
    table = Table(title=title, title_justify="left", box=None, padding=(0, 1), pad_edge=False)
    for header in ("task", "metric", "score", "± stderr", "chance", "items"):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right", no_wrap=True)
    for score in scores:
        metric = score.primary
        value = score.metrics.get(metric) if metric else None
        stderr = score.metrics.get(f"{metric}_stderr") if metric else None
        above = value is not None and score.chance is not None and metric.startswith("acc") and value > score.chance
        table.add_row(score.task, metric or "", number_or(value, ".3f", ""), number_or(stderr, ".3f", ""),
                      number_or(score.chance, ".3f", ""), f"{score.items:,}", style="green" if above else None)
    return table


@guard
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (its final/ model and tokenizer are scored).")],
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="Comma-separated lm_eval task names, task YAML files or folders of them (default: "
                        "hellaswag,arc_easy,piqa,winogrande,lambada_openai; their data comes from the Hugging "
                        "Face hub the first time).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Score only the first N items of each task.")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="cpu, cuda or cuda:N (default: cuda when torch sees a GPU, else cpu).")] = None,
    include_path: Annotated[list[Path] | None, typer.Option(
        "--include-path", help="A folder of your own lm_eval task YAML files whose task names --tasks may use "
                               "(repeatable).")] = None,
    threads: Annotated[int | None, typer.Option(
        "--threads", help="CPU threads for torch (default: torch's choice; on a busy machine fewer can be faster).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, nothing else.")
                       ] = False,
) -> None:
    """Score the run's final model with lm-evaluation-harness; the scores go to RUN/eval.json and MLflow."""
    from oneday.evaluate.harness import evaluate_run
    from oneday.evaluate.tasks import parse_task_list

    task_list = parse_task_list(tasks)
    if as_json:
        result = evaluate_run(run_dir, tasks=task_list, limit=limit, device=device, include_paths=include_path or (),
                              threads=threads)
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    result = evaluate_run(run_dir, tasks=task_list, limit=limit, device=device, include_paths=include_path or (),
                              threads=threads)
    console.print(scores_table(f"{result.run_dir}: {result.items:,} items in {human_seconds(result.seconds)} on "
                               f"{result.device}", result.scores))
    per_1000 = result.seconds_per_1000_items
    if per_1000 is not None:
        console.print(f"{per_1000:.1f} s per 1,000 items scored (loading the data and the model: "
                      f"{human_seconds(result.load_seconds)})", highlight=False)
    console.print(f"written: {Path(result.run_dir) / 'eval.json'}", highlight=False, soft_wrap=True)
    if result.mlflow_run_id and not result.mlflow_note:
        console.print(f"MLflow:  run {result.mlflow_run_id} (metrics eval/<task>/<metric>)", highlight=False)
    elif result.mlflow_note:
        console.print(f"MLflow:  not logged ({result.mlflow_note})", highlight=False, soft_wrap=True)
