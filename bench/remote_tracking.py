"""Does a remote MLflow server slow training? tokens/s of `oneday run` against three stores, same plan:

1. the default: a sqlite file beside the run (`sqlite:///…/mlflow.db`);
2. an `mlflow server` on 127.0.0.1 with a PostgreSQL backend store and a served artifact root (started here,
   as in tests/servers.py: `initdb` into a temp folder, `postgres` on a free port);
3. the same server, killed (SIGKILL) once the run is on it and restarted after half the budget: down for
   about half the run.

Prints each run's mean tokens/s against the sqlite run (goal ≥ 0.97), its wall time, and whether every
train/loss step arrived on the server (the outage's backlog included). `--repeat N` alternates the first two
N times (a shared machine's load drifts) and compares their medians. In the outage run the restarting server
competes with training for the CPUs when both share one machine; on a team's separate server it would not.
Needs PostgreSQL's binaries (Debian's `postgresql`) and psycopg (`pip install 'oneday[postgres]'`).

    python bench/remote_tracking.py                 # 2-minute runs
    python bench/remote_tracking.py --budget 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from budget import bench_plan  # noqa: E402

from oneday.plan import save_plan  # noqa: E402
from oneday.runner.summary import load_summary  # noqa: E402
from tests.servers import MlflowServer, PostgresServer, postgres_bin  # noqa: E402

ONEDAY = str(Path(sys.executable).with_name("oneday"))


def _run(plan_path: Path, run_dir: Path, uri: str, *, threads: int, during=None) -> tuple[float, str]:
    started = time.monotonic()
    process = subprocess.Popen(
        [ONEDAY, "run", str(plan_path), "--run-dir", str(run_dir), "--tracking-uri", uri, "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    if during is not None:
        during(process, run_dir)
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"oneday run against {uri} failed ({process.returncode}): {err[-2000:]}")
    return time.monotonic() - started, err


def _arrived(uri: str, run_id: str | None, run_dir: Path) -> str:
    """How many of the run's train/loss steps the server holds, of those in metrics.jsonl."""
    if run_id is None:
        return "no run"
    from mlflow.tracking import MlflowClient

    local = {r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "step"}
    remote = {m.step for m in MlflowClient(uri).get_metric_history(run_id, "train/loss")}
    return f"{len(remote & local)}/{len(local)} steps"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of each run (default 120)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="alternate sqlite and server runs N times")
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    args = parser.parse_args()
    folder = postgres_bin()
    if folder is None:
        raise SystemExit("no PostgreSQL binaries (initdb, postgres): apt-get install -y postgresql")

    from oneday.data.prepare import prepare_data

    work = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-remote-"))
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data("builtin:pydoc", vocab_size=512, cache_dir=work / "cache")
    plan_path = save_plan(bench_plan(prepared, budget=args.budget, threads=args.threads, name="remote-bench"),
                          work / "plan.json")
    postgres = PostgresServer(folder)
    server = MlflowServer(postgres.create_database("mlflow"), work / "artifacts")
    outage: dict[str, float] = {}

    def down_for_half(process: subprocess.Popen, run_dir: Path) -> None:
        while process.poll() is None and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.2)
        time.sleep(3.0)  # the run is on the server and training
        server.stop(crash=True)
        outage["down"] = time.monotonic()
        time.sleep(max(0.0, args.budget / 2 - 15.0))  # the restart itself takes ~15 s
        server.start()
        outage["up"] = time.monotonic()

    rows = []
    try:
        print(f"budget {args.budget:.0f} s, {args.threads} thread(s), load {os.getloadavg()}", flush=True)
        plan = [("sqlite (default)", f"sqlite:///{work / 'mlflow.db'}", None),
                ("mlflow server + PostgreSQL", server.uri, None)] * max(1, args.repeat)
        for label, uri, during in [*plan, ("server down for half the run", server.uri, down_for_half)]:
            run_dir = work / f"run-{len(rows)}"
            wall, _ = _run(plan_path, run_dir, uri, threads=args.threads, during=during)
            summary = load_summary(run_dir)
            arrived = _arrived(uri, summary.mlflow_run_id, run_dir) if uri.startswith("http") else "-"
            rows.append((label, summary.mean_tokens_per_s, wall, arrived, summary.tracking_error))
            print(f"  {label}: {summary.mean_tokens_per_s:,.0f} tok/s, wall {wall:.1f} s", flush=True)
    finally:
        server.stop()
        postgres.close()
    base = statistics.median(r[1] for r in rows if r[0] == "sqlite (default)")
    remote = statistics.median(r[1] for r in rows if r[0] == "mlflow server + PostgreSQL")
    print(f"\n{'store':<30} {'tok/s':>8} {'vs sqlite':>9} {'wall s':>7}  on the server")
    for label, tps, wall, arrived, error in rows:
        note = f"  ({error})" if error else ""
        print(f"{label:<30} {tps:>8,.0f} {tps / base:>9.3f} {wall:>7.1f}  {arrived}{note}")
    print(f"median of {max(1, args.repeat)}: server {remote:,.0f} tok/s vs sqlite {base:,.0f}: {remote / base:.3f}")
    if outage:
        print(f"server down {outage['up'] - outage['down']:.0f} s of the {args.budget:.0f} s run")
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
