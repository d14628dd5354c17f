"""`oneday compare` on 50 runs, and `oneday ui` start-up: the issue #6 acceptance figures.

    python bench/compare_speed.py [--runs 50] [--repeat 3] [--ui]

1. Logs `--runs` fake runs through `MlflowClient` into a temporary sqlite store, the way `oneday run` logs
   them (the flattened plan as params, the oneday tags, per-step metrics, val/predicted/gap metrics).
2. Times `oneday compare --last N` as a user runs it (a fresh `oneday` process, interpreter start-up
   included; best and median of `--repeat`), and the library call in this process through both readers:
   the direct sqlite read `oneday compare` uses for sqlite stores and `MlflowClient` (mlflow already
   imported here, so that figure leaves out the ~2.5 s import the direct read avoids).
3. With `--ui`: starts `oneday ui`'s lean MLflow server on that store and times it to the first HTTP answer.

Acceptance (issue #6): compare under 3 s for 50 runs; the UI answering HTTP within 15 s. On a shared 2-core
machine the load from other processes shows in every figure; the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_compare import fake_plan, log_fake_run  # noqa: E402

ONEDAY = str(Path(sys.executable).with_name("oneday"))


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ui", action="store_true", help="also time `oneday ui` to its first HTTP answer")
    args = parser.parse_args()

    from mlflow.tracking import MlflowClient

    from oneday.compare.readers import ClientReader, SqliteReader
    from oneday.compare.runs import compare_runs, select_runs
    from oneday.compare.ui import start_ui

    with tempfile.TemporaryDirectory(prefix="oneday-bench-") as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("oneday/bench")
        started = time.perf_counter()
        for i in range(args.runs):
            plan = fake_plan(name=f"run{i:02d}", d_model=64 * (1 + i % 4), lr=1e-3 * (1 + i % 5),
                             budget_seconds=3600.0 * (1 + i % 24))
            log_fake_run(client, experiment, plan, val_loss=4.0 + (i % 7) / 10, tokens=100_000 + 1000 * i,
                         steps=20, start_ms=1_700_000_000_000 + 1000 * i)
        print(f"logged {args.runs} runs in {time.perf_counter() - started:.1f} s ({load()})")

        command = [ONEDAY, "compare", "--tracking-uri", uri, "--last", str(args.runs)]
        walls = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            walls.append(time.perf_counter() - t)
            if result.returncode != 0:
                raise SystemExit(f"oneday compare failed: {result.stderr}")
        rows = sum(1 for line in result.stdout.splitlines() if re.match(r"run\d+-", line))
        print(f"`oneday compare --last {args.runs}` ({rows} runs in the table): best {min(walls):.2f} s, "
              f"median {statistics.median(walls):.2f} s over {args.repeat} ({load()})")

        in_process = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            comparison = compare_runs(uri, last=args.runs)
            in_process.append(time.perf_counter() - t)
        assert len(comparison.rows) == args.runs
        print(f"compare_runs in-process (direct sqlite read): best {min(in_process) * 1000:.0f} ms")
        for name, reader in (("sqlite", SqliteReader(Path(tmp) / "mlflow.db")), ("MlflowClient", ClientReader(uri))):
            t = time.perf_counter()
            selection = select_runs(reader, last=args.runs)
            print(f"  select_runs via {name}: {(time.perf_counter() - t) * 1000:.0f} ms "
                  f"({len(selection.records)} runs)")

        if args.ui:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            t = time.perf_counter()
            server = start_ui(uri, port=port)
            try:
                print(f"`oneday ui`: mlflow server answering HTTP after {server.startup_seconds:.1f} s "
                      f"(links ready after {time.perf_counter() - t:.1f} s; {load()})")
            finally:
                server.stop()


if __name__ == "__main__":
    main()
