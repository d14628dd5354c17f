"""Which MLflow store a run talks to, whether it answers, and its experiment.

- The store: the `--tracking-uri` flag, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db` (MLflow 3's
  own default file, made absolute so a server started elsewhere finds the same file).
- `open_experiment`: the client and the experiment, created (with its artifacts beside a sqlite database) or
  restored; an HTTP store that does not accept a connection fails at once, and MLflow's HTTP retries are
  capped, so an outage costs seconds, not minutes of retries.
- `standard_run_tags`: the tags `mlflow.start_run` would set (user, source name and type, git commit and branch
  of oneday's own source when it is a git checkout); runs made with `MlflowClient.create_run` get them too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB = "mlflow.db"


def resolve_tracking_uri(flag: str | None = None) -> str:
    """The flag, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/mlflow.db` (MLflow 3's own default file)."""
    if flag:
        return flag
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative paths made absolute), else None
    (in-memory databases and other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path).expanduser().resolve()


def unreachable_reason(uri: str, timeout: float = 3.0) -> str | None:
    """None when the store looks reachable; else why not. Only HTTP(S) stores are probed."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or "localhost"
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return None
        except OSError as exc:
            return f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        return f"the folder {db.parent} does not exist"
    return None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store, artifacts go beside the database (`<db folder>/mlruns/<experiment>`), not into
    whatever folder the process happens to run in; other stores choose their own."""
    db = sqlite_path(uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-") or "experiment"
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:6]
    return (db.parent / "mlruns" / f"{slug}-{digest}").as_uri()


def open_experiment(uri: str, experiment: str) -> tuple[Any, str]:
    """(an `MlflowClient` for `uri`, the id of `experiment`), the experiment created, or restored when deleted.
    An unreachable store raises ConnectionError at once; HTTP retries are bounded, so a server that goes away
    mid-run does not hold the caller for minutes. Another process creating the experiment first is fine."""
    reason = unreachable_reason(uri)
    if reason is not None:
        raise ConnectionError(reason)
    if urlparse(uri).scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            return client, client.create_experiment(experiment,
                                                    artifact_location=_artifact_location(uri, experiment))
        except Exception:  # another process created it first
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
    elif found.lifecycle_stage == "deleted":
        client.restore_experiment(found.experiment_id)
    return client, found.experiment_id


@lru_cache(maxsize=1)
def standard_run_tags() -> dict[str, str]:
    """MLflow's context tags (`mlflow.user`, `mlflow.source.name`, `mlflow.source.type`, and from oneday's own
    source folder `mlflow.source.git.commit`/`.branch` when it is a git checkout), as `mlflow.start_run` sets them;
    empty if MLflow cannot tell. Once per process: the git look-up costs seconds."""
    tags: dict[str, str] = {}
    try:
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.git_utils import get_git_branch, get_git_commit
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT

        import oneday

        tags.update(resolve_tags({}))
        commit = get_git_commit(oneday.__file__)
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
            branch = get_git_branch(oneday.__file__)
            if branch:
                tags[MLFLOW_GIT_BRANCH] = branch
    except Exception as exc:  # tags are a courtesy: never a reason to fail tracking
        logging.getLogger(__name__).debug("standard run tags: %s", exc)
    return {k: str(v) for k, v in tags.items()}


__all__ = ["DEFAULT_DB", "open_experiment", "resolve_tracking_uri", "sqlite_path", "standard_run_tags",
           "unreachable_reason"]
