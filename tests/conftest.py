"""Shared test setup, so that `python -m pytest` alone is the whole test command (README and CI run the same line).

- Never touch the network: hub look-ups fail at once instead of retrying for ~47 s.
- One torch/OpenMP thread: the suite runs tiny models on shared 2-core machines, where two threads can be several
  times slower than one under load; subprocesses the tests start (`oneday run`, torchrun) inherit the same.
Set here, before any test module imports huggingface_hub, datasets, transformers or torch.
"""

from __future__ import annotations

import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture
def hung_server():
    """A TCP server that accepts connections and never answers (a hung MLflow server)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()
