"""The data a plan was made for: its cache entry, checked by the content key, prepared again when missing.

An entry that is there but cannot be used (incomplete, a token file whose checksum changed, an older layout) is
prepared again too, with a warning: oneday wrote it, and preparing it again under the same key gives the data the
plan was made for.

A plan records where its prepared data lives (`data.path`), the content key of that entry, and how it was
asked for (`data.spec`, tokenizer, text column), so a run or a study on another machine, or after the cache was
cleared, can prepare the same data again. Different data under the same path, or a source that changed since
(a new key), is refused: the plan's sizes and predictions were made for the data it names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from oneday.data.prepare import PreparedData, load_prepared, prepare_data
from oneday.errors import UserError, first_line
from oneday.plan import DataInfo
from oneday.progress import Progress

log = logging.getLogger(__name__)


def load_plan_data(info: DataInfo, *, progress: Progress | None = None,
                   clock: Callable[[], float] = time.monotonic) -> tuple[PreparedData, float]:
    """(the plan's prepared data, seconds spent preparing it again: 0 when the cache entry was there)."""
    try:
        data = load_prepared(info.path)
    except (UserError, OSError, ValueError) as exc:  # missing, incomplete, changed, unreadable: prepare it again
        reason = first_line(exc)
    else:
        return _checked(data, info), 0.0
    if not info.spec:
        raise UserError(
            f"data: the prepared data at {info.path} cannot be read ({reason}), and the plan does not say "
            "how it was made; prepare it with `oneday data prepare --data ...` and make a new plan"
        )
    log.warning("prepared data at %s cannot be used (%s); preparing %s again", info.path, reason, info.spec)
    started = clock()
    try:
        data = prepare_data(info.spec, tokenizer=info.tokenizer_spec, vocab_size=info.vocab_size,
                            text_column=info.text_column, config=info.config, split=info.split,
                            max_tokens=info.max_tokens, cache_dir=_cache_root(info.path), progress=progress)
    except UserError as exc:
        raise UserError(
            f"data: {info.path} cannot be used and preparing {info.spec} again failed ({exc}); "
            f"prepare it with `oneday data prepare --data {info.spec}` and make a new plan"
        ) from None
    if data.key != info.key:
        raise UserError(
            f"data: {info.path} cannot be used, and preparing {info.spec} again gave different data "
            f"(key {data.key}, the plan has {info.key}); the source or tokenizer changed: run "
            f"`oneday data prepare --data {info.spec}` and make a new plan"
        )
    seconds = clock() - started
    log.info("prepared %s again in %.1f s", info.spec, seconds)
    return data, seconds


def capped_corpus_note(data: PreparedData, *, planned_tokens: float) -> str | None:
    """A sentence for the plan's reasons when `--max-tokens` stopped preparation before the corpus ended: the
    whole corpus's tokens estimated from the prepared sample (its bytes per token × the source's bytes), and
    what the plan's tokens are of it. None when the corpus was read whole."""
    meta = data.metadata()
    if not meta.get("capped"):
        return None
    cap = meta["settings"].get("max_tokens")
    taken = data.train_tokens + data.val_tokens
    head = (f"--max-tokens {cap:,} took the first {taken:,} tokens of {data.source}, "
            f"{data.bytes_per_token():.2f} bytes/token")
    source_bytes = meta.get("source_bytes")
    if not source_bytes or meta.get("files_per_kind", {}).get("parquet"):
        return head + ("; the whole corpus's size is not known before reading it (a hub split or compressed "
                       "files), so the plan counts only these as unique tokens.")
    estimate = source_bytes / data.bytes_per_token()
    return (head + f"; the whole corpus ({source_bytes / 1e9:.2f} GB) is ~{estimate:,.0f} tokens at that "
            f"rate (estimated from this sample, not tokenized), and the plan's {planned_tokens:,.0f} tokens "
            f"would be {planned_tokens / estimate:.2f} epochs of it against {planned_tokens / data.train_tokens:.2f} "
            "of what was prepared: " + ("prepare more (a larger --max-tokens) to train on fresh data."
                                        if planned_tokens > data.train_tokens else "the cap costs nothing."))


def _checked(data: PreparedData, info: DataInfo) -> PreparedData:
    if data.key != info.key:
        raise UserError(f"data: {info.path} holds data with key {data.key}, but the plan was made for {info.key}; "
                        "make a new plan for this data")
    return data


def _cache_root(data_path: str) -> Path | None:
    """The cache folder that `data_path` lives in, if it follows `<cache>/data/<key>`; else None (default)."""
    path = Path(data_path)
    return path.parent.parent if path.parent.name == "data" else None


__all__ = ["capped_corpus_note", "load_plan_data"]
