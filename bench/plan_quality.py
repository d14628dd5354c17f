"""Is the planned model size the right one? Train it and a grid of other shapes on the same budget.

Makes a real plan with `oneday.planner.make.make_plan` for a CPU budget (`--minutes`, default 5) and a data set
(`--data`), then trains the planned configuration and a grid of other shapes with `oneday run` (each a
subprocess, as a user would run it): same data, same budget, same batch, LR and schedule — only the shape and
the seed differ. The grid brackets the plan on both axes: one shape shallower and one deeper at the planned
width, one narrower and one wider at the planned depth (`bracket_shapes`), plus `--alternatives` others nearest
in size from the planner's own candidate ladder. Every grid point is the mean of `--seeds` runs (at least 2;
seeds plan.seed, plan.seed + 1, ...: weights and data order differ), each scored by its final evaluation on
`--val-tokens` validation tokens (default 65,536, or what the corpus has; evaluations during the run are off so
that only the final one costs time, the same for every point). Prints validation loss (mean ± spread over the
seeds) and bits per byte per shape, the planned one marked, and the planned configuration's gap to the grid's
best mean in % (goal: within 2%).

    python bench/plan_quality.py                               # 5 minutes per run, the default corpus
    python bench/plan_quality.py --minutes 3 --threads 1 --workdir /tmp/pq
    python bench/plan_quality.py --minutes 0.5 --alternatives 0 --threads 1   # the smallest grid: 5 shapes × 2
    python bench/plan_quality.py --minutes 3 --calibration plan.calibration.json  # the plan a calibrated law makes

The default corpus is the development machines' English text (`../shared/data` beside the checkout, outside
this repository); pass `--data` anywhere else. The whole benchmark takes about (1 + shapes × seeds) × the
budget. Runs share the machine with nothing else only if you make it so: on a loaded 2-core machine, use
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
from oneday.planner.ladder import candidate_shapes, reshape  # noqa: E402
from oneday.planner.make import make_plan  # noqa: E402


def bracket_shapes(chosen: ModelSpec) -> list[ModelSpec]:
    """One shape shallower and one deeper at the planned width, one narrower and one wider at the planned depth:
    about a third of the depth (at least one layer) and a quarter of the width (a multiple of 32) each way. A
    one-layer plan has no shallower shape; one under 48 wide no narrower (16 wide is the narrowest)."""
    layers, width = chosen.n_layer, chosen.d_model
    step_l = max(1, round(layers / 3))
    step_w = max(32, round(width / 4 / 32) * 32)
    out = [reshape(chosen, n_layer=layers + step_l, d_model=width),
           reshape(chosen, n_layer=layers, d_model=width + step_w)]
    if layers - step_l >= 1:
        out.append(reshape(chosen, n_layer=layers - step_l, d_model=width))
    if width - step_w >= 16:
        out.append(reshape(chosen, n_layer=layers, d_model=width - step_w))
    return out


def grid_shapes(plan: Plan, *, count: int) -> list[ModelSpec]:
    """The planned shape, its `bracket_shapes`, and `count` others nearest to it in size from the planner's ladder
    (its candidates, extended), sorted by size."""
    chosen = plan.model
    key = (chosen.n_layer, chosen.d_model)
    grid = {(s.n_layer, s.d_model): s for s in bracket_shapes(chosen)}
    pool = {
        (c.n_layer, c.d_model): reshape(chosen, n_layer=c.n_layer, d_model=c.d_model) for c in plan.candidates
    }
    n = chosen.params_scaling()
    for spec in candidate_shapes(vocab_size=plan.data.vocab_size, seq_len=chosen.seq_len, min_params=n / 8,
                                 max_params=n * 16):
        pool.setdefault((spec.n_layer, spec.d_model), reshape(chosen, n_layer=spec.n_layer, d_model=spec.d_model))
    for k in [*grid, key]:
        pool.pop(k, None)
    # Nearest in log-size, so the grid brackets the plan on both sides where the ladder allows.
    for spec in sorted(pool.values(), key=lambda s: abs(math.log(s.params_scaling() / n)))[:count]:
        grid[(spec.n_layer, spec.d_model)] = spec
    return sorted([chosen, *grid.values()], key=lambda s: (s.params_scaling(), s.n_layer))


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
    parser.add_argument("--alternatives", type=int, default=3,
                        help="shapes nearest in size besides the four bracketing ones (default 3)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per grid point, averaged (at least 2; default 2)")
    parser.add_argument("--val-tokens", type=int, default=65536,
                        help="validation tokens each run is scored on (default 65,536, or what the corpus has)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every run (default: plan's)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--calibration", type=Path, default=None,
                        help="plan with this calibration file (`oneday tune plan.json --calibrate`), as a user would")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error(f"--seeds: at least 2 (a grid point is a mean over seeds), got {args.seeds}")
    if args.val_tokens < 1 or args.alternatives < 0:
        parser.error("--val-tokens must be >= 1 and --alternatives >= 0")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oneday-plan-quality-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plan = make_plan(hours=args.minutes / 60, data=args.data, vocab_size=args.vocab_size, device="cpu",
                     name="planned", cache_dir=workdir / "cache", command="bench/plan_quality.py",
                     calibration=args.calibration)
    val_tokens = min(args.val_tokens, plan.data.val_tokens)
    # only the final evaluation, on the same validation tokens for every run
    train = replace(plan.train, eval_tokens=val_tokens, eval_every_seconds=plan.train.budget_seconds)
    if args.threads:
        train = replace(train, threads=args.threads)
    plan = replace(plan, train=train)
    print(f"plan made in {time.monotonic() - started:.1f} s: {plan.model.n_layer}x{plan.model.d_model} "
          f"({plan.model.params_scaling() / 1e6:.2f}M N), {plan.train.tokens_per_step()} tokens/step, "
          f"lr {plan.train.lr:.3g}, predicted {plan.prediction.tokens:,} tokens; scored on {val_tokens:,} "
          f"validation tokens (asked {args.val_tokens:,}; the corpus has {plan.data.val_tokens:,}); "
          f"workdir {workdir}", flush=True)

    shapes = grid_shapes(plan, count=args.alternatives)
    m = plan.model
    for axis, below in (("depth", any(s.n_layer < m.n_layer and s.d_model == m.d_model for s in shapes)),
                        ("width", any(s.d_model < m.d_model and s.n_layer == m.n_layer for s in shapes))):
        if not below:
            print(f"note: no shape below the plan's {axis} exists ({plan.model.label()}): the grid reaches above only")
    seeds = [plan.train.seed + k for k in range(args.seeds)]
    print(f"grid: {len(shapes)} shapes × {len(seeds)} seeds = {len(shapes) * len(seeds)} runs of "
          f"{args.minutes:g} min", flush=True)
    rows = []
    for spec in shapes:
        planned = spec == plan.model
        name = "planned" if planned else f"grid-{spec.n_layer}x{spec.d_model}"
        runs = []
        for seed in seeds:
            variant = replace(plan, name=f"{name}-seed{seed}", model=spec, train=replace(plan.train, seed=seed))
            summary = run(variant, workdir=workdir, threads=args.threads)
            runs.append(summary)
            print(f"  {name:>16} seed {seed}: val loss {summary['final_val_loss']:.4f}, {summary['tokens']:,} tokens "
                  f"in {summary['bench_wall_seconds']:.0f} s", flush=True)
        rows.append((spec, planned, runs))

    def mean(runs: list[dict], key: str) -> float:
        return sum(r[key] for r in runs) / len(runs)

    best = min(mean(runs, "final_val_loss") for _, _, runs in rows)
    print(f"\n{'shape':>9} {'N':>8} {'total':>8} {'tokens':>11} {'tok/s':>8} {'val loss (mean ± half-range)':>29} "
          f"{'bpb':>7}  note")
    for spec, planned, runs in rows:
        loss = mean(runs, "final_val_loss")
        spread = (max(r["final_val_loss"] for r in runs) - min(r["final_val_loss"] for r in runs)) / 2
        side = []
        if spec != plan.model:
            side = [f"{'deeper' if spec.n_layer > plan.model.n_layer else 'shallower'}"
                    if spec.n_layer != plan.model.n_layer else "",
                    f"{'wider' if spec.d_model > plan.model.d_model else 'narrower'}"
                    if spec.d_model != plan.model.d_model else ""]
        notes = [n for n, on in (("<- planned", planned), ("best", loss == best)) if on] + [s for s in side if s]
        n, total = spec.params_scaling() / 1e6, spec.params_total() / 1e6
        print(f"{spec.n_layer:>3}x{spec.d_model:<5} {n:>7.2f}M {total:>7.2f}M {mean(runs, 'tokens'):>11,.0f} "
              f"{mean(runs, 'mean_tokens_per_s'):>8,.0f} {loss:>20.4f} ± {spread:.4f} "
              f"{mean(runs, 'final_val_bpb'):>7.4f}  {' '.join(notes)}")
    planned_loss = next(mean(runs, "final_val_loss") for _, p, runs in rows if p)
    gap = planned_loss / best - 1
    print(f"\nplanned {planned_loss:.4f} vs the grid's best {best:.4f} (means over {len(seeds)} seeds): gap "
          f"{gap:+.2%} (goal within 2%: {'met' if gap <= 0.02 else 'NOT met'}); "
          f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
