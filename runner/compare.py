"""Compare oneday runs: read them back from MLflow, build the comparison, draw it, and serve the MLflow UI.

The library side of `oneday compare` and `oneday ui` (issue #6). No rich here (the command draws), and
nothing heavy at import: mlflow and matplotlib are imported only on the paths that need them.

Reading runs. Three readers give the same records (run id, name, status, start time, tags, params, latest
metrics), newest run first:

- `SqliteReader`: a `sqlite:///` store read directly with Python's `sqlite3`, read-only. `import mlflow` alone
  takes ~2.5 s on the CPU machines here (6+ s under load), more than the whole `oneday compare` may take, so
  the common case (the local store `oneday run` writes) skips it. The tables read (`experiments`, `runs`,
  `tags`, `params`, `latest_metrics`) are MLflow's SQL store schema since 1.x; the reader checks their columns
  first and falls back to the client when they differ. `latest_metrics` is what `MlflowClient` itself returns
  as a run's metrics, so both paths agree (tests/test_compare.py checks that they do).
- `ClientReader`: `MlflowClient.search_runs` (any store: http(s) servers with their auth, PostgreSQL, ...).
- `RestReader`: the REST API of a server `oneday ui` has just started (no auth, no mlflow import).

Which runs. A run is oneday's when it has an `oneday.*` tag (or, from an older oneday without tags, the
`train.budget_seconds` param); its kind is the `oneday.kind` tag (`run` when missing). The comparison takes
the newest `last` runs of the wanted kinds from one experiment (the flag, else the experiment of the newest
oneday run); values a run lacks (older oneday, a run still going) stay blank.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

from oneday import tracking_names as names
from oneday.errors import UserError

DEFAULT_LAST = 10
DEFAULT_SORT = "val_loss"
DEFAULT_UI_PORT = 5000
DEFAULT_UI_HOST = "127.0.0.1"
UI_READY_TIMEOUT_S = 90.0
PAGE_SIZE = 200

# Params that differ between any two runs without saying anything about the runs (left out of "differing").
_NOISY_PARAMS = frozenset({
    "provenance.created", "provenance.command", "provenance.probe_seconds", "hardware.free_memory_bytes",
})


# --------------------------------------------------------------------------------------------------------
# Records and rows


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as a reader returns it (metrics: the latest value of each)."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time_ms: int | None
    tags: Mapping[str, str]
    params: Mapping[str, str]
    metrics: Mapping[str, float]

    def is_oneday(self) -> bool:
        return any(k.startswith(names.TAG_PREFIX) for k in self.tags) or names.PARAM_BUDGET_SECONDS in self.params

    @property
    def kind(self) -> str:
        return self.tags.get(names.TAG_KIND) or names.KIND_RUN


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _float(value: Any) -> float | None:
    if value is None or value == "" or value == "None":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return None if number is None else round(number)


def row_from_record(record: RunRecord) -> RunRow:
    """The comparison row of a run; metric first, then the plan's param, for what both carry."""
    p, m, t = record.params, record.metrics, record.tags
    budget = _float(p.get(names.PARAM_BUDGET_HOURS))
    if budget is None and (seconds := _float(p.get(names.PARAM_BUDGET_SECONDS))) is not None:
        budget = seconds / 3600
    val_loss = _float(m.get(names.METRIC_VAL_LOSS))
    predicted_loss = _float(m.get(names.METRIC_PREDICTED_LOSS))
    if predicted_loss is None:
        predicted_loss = _float(p.get(names.PARAM_PREDICTED_LOSS))
    predicted_tokens = _float(m.get(names.METRIC_PREDICTED_TOKENS))
    if predicted_tokens is None:
        predicted_tokens = _float(p.get(names.PARAM_PREDICTED_TOKENS))
    tokens = _float(m.get(names.METRIC_TOKENS))
    gap_loss = _float(m.get(names.METRIC_GAP_LOSS))
    if gap_loss is None and val_loss is not None and predicted_loss is not None:
        gap_loss = val_loss - predicted_loss
    gap_tokens = _float(m.get(names.METRIC_GAP_TOKENS))
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
        lr=_float(p.get(names.PARAM_LR)), tokens=tokens, predicted_tokens=predicted_tokens, val_loss=val_loss,
        val_bpb=_float(m.get(names.METRIC_VAL_BPB)), predicted_loss=predicted_loss, gap_loss=gap_loss,
        gap_tokens=gap_tokens, mfu=_float(m.get(names.METRIC_MFU)),
        tokens_per_s=_float(m.get(names.METRIC_TOKENS_PER_S)), plan_hash=t.get(names.TAG_PLAN_HASH),
        device=t.get(names.TAG_DEVICE), version=t.get(names.TAG_VERSION), parent_run_id=t.get(names.TAG_MLFLOW_PARENT),
    )


# --------------------------------------------------------------------------------------------------------
# Readers


class SqliteReader:
    """A `sqlite:///` MLflow store read directly (read-only; see the module docstring)."""

    TABLES: Mapping[str, tuple[str, ...]] = {
        "experiments": ("experiment_id", "name", "lifecycle_stage"),
        "runs": ("run_uuid", "name", "status", "start_time", "lifecycle_stage", "experiment_id"),
        "tags": ("key", "value", "run_uuid"),
        "params": ("key", "value", "run_uuid"),
        "latest_metrics": ("key", "value", "step", "is_nan", "run_uuid"),
    }

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10.0)

    def check_schema(self) -> str | None:
        """None when the tables this reader uses look as expected; else what differs."""
        try:
            for table, columns in self.TABLES.items():
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                missing = [c for c in columns if c not in have]
                if missing:
                    return f"table {table} lacks {', '.join(missing)}" if have else f"no table {table}"
        except sqlite3.DatabaseError as exc:
            return str(exc)
        return None

    def close(self) -> None:
        self._db.close()

    def experiments(self) -> list[tuple[str, str]]:
        rows = self._db.execute(
            "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' ORDER BY experiment_id"
        ).fetchall()
        return [(str(i), n) for i, n in rows]

    def runs(self, experiment_ids: Sequence[str], *, page_size: int = PAGE_SIZE) -> Iterator[RunRecord]:
        if not experiment_ids:
            return
        marks = ",".join("?" * len(experiment_ids))
        offset = 0
        while True:
            page = self._db.execute(
                f"SELECT run_uuid, experiment_id, name, status, start_time FROM runs "
                f"WHERE lifecycle_stage = 'active' AND experiment_id IN ({marks}) "
                f"ORDER BY start_time DESC, run_uuid LIMIT ? OFFSET ?",
                [int(e) for e in experiment_ids] + [page_size, offset],
            ).fetchall()
            if not page:
                return
            ids = [r[0] for r in page]
            tags, params, metrics = self._details(ids)
            for run_id, exp_id, name, status, start in page:
                yield RunRecord(run_id=run_id, experiment_id=str(exp_id), name=name or "", status=status or "",
                                start_time_ms=start, tags=tags.get(run_id, {}), params=params.get(run_id, {}),
                                metrics=metrics.get(run_id, {}))
            if len(page) < page_size:
                return
            offset += page_size

    def _details(self, ids: list[str]) -> tuple[dict[str, dict[str, str]], ...]:
        marks = ",".join("?" * len(ids))
        tags: dict[str, dict[str, str]] = {}
        params: dict[str, dict[str, str]] = {}
        metrics: dict[str, dict[str, float]] = {}
        for run_id, key, value in self._db.execute(
                f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", ids):
            tags.setdefault(run_id, {})[key] = value
        for run_id, key, value in self._db.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})", ids):
            params.setdefault(run_id, {})[key] = value
        for run_id, key, value, is_nan in self._db.execute(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({marks})", ids):
            metrics.setdefault(run_id, {})[key] = math.nan if is_nan else float(value)
        return tags, params, metrics  # type: ignore[return-value]


class ClientReader:
    """Any MLflow store, through `MlflowClient` (imports mlflow: seconds)."""

    def __init__(self, uri: str) -> None:
        if urlparse(uri).scheme in ("http", "https"):
            # Bounded retries: a server that is down must not hold `oneday compare` for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self._client = MlflowClient(tracking_uri=uri)

    def close(self) -> None:
        pass

    def experiments(self) -> list[tuple[str, str]]:
        out, token = [], None
        while True:
            page = self._client.search_experiments(max_results=1000, page_token=token)
            out += [(e.experiment_id, e.name) for e in page]
            token = page.token
            if not token:
                return out

    def runs(self, experiment_ids: Sequence[str], *, page_size: int = PAGE_SIZE) -> Iterator[RunRecord]:
        if not experiment_ids:
            return
        token = None
        while True:
            page = self._client.search_runs(list(experiment_ids), max_results=page_size,
                                            order_by=["attributes.start_time DESC"], page_token=token)
            for run in page:
                info, data = run.info, run.data
                yield RunRecord(run_id=info.run_id, experiment_id=info.experiment_id, name=info.run_name or "",
                                status=info.status, start_time_ms=info.start_time, tags=dict(data.tags),
                                params=dict(data.params), metrics=dict(data.metrics))
            token = page.token
            if not token:
                return


class RestReader:
    """An MLflow server's REST API (`/api/2.0/mlflow/...`), for the server `oneday ui` started."""

    def __init__(self, base_url: str, *, timeout: float = 20.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def close(self) -> None:
        pass

    def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base_url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read().decode() or "{}")

    def experiments(self) -> list[tuple[str, str]]:
        out, token = [], None
        while True:
            body: dict[str, Any] = {"max_results": 1000, "view_type": "ACTIVE_ONLY"}
            if token:
                body["page_token"] = token
            reply = self._post("experiments/search", body)
            out += [(e["experiment_id"], e["name"]) for e in reply.get("experiments", [])]
            token = reply.get("next_page_token")
            if not token:
                return out

    def runs(self, experiment_ids: Sequence[str], *, page_size: int = PAGE_SIZE) -> Iterator[RunRecord]:
        if not experiment_ids:
            return
        token = None
        while True:
            body: dict[str, Any] = {"experiment_ids": list(experiment_ids), "max_results": page_size,
                                    "order_by": ["attributes.start_time DESC"], "run_view_type": "ACTIVE_ONLY"}
            if token:
                body["page_token"] = token
            reply = self._post("runs/search", body)
            for run in reply.get("runs", []):
                info, data = run.get("info", {}), run.get("data", {})
                start = info.get("start_time")
                yield RunRecord(
                    run_id=info.get("run_id") or info.get("run_uuid", ""), experiment_id=str(info.get("experiment_id")),
                    name=info.get("run_name", ""), status=info.get("status", ""),
                    start_time_ms=int(start) if start is not None else None,
                    tags={t["key"]: t.get("value", "") for t in data.get("tags", [])},
                    params={p["key"]: p.get("value", "") for p in data.get("params", [])},
                    metrics={x["key"]: _metric_value(x.get("value")) for x in data.get("metrics", [])},
                )
            token = reply.get("next_page_token")
            if not token:
                return


def _metric_value(value: Any) -> float:
    number = _float(value)
    return math.nan if number is None else number


def check_store(uri: str) -> Path | None:
    """Refuse a sqlite store that is missing, or is not an MLflow database (MLflow would create its tables in
    it, silently); its path, or None for other stores."""
    db = names.sqlite_path(uri)
    if db is None:
        return None
    if not db.is_file():
        hint = "" if db.parent.is_dir() else f" (nor does the folder {db.parent})"
        raise UserError(
            f"no MLflow store at {db}{hint}: nothing has been logged there. Train a run here first "
            f"(`oneday run plan.json`), or point at the runs' store with --tracking-uri or MLFLOW_TRACKING_URI"
        )
    try:
        reader = SqliteReader(db)
    except sqlite3.Error as exc:
        raise UserError(f"{db}: cannot open it ({exc})") from None
    try:
        problem = reader.check_schema()
    finally:
        reader.close()
    if problem is not None and ("no table" in problem or "not a database" in problem):
        raise UserError(f"{db}: not an MLflow store ({problem})")
    return db


def open_reader(uri: str) -> SqliteReader | ClientReader:
    """The fastest reader for `uri` (see the module docstring). `UserError` for a sqlite file that is missing
    or not MLflow's; a sqlite store whose tables differ from what `SqliteReader` knows goes through mlflow."""
    db = check_store(uri)
    if db is not None:
        reader = SqliteReader(db)
        if reader.check_schema() is None:
            return reader
        reader.close()
    try:
        return ClientReader(uri)
    except Exception as exc:  # MlflowException and friends: a store MLflow refuses
        raise UserError(f"cannot open the MLflow store {uri}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


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
    uri = names.resolve_tracking_uri(tracking_uri)
    if plot_x not in ("budget", "tokens"):
        raise UserError(f"--plot-x: must be budget or tokens, got {plot_x!r}")
    sort_rows([], sort)  # a bad key fails before any reading
    reader = open_reader(uri)
    try:
        selection = select_runs(reader, experiment=experiment, last=last, kinds=kinds)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read runs from {uri}: {_first_line(exc)}") from None
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


# --------------------------------------------------------------------------------------------------------
# The picture


def plot_comparison(rows: Sequence[RunRow], path: str | os.PathLike[str], *, x: str = "budget",
                    title: str = "") -> Path:
    """Val loss of each run (filled) against its budget in hours (or its tokens), and the planner's predicted
    loss (hollow, joined to the achieved one by a dotted line; at the predicted tokens when x is tokens).
    Agg canvas: no display, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    if not out.parent.is_dir():
        raise UserError(f"--plot: the folder {out.parent} does not exist")
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    xs_all: list[float] = []
    drawn = 0
    for row, color in zip(rows, colors, strict=True):
        if x == "budget":
            xa = xp = row.budget_hours
        else:
            xa, xp = row.tokens, row.predicted_tokens
        if xa is not None and row.val_loss is not None:
            ax.plot([xa], [row.val_loss], "o", color=color, markersize=8, label=row.name)
            ax.annotate(row.name, (xa, row.val_loss), textcoords="offset points", xytext=(6, 4), fontsize=8)
            xs_all.append(xa)
            drawn += 1
        if xp is not None and row.predicted_loss is not None:
            ax.plot([xp], [row.predicted_loss], "o", markerfacecolor="none", markeredgecolor=color, markersize=8)
            xs_all.append(xp)
            if xa is not None and row.val_loss is not None:
                ax.plot([xa, xp], [row.val_loss, row.predicted_loss], ":", color=color, linewidth=1)
    # legend entries for the two marker styles
    ax.plot([], [], "o", color="0.3", label="achieved val loss")
    ax.plot([], [], "o", markerfacecolor="none", markeredgecolor="0.3", label="predicted (plan)")
    positive = [v for v in xs_all if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("budget (hours)" if x == "budget" else "tokens")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{title}: val loss vs {'budget' if x == 'budget' else 'tokens'}" if title else "")
    if not drawn:
        ax.text(0.5, 0.5, "no run has a val loss yet", transform=ax.transAxes, ha="center", va="center")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(out, format="png")
    except OSError as exc:
        raise UserError(f"--plot: cannot write {out} ({exc.strerror or exc})") from None
    return out


# --------------------------------------------------------------------------------------------------------
# MLflow UI links (the routes the UI itself builds: mlflow/server/js, getCompareRunPageRoute and
# getMetricPageRoute)


def _js(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}"


def compare_url(base: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """The compare view: names, params (with "Show diff only"), metrics of the runs side by side."""
    experiments = _js(list(dict.fromkeys(experiment_ids)))
    return f"{base.rstrip('/')}/#/compare-runs?runs={_js(list(run_ids))}&experiments={experiments}"


def metric_url(base: str, run_ids: Sequence[str], experiment_ids: Sequence[str], metric: str = names.METRIC_TRAIN_LOSS,
               *, x_axis: str = "step") -> str:
    """The metric view: one curve per run (`x_axis` step, wall or relative)."""
    return (
        f"{base.rstrip('/')}/#/metric/?runs={_js(list(run_ids))}&metric={quote(_js(metric), safe='')}"
        f"&experiments={_js(list(dict.fromkeys(experiment_ids)))}&plot_metric_keys={quote(_js([metric]), safe='')}"
        f"&plot_layout={{}}&x_axis={x_axis}&y_axis_scale=linear&line_smoothness=1&show_point=false"
        f"&deselected_curves=[]&last_linear_y_axis_range=[]"
    )


# --------------------------------------------------------------------------------------------------------
# `oneday ui`: a lean MLflow server


def _bind_address(host: str, port: int) -> tuple[int, Any]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    return family, address


# Ports Chromium and Firefox refuse to open (ERR_UNSAFE_PORT; Chromium net/base/port_util.cc, the Fetch
# standard's "bad ports"): a UI there cannot be seen in a browser.
BROWSER_BLOCKED_PORTS = frozenset({
    1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95, 101, 102, 103, 104, 109,
    110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161, 179, 389, 427, 465, 512, 513, 514, 515, 526, 530,
    531, 532, 540, 548, 554, 556, 563, 587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190,
    5060, 5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080,
})


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as uvicorn binds)."""
    family, address = _bind_address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            if exc.errno == errno.EACCES:
                raise UserError(f"--port {port}: not allowed to listen there (ports below 1024 need root)") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"--host {host}: not an address of this machine") from None
            raise UserError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    return True


def free_port(host: str, start: int) -> int:
    """The first free port after `start` (within 200), else one the system picks."""
    for candidate in range(start + 1, min(start + 200, 65536)):
        if candidate not in BROWSER_BLOCKED_PORTS and port_free(host, candidate):
            return candidate
    family, address = _bind_address(host, 0)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(address)
        return int(sock.getsockname()[1])


def _connect_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line for line in text.splitlines() if line.strip() and "Warning" not in line and "warn(" not in line]
    return "\n".join(kept[-lines:])


@dataclass
class UiServer:
    """A running `mlflow server` (its own process group), with the links `oneday ui` prints."""

    url: str
    tracking_uri: str
    process: subprocess.Popen[bytes]
    log_path: Path
    startup_seconds: float
    experiment: str | None = None
    experiment_url: str | None = None
    compare_url: str | None = None
    metric_url: str | None = None
    run_names: tuple[str, ...] = ()
    note: str | None = None

    def __enter__(self) -> UiServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout`; the log is removed on a clean stop."""
        pgid = self.process.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        while time.monotonic() < deadline and process_group_alive(pgid):
            time.sleep(0.1)
        if process_group_alive(pgid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        if self.process.returncode in (0, -signal.SIGTERM):
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def serve_forever(self) -> int:
        """Wait until the server ends (its exit code) or this process gets Ctrl-C / SIGTERM / SIGHUP (then stop
        it and return 0). SIGINT is handled even where it was ignored at start (`oneday ui &` in a script)."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, _raise_interrupt)
        try:
            code = self.process.wait()
        except KeyboardInterrupt:
            self.stop()
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stop()
        return code


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs. Zombies do not count: an orphan the init process has
    not reaped yet is gone for every purpose here (it holds no port, no memory)."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[-1].split()
            if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def server_command(uri: str, *, host: str, port: int, artifacts: Path | None = None) -> list[str]:
    """`mlflow server` in the lean mode: one worker (job execution is switched off through the environment)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    if artifacts is not None:
        command += ["--artifacts-destination", str(artifacts)]
    return command


def start_ui(
    tracking_uri: str | None = None,
    *,
    host: str = DEFAULT_UI_HOST,
    port: int = DEFAULT_UI_PORT,
    experiment: str | None = None,
    last: int = 5,
    ready_timeout: float = UI_READY_TIMEOUT_S,
) -> UiServer:
    """Start the MLflow UI on the runs' store and wait until it answers HTTP. The returned server carries the
    links to the experiment and to a compare view of its newest `last` oneday runs (when there are any).

    `UserError`: a sqlite store that does not exist (nothing is created), an http(s) URI (already a server),
    a port in use (naming a free one), a server that exits or does not answer within `ready_timeout`."""
    uri = names.resolve_tracking_uri(tracking_uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        raise UserError(f"{uri} is an MLflow server already: open it in a browser (oneday ui serves a local store)")
    db = check_store(uri)
    if db is not None:
        uri = f"sqlite:///{db}"  # absolute, whatever folder the server runs in
    if not 0 < port < 65536:
        raise UserError(f"--port: must be in 1..65535, got {port}")
    if port in BROWSER_BLOCKED_PORTS:
        raise UserError(f"--port {port}: browsers refuse to open this port (ERR_UNSAFE_PORT); "
                        f"try --port {free_port(host, port)}")
    if not port_free(host, port):
        raise UserError(f"port {port} on {host} is in use (another MLflow UI?); try --port {free_port(host, port)}")
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes: starts in seconds
    env.setdefault("PYTHONUNBUFFERED", "1")
    artifacts = db.parent / "mlartifacts" if db is not None else None
    handle = tempfile.NamedTemporaryFile(prefix=f"oneday-ui-{port}-", suffix=".log", delete=False)  # noqa: SIM115
    log_path = Path(handle.name)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            server_command(uri, host=host, port=port, artifacts=artifacts), stdin=subprocess.DEVNULL,
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    finally:
        handle.close()
    base = f"http://{_connect_host(host)}:{port}"
    server = UiServer(url=base, tracking_uri=uri, process=process, log_path=log_path, startup_seconds=0.0)
    try:
        while not _answers(f"{base}/health"):
            if process.poll() is not None:
                tail = _log_tail(log_path)
                if "address already in use" in tail.lower():
                    raise UserError(f"port {port} on {host} is in use; try --port {free_port(host, port)}")
                raise UserError(f"the MLflow server exited (code {process.returncode}) before answering; "
                                f"its log: {log_path}\n{tail}")
            if time.monotonic() - started > ready_timeout:
                raise UserError(f"the MLflow server did not answer within {ready_timeout:.0f} s; its log: {log_path}")
            time.sleep(0.1)
        server.startup_seconds = time.monotonic() - started
        _add_links(server, experiment=experiment, last=last)
    except BaseException:
        server.stop()
        raise
    return server


def _add_links(server: UiServer, *, experiment: str | None, last: int) -> None:
    reader = RestReader(server.url)
    try:
        selection = select_runs(reader, experiment=experiment, last=last)
    except UserError as exc:
        if experiment is not None and "no experiment named" in str(exc):
            raise
        server.note = str(exc)
        return
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        server.note = f"could not list the runs ({_first_line(exc)})"
        return
    ids = [r.run_id for r in selection.records]
    experiments = [r.experiment_id for r in selection.records]
    server.experiment = selection.experiment
    server.experiment_url = experiment_url(server.url, selection.experiment_id)
    server.run_names = tuple(r.name for r in selection.records)
    server.compare_url = compare_url(server.url, ids, experiments)
    server.metric_url = metric_url(server.url, ids, experiments)


__all__ = [
    "BROWSER_BLOCKED_PORTS",
    "DEFAULT_LAST",
    "DEFAULT_SORT",
    "DEFAULT_UI_PORT",
    "SORT_KEYS",
    "ClientReader",
    "Comparison",
    "RestReader",
    "RunRecord",
    "RunRow",
    "Selection",
    "SqliteReader",
    "UiServer",
    "check_store",
    "compare_runs",
    "compare_url",
    "differing_params",
    "experiment_url",
    "free_port",
    "metric_url",
    "open_reader",
    "plot_comparison",
    "port_free",
    "process_group_alive",
    "row_from_record",
    "select_runs",
    "server_command",
    "sort_rows",
    "start_ui",
]
