"""The `oneday` command line: thin wrappers that parse arguments and call one library function each.

Importing this module must stay cheap: no torch, transformers, datasets or mlflow at import time
(each command imports what it needs when it runs).
"""

from __future__ import annotations

import signal
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer import _click
from typer.core import TyperGroup

from oneday import __version__
from oneday.commands import compare as compare_commands
from oneday.commands import data as data_commands
from oneday.commands import eval as eval_commands
from oneday.commands import plan as plan_commands
from oneday.commands import run as run_commands
from oneday.commands import tune as tune_commands
from oneday.console import console, err_console, setup_logging, state
from oneday.signals import raise_interrupt


class _OneLineErrors(TyperGroup):
    """Usage errors (`--minutes abc`, `--threads 0`, an unknown option) as one line and exit code 2, like every
    other user error, instead of click's usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _click.exceptions.NoArgsIsHelpError:
            code = 2  # `oneday` alone: the help is already printed
        except _click.exceptions.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "oneday"
            message = " ".join(exc.format_message().split())
            err_console.print(f"[bold red]error:[/bold red] {escape(message)} (see `{escape(where)} --help`)",
                              highlight=False, soft_wrap=True)
            code = exc.exit_code
        except typer.Abort:
            err_console.print("[yellow]interrupted[/yellow]")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
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
app.command("eval", help=eval_commands.HELP)(eval_commands.eval_run)


def main() -> None:
    signal.signal(signal.SIGTERM, raise_interrupt)  # `kill` unwinds like Ctrl-C: temporary files are cleaned up
    app()
