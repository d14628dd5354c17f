"""System metrics per node: a two-node torchrun on this machine (two agents, gloo), both nodes' metrics in rank 0's
MLflow run (sqlite); a store that is down never stops or slows a non-zero rank's training."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from oneday.plan import save_plan
from oneday.runner.summary import load_summary
from oneday.tracking import nodes
from oneday.tracking.nodes import NodeSystemLogger, is_multi_node, node_rank, start_node_metrics
from oneday.tracking.system import SystemSampler
from tests import test_run
from tests.test_run import ONEDAY, quick

prepared = test_run.prepared  # the fixture: a small tokenized corpus


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_two_node_torchrun_logs_both_nodes_system_metrics_into_rank_zeros_run(prepared, tmp_path: Path) -> None:
    """Two torchrun agents on this machine, one process each: node 1's first process gets rank 0's run id and
    logs its samples there under system/node1/ (the final one at least: the run lasts seconds)."""
    from mlflow.tracking import MlflowClient

    plan = quick(prepared, steps=4, grad_accum=2)  # made for one process: grad_accum 1 on each of 2 ranks
    path = save_plan(plan, tmp_path / "plan.json")
    run_dir, uri, port = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}", _free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", ONEDAY, "run", str(path),
         "--run-dir", str(run_dir), "--tracking-uri", uri, "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outputs = [agent.communicate(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    for agent, (_, err) in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, err[-3000:]
    assert "system metrics of node1" not in outputs[1][1]  # no warning: the store took them
    run_id = load_summary(run_dir).mlflow_run_id
    keys = set(MlflowClient(uri).get_run(run_id).data.metrics)
    assert "system/process_rss_megabytes" in keys  # rank 0's node: the names of a one-node run
    assert "system/node1/process_rss_megabytes" in keys


def test_a_store_that_is_down_never_stops_a_nodes_training(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="oneday.tracking.nodes")
    logger = NodeSystemLogger(uri=f"http://127.0.0.1:{_free_port()}", run_id="r", node_id="node1", gpu=False,
                              every=0.05).start()
    steps, start = 0, time.monotonic()
    while time.monotonic() - start < 0.6:  # "training" goes on meanwhile
        sum(range(1000))
        steps += 1
    assert steps > 100
    stopping = time.monotonic()
    logger.stop(timeout=2.0)
    assert time.monotonic() - stopping < 2.5
    assert logger.sent == 0 and "cannot connect" in (logger.error or "")
    assert len(logger._pending) >= 3  # kept for when the store answers again
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # one warning per outage


def test_a_failing_sampler_ends_only_the_logger(monkeypatch) -> None:
    def broken(self):
        raise RuntimeError("NVML fell over")

    monkeypatch.setattr(SystemSampler, "sample", broken)
    logger = NodeSystemLogger(uri="sqlite:////nonexistent/x.db", run_id="r", node_id="node1", gpu=False,
                              every=0.01).start()
    time.sleep(0.1)
    logger.stop(timeout=1.0)
    assert not logger._thread.is_alive() and logger.sent == 0


def test_nodes_from_torchruns_environment(monkeypatch) -> None:
    dist = SimpleNamespace(rank=5, world_size=8, local_rank=1)
    monkeypatch.delenv("GROUP_RANK", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert is_multi_node(dist) and node_rank(dist) == 1
    monkeypatch.setenv("GROUP_RANK", "3")
    assert node_rank(dist) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert not is_multi_node(dist) and not is_multi_node(None)
    # one node: no broadcast (no process group here) and no logger
    assert start_node_metrics(dist, None, tracker=None, uri="sqlite:///x.db", gpu=False) is None
    assert nodes.NODE_EVERY_SECONDS == 10.0
