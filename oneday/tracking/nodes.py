"""System metrics of every node of a multi-node run, in rank 0's MLflow run (docs/design.md, Tracking).

Rank 0's tracker (`oneday.tracking.writer`) samples its own node: names `system/gpu_<i>_...`, as in a one-node
run. On every other node the process with local rank 0 runs a `NodeSystemLogger`: the same `SystemSampler` (all
of that node's GPUs through NVML, its own RSS and CPU share) every `NODE_EVERY_SECONDS`, logged to rank 0's run
as `system/node<k>/...` (k: torchrun's node rank, GROUP_RANK). Rank 0 broadcasts the run id once it exists
(`share_run_id`, waiting at most `RUN_ID_WAIT_SECONDS` for the store); one-node runs skip the broadcast.

The logger never stalls or stops training: it samples and sends from its own daemon thread, a store that does
not answer costs one warning, samples are kept (at most `MAX_PENDING_SAMPLES`) and sent when it answers again,
and `stop()` waits at most a couple of seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

from oneday.errors import first_line
from oneday.tracking.store import unreachable_reason
from oneday.tracking.system import SystemSampler

log = logging.getLogger(__name__)

NODE_EVERY_SECONDS = 10.0  # as rank 0's tracker samples
RUN_ID_WAIT_SECONDS = 20.0  # rank 0's wait for the store to create the run, before the other nodes get its id
MAX_PENDING_SAMPLES = 360  # an hour of samples kept for a store that is down
MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH


def node_rank(dist: Any) -> int:
    """This process's node: torchrun's GROUP_RANK, else its rank over the ranks per node."""
    if os.environ.get("GROUP_RANK", "").isdigit():
        return int(os.environ["GROUP_RANK"])
    return dist.rank // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))


def is_multi_node(dist: Any) -> bool:
    """Whether the ranks span more than one node (torchrun's LOCAL_WORLD_SIZE below WORLD_SIZE); the same answer
    on every rank, so that all or none of them join `share_run_id`'s broadcast."""
    return dist is not None and int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)) < dist.world_size


def share_run_id(dist: Any, group: Any, *, tracker: Any, wait: float = RUN_ID_WAIT_SECONDS) -> str | None:
    """Rank 0's MLflow run id on every rank (None when the store did not create it within `wait` s)."""
    import torch.distributed as torch_dist

    run_id = tracker.wait_ready(timeout=wait) if dist.rank == 0 and tracker is not None else None
    box = [run_id]
    torch_dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def start_node_metrics(dist: Any, group: Any, *, tracker: Any, uri: str, gpu: bool,
                       every: float = NODE_EVERY_SECONDS) -> NodeSystemLogger | None:
    """On a multi-node run: the started logger of this node when this is its first process (not rank 0's node:
    the tracker samples that one); None elsewhere. Every rank must call it (the run id is broadcast)."""
    if not is_multi_node(dist):
        return None
    run_id = share_run_id(dist, group, tracker=tracker)
    if dist.rank == 0 or dist.local_rank != 0 or run_id is None:
        return None
    return NodeSystemLogger(uri=uri, run_id=run_id, node_id=f"node{node_rank(dist)}", gpu=gpu, every=every).start()


class NodeSystemLogger:
    """Samples this node every `every` s and logs `system/<node_id>/<name>` to `run_id` in the store at `uri`, from a
    daemon thread; no method raises or blocks for long. `sent` counts the samples the store took."""

    def __init__(self, *, uri: str, run_id: str, node_id: str, gpu: bool, every: float = NODE_EVERY_SECONDS) -> None:
        self.uri, self.run_id, self.node_id = uri, run_id, node_id
        self._gpu, self._every = gpu, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"oneday-system-{node_id}", daemon=True)
        self._pending: list[tuple[int, int, dict[str, float]]] = []  # (step, ms, values), oldest first
        self._warned = False
        self.sent = 0
        self.error: str | None = None

    def start(self) -> NodeSystemLogger:
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Take a last sample, try once more to send, and wait at most `timeout` s for that."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, timeout))

    def _work(self) -> None:
        sampler = None
        try:
            sampler = SystemSampler(gpu=self._gpu)  # every GPU NVML sees on this node
            import mlflow.tracking  # noqa: F401  (~2.5 s, here while training runs, not in the last send)
            step = 0
            while True:
                stopping = self._stop.wait(self._every)
                values = sampler.sample()
                if values:
                    prefix = f"system/{self.node_id}/"
                    named = {prefix + name.removeprefix("system/"): value for name, value in values.items()}
                    self._pending.append((step, int(time.time() * 1000), named))
                    del self._pending[:-MAX_PENDING_SAMPLES]
                    step += 1
                self._send()
                if stopping:
                    return
        except Exception as exc:  # sampling must never reach training
            log.debug("system metrics of %s: %s", self.node_id, exc)
        finally:
            if sampler is not None:
                sampler.close()

    def _send(self) -> None:
        if not self._pending:
            return
        try:
            reason = unreachable_reason(self.uri, timeout=1.0)
            if reason is not None:
                raise ConnectionError(reason)
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            if urlparse(self.uri).scheme in ("http", "https"):  # bounded retries, as the tracker's (store.py)
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            client = MlflowClient(tracking_uri=self.uri)
            while self._pending:  # whole samples per batch; each leaves the backlog once the store took it
                count, values = 0, 0
                while count < len(self._pending) and values + len(self._pending[count][2]) <= MAX_METRICS_PER_BATCH:
                    values += len(self._pending[count][2])
                    count += 1
                batch = self._pending[: max(count, 1)]
                metrics = [Metric(k, v, ms, step) for step, ms, named in batch for k, v in named.items()]
                client.log_batch(self.run_id, metrics=metrics, synchronous=True)
                del self._pending[: len(batch)]
                self.sent += len(batch)
        except Exception as exc:
            self.error = first_line(exc)
            if not self._warned:
                self._warned = True
                log.warning("system metrics of %s: MLflow tracking at %s failed: %s; training goes on, the samples "
                            "are sent when the store answers again", self.node_id, self.uri, self.error)
            return
        self.error, self._warned = None, False


__all__ = ["NODE_EVERY_SECONDS", "NodeSystemLogger", "is_multi_node", "node_rank", "share_run_id",
           "start_node_metrics"]
