"""Which runs to compare, their rows, and `compare_runs`: the library side of `oneday compare`.

Which runs. A run is oneday's when it has an `oneday.*` tag (or, from an older oneday without tags, the
`train.budget_seconds` param); its kind is the `oneday.kind` tag (`run` when missing). The comparison takes
the newest `last` runs of the wanted kinds from one experiment (the flag, else the experiment of the newest
oneday run); values a run lacks (older oneday, a run still going) stay blank. No rich here (the command
draws), and nothing heavy at import: mlflow and matplotlib are imported only on the paths that need them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from oneday.compare.readers import RunRecord, open_reader
from oneday.errors import UserError, first_line
from oneday.formats import finite_or_none
from oneday.tracking import names
from oneday.tracking.plots import plot_comparison
from oneday.tracking.store import resolve_tracking_uri

DEFAULT_LAST = 10
DEFAULT_SORT = "val_loss"

# Params that differ between any two runs without saying anything about the runs (left out of "differing").
_NOISY_PARAMS = frozenset({
    "provenance.created", "provenance.command", "provenance.probe_seconds", "hardware.free_memory_bytes",
})


@dataclass(frozen=True)
class RunRow:
    """One row of the comparison; a value the run did not log is None (shown blank)."""

    run_id: str
    experiment_id: str
    name: str
    kind: str
    status: str
    start_time: str | None  # ISO 8601, UTC
    budget_hours: float | None
    params_scaling: int | None  # N: non-embedding + LM head
    params_total: int | None
    n_layer: int | None
    d_model: int | None
    lr: float | None
    tokens: float | None
    predicted_tokens: float | None
    val_loss: float | None
    val_bpb: float | None
    predicted_loss: float | None
    gap_loss: float | None
    gap_tokens: float | None
    mfu: float | None
    tokens_per_s: float | None
    plan_hash: str | None = None
    device: str | None = None
    version: str | None = None
    parent_run_id: str | None = None
    benchmarks: dict[str, float] = field(default_factory=dict)  # "<task>/<metric>" from `oneday eval`

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def benchmark(self, task: str) -> tuple[str, float] | None:
        """The headline score of a benchmark task (acc_norm, else acc, else perplexity) and its metric."""
        for metric in ("acc_norm", "acc", "perplexity"):
            value = self.benchmarks.get(f"{task}/{metric}")
            if value is not None:
                return metric, value
        return None


def _int(value: Any) -> int | None:
    number = finite_or_none(value)
    return None if number is None else round(number)


def row_from_record(record: RunRecord) -> RunRow:
    """The comparison row of a run; metric first, then the plan's param, for what both carry."""
    p, m, t = record.params, record.metrics, record.tags
    budget = finite_or_none(p.get(names.PARAM_BUDGET_HOURS))
    if budget is None and (seconds := finite_or_none(p.get(names.PARAM_BUDGET_SECONDS))) is not None:
        budget = seconds / 3600
    val_loss = finite_or_none(m.get(names.METRIC_VAL_LOSS))
    predicted_loss = finite_or_none(m.get(names.METRIC_PREDICTED_LOSS))
    if predicted_loss is None:
        predicted_loss = finite_or_none(p.get(names.PARAM_PREDICTED_LOSS))
    predicted_tokens = finite_or_none(m.get(names.METRIC_PREDICTED_TOKENS))
    if predicted_tokens is None:
        predicted_tokens = finite_or_none(p.get(names.PARAM_PREDICTED_TOKENS))
    tokens = finite_or_none(m.get(names.METRIC_TOKENS))
    gap_loss = finite_or_none(m.get(names.METRIC_GAP_LOSS))
    if gap_loss is None and val_loss is not None and predicted_loss is not None:
        gap_loss = val_loss - predicted_loss
    gap_tokens = finite_or_none(m.get(names.METRIC_GAP_TOKENS))
    if gap_tokens is None and tokens is not None and predicted_tokens is not None:
        gap_tokens = tokens - predicted_tokens
    start = None
    if record.start_time_ms:
        start = datetime.fromtimestamp(record.start_time_ms / 1000, timezone.utc).isoformat(timespec="seconds")
    return RunRow(
        run_id=record.run_id, experiment_id=record.experiment_id, name=record.name or record.run_id[:8],
        kind=record.kind, status=record.status, start_time=start, budget_hours=budget,
        params_scaling=_int(p.get(names.PARAM_PARAMS_SCALING)), params_total=_int(p.get(names.PARAM_PARAMS_TOTAL)),
        n_layer=_int(p.get(names.PARAM_N_LAYER)), d_model=_int(p.get(names.PARAM_D_MODEL)),
        lr=finite_or_none(p.get(names.PARAM_LR)), tokens=tokens, predicted_tokens=predicted_tokens, val_loss=val_loss,
        val_bpb=finite_or_none(m.get(names.METRIC_VAL_BPB)), predicted_loss=predicted_loss, gap_loss=gap_loss,
        gap_tokens=gap_tokens, mfu=finite_or_none(m.get(names.METRIC_MFU)),
        tokens_per_s=finite_or_none(m.get(names.METRIC_TOKENS_PER_S)), plan_hash=t.get(names.TAG_PLAN_HASH),
        device=t.get(names.TAG_DEVICE), version=t.get(names.TAG_VERSION), parent_run_id=t.get(names.TAG_MLFLOW_PARENT),
        benchmarks={key[len(names.METRIC_EVAL_PREFIX):]: value for key, value in m.items()
                    if key.startswith(names.METRIC_EVAL_PREFIX) and not key.endswith("_stderr")
                    and finite_or_none(value) is not None},
    )


# --------------------------------------------------------------------------------------------------------
# Choosing runs


@dataclass(frozen=True)
class Selection:
    experiment_id: str
    experiment: str
    records: tuple[RunRecord, ...]
    other_runs: int  # runs of that experiment that are not oneday's or not of the wanted kinds (seen)


def _kinds(kinds: Iterable[str] | None) -> frozenset[str] | None:
    if kinds is None:
        return None
    wanted = frozenset(kinds)
    unknown = sorted(wanted - set(names.KINDS))
    if unknown:
        raise UserError(f"--kind: unknown kind {', '.join(unknown)} (one of: {', '.join(names.KINDS)}, all)")
    return wanted


def select_runs(reader: Any, *, experiment: str | None = None, last: int = DEFAULT_LAST,
                kinds: Iterable[str] | None = (names.KIND_RUN,)) -> Selection:
    """The newest `last` oneday runs of the wanted `kinds` (None: all) in `experiment` (None: the experiment of
    the newest such run). `UserError` when there are none, naming what the store holds instead."""
    if last < 1:
        raise UserError(f"--last: must be >= 1, got {last}")
    wanted = _kinds(kinds)
    kinds_text = "" if wanted is None else f" of kind {', '.join(sorted(wanted))}"

    def matches(record: RunRecord) -> bool:
        return record.is_oneday() and (wanted is None or record.kind in wanted)

    experiments = reader.experiments()
    by_id = dict(experiments)
    if experiment is not None:
        ids = [i for i, n in experiments if n == experiment] or [i for i, _ in experiments if i == experiment]
        if not ids:
            listing = ", ".join(sorted(by_id.values())) or "none"
            raise UserError(f"no experiment named {experiment!r} in the store (experiments there: {listing})")
        experiment_id = ids[0]
    else:
        newest = next((r for r in reader.runs(list(by_id)) if matches(r)), None)
        if newest is None:
            raise UserError(
                f"no oneday runs{kinds_text} in this store (experiments: "
                f"{', '.join(sorted(by_id.values())) or 'none'}); train one with `oneday run plan.json`"
            )
        experiment_id = newest.experiment_id
    chosen: list[RunRecord] = []
    others: dict[str, int] = {}  # runs passed over: "" = not oneday's, else their kind
    for record in reader.runs([experiment_id]):
        if matches(record):
            chosen.append(record)
            if len(chosen) >= last:
                break
        else:
            key = record.kind if record.is_oneday() else ""
            others[key] = others.get(key, 0) + 1
    name = by_id.get(experiment_id, experiment_id)
    if not chosen:
        some_oneday = any(others)  # oneday runs of other kinds are there
        raise UserError(f"experiment {name!r} holds no oneday runs{kinds_text if some_oneday else ''} "
                        f"({_others_text(others)})")
    return Selection(experiment_id=experiment_id, experiment=name, records=tuple(chosen),
                     other_runs=sum(others.values()))


def _others_text(others: Mapping[str, int]) -> str:
    if not others:
        return "it holds no runs"
    parts = []
    if others.get(""):
        n = others[""]
        parts.append(f"{n} run{'s' if n != 1 else ''} not made by oneday")
    for kind, n in sorted(others.items()):
        if kind:
            parts.append(f"{n} of kind {kind}")
    hint = "; --kind all shows every kind" if any(others) else ""
    return "it holds " + ", ".join(parts) + hint


# --------------------------------------------------------------------------------------------------------
# Sorting and the comparison


# key -> (RunRow field, descending by default)
SORT_KEYS: Mapping[str, tuple[str, bool]] = {
    "val_loss": ("val_loss", False),
    "bpb": ("val_bpb", False),
    "budget": ("budget_hours", False),
    "params": ("params_scaling", False),
    "tokens": ("tokens", True),
    "predicted": ("predicted_loss", False),
    "gap": ("gap_loss", False),
    "mfu": ("mfu", True),
    "tok_s": ("tokens_per_s", True),
    "start": ("start_time", True),
    "name": ("name", False),
    "lr": ("lr", False),
}
_SORT_ALIASES = {
    "loss": "val_loss", "val/loss": "val_loss", "val": "val_loss", "val/bpb": "bpb", "val_bpb": "bpb",
    "budget_hours": "budget", "hours": "budget", "n": "params", "size": "params", "tokens_per_s": "tok_s",
    "tok/s": "tok_s", "speed": "tok_s", "gap/loss": "gap", "time": "start", "newest": "start", "run": "name",
    "predicted/loss": "predicted",
}


def sort_rows(rows: Sequence[RunRow], key: str) -> list[RunRow]:
    """Rows sorted by `key` (see `SORT_KEYS`; a leading `-` reverses it); missing values last."""
    text = key.strip().lower()
    flip = text.startswith("-")
    text = _SORT_ALIASES.get(text.lstrip("-"), text.lstrip("-"))
    if text not in SORT_KEYS:
        raise UserError(f"--sort: unknown key {key!r} (one of: {', '.join(SORT_KEYS)}; prefix - to reverse)")
    attribute, descending = SORT_KEYS[text]
    descending ^= flip
    present = [r for r in rows if getattr(r, attribute) is not None]
    missing = [r for r in rows if getattr(r, attribute) is None]
    return sorted(present, key=lambda r: getattr(r, attribute), reverse=descending) + missing


def differing_params(records: Sequence[RunRecord]) -> dict[str, list[str | None]]:
    """Param keys with two or more different values among the runs that have them (noise such as the creation
    time left out), with the values in run order (None where a run lacks the key)."""
    if len(records) < 2:
        return {}
    keys = sorted({k for r in records for k in r.params} - _NOISY_PARAMS)
    out = {}
    for key in keys:
        values = [r.params.get(key) for r in records]
        if len({v for v in values if v is not None}) > 1:  # a run without the param (older oneday) is no difference
            out[key] = values
    return out


@dataclass(frozen=True)
class Comparison:
    tracking_uri: str
    experiment: str
    experiment_id: str
    sort: str
    rows: tuple[RunRow, ...]
    differing_params: Mapping[str, list[str | None]] = field(default_factory=dict)  # values in `rows` order
    other_runs: int = 0
    plot: str | None = None
    seconds: float = 0.0

    def best(self) -> RunRow | None:
        scored = [r for r in self.rows if r.val_loss is not None]
        return min(scored, key=lambda r: r.val_loss) if scored else None  # type: ignore[arg-type,return-value]

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        return {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "sort": self.sort,
            "best_run_id": best.run_id if best else None,
            "runs": [r.to_dict() for r in self.rows],
            "differing_params": dict(self.differing_params),
            "plot": self.plot,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


def compare_runs(
    tracking_uri: str | None = None,
    *,
    experiment: str | None = None,
    last: int = DEFAULT_LAST,
    sort: str = DEFAULT_SORT,
    kinds: Iterable[str] | None = (names.KIND_RUN,),
    plot: str | os.PathLike[str] | None = None,
    plot_x: str = "budget",
) -> Comparison:
    """The newest `last` oneday runs of an experiment as comparison rows, sorted by `sort`; with `plot`, also
    a PNG of val loss against budget (or tokens) with the planner's predictions beside the achieved values."""
    started = time.perf_counter()
    uri = resolve_tracking_uri(tracking_uri)
    if plot_x not in ("budget", "tokens"):
        raise UserError(f"--plot-x: must be budget or tokens, got {plot_x!r}")
    sort_rows([], sort)  # a bad key fails before any reading
    reader = open_reader(uri)
    try:
        selection = select_runs(reader, experiment=experiment, last=last, kinds=kinds)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read runs from {uri}: {first_line(exc)}") from None
    finally:
        reader.close()
    rows = sort_rows([row_from_record(r) for r in selection.records], sort)
    order = {row.run_id: i for i, row in enumerate(rows)}
    records = sorted(selection.records, key=lambda r: order[r.run_id])
    plot_path = None
    if plot is not None:
        plot_path = str(plot_comparison(rows, plot, x=plot_x, title=selection.experiment))
    return Comparison(
        tracking_uri=uri, experiment=selection.experiment, experiment_id=selection.experiment_id, sort=sort,
        rows=tuple(rows), differing_params=differing_params(records), other_runs=selection.other_runs,
        plot=plot_path, seconds=time.perf_counter() - started,
    )


__all__ = [
    "DEFAULT_LAST",
    "DEFAULT_SORT",
    "SORT_KEYS",
    "Comparison",
    "RunRow",
    "Selection",
    "compare_runs",
    "differing_params",
    "row_from_record",
    "select_runs",
    "sort_rows",
]
