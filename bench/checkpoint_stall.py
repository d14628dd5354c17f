"""How long training stands still for a checkpoint: a foreground write (`CheckpointStore.save`) against a
snapshot to host memory and a background write (`CheckpointStore.save_async`, what the loop does).

A model is trained with fused AdamW (`oneday.runner.step.TrainStep`) for `--steps` steps three times: without
checkpoints, with a foreground checkpoint every `--every` steps, with a background one at the same steps
(the phases alternate over `--rounds`, so a drifting machine load hits each alike). The stall per checkpoint
is (the phase's wall time - the no-checkpoint phase's) / checkpoints: it counts the call training waits for
and any slowdown of the steps the background write runs beside (on a CPU the write takes cores from training;
on a GPU it does not). The blocking call's own time (the whole write, or the snapshot) is printed too, and
the cost model's figures (`oneday.runner.costs`) for the same parameter count.

    python bench/checkpoint_stall.py                            # ~26M parameters (a 315 MB checkpoint), CPU
    python bench/checkpoint_stall.py --layers 8 --d-model 768  # bigger
    python bench/checkpoint_stall.py --dir /some/disk          # checkpoints there (default: a temp folder)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oneday.models.spec import ModelSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24, help="steps per phase (default 24)")
    parser.add_argument("--every", type=int, default=8, help="a checkpoint every this many steps (default 8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="windows of 64 tokens a step (default 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="checkpoints go here (default: a temp folder)")
    args = parser.parse_args()

    import torch

    from oneday.models.build import build_model, param_groups
    from oneday.runner import costs
    from oneday.runner.checkpoint import CheckpointStore
    from oneday.runner.step import LMLoss, TrainStep, make_optimizer

    torch.set_num_threads(args.threads)
    spec = ModelSpec(n_layer=args.layers, d_model=args.d_model, n_head=args.d_model // 64, d_ff=3 * args.d_model,
                     vocab_size=8192, seq_len=64)
    model = build_model(spec, seed=0)
    params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(param_groups(model, spec, lr=1e-4, weight_decay=0.1), lr=1e-4, betas=(0.9, 0.95))
    step = TrainStep(LMLoss(model), params=model.parameters(), optimizer=optimizer, grad_accum=1, grad_clip=1.0)
    batch = torch.randint(0, spec.vocab_size, (args.batch, spec.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    step(batch)  # warm-up: the optimizer's state exists from here on

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        store = CheckpointStore(folder, keep=2)

        def phase(mode: str) -> tuple[float, list[float]]:
            calls: list[float] = []
            started = time.perf_counter()
            for i in range(1, args.steps + 1):
                step(batch)
                if mode != "none" and i % args.every == 0:
                    t0 = time.perf_counter()
                    save = store.save if mode == "foreground" else store.save_async
                    save(model=model, optimizer=optimizer, state={"step": i})
                    calls.append(time.perf_counter() - t0)
            store.wait()  # a background write still running belongs to this phase
            return time.perf_counter() - started, calls

        walls: dict[str, list[float]] = {"none": [], "foreground": [], "background": []}
        calls: dict[str, list[float]] = {"foreground": [], "background": []}
        for _ in range(args.rounds):
            for mode in walls:
                wall, blocking = phase(mode)
                walls[mode].append(wall)
                calls.get(mode, []).extend(blocking)

    checkpoints = args.steps // args.every
    base = statistics.median(walls["none"])
    print(f"model: {params / 1e6:.1f}M parameters, checkpoint {costs.checkpoint_bytes(params) / 1e6:.0f} MB; "
          f"{args.steps} steps, a checkpoint every {args.every}; {args.rounds} rounds, {args.threads} thread(s)")
    print(f"step time without checkpoints: {base / args.steps * 1e3:.0f} ms")
    for mode in ("foreground", "background"):
        stall = (statistics.median(walls[mode]) - base) / checkpoints
        print(f"{mode:>10}: stall per checkpoint {stall:6.2f} s (wall over the no-checkpoint phase); "
              f"the call itself {statistics.median(calls[mode]):.2f} s")
    print(f"cost model: foreground write {costs.checkpoint_write_seconds(params):.2f} s, "
          f"snapshot {costs.checkpoint_snapshot_seconds(params):.2f} s")


if __name__ == "__main__":
    main()
