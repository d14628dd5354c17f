"""`oneday ui` and `oneday compare`: thin wrappers over `oneday.compare` (start_ui / compare_runs).

Only argument parsing and drawing (rich) live here; the library is imported when a command runs, so
`oneday --help` stays fast and never imports mlflow or matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from oneday.console import console, err_console, guard
from oneday.formats import human_count, human_seconds, number_or

HELP = ("Start the MLflow UI (lean: one worker, no job runner) on the runs' store and print the links to the "
        "experiment and to a side-by-side view of the latest runs.")
COMPARE_HELP = ("Compare runs in the terminal: budget, params, tokens, val loss, bpb, predicted vs achieved, MFU, "
                "tok/s; sortable, --json, --plot.")

_URI_HELP = "MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here, as `oneday run` uses)."


@guard
def ui(
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on.")] = 5000,
    host: Annotated[str, typer.Option(
        "--host", help="Interface to bind (0.0.0.0: every interface; MLflow then accepts localhost and private "
                       "IPs unless MLFLOW_SERVER_ALLOWED_HOSTS says more).")] = "127.0.0.1",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help=_URI_HELP)] = None,
    experiment: Annotated[str | None, typer.Option(
        "--experiment", help="Experiment to link (default: the one with the newest oneday run).")] = None,
    last: Annotated[int, typer.Option("--last", min=1, help="How many of the newest runs the compare link shows.")
                    ] = 5,
) -> None:
    """Serve the MLflow UI on the local store until Ctrl-C (for an MLflow server: print its links)."""
    from oneday.compare.ui import server_failure, server_links, start_ui
    from oneday.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        links = server_links(uri, experiment=experiment, last=last)
        console.print(f"MLflow UI    {links.url}  (a server: nothing started)", highlight=False, soft_wrap=True)
        _print_links(links)
        return
    with err_console.status("starting the MLflow UI ..."):
        server = start_ui(tracking_uri, host=host, port=port, experiment=experiment, last=last)
    console.print(f"MLflow UI    {server.url}  (store {server.tracking_uri}; answering after "
                  f"{server.startup_seconds:.1f} s)", highlight=False, soft_wrap=True)
    _print_links(server)
    console.print("Ctrl-C stops it.")
    code = server.serve_forever()
    if code not in (0, None):
        from oneday.errors import UserError

        raise UserError(server_failure(f"the MLflow server stopped by itself (exit code {code})", server.log_path))
    err_console.print("MLflow UI stopped")

def _print_links(server: Any) -> None:
    if server.experiment_url:
        console.print(f"experiment   {server.experiment_url}  ({server.experiment})", highlight=False, soft_wrap=True)
        count = len(server.run_names)
        console.print(f"compare      {server.compare_url}  (the latest {count} run{'s' if count != 1 else ''}: "
                      f"{', '.join(server.run_names)})", highlight=False, soft_wrap=True)
        console.print(f"train/loss   {server.metric_url}", highlight=False, soft_wrap=True)
    elif server.note:
        console.print(f"[yellow]{server.note}[/yellow]", highlight=False, soft_wrap=True)


def _count(value: float | None) -> str:
    return "" if value is None else human_count(value)


def _hours(value: float | None) -> str:
    return "" if value is None else human_seconds(round(value * 3600, 3))


def comparison_table(comparison: Any) -> Table:
    """The rich table of a `Comparison` (blank cells for what a run did not log); the best val loss in green."""
    best = comparison.best()
    table = Table(title=f"{comparison.experiment}: {len(comparison.rows)} run(s), sorted by {comparison.sort}",
                  title_justify="left", box=None, padding=(0, 1), pad_edge=False)
    table.add_column("run", min_width=10, overflow="fold")
    for header in ("budget", "N", "tokens", "pred\ntokens", "val\nloss", "pred\nloss", "gap", "bpb", "MFU", "tok/s"):
        table.add_column(header, justify="right", no_wrap=True, style="dim" if header.startswith("pred") else None)
    # `oneday eval` scores: one column per benchmark task any row has, its headline metric (acc_norm, acc, ...)
    tasks = sorted({key.split("/", 1)[0] for row in comparison.rows for key in row.benchmarks})
    for task in tasks:
        table.add_column(task.replace("_", "\n", 1), justify="right", no_wrap=True)
    for row in comparison.rows:
        style = "bold green" if best is not None and row.run_id == best.run_id else None
        scores = [row.benchmark(task) for task in tasks]
        cells = ["" if score is None else f"{score[1]:.3f}" for score in scores]
        name = row.name if row.kind == "run" else f"{row.name} ({row.kind})"
        if row.status and row.status not in ("FINISHED",):
            name += f" [{row.status.lower()}]"
        table.add_row(
            name, _hours(row.budget_hours), _count(row.params_scaling), _count(row.tokens),
            _count(row.predicted_tokens), number_or(row.val_loss, ".3f", ""), number_or(row.predicted_loss, ".3f", ""),
            number_or(row.gap_loss, "+.3f", ""), number_or(row.val_bpb, ".3f", ""),
            "" if row.mfu is None else f"{100 * row.mfu:.1f}%", _count(row.tokens_per_s), *cells, style=style,
        )
    return table


@guard
def compare(
    experiment: Annotated[str | None, typer.Option(
        "--experiment", help="Experiment name (default: the one with the newest oneday run).")] = None,
    last: Annotated[int, typer.Option("--last", min=1, help="Compare the newest N runs.")] = 10,
    sort: Annotated[str, typer.Option(
        "--sort", help="val_loss, bpb, budget, params, tokens, predicted, gap, mfu, tok_s, start, name or lr; "
                       "a leading - reverses.")] = "val_loss",
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help=_URI_HELP)] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="Run kinds to include: run (default), tune-study, tune-trial, calibration, probe, or all.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON on stdout, nothing else.")
                       ] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw val loss vs budget (or --plot-x tokens) with the predictions beside, to this PNG.")
    ] = None,
    plot_x: Annotated[str, typer.Option("--plot-x", help="x axis of --plot: budget or tokens.")] = "budget",
) -> None:
    """Compare the latest runs of an experiment: which did best, with what settings, how far from the plan."""
    from oneday.compare.runs import compare_runs

    kinds: tuple[str, ...] | None = ("run",)
    if kind:
        kinds = None if "all" in kind else tuple(kind)
    comparison = compare_runs(tracking_uri, experiment=experiment, last=last, sort=sort, kinds=kinds, plot=plot,
                              plot_x=plot_x)
    if as_json:
        typer.echo(comparison.to_json(), nl=False)
        return
    # Piped or redirected: the whole table, however wide (a terminal gets its own width).
    out = console if console.is_terminal else Console(width=200)
    out.print(comparison_table(comparison))
    if comparison.differing_params:
        keys = list(comparison.differing_params)
        shown = ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        console.print(f"differing params: {shown}", highlight=False, soft_wrap=True)
    if comparison.plot:
        console.print(f"plot: {comparison.plot}", highlight=False)
