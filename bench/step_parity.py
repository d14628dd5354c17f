"""Does the planner's timing of a step predict the run's speed? Alternate the two on one plan and compare.

A plan's tokens are its measured tokens/s × its training seconds. The seconds are exact (the run's clock keeps
them to a fraction of a percent); the tokens/s is a measurement taken minutes before the run, on a machine whose
speed may drift meanwhile. To tell the method's error from the machine's drift, this benchmark alternates, on the
same machine and the same plan, for `--rounds` rounds:

1. the planner's check of the plan's shape at the plan's micro-batch and accumulation
   (`planner.measure.measure_more`, the path `oneday plan` takes, `--probe-seconds` long, in this process as
   in `oneday plan`);
2. the run itself: `oneday run` (a subprocess, as a user runs it) of the plan stopped after the steps that fill
   about `--run-seconds`; its speed is read from its `metrics.jsonl` windows after the first (the first steps
   after start-up are still warming the heap; `planner.timing.steady_step_seconds` skips them too).

Each run is compared with the mean of the checks just before and just after it: a drift slower than a round
cancels there. Prints a row per round and the mean ratio run/check (goal: within 2% of 1), and the spread of the
checks themselves over the whole benchmark — how far this machine's speed moved while it ran.

    python bench/step_parity.py plan.json --rounds 4 --workdir /tmp/parity
    python bench/step_parity.py plan.json --rounds 6 --probe-seconds 20 --run-seconds 90 --threads 1

Writes only under --workdir (default: a new temporary folder).
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
from dataclasses import replace
from pathlib import Path
from typing import Any

ONEDAY = str(Path(sys.executable).with_name("oneday"))


def check(plan: Any, probe: Any, *, seconds: float) -> tuple[float, Any]:
    """The planner's check of the plan's step (its shape, micro-batch and accumulation): (tokens/s, `probe` with
    that timing)."""
    from oneday.planner.measure import measure_more

    skipped = len(probe.skipped)
    probe = measure_more(probe, plan.model, micro_batch=plan.train.micro_batch, grad_accum=plan.train.grad_accum,
                         deadline=time.perf_counter() + seconds, memory_limit_bytes=plan.hardware.memory_bytes,
                         peak_flops=plan.hardware.peak_flops)
    timing = probe.timing_for(plan.model)
    if timing is None or len(probe.skipped) > skipped:
        raise SystemExit(f"the check did not run: {probe.skipped[-1] if probe.skipped else 'no reason given'}")
    return timing.measurement.tokens_per_s, probe


def run(plan: Any, *, steps: int, folder: Path, threads: int | None) -> dict:
    """`oneday run` of `plan` stopped after `steps` optimizer steps; its steady tokens/s and its length."""
    from oneday.plan import save_plan
    from oneday.tracking.recorder import read_metrics

    folder.mkdir(parents=True, exist_ok=True)
    path = save_plan(replace(plan, train=replace(plan.train, max_steps=steps)), folder / "plan.json")
    command = [ONEDAY, "run", str(path), "--run-dir", str(folder / "run"),
               "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    if threads:
        command += ["--threads", str(threads)]
    started = time.monotonic()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"oneday run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    records = [r for r in read_metrics(folder / "run" / "metrics.jsonl") if r.get("kind") == "step"]
    if len(records) < 3:
        raise SystemExit(f"the run logged {len(records)} step windows; give it more --run-seconds")
    first, last = records[0], records[-1]
    tokens_per_s = (last["tokens"] - first["tokens"]) / (last["train_elapsed"] - first["train_elapsed"])
    return {"tokens_per_s": tokens_per_s, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plan", type=Path, help="a plan.json made by `oneday plan` (its data must be prepared)")
    parser.add_argument("--rounds", type=int, default=4, help="check + run pairs (default 4; one more check ends)")
    parser.add_argument("--probe-seconds", type=float, default=20.0, help="each check's length (default 20)")
    parser.add_argument("--run-seconds", type=float, default=60.0, help="each run's training length (default 60)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the plan's)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the runs go")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    import torch

    from oneday.data.plan_data import load_plan_data
    from oneday.plan import load_plan
    from oneday.planner.measure import probe_throughput, training_sample

    plan = load_plan(args.plan)
    if plan.train.device != "cpu":
        raise SystemExit("this benchmark alternates a check and a run on the CPU; for a GPU use bench/gpu_check.py")
    if args.threads:
        plan = replace(plan, train=replace(plan.train, threads=args.threads))
    torch.set_num_threads(plan.train.threads or 1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-parity-"))
    data, _ = load_plan_data(plan.data)
    tokens = training_sample(data)
    steps = max(10, round(args.run_seconds * plan.prediction.tokens_per_s / plan.train.tokens_per_step()))
    print(f"{args.plan}: {plan.model.label()} at micro-batch {plan.train.micro_batch} × {plan.train.grad_accum}, "
          f"{plan.train.threads} thread(s); planned {plan.prediction.tokens_per_s:,.0f} tok/s; runs of {steps} steps",
          flush=True)

    # As in `oneday plan`, the check extends a probe of the shape (not counted: its micro-batch is the probe's own).
    probe = probe_throughput([plan.model], device="cpu", dtype=plan.train.precision, compile=plan.train.compile,
                             seconds=args.probe_seconds, memory_limit_bytes=plan.hardware.memory_bytes,
                             threads=plan.train.threads, peak_flops=plan.hardware.peak_flops, tokens=tokens)
    checks, rows = [], []
    speed, probe = check(plan, probe, seconds=args.probe_seconds)
    checks.append(speed)
    for i in range(args.rounds):
        got = run(plan, steps=steps, folder=workdir / f"round-{i}", threads=plan.train.threads)
        speed, probe = check(plan, probe, seconds=args.probe_seconds)
        checks.append(speed)
        around = (checks[-2] + checks[-1]) / 2
        rows.append({"round": i, "check_before": checks[-2], "run": got["tokens_per_s"], "check_after": checks[-1],
                     "ratio": got["tokens_per_s"] / around, "run_seconds": round(got["seconds"], 1),
                     "load": [round(x, 2) for x in os.getloadavg()]})
        r = rows[-1]
        print(f"round {i}: check {r['check_before']:>8,.0f}  run {r['run']:>8,.0f}  check {r['check_after']:>8,.0f} "
              f"tok/s  run/checks {r['ratio']:.3f}  load {r['load'][0]:.2f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    spread = max(checks) / min(checks) - 1
    print()
    print(f"run / neighbouring checks: mean {statistics.fmean(ratios):.3f}, "
          f"range {min(ratios):.3f}–{max(ratios):.3f} over {len(ratios)} rounds")
    print(f"the checks themselves: {min(checks):,.0f}–{max(checks):,.0f} tok/s (+{spread:.1%} from slowest to "
          f"fastest); the plan's own reading {plan.prediction.tokens_per_s:,.0f}")
    if args.json:
        args.json.write_text(json.dumps({"plan": str(args.plan), "checks": checks, "rounds": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
