"""`oneday data prepare`: tokenize a corpus into cached token files.

Thin: parse options, call `oneday.data.prepare.prepare_data`, print a table (or JSON). The library (and
with it datasets/tokenizers/transformers) is imported when the command runs, so `oneday --help` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from oneday.console import console, guard

app = typer.Typer(help="Prepare data: read a corpus, train or load a tokenizer, write cached token files.",
                  no_args_is_help=True)

SPEC_HELP = ("A file (.txt .raw .md .jsonl .json .parquet .csv), a directory (searched recursively), a glob "
             "('data/*.txt'), builtin:pydoc (Python's bundled docs, offline), or a Hugging Face dataset "
             "name (optionally hf:NAME; needs the hub).")


@app.command("prepare")
@guard
def prepare(
    data: Annotated[str, typer.Option("--data", help=SPEC_HELP, show_default=False)],
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="A local tokenizer directory or a hub tokenizer name; default: train a byte-level "
                            "BPE on the data.")] = None,
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary of the trained tokenizer.")] = 8192,
    text_column: Annotated[str | None, typer.Option(
        "--text-column", help="Column holding the text in jsonl/json/parquet/csv files or hub datasets "
                              "(default: text/content/story/body/document..., else the only string column).")
    ] = None,
    config: Annotated[str | None, typer.Option("--config", help="Hub dataset configuration.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Hub dataset split (default: train).")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", help="Take at most this many tokens: the first documents up to it; the source is read "
                             "no further (a hub split is streamed, never downloaded whole).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Cache directory (default: $ONEDAY_CACHE, else ~/.cache/oneday).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the metadata as JSON on stdout, nothing else.")
                       ] = False,
) -> None:
    """Tokenize a corpus into cached train/validation token files (a second run with the same input is free)."""
    from oneday.console import RichProgress
    from oneday.data.prepare import prepare_data

    started = time.perf_counter()
    prepared = prepare_data(data, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column,
                            config=config, split=split, max_tokens=max_tokens, cache_dir=cache_dir,
                            progress=RichProgress())
    seconds = time.perf_counter() - started
    meta = prepared.metadata()
    meta["source"] = prepared.source
    meta["directory"] = str(prepared.directory)
    meta["tokenizer_dir"] = str(prepared.tokenizer_dir)
    meta["from_cache"] = prepared.from_cache
    if as_json:
        typer.echo(json.dumps(meta, indent=2))
        return
    _print_table(meta, seconds)


def _print_table(meta: dict[str, Any], seconds: float) -> None:
    from rich.table import Table

    kinds = ", ".join(f"{n} .{k}" if k not in ("builtin", "hub") else k
                      for k, n in sorted(meta["files_per_kind"].items(), key=lambda kv: (-kv[1], kv[0])))
    table = Table(title="prepared data", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("source", meta["source"]),
        ("files", kinds or "-"),
        ("documents", f"{meta['train_documents']:,} train / {meta['val_documents']:,} val"),
        ("tokens", f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val"),
        ("bytes/token", f"{meta['bytes_per_token']:.3f} (val {meta['val_bytes_per_token']:.3f})"),
        ("vocab", f"{meta['vocab_size']:,} ({meta['tokenizer']['origin']}), end-of-text id {meta['eot_id']}"),
        ("dtype", meta["dtype"]),
        ("where", meta["directory"]),
        ("cache", "hit: nothing prepared" if meta["from_cache"] else "fresh"),
        ("time", f"{seconds:.1f} s" + ("" if meta["from_cache"] else
                                       f" (tokenizing {meta['seconds']['tokenize']:.1f} s)")),
        ("tokens/s", f"{meta['tokens_per_second']:,}" + (" (when prepared)" if meta["from_cache"] else "")),
    ]
    if meta.get("invalid_bytes_replaced"):
        rows.append(("replaced", f"{meta['invalid_bytes_replaced']:,} invalid UTF-8 bytes"))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
