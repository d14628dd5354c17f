"""Is the planned model size the right one? Train it and a grid of other sizes on the same budget.

Makes a real plan with `oneday.planner.make.make_plan` for a fixed CPU budget (default 5 minutes) and a data
set, then trains the planned configuration and at least five other model sizes around it with `oneday run`
(each a subprocess, as a user would run it): same data, same budget, same seed, same batch, LR and schedule —
only the shape differs (the shapes come from the planner's own candidate ladder, extended when it is short).
Prints validation loss and bits per byte per configuration, the planned one marked, and how far the plan's
loss is from the best grid entry (goal: within 2%).

    python bench/plan_quality.py                               # 5 minutes per run, the default corpus
    python bench/plan_quality.py --minutes 3 --threads 1 --workdir /tmp/pq

The default corpus is the development machines' English text (`../shared/data` beside the checkout, outside
this repository); pass `--data` anywhere else. The whole benchmark takes about (1 + number of configurations) ×
the budget. Runs share the machine with nothing else only if you make it so: on a loaded 2-core machine, use
--threads 1.
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

from oneday.models.spec import ModelSpec  # noqa: E402
from oneday.plan import Plan, save_plan  # noqa: E402
from oneday.planner.ladder import candidate_shapes, swiglu_ff  # noqa: E402
from oneday.planner.make import make_plan  # noqa: E402


def grid_shapes(plan: Plan, *, count: int) -> list[ModelSpec]:
    """The planned shape and `count` others nearest to it in size, from the planner's ladder (extended)."""
    chosen = plan.model
    shapes = {
        (c.n_layer, c.d_model): replace(chosen, n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head,
                                        d_ff=swiglu_ff(c.d_model))
        for c in plan.candidates
    }
    n = chosen.params_scaling()
    for spec in candidate_shapes(vocab_size=plan.data.vocab_size, seq_len=chosen.seq_len, min_params=n / 8,
                                 max_params=n * 16):
        shapes.setdefault((spec.n_layer, spec.d_model), replace(chosen, n_layer=spec.n_layer, d_model=spec.d_model,
                                                                 n_head=spec.n_head, d_ff=spec.d_ff))
    shapes.pop((chosen.n_layer, chosen.d_model), None)
    # Nearest in log-size, so the grid brackets the plan on both sides where the ladder allows.
    others = sorted(shapes.values(), key=lambda s: abs(math.log(s.params_scaling() / n)))[:count]
    return sorted([chosen, *others], key=lambda s: s.params_scaling())


def run(plan: Plan, *, workdir: Path, threads: int | None) -> dict:
    plan_path = workdir / f"{plan.name}.json"
    save_plan(plan, plan_path)
    oneday = str(Path(sys.executable).parent / "oneday")
    command = [oneday, "run", str(plan_path), "--run-dir", str(workdir / plan.name),
               "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment", "plan-quality"]
    if threads:
        command += ["--threads", str(threads)]
    started = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((workdir / plan.name / "summary.json").read_text())
    summary["bench_wall_seconds"] = time.monotonic() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="budget of every run (default 5)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--alternatives", type=int, default=5, help="other sizes to train (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every run (default: plan's)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-plan-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plan = make_plan(hours=args.minutes / 60, data=args.data, vocab_size=args.vocab_size, device="cpu",
                     name="planned", cache_dir=workdir / "cache", command="bench/plan_quality.py")
    if args.threads:
        plan = replace(plan, train=replace(plan.train, threads=args.threads))
    print(f"plan made in {time.monotonic() - started:.1f} s: {plan.model.n_layer}x{plan.model.d_model} "
          f"({plan.model.params_scaling() / 1e6:.2f}M N), {plan.train.tokens_per_step()} tokens/step, "
          f"lr {plan.train.lr:.3g}, predicted {plan.prediction.tokens:,} tokens; workdir {workdir}", flush=True)

    rows = []
    for spec in grid_shapes(plan, count=args.alternatives):
        planned = spec == plan.model
        name = "planned" if planned else f"grid-{spec.n_layer}x{spec.d_model}"
        variant = replace(plan, name=name, model=spec)
        summary = run(variant, workdir=workdir, threads=args.threads)
        rows.append((spec, planned, summary))
        print(f"  {name:>16}: val loss {summary['final_val_loss']:.4f}, {summary['tokens']:,} tokens "
              f"in {summary['bench_wall_seconds']:.0f} s", flush=True)

    best = min(r[2]["final_val_loss"] for r in rows)
    print(f"\n{'shape':>9} {'N':>8} {'total':>8} {'tokens':>11} {'tok/s':>8} {'val loss':>9} {'bpb':>7}  note")
    for spec, planned, s in rows:
        notes = [n for n, on in (("<- planned", planned), ("best", s["final_val_loss"] == best)) if on]
        n, total = spec.params_scaling() / 1e6, spec.params_total() / 1e6
        print(f"{spec.n_layer:>3}x{spec.d_model:<5} {n:>7.2f}M {total:>7.2f}M "
              f"{s['tokens']:>11,} {s['mean_tokens_per_s']:>8,.0f} {s['final_val_loss']:>9.4f} "
              f"{s['final_val_bpb']:>7.4f}  {' '.join(notes)}")
    planned_loss = next(s["final_val_loss"] for _, p, s in rows if p)
    gap = planned_loss / best - 1
    print(f"\nplanned {planned_loss:.4f} vs best {best:.4f}: {gap:+.2%} (goal within 2%: "
          f"{'met' if gap <= 0.02 else 'NOT met'}); total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
