"""Small valid objects for tests: a tiny plan that trains in seconds on one CPU thread."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from oneday.models.spec import ModelSpec
from oneday.plan import Candidate, DataInfo, HardwareInfo, Plan, Prediction, Provenance, TrainSpec


def tiny_model(**overrides: Any) -> ModelSpec:
    base = ModelSpec(n_layer=2, d_model=64, n_head=4, d_ff=192, vocab_size=512, seq_len=64)
    return replace(base, **overrides)


def make_plan(*, data: DataInfo | None = None, model: ModelSpec | None = None, **train_overrides: Any) -> Plan:
    """A complete, valid CPU plan. `train_overrides` replace fields of the TrainSpec."""
    model = model or tiny_model()
    data = data or DataInfo(
        source="test", key="0" * 16, path="/nonexistent", tokenizer="/nonexistent/tokenizer",
        vocab_size=model.vocab_size, train_tokens=100_000, val_tokens=10_000, bytes_per_token=4.0,
        spec="test",
    )
    train = TrainSpec(
        budget_seconds=60.0, train_seconds=50.0, seq_len=model.seq_len, micro_batch=4, grad_accum=1,
        lr=3e-3, planned_tokens=200_000, planned_steps=800, device="cpu", precision="fp32", threads=1,
        eval_every_seconds=10.0, eval_tokens=2048, checkpoint_every_seconds=10.0,
    )
    train = replace(train, **train_overrides)
    return Plan(
        name="tiny",
        hardware=HardwareInfo(
            device="cpu", name="test cpu", count=1, memory_bytes=8 << 30, peak_flops=1e11,
            peak_flops_source="test", dtype="fp32", torch_version="test", threads=1,
        ),
        data=data,
        model=model,
        train=train,
        prediction=Prediction(
            tokens_per_s=4000.0, mfu=0.1, tokens=200_000, loss=5.0, loss_band=(4.8, 5.3),
            law="epoch2024", band_law="hoffmann2022",
        ),
        provenance=Provenance(oneday_version="test", created="2026-11-28T00:00:00Z", command="test"),
        candidates=(
            Candidate(n_layer=2, d_model=64, n_head=4, params_total=model.params_total(),
                      params_scaling=model.params_scaling(), tokens_per_s=4000.0, mfu=0.1, measured=True,
                      micro_batch=4, peak_memory_bytes=1 << 20, tokens=200_000, epochs=2.0,
                      predicted_loss=5.0, band_loss=5.2, chosen=True),
        ),
        reasons=("test plan",),
    )


def _nvml_missing() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return True
    pynvml.nvmlShutdown()
    return False


# For tests of what happens on a machine without an NVIDIA GPU (like CI's).
no_gpu = pytest.mark.skipif(not _nvml_missing(), reason="an NVIDIA driver is present")


def one_error_line(stderr: str) -> str:
    """The CLI's stderr, whitespace collapsed, after checking it holds exactly one `error:` line and no
    traceback (every user-caused error is one clear line)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return " ".join(stderr.split())


class HungServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung MLflow server); `uri` is
    its http address. `close()` drops the connections and the socket."""

    def __init__(self) -> None:
        import socket
        import threading

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self._socket.settimeout(0.2)
        self._held: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self._socket.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                self._held.append(self._socket.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in self._held:
            conn.close()
        self._socket.close()


def invoke_cli(*args: str) -> tuple[int, str, str]:
    """`oneday ARGS` through Typer's CliRunner: (exit code, stdout, stderr); an exception other than the exit
    is raised, so a traceback never passes for a one-line error."""
    from typer.testing import CliRunner

    from oneday.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr
