"""Does `oneday run` end when the budget says? Wall time from process start to exit vs the budget.

Prepares a small corpus first (one-off data preparation is not part of the budget), writes a CPU plan with a
3-minute budget, runs `oneday run plan.json` as a subprocess, and measures the wall time from just before
the process is created to its exit. Prints it against the budget (goal: within 2%), the time charged as
`summary.json` saw it, and the learning rate of the last step against the schedule's final value.

The plan sets `train_seconds = budget_seconds`, so that the deadline, not the planner's estimate of the
training share, ends the run (a real plan reserves part of the budget for probing, compile, evals and
checkpoints; the loop stops at whichever comes first).

    python bench/budget.py                 # 180 s, one thread
    python bench/budget.py --budget 60 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oneday.models.spec import ModelSpec  # noqa: E402
from oneday.plan import DataInfo, Plan, save_plan  # noqa: E402
from tests.factories import make_plan  # noqa: E402


def bench_plan(prepared, *, budget: float, threads: int, name: str = "budget-bench") -> Plan:
    """A CPU plan for a ~1M-parameter model on the prepared corpus; the deadline ends it."""
    model = ModelSpec(n_layer=4, d_model=128, n_head=4, d_ff=384, vocab_size=prepared.vocab_size, seq_len=128)
    data = DataInfo(
        source=prepared.source, key=prepared.key, path=str(prepared.directory), tokenizer=str(prepared.tokenizer_dir),
        vocab_size=prepared.vocab_size, train_tokens=prepared.train_tokens, val_tokens=prepared.val_tokens,
        bytes_per_token=prepared.bytes_per_token(), spec="builtin:pydoc",
    )
    plan = make_plan(
        data=data, model=model, budget_seconds=budget, train_seconds=budget, micro_batch=8, lr=2e-3,
        planned_steps=max(1, int(budget * 5)), planned_tokens=int(budget * 5 * 8 * 128), threads=threads,
        eval_every_seconds=budget / 6, eval_tokens=8192, checkpoint_every_seconds=budget / 3,
        final_lr_fraction=0.1, warmup_fraction=0.02, cooldown_fraction=0.2,
    )
    return replace(plan, name=name, hardware=replace(plan.hardware, threads=threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=180.0, help="seconds (default 180)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temp folder)")
    args = parser.parse_args()

    from oneday.data.prepare import prepare_data
    from oneday.tracking.recorder import read_metrics

    work = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-budget-"))
    work.mkdir(parents=True, exist_ok=True)
    prepared = prepare_data("builtin:pydoc", vocab_size=512, cache_dir=work / "cache")
    plan = bench_plan(prepared, budget=args.budget, threads=args.threads)
    plan_path = save_plan(plan, work / "plan.json")
    run_dir = work / "run"
    oneday = str(Path(sys.executable).with_name("oneday"))
    command = [oneday, "run", str(plan_path), "--run-dir", str(run_dir), "--tracking-uri",
               f"sqlite:///{work / 'mlflow.db'}", "--force"]
    print(f"budget {args.budget:.0f} s, {args.threads} thread(s); {' '.join(command)}", flush=True)
    env = {**os.environ, "COLUMNS": "120"}
    started = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"oneday run failed with exit code {proc.returncode}")

    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    last = steps[-1]
    final_value = plan.train.lr * plan.train.final_lr_fraction
    session = json.loads((run_dir / "run.json").read_text())["sessions"][-1]
    error = (wall - args.budget) / args.budget
    print(f"wall time, process start to exit: {wall:8.2f} s   budget {args.budget:.0f} s   "
          f"error {100 * error:+.2f}%  ({'within' if abs(error) <= 0.02 else 'OUTSIDE'} 2%)")
    print(f"charged when summary.json was written: {summary['wall_seconds']:.2f} s "
          f"(start-up before training {session['startup_seconds']:.1f} s, training {summary['train_seconds']:.1f} s)")
    print(f"steps {summary['steps']}, tokens {summary['tokens']:,}, {summary['mean_tokens_per_s']:,.0f} tok/s, "
          f"final val loss {summary['final_val_loss']:.3f}")
    print(f"LR at the last step {summary['final_lr']:.3e} (last logged record: step {last['step']}, "
          f"lr {last['lr']:.3e}, schedule progress {last['budget_fraction']:.4f}); "
          f"the schedule's final value {final_value:.3e} (ratio {summary['final_lr'] / final_value:.3f})")
    if not math.isclose(summary["final_lr"], final_value, rel_tol=0.05):
        print("note: the last LR is more than 5% away from the schedule's final value")
    print(f"outputs in {work}")


if __name__ == "__main__":
    main()
