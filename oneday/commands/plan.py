"""`oneday plan`: a thin wrapper over `oneday.planner.make.make_plan`, and `--explain` of a saved plan.

Nothing heavy is imported at module level (the CLI must start without torch). The rich table, summary and
reasons are drawn here from `oneday.planner.explain`, which `--explain` shares.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from oneday.console import RichProgress, console, err_console, guard
from oneday.errors import UserError

TABLE_WIDTH = 110
HELP = "Measure this machine and choose the best model, batch, LR and schedule for a time budget."


def _command_line(**options: Any) -> str:
    """The command as it was given (normalized), for the plan's provenance."""
    words = ["oneday", "plan"]
    for flag, value in options.items():
        if value is None or value is False:
            continue
        words.append(f"--{flag.replace('_', '-')}")
        if value is not True:
            words.append(f"{value:g}" if isinstance(value, float) else str(value))
    return shlex.join(words)


def _candidates_table(plan: Any) -> Table:
    from oneday.planner.explain import COLUMNS, candidate_rows

    budget = plan.budget_seconds()
    title = f"{plan.name}: candidates for {budget / 3600:.3g} h on {plan.hardware.name} ({plan.hardware.device})"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for i, column in enumerate(COLUMNS):
        table.add_column(column, justify="left" if i in (0, 1, 6) else "right", no_wrap=True)
    for row in candidate_rows(plan):
        style = "bold green" if row.chosen else (None if row.fits else "dim")
        table.add_row(*row.cells, style=style)
    return table


def show_plan(plan: Any, *, out: Path | None, target: Any = None) -> None:
    """Print the candidates table, the summary, where the plan is, and the reasons."""
    from oneday.planner.explain import summary_lines

    target = target or console
    # Not a terminal (piped, captured): draw the table whole rather than squeezed into 80 columns.
    wide = target if target.is_terminal else Console(width=max(target.width, TABLE_WIDTH), stderr=target.stderr)
    wide.print(_candidates_table(plan))
    width = max(len(label) for label, _ in summary_lines(plan))
    for label, text in summary_lines(plan):
        target.print(f"[bold]{label:<{width}}[/bold]  {text}", highlight=False, soft_wrap=True)
    if out is not None:
        target.print(f"[bold]{'plan':<{width}}[/bold]  written to {out}", highlight=False, soft_wrap=True)
    if plan.reasons:
        target.print("\n[bold]why[/bold]")
        for reason in plan.reasons:
            target.print(f"  • {reason}", highlight=False, soft_wrap=True)
    for note in plan.hardware.notes:
        target.print(f"  • [dim]{note}[/dim]", highlight=False, soft_wrap=True)


@guard
def plan(
    hours: Annotated[float | None, typer.Option("--hours", help="Wall-clock budget in hours.")] = None,
    minutes: Annotated[float | None, typer.Option("--minutes", help="Wall-clock budget in minutes.")] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", help="Corpus: a file, folder, glob, builtin:pydoc, or a hub dataset (hf:NAME)."),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option("--tokenizer", help="A tokenizer folder or hub name (default: train a BPE).")
    ] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary of the trained BPE.")] = 8192,
    text_column: Annotated[
        str | None, typer.Option("--text-column", help="Text column of structured files.")
    ] = None,
    config: Annotated[str | None, typer.Option("--config", help="Hub dataset configuration.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Hub dataset split (default: train).")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Take at most this many tokens of the corpus (streamed).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cuda or cpu.")] = "auto",
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Sequence length (default: 1024 on GPUs, 256 on CPUs).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where to write the plan.")] = Path("plan.json"),
    name: Annotated[
        str | None, typer.Option("--name", help="Plan name (default: <data>-<budget>-<size>).")
    ] = None,
    probe_seconds: Annotated[
        float | None,
        typer.Option("--probe-seconds", help="Time for measuring (default: 2% of the budget, at most 3 min)."),
    ] = None,
    cache_dir: Annotated[
        Path | None, typer.Option("--cache-dir", help="Data cache (default: $ONEDAY_CACHE or ~/.cache/oneday).")
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option("--calibration", help="A calibrated loss law (JSON) to predict with.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON on stdout (and nothing else).")
    ] = False,
    explain: Annotated[
        Path | None,
        typer.Option("--explain", help="Show the table, summary and reasons of a saved plan; measure nothing."),
    ] = None,
    what_if: Annotated[
        str | None,
        typer.Option("--what-if", help="Plan for GPUs this machine lacks, from the datasheet table: h200, h100, "
                     "a100-80gb, rtx4090, l4, ...; h100x8 for eight. Nothing is probed."),
    ] = None,
    data_tokens: Annotated[
        str | None,
        typer.Option("--data-tokens", help="With --what-if: a corpus not yet downloaded, this many training "
                     "tokens (10B, 100M); the vocabulary is --vocab-size."),
    ] = None,
    throughput: Annotated[
        Path | None,
        typer.Option("--throughput", help="With --what-if: use the throughput measured on the real machine "
                     "(its plan.json, or a throughput JSON) instead of the assumed one."),
    ] = None,
    gpus: Annotated[
        int, typer.Option("--gpus", help="Plan for this many GPUs, data parallel (run under torchrun).")
    ] = 1,
    compile_: Annotated[
        bool | None,
        typer.Option("--compile/--no-compile", help="torch.compile on the GPU whatever the budget, or never "
                     "(default: from a 30 min budget on)."),
    ] = None,
    self_calibrate: Annotated[
        bool, typer.Option("--self-calibrate/--no-self-calibrate", help="From a 1 h budget, fit the loss law to "
                           "this data with runs of the plan's recipe (at most 5% of the budget) and plan again.")
    ] = True,
) -> None:
    """Measure this machine and write plan.json: model, batch, LR, schedule and tokens for the budget."""
    from oneday.plan import load_plan, save_plan

    if explain is not None:
        given = [flag for flag, value in (("--hours", hours), ("--minutes", minutes), ("--data", data))
                 if value is not None]
        if given:
            raise UserError(f"--explain shows a saved plan; it takes no {', '.join(given)}")
        saved = load_plan(explain)
        if json_out:
            typer.echo(saved.to_json(), nl=False)
        else:
            show_plan(saved, out=None)
        return

    if (hours is None) == (minutes is None):
        raise UserError("give the budget as exactly one of --hours or --minutes" + (
            "" if hours is None else " (not both)"))
    flag, value = ("--hours", hours) if hours is not None else ("--minutes", minutes)
    assert value is not None
    if not value > 0:
        raise UserError(f"{flag}: the budget must be more than 0, got {value:g}")
    budget_hours = value if hours is not None else value / 60.0
    if gpus < 1:
        raise UserError(f"--gpus: must be at least 1, got {gpus}")
    if what_if is None:
        extra = [flag for flag, value in (("--data-tokens", data_tokens), ("--throughput", throughput))
                 if value is not None]
        if extra:
            raise UserError(f"{' and '.join(extra)}: only with --what-if (plan for hardware this machine lacks)")
    elif device != "auto":
        raise UserError("--what-if plans for the GPU it names; it takes no --device")
    if data is None and not (what_if is not None and data_tokens is not None):
        raise UserError("--data is required: a file, folder, glob, builtin:pydoc or a hub dataset")

    from oneday.paths import check_output_path
    from oneday.planner.make import make_plan
    from oneday.planner.policy import MAX_HOURS

    if budget_hours > MAX_HOURS:
        raise UserError(f"{flag}: {value:g} is more than the supported maximum of {MAX_HOURS:,.0f} hours")
    out = check_output_path(out)  # fail fast: before any probing or data preparation
    command = _command_line(
        hours=hours, minutes=minutes, data=data, tokenizer=tokenizer,
        vocab_size=vocab_size if vocab_size != 8192 else None, text_column=text_column, config=config, split=split,
        max_tokens=max_tokens, device=device if device != "auto" else None, seq_len=seq_len, out=out, name=name,
        probe_seconds=probe_seconds, cache_dir=cache_dir, calibration=calibration, json=json_out,
        what_if=what_if, data_tokens=data_tokens, throughput=throughput, gpus=gpus if gpus != 1 else None,
        compile=compile_ or None, no_compile=compile_ is False or None,
    )
    if what_if is not None:
        from oneday.planner.what_if import parse_token_count, what_if_plan

        made = what_if_plan(
            what_if=what_if, hours=budget_hours, data=data,
            data_tokens=parse_token_count(data_tokens) if data_tokens is not None else None, tokenizer=tokenizer,
            vocab_size=vocab_size, text_column=text_column, config=config, split=split, max_tokens=max_tokens,
            seq_len=seq_len, name=name, probe_seconds=probe_seconds,
            cache_dir=cache_dir, calibration=str(calibration) if calibration is not None else None,
            throughput=throughput, gpus=gpus, compile=compile_, command=command, progress=RichProgress(),
        )
    else:
        made = make_plan(
            hours=budget_hours, data=data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column,
            config=config, split=split, max_tokens=max_tokens, device=device,
            seq_len=seq_len, name=name, probe_seconds=probe_seconds, cache_dir=cache_dir,
            calibration=str(calibration) if calibration is not None else None, command=command, gpus=gpus,
            compile=compile_, auto_calibrate=self_calibrate, progress=RichProgress(),
        )
    saved_to = save_plan(made, out)
    if json_out:
        typer.echo(made.to_json(), nl=False)
        err_console.print(f"plan written to {saved_to}", highlight=False)
    else:
        show_plan(made, out=saved_to)
