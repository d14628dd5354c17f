"""`oneday run` and `oneday sample`: thin wrappers over `oneday.runner.run.run_plan` and
`oneday.runner.sample.sample_run`.

Nothing heavy is imported here at module level (the CLI must start without torch); the rich progress view
lives here because only the CLI draws.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text

from oneday.console import console, err_console, guard
from oneday.formats import clock_text, number_or

HELP = "Train the planned model to the deadline: resumable, logged to MLflow."
SAMPLE_HELP = "Generate text from a trained run's saved model."
class _StatsColumn(ProgressColumn):
    def __init__(self, view: RunView) -> None:
        super().__init__()
        self.view = view

    def render(self, task: Any) -> Text:
        return Text(self.view.stats_text(), style="progress.data")


class RunView:
    """The `oneday run` console: a progress bar on the TIME budget with loss, val loss, tok/s, MFU and ETA.

    An `Observer` of the training loop (plus `on_session`, which `run_plan` calls first with the budget).
    """

    def __init__(self) -> None:
        self.info: Any = None
        self.step = 0
        self.tokens = 0
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._done = threading.Event()
        self._ticker: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> RunView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._done.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        if self._progress is not None:
            self._tick()
            self._progress.stop()
            self._progress = None

    def _tick(self) -> None:
        if self._progress is not None and self.info is not None:
            elapsed = min(self.info.elapsed(), self.info.budget_seconds)
            self._progress.update(self._task, completed=elapsed)

    def _tick_loop(self) -> None:
        while not self._done.wait(0.5):
            self._tick()

    def stats_text(self) -> str:
        if self.info is None:
            return ""
        elapsed = self.info.elapsed()
        remaining = max(0.0, self.info.budget_seconds - elapsed)
        parts = [
            f"{clock_text(elapsed)}/{clock_text(self.info.budget_seconds)}",
            f"step {self.step:,}",
            f"loss {number_or(self.loss, '.3f')}",
            f"val {number_or(self.val_loss, '.3f')}",
            f"{number_or(self.tokens_per_s, ',.0f')} tok/s",
            f"MFU {number_or(None if self.mfu is None else 100 * self.mfu, '.1f')}%",
            f"ETA {clock_text(remaining)}",
        ]
        return "  ".join(parts)

    # -- observer ----------------------------------------------------------------------------------------
    def on_session(self, info: Any) -> None:
        self.info = info
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            _StatsColumn(self),
            console=err_console,
            transient=False,
            refresh_per_second=4,
        )
        description = info.plan_name
        if info.resumed_from_step is not None:
            description += f" (resumed at step {info.resumed_from_step:,})"
        self._task = self._progress.add_task(description, total=info.budget_seconds)
        self._progress.start()
        self._tick()
        self._ticker = threading.Thread(target=self._tick_loop, name="oneday-run-view", daemon=True)
        self._ticker.start()

    def on_start(self, *, step: int, tokens: int, resumed: bool) -> None:
        self.step, self.tokens = step, tokens

    def on_step(self, record: Any) -> None:
        self.step = record.step
        self.tokens = record.tokens
        self.loss = record.loss
        self.tokens_per_s = record.tokens_per_s
        self.mfu = record.mfu

    def on_eval(self, record: Any) -> None:
        self.val_loss = record.val_loss

    def on_event(self, kind: str, message: str, *, step: int) -> None:
        pass  # the loop logs its events; the log lines print above the bar


def summary_table(summary: Any) -> Table:
    """Planned vs achieved, for the end of `oneday run`."""
    table = Table(title=f"{summary.plan_name}: planned vs achieved", title_justify="left")
    table.add_column("")
    table.add_column("planned", justify="right")
    table.add_column("achieved", justify="right")
    table.add_row("tokens", f"{summary.predicted_tokens:,}", f"{summary.tokens:,}")
    table.add_row("steps", f"{summary.planned_steps:,}", f"{summary.steps:,}")
    table.add_row("val loss", summary.predicted_loss_text(),
                  number_or(summary.final_val_loss, ".3f"))
    table.add_row("val bits/byte", "", number_or(summary.final_val_bpb, ".3f"))
    table.add_row("tokens/s", f"{summary.predicted_tokens_per_s:,.0f}", f"{summary.mean_tokens_per_s:,.0f}")
    table.add_row("MFU", f"{100 * summary.predicted_mfu:.1f}%", f"{100 * summary.mfu:.1f}%")
    table.add_row("time", clock_text(summary.budget_seconds), clock_text(summary.wall_seconds))
    if summary.skipped_steps or summary.rollbacks or summary.resumes:
        table.add_row("skipped / rollbacks / resumes", "",
                      f"{summary.skipped_steps} / {summary.rollbacks} / {summary.resumes}")
    return table


@guard
def run(
    plan: Annotated[Path, typer.Argument(help="The plan to run (plan.json from `oneday plan`).")],
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Where outputs and checkpoints go (default: runs/<plan name>).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu or cuda (default: the plan's device).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (default: the plan's).")] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)."),
    ] = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", help="MLflow experiment (default: oneday/<data set>).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Move aside a run folder that holds another plan's run (or this plan's "
                           "finished one) and start fresh; or train in a non-empty folder beside its files; "
                           "or run a what-if plan on other hardware.")
    ] = False,
    eval_tasks: Annotated[str | None, typer.Option(
        "--eval", help="After the final save, score the model on these lm_eval benchmarks (comma-separated, as "
                       "`oneday eval --tasks`; 'default' for the default set): inside the budget when they fit "
                       "a quarter of it, else after the deadline.")] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="Items per --eval task (default: all).")
                          ] = None,
) -> None:
    """Train the planned model until the budget runs out; rerun the same command to resume."""
    from oneday.errors import UserError
    from oneday.plan import load_plan
    from oneday.runner.deadline import process_start_time
    from oneday.runner.run import run_plan

    if device is not None and device not in ("cpu", "cuda"):
        raise UserError(f"--device: must be cpu or cuda, got {device!r}")
    request = None
    if eval_tasks is not None or eval_limit is not None:
        from oneday.evaluate.harness import check_eval_request
        from oneday.evaluate.tasks import parse_task_list

        request = check_eval_request(parse_task_list(None if eval_tasks in (None, "default") else eval_tasks),
                                     limit=eval_limit)
    loaded = load_plan(plan)
    with RunView() as view:
        summary = run_plan(loaded, run_dir=run_dir, device=device, threads=threads, tracking_uri=tracking_uri,
                           experiment=experiment, force=force, observer=view, process_start=process_start_time(),
                           eval_request=request)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        _end_process(130 if summary.interrupted else 0)
        return
    console.print(summary_table(summary))
    state = "interrupted (rerun the same command to resume)" if summary.interrupted else "finished"
    console.print(f"run {state}")
    if summary.model_dir:
        console.print(f"model:   {summary.model_dir}")
    console.print(f"summary: {Path(summary.run_dir) / 'summary.json'}")
    if request is not None:
        from oneday.commands.eval import scores_table
        from oneday.evaluate.harness import read_scores

        scores = read_scores(summary.run_dir)
        if scores:
            console.print(scores_table("benchmarks (lm-evaluation-harness)", scores))
            console.print(f"scores:  {Path(summary.run_dir) / 'eval.json'}")
    if summary.mlflow_run_id:
        console.print(f"MLflow:  run {summary.mlflow_run_id} in {summary.mlflow_experiment} ({summary.tracking_uri})")
    elif summary.tracking_error:
        console.print(f"MLflow:  not logged ({summary.tracking_error})")
    _end_process(130 if summary.interrupted else 0)


def _end_process(code: int) -> None:
    """End `oneday run` now. Run as the `oneday` program, skip the interpreter's teardown with `os._exit`:
    with torch, transformers and mlflow loaded it takes 2–4 s on the CPU machines here, and the budget runs
    until the process exits. Every output is written and closed by now; stdout, stderr and logging are
    flushed first. Called in-process (tests, `CliRunner`), it returns or raises `typer.Exit` as usual."""
    if Path(sys.argv[0]).name != "oneday":
        if code:
            raise typer.Exit(code)
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


@guard
def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (its final/ model) or a saved model folder.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 100,
    temperature: Annotated[float, typer.Option("--temperature", help="0 for greedy.")] = 0.8,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
) -> None:
    """Print text generated by a trained run's final model."""
    from oneday.runner.sample import sample_run

    text = sample_run(run_dir, prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
