"""Can anything eat a day of training? Kills at random points, and tracking stores that are dead or hung.

1. **Kills.** A CPU plan with a 4-minute budget and a checkpoint every 60 s is run once uninterrupted, then
   again in a fresh folder where `oneday run` is SIGKILLed at `--kills` random moments (each session lives
   15–100 s, start-up included) and rerun each time, until a last session finishes it. For every kill it prints
   the training seconds lost (the last logged step's `train_elapsed` minus that of the checkpoint the next
   session resumed from) against the interval, and what the rerun said about it. At the end: steps and
   tokens must be continuous (`tokens == steps × tokens per step`, every session's steps pick up after its
   checkpoint), and the final validation loss is compared with the uninterrupted run's.
2. **Tracking.** The same plan (`--tracking-minutes` long) against a healthy sqlite store, a dead HTTP URI
   (nothing listens) and a hung one (accepts connections, never answers; served by this script). Prints the
   mean tokens/s of each against the healthy run (goal ≥ 0.97) and the wall time from process creation to
   exit against the budget (goal: within 2%).

    python bench/faults.py                              # 4-minute kill run, 2-minute tracking runs
    python bench/faults.py --minutes 2 --kills 4 --tracking-minutes 1 --skip-uninterrupted
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from budget import bench_plan  # noqa: E402

from oneday.plan import Plan, save_plan  # noqa: E402
from oneday.runner.summary import load_summary  # noqa: E402
from oneday.tracking.recorder import read_metrics  # noqa: E402
from tests.factories import HungServer  # noqa: E402

ONEDAY = str(Path(sys.executable).with_name("oneday"))


def _start(plan_path: Path, run_dir: Path, uri: str, threads: int) -> subprocess.Popen:
    return subprocess.Popen(
        [ONEDAY, "run", str(plan_path), "--run-dir", str(run_dir), "--tracking-uri", uri, "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"},
    )


def _finish(proc: subprocess.Popen, *, started: float) -> tuple[int, str, float]:
    _, err = proc.communicate()
    return proc.returncode, err, time.monotonic() - started


def _last_step(run_dir: Path) -> dict | None:
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "step"]
    return steps[-1] if steps else None


def _newest_checkpoint(run_dir: Path) -> dict | None:
    """step and train_elapsed of the checkpoint a rerun resumes from (the newest whole one)."""
    from oneday.runner.checkpoint import CheckpointStore

    state = CheckpointStore(run_dir / "checkpoints", keep=99).latest_state()
    if state is None:
        return None
    return {"step": int(state["step"]), "train_elapsed": float(state["train_elapsed"])}


def kills(plan: Plan, plan_path: Path, work: Path, *, count: int, threads: int, seed: int,
          lifetimes: tuple[float, float]) -> dict:
    run_dir, uri = work / "killed", f"sqlite:///{work / 'mlflow.db'}"
    rng = random.Random(seed)
    rows = []
    finished = False
    for i in range(count):
        lifetime = rng.uniform(*lifetimes)
        started = time.monotonic()
        proc = _start(plan_path, run_dir, uri, threads)
        try:
            proc.wait(timeout=lifetime)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        code, err, wall = _finish(proc, started=started)
        said = re.search(r"trained about (\d+) s past", " ".join(err.split()))
        if rows:
            rows[-1]["rerun_said_lost"] = int(said.group(1)) if said else 0
        if code != -signal.SIGKILL:
            if code != 0:
                raise SystemExit(f"session {i + 1} failed ({code}): {err[-2000:]}")
            print(f"  session {i + 1} ended by itself after {wall:.1f} s: the run is done")
            finished = True
            break
        last, checkpoint = _last_step(run_dir), _newest_checkpoint(run_dir)
        lost = max(0.0, (last["train_elapsed"] - checkpoint["train_elapsed"]) if last and checkpoint else
                   (last["train_elapsed"] if last else 0.0))
        rows.append({"kill": i + 1, "session_s": round(wall, 1), "last_step": last["step"] if last else 0,
                     "checkpoint_step": checkpoint["step"] if checkpoint else None, "lost_train_s": round(lost, 1)})
        print(f"  kill {i + 1}: after {wall:5.1f} s; last logged step {rows[-1]['last_step']}, "
              f"checkpoint {rows[-1]['checkpoint_step']}, lost {lost:.1f} training s")
    if not finished:
        started = time.monotonic()
        code, err, wall = _finish(_start(plan_path, run_dir, uri, threads), started=started)
        said = re.search(r"trained about (\d+) s past", " ".join(err.split()))
        if rows and "rerun_said_lost" not in rows[-1]:
            rows[-1]["rerun_said_lost"] = int(said.group(1)) if said else 0
        if code != 0:
            raise SystemExit(f"the last session failed ({code}): {err[-2000:]}")
    summary = load_summary(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    per_step = plan.train.tokens_per_step()
    continuous = summary.tokens == summary.steps * per_step and all(
        r["tokens"] == r["step"] * per_step for r in records if r.get("kind") == "step")
    # after each resume, the steps pick up right after the checkpoint it names
    picks_up = True
    for index, record in enumerate(records):
        if record.get("event") == "resume":
            following = next((r for r in records[index + 1:] if r.get("kind") == "step"), None)
            picks_up &= following is None or following["step"] > record["step"]
    return {"kills": rows, "summary": summary, "continuous": continuous, "picks_up": picks_up}


def tracking(plan_path: Path, work: Path, *, threads: int, budget: float) -> list[dict]:
    hung = HungServer()
    rows = []
    try:
        for label, uri in (("healthy sqlite", f"sqlite:///{work / 'mlflow-tracking.db'}"),
                           ("dead http://127.0.0.1:9", "http://127.0.0.1:9"), ("hung server", hung.uri)):
            run_dir = work / f"tracking-{label.split()[0]}"
            started = time.monotonic()
            code, err, wall = _finish(_start(plan_path, run_dir, uri, threads), started=started)
            if code != 0:
                raise SystemExit(f"{label}: oneday run failed ({code}): {err[-2000:]}")
            summary = load_summary(run_dir)
            rows.append({"store": label, "tokens_per_s": summary.mean_tokens_per_s, "steps": summary.steps,
                         "wall": wall, "summary_wall": summary.session_wall_seconds,
                         "over_budget": wall / budget - 1, "error": summary.tracking_error})
    finally:
        hung.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=4.0, help="budget of the kill run (default 4)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--tracking-minutes", type=float, default=2.0, help="budget of each tracking run")
    parser.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--session-seconds", type=float, nargs=2, default=(15.0, 100.0),
                        help="each killed session lives a random time in this range (start-up included)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-uninterrupted", action="store_true", help="no reference run (no loss comparison)")
    parser.add_argument("--skip-tracking", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    args = parser.parse_args()

    from oneday.data.prepare import prepare_data

    work = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data("builtin:pydoc", vocab_size=1024, cache_dir=work / "cache")
    print(f"work folder {work}; load average at start {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")

    budget = args.minutes * 60
    plan = bench_plan(prepared, budget=budget, threads=args.threads, name="faults")
    plan = replace(plan, train=replace(plan.train, checkpoint_every_seconds=args.checkpoint_every))
    plan_path = save_plan(plan, work / "plan.json")

    baseline = None
    if not args.skip_uninterrupted:
        print(f"\n== uninterrupted {args.minutes:g}-minute run ==")
        started = time.monotonic()
        code, err, wall = _finish(_start(plan_path, work / "uninterrupted", f"sqlite:///{work / 'mlflow.db'}",
                                         args.threads), started=started)
        if code != 0:
            raise SystemExit(f"uninterrupted run failed ({code}): {err[-2000:]}")
        baseline = load_summary(work / "uninterrupted")
        print(f"  {baseline.steps} steps, val loss {baseline.final_val_loss:.4f}, wall {wall:.1f} s")

    print(f"\n== {args.kills} SIGKILLs, checkpoint every {args.checkpoint_every:g} s ==")
    result = kills(plan, plan_path, work, count=args.kills, threads=args.threads, seed=args.seed,
                   lifetimes=tuple(args.session_seconds))
    rows = result["kills"]
    summary = result["summary"]
    print(f"\n  {'kill':>4} {'session s':>9} {'last step':>9} {'ckpt step':>9} {'lost train s':>12} "
          f"{'rerun said':>10}")
    for row in rows:
        print(f"  {row['kill']:>4} {row['session_s']:>9} {row['last_step']:>9} {row['checkpoint_step']!s:>9} "
              f"{row['lost_train_s']:>12} {row.get('rerun_said_lost', '-')!s:>10}")
    worst = max((row["lost_train_s"] for row in rows), default=0.0)
    print(f"  worst loss {worst:.1f} training s against the {args.checkpoint_every:g} s interval "
          f"({'within' if worst <= args.checkpoint_every else 'OVER'} one interval)")
    print(f"  final: {summary.steps} steps, {summary.tokens:,} tokens, {result['resumes']} resumes; "
          f"tokens == steps × tokens/step on every record: {result['continuous']}; "
          f"steps pick up after each checkpoint: {result['picks_up']}")
    if baseline is not None and summary.final_val_loss is not None:
        print(f"  val loss {summary.final_val_loss:.4f} (killed {len(rows)}×) vs {baseline.final_val_loss:.4f} "
              f"(uninterrupted): {summary.final_val_loss - baseline.final_val_loss:+.4f}; "
              f"steps {summary.steps} vs {baseline.steps}")

    if not args.skip_tracking:
        tracking_budget = args.tracking_minutes * 60
        plan = bench_plan(prepared, budget=tracking_budget, threads=args.threads, name="tracking")
        plan_path = save_plan(plan, work / "plan-tracking.json")
        print(f"\n== tracking stores, {args.tracking_minutes:g}-minute runs ==")
        rows = tracking(plan_path, work, threads=args.threads, budget=tracking_budget)
        healthy = rows[0]["tokens_per_s"]
        print(f"  {'store':<24} {'tok/s':>8} {'vs healthy':>10} {'wall s':>8} {'vs budget':>9} "
              f"{'summary wall':>12}")
        for row in rows:
            print(f"  {row['store']:<24} {row['tokens_per_s']:>8,.0f} {row['tokens_per_s'] / healthy:>10.3f} "
                  f"{row['wall']:>8.1f} {100 * row['over_budget']:>+8.1f}% {row['summary_wall']:>12.1f}")
        for row in rows:
            if row["error"]:
                print(f"  {row['store']}: {row['error']}")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
