"""Shared test setup, so that `python -m pytest` alone is the whole test command (README and CI run the same line).

- Never touch the network: hub look-ups fail at once instead of retrying for ~47 s.
- Never write into the user's caches: `datasets` (lm-eval loads local task files through it) caches in a
  temporary folder removed at exit.
- One torch/OpenMP thread: the suite runs tiny models on shared 2-core machines, where two threads can be several
  times slower than one under load; subprocesses the tests start (`oneday run`, torchrun) inherit the same.
Set here, before any test module imports huggingface_hub, datasets, transformers or torch.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"
os.environ["HF_DATASETS_CACHE"] = _datasets_cache = tempfile.mkdtemp(prefix="oneday-tests-datasets-")
atexit.register(shutil.rmtree, _datasets_cache, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def hung_server():
    """The http address of a server that accepts connections and never answers (a hung MLflow server)."""
    from tests.factories import HungServer

    server = HungServer()
    yield server.uri
    server.close()


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the whole session (tests/servers.py); skips without PostgreSQL, fails in CI."""
    from tests.servers import PostgresServer, postgres_or_skip

    server = PostgresServer(postgres_or_skip())
    yield server
    server.close()


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """One `mlflow server` (PostgreSQL backend, served local artifact root) for the whole session."""
    from tests.servers import MlflowServer

    server = MlflowServer(postgres.create_database("mlflow"), tmp_path_factory.mktemp("mlflow-server") / "artifacts")
    yield server
    server.stop()
