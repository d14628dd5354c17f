"""oneday's `SystemSampler` against MLflow's `SystemMetricsMonitor`: CPU cost per sample, and tok/s of a tiny
training loop while each samples in its own thread (docs/design.md, Tracking).

    python bench/system_metrics.py [--samples 300] [--seconds 20] [--interval 1.0]

MLflow's monitor needs psutil (`pip install psutil`). Its loop also asks the store for the run (`get_run`) after
every sample, so its cost per sample is measured with and without that call (a sqlite store in a temp folder).
The training comparison runs the loop alone, with oneday's sampler, and with MLflow's monitor, `--seconds` each,
in that order, twice; it prints the median tok/s and tokens per CPU-second of this process (the sampler's
thread included; what other processes take is not) of each, and `uptime` (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable


def cpu_seconds_per_call(call: Callable[[], object], samples: int) -> float:
    call()  # first call: imports, NVML init, psutil's first cpu_percent
    start = time.process_time()
    for _ in range(samples):
        call()
    return (time.process_time() - start) / samples


def train_tok_per_s(seconds: float, background: Callable[[threading.Event], None] | None) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process: the sampler thread's CPU included, other
    processes' load not)."""
    import torch

    torch.manual_seed(0)
    vocab, width, seq, batch = 512, 128, 64, 8
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    stop = threading.Event()
    thread = threading.Thread(target=background, args=(stop,), daemon=True) if background else None
    if thread:
        thread.start()
    done, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        done += batch * seq
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stop.set()
    if thread:
        thread.join()
    return done / elapsed, done / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from oneday.tracking.system import SystemSampler

    folder = tempfile.mkdtemp(prefix="oneday-sysbench-")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("bench")).info.run_id

    own = SystemSampler(gpu=True)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=args.interval, tracking_uri=uri)
    cost_own = cpu_seconds_per_call(own.sample, args.samples)
    cost_mlflow = cpu_seconds_per_call(monitor.collect_metrics, args.samples)
    cost_mlflow_loop = cpu_seconds_per_call(lambda: (monitor.collect_metrics(), client.get_run(run_id)),
                                            max(20, args.samples // 10))
    print(f"CPU per sample: oneday SystemSampler {1e3 * cost_own:.3f} ms; MLflow collectors "
          f"{1e3 * cost_mlflow:.3f} ms ({', '.join(type(m).__name__ for m in monitor.monitors)}); "
          f"MLflow collectors + its per-sample get_run {1e3 * cost_mlflow_loop:.3f} ms")

    def run_own(stop: threading.Event) -> None:
        sampler = SystemSampler(gpu=True)
        while not stop.wait(args.interval):
            sampler.sample()

    def run_mlflow(stop: threading.Event) -> None:
        run = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
        mon = SystemMetricsMonitor(run, sampling_interval=args.interval, tracking_uri=uri)
        mon.start()
        stop.wait()
        mon.finish()

    results: dict[str, list[tuple[float, float]]] = {"none": [], "oneday": [], "mlflow": []}
    for _ in range(args.rounds):
        for name, background in (("none", None), ("oneday", run_own), ("mlflow", run_mlflow)):
            results[name].append(train_tok_per_s(args.seconds, background))
    base = [statistics.median(v[i] for v in results["none"]) for i in (0, 1)]
    for name, values in results.items():
        wall, cpu = (statistics.median(v[i] for v in values) for i in (0, 1))
        print(f"sampler {name:6s} every {args.interval:g} s: {wall:7.0f} tok/s (ratio {wall / base[0]:.3f}), "
              f"{cpu:7.0f} tok/CPU-s (ratio {cpu / base[1]:.3f})  runs: "
              f"{', '.join(f'{w:.0f}/{c:.0f}' for w, c in values)}")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), f"cpus={os.cpu_count()}")


if __name__ == "__main__":
    main()
