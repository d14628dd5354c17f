"""`oneday data prepare`: tokenize a corpus into cached token files."""

from __future__ import annotations

import typer

from oneday.console import guard
from oneday.errors import NotBuiltError

app = typer.Typer(help="Prepare data: read a corpus, train or load a tokenizer, write cached token files.",
                  no_args_is_help=True)


@app.command("prepare")
@guard
def prepare() -> None:
    """Tokenize a corpus into cached train/validation token files."""
    raise NotBuiltError("being built")
