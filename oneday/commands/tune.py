"""`oneday tune`: a thin wrapper over `oneday.studies.tune.tune_plan` / `run_worker` and
`oneday.studies.calibrate.calibrate_plan`.

Nothing heavy is imported at module level (torch, optuna and mlflow load when the command runs); the rich
live table of trials lives here because only the CLI draws. The library feeds it through its `on_trial`
callback.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from oneday.console import console, end_live_frame, err_console, guard
from oneday.errors import UserError
from oneday.formats import number_or

HELP = ("Tune the learning rate and schedule with Optuna on short μP proxy runs and write a tuned plan "
        "(--worker: only run trials of a shared study; --calibrate: fit the loss law to this data).")

_STATE_STYLE = {"running": "cyan", "complete": "green", "pruned": "yellow", "failed": "red", "diverged": "red",
                "waiting": "dim"}

class TrialTable:
    """The live table of trials: number, LR, warmup, cooldown, loss, state, seconds; the best row in bold."""

    def __init__(self, title: str = "trials") -> None:
        self.title = title
        self.rows: dict[int, Any] = {}

    def update(self, result: Any) -> None:
        self.rows[result.number] = result

    def render(self) -> Table:
        table = Table(title=self.title, title_justify="left", expand=False)
        for name, justify in (("#", "right"), ("LR", "right"), ("warmup", "right"), ("cooldown", "right"),
                              ("loss", "right"), ("state", "left"), ("s", "right"), ("note", "left")):
            table.add_column(name, justify=justify)
        complete = [r for r in self.rows.values() if r.state == "complete" and r.value is not None]
        best = min(complete, key=lambda r: r.value).number if complete else None
        for number in sorted(self.rows)[-40:]:
            r = self.rows[number]
            p = r.params
            table.add_row(
                str(number), number_or(p.lr if p else None, ".3g"), number_or(p.warmup_fraction if p else None, ".3f"),
                number_or(p.cooldown_fraction if p else None, ".3f"), number_or(r.value, ".4f"),
                f"[{_STATE_STYLE.get(r.state, '')}]{r.state}[/]", number_or(r.seconds, ".1f"), (r.note or "")[:40],
                style="bold" if number == best else None,
            )
        return table


class TrialView:
    """Stage lines on stderr, and the live trial table, started with the first trial (so that an error before
    any trial is one line, not a table and a line)."""

    def __init__(self) -> None:
        self.table = TrialTable()
        self.live: Live | None = None

    def on_trial(self, result: Any) -> None:
        self.table.update(result)
        if self.live is None:
            self.live = Live(self.table.render(), console=err_console, refresh_per_second=4, transient=False)
            self.live.start()
        else:
            self.live.update(self.table.render())

    def on_stage(self, text: str) -> None:
        (self.live.console if self.live is not None else err_console).print(f"[dim]{text}[/dim]", highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.update(self.table.render())
            self.live.stop()
            end_live_frame()
            self.live = None


def _summary(result: Any) -> Table:
    table = Table(title="tuning result", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    counts = ", ".join(f"{v} {k}" for k, v in sorted(result.counts().items()))
    proxy = result.proxy
    table.add_row("study", f"{result.study} ({result.storage})")
    table.add_row("trials", counts)
    table.add_row("proxy", f"{proxy.label()}, {proxy.steps} steps, {proxy.tokens():,} tokens")
    if result.all_diverged:
        table.add_row("result", "[red]every trial diverged: kept the planner's default LR[/red]")
    elif result.best is not None and result.best.params is not None:
        p = result.best.params
        table.add_row("best trial", f"#{result.best.number}: loss {result.best.value:.4f}, proxy LR {p.lr:.3g}, "
                                    f"warmup {p.warmup_fraction:.3f}, cooldown {p.cooldown_fraction:.3f}")
        table.add_row("LR for the plan", f"{result.tuned_lr:.3g} (planner default {result.default_lr:.3g}, "
                                         f"×{result.tuned_lr / result.default_lr:.2f})")
        if result.plan is not None:
            train = result.plan.train
            kept = (result.plan.provenance.tuning or {}).get("schedule", {}).get("searched_and_transferred") is False
            note = " (the planner's, kept)" if kept else ""
            table.add_row("schedule for the plan",
                          f"warmup {train.warmup_fraction:.3f}, cooldown {train.cooldown_fraction:.3f}{note}")
    if result.transfer is not None:
        check = result.transfer
        runs = ", ".join(f"{m:g}×: {loss:.4f}" for m, loss in zip(check.multipliers, check.losses, strict=True))
        verdict = "[green]η* best[/green]" if check.ok() else f"[yellow]{check.best_multiplier():g}×η* best[/yellow]"
        table.add_row("transfer check", f"width {check.width}: {runs} — {verdict}")
    table.add_row("cost", f"{result.seconds:.0f} s = {result.cost_fraction():.1%} of the plan's budget")
    if result.out is not None:
        table.add_row("tuned plan", str(result.out))
    return table


@guard
def tune(
    plan: Annotated[Path, typer.Argument(help="The plan.json to tune.")],
    trials: Annotated[int | None, typer.Option("--trials", help="Trials the study should hold (in total); without "
                                                                "--hours the budget is what they cost.")] = None,
    hours: Annotated[
        float | None, typer.Option("--hours", help="Tuning budget in hours (this command's deadline).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The tuned plan (default: <plan>.tuned.json; with "
                                                          "--calibrate the calibration file).")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="MLflow tracking URI.")] = None,
    storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage: an RDB URL or a journal file "
                                                                  "(default: <plan>.tune.journal).")] = None,
    study: Annotated[str | None, typer.Option("--study", help="Study name (default: plan name + hash).")] = None,
    worker: Annotated[bool, typer.Option("--worker", help="Only run trials of an existing study.")] = False,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Fit the loss law's E, A, B to this data.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the TPE sampler.")] = 0,
    beta2: Annotated[bool, typer.Option("--beta2", help="Also tune AdamW's β₂.")] = False,
    weight_decay: Annotated[bool, typer.Option("--weight-decay", help="Also tune the weight decay.")] = False,
    schedule: Annotated[str, typer.Option(
        "--schedule", help="Search warmup/cooldown on the proxies and put them into the plan: auto (only when a "
                           "trial is not much shorter than the target's run), transfer, keep.")] = "auto",
) -> None:
    if calibrate and (worker or trials is not None or storage or study):
        raise UserError("--calibrate takes only PLAN, --hours, --out and --tracking-uri")
    if worker and out is not None:
        raise UserError("--worker writes no plan; --out belongs to the `oneday tune` that finishes the study")
    if calibrate:
        _calibrate(plan, hours=hours, out=out, tracking_uri=tracking_uri)
        return
    from oneday.plan import load_plan
    from oneday.studies.study import check_budget_args

    check_budget_args(trials=trials, hours=hours)
    load_plan(plan)  # a plan that fails validation stops here, before anything is drawn
    view = TrialView()
    try:
        if worker:
            from oneday.studies.tune import run_worker

            done = run_worker(plan, storage=storage, study_name=study, tracking_uri=tracking_uri, hours=hours,
                              on_trial=view.on_trial)
        else:
            from oneday.studies.tune import tune_plan

            result = tune_plan(plan, trials=trials, hours=hours, out=out, tracking_uri=tracking_uri, storage=storage,
                               study_name=study, seed=seed, beta2=beta2, weight_decay=weight_decay,
                               schedule=schedule, command=shlex.join(["oneday", *sys.argv[1:]]), on_trial=view.on_trial,
                               on_stage=view.on_stage)
    finally:
        view.close()
    if worker:
        console.print(f"worker done: {len(done)} trial(s) run here")
        return
    console.print(_summary(result))
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _calibrate(plan: Path, *, hours: float | None, out: Path | None, tracking_uri: str | None) -> None:
    from oneday.studies.calibrate import calibrate_plan

    table = Table(title="calibration runs", title_justify="left")
    for name in ("width", "N", "tokens", "steps", "LR", "loss", "s"):
        table.add_column(name, justify="right")
    # transient, printed once it has rows: a refused calibration leaves one line, not an empty table above it
    with Live(table, console=err_console, refresh_per_second=4, transient=True):
        def on_run(run: Any) -> None:
            table.add_row(str(run.d_model), f"{run.params:,}", f"{run.tokens:,}", str(run.steps), f"{run.lr:.3g}",
                          number_or(run.loss, ".4f") if run.loss is not None else "[red]diverged[/red]",
                          f"{run.seconds:.1f}")

        try:
            result = calibrate_plan(plan, hours=hours, out=out, tracking_uri=tracking_uri, on_run=on_run)
        finally:
            if table.row_count:
                err_console.print(table)
    end_live_frame()
    law = result.law
    console.print(f"fitted L = {law.E:.4g} + {law.A:.4g}/N^{law.alpha} + {law.B:.4g}/D^{law.beta} "
                  f"(rmse {result.rmse():.4f} nats) -> {result.out}")
    console.print(f"this plan's loss: {result.predicted_plan_loss:.3f} calibrated vs "
                  f"{result.default_plan_loss:.3f} with the published law; remake the plan with "
                  f"`oneday plan ... --calibration {result.out}`")
