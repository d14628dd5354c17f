"""The `oneday` command line: thin wrappers that parse arguments and call one library function each.

Importing this module must stay cheap: no torch, transformers, datasets or mlflow at import time
(each command imports what it needs when it runs).
"""

from __future__ import annotations

from typing import Annotated

import typer

from oneday import __version__
from oneday.commands import compare as compare_commands
from oneday.commands import data as data_commands
from oneday.commands import plan as plan_commands
from oneday.commands import run as run_commands
from oneday.commands import tune as tune_commands
from oneday.console import console, setup_logging, state

app = typer.Typer(
    name="oneday",
    help="The best language model you can train on this machine in the time you have.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"oneday {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Plan, train, tune and compare language models on a wall-clock budget."""
    state["debug"] = debug
    setup_logging(debug=debug)


app.command("plan", help=plan_commands.HELP)(plan_commands.plan)
app.command("run", help=run_commands.HELP)(run_commands.run)
app.command("sample", help=run_commands.SAMPLE_HELP)(run_commands.sample)
app.command("tune", help=tune_commands.HELP)(tune_commands.tune)
app.add_typer(data_commands.app, name="data")
app.command("ui", help=compare_commands.HELP)(compare_commands.ui)
app.command("compare", help=compare_commands.COMPARE_HELP)(compare_commands.compare)


def main() -> None:
    app()
