"""Three readers of an MLflow store that return the same records (run id, name, status, start time, tags,
params, latest metrics), newest run first.

- `SqliteReader`: a `sqlite:///` store read directly with Python's `sqlite3`, read-only. `import mlflow` alone
  takes ~2.5 s on the CPU machines here (6+ s under load), more than the whole `oneday compare` may take, so
  the common case (the local store `oneday run` writes) skips it. The tables read (`experiments`, `runs`,
  `tags`, `params`, `latest_metrics`) are MLflow's SQL store schema since 1.x; the reader checks their columns
  first and falls back to the client when they differ. `latest_metrics` is what `MlflowClient` itself returns
  as a run's metrics, so both paths agree (tests/test_compare.py checks that they do).
- `ClientReader`: `MlflowClient.search_runs` (any store: http(s) servers with their auth, PostgreSQL, ...).
- `RestReader`: the REST API of a server `oneday ui` has just started (no auth, no mlflow import).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from oneday.errors import UserError, first_line
from oneday.formats import finite_or_none
from oneday.tracking import names
from oneday.tracking.store import sqlite_path

PAGE_SIZE = 200


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
    number = finite_or_none(value)
    return math.nan if number is None else number


def check_store(uri: str) -> Path | None:
    """Refuse a sqlite store that is missing, or is not an MLflow database (MLflow would create its tables in
    it, silently); its path, or None for other stores."""
    db = sqlite_path(uri)
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
        raise UserError(f"cannot open the MLflow store {uri}: {first_line(exc)}") from None


__all__ = ["ClientReader", "RestReader", "RunRecord", "SqliteReader", "check_store", "open_reader"]
