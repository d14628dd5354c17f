"""What would oneday train on GPUs this machine lacks? `oneday plan --what-if` for a few GPUs, budgets and corpora.

For h200, h100x8, a100-80gb and rtx4090, at 1 h and 24 h, on a 10B-token and a 100M-token corpus (assumed, as
`--data-tokens`; vocabulary 8192): the chosen shape, N (non-embedding, and with the LM head as the laws count
it, and in all), tokens, tokens per parameter, epochs, the global batch, the peak LR, the steps, the predicted
loss and the estimated training memory against the plan's limit (90% of the GPU's memory less 512 MiB). Below
the table, the Chinchilla comparison for the 10B rows: the compute C = 6·N·D the plan spends, and the size and
tokens Chinchilla's rule (~20 tokens per parameter, Hoffmann et al. 2022) would give for the same C.

No GPU and no torch: each plan takes a fraction of a second.

    python bench/what_if.py
    python bench/what_if.py --gpus h100 l4 --hours 8
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oneday.formats import human_count  # noqa: E402
from oneday.planner.decide import estimate_memory_bytes  # noqa: E402
from oneday.planner.policy import CUDA_MEMORY_FRACTION, CUDA_MEMORY_RESERVED  # noqa: E402
from oneday.planner.what_if import what_if_plan  # noqa: E402

CHINCHILLA_TOKENS_PER_PARAM = 20.0


def non_embedding(model) -> int:
    return model.n_layer * model.params_per_layer() + model.d_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", nargs="+", default=["h200", "h100x8", "a100-80gb", "rtx4090"])
    parser.add_argument("--hours", nargs="+", type=float, default=[1.0, 24.0])
    parser.add_argument("--tokens", nargs="+", default=["10B", "100M"])
    args = parser.parse_args()

    from oneday.planner.what_if import parse_token_count

    header = (f"{'GPU':<10} {'h':>3} {'data':>5}  {'shape':<8} {'N non-emb':>9} {'N+head':>7} {'total':>7} "
              f"{'tokens':>7} {'tok/N':>6} {'epochs':>6} {'batch':>17} {'LR':>8} {'steps':>7} {'loss':>6} "
              f"{'MFU':>5} {'memory / limit':>16}")
    print(header)
    print("-" * len(header))
    chinchilla = []
    for gpu in args.gpus:
        for hours in args.hours:
            for data in args.tokens:
                plan = what_if_plan(what_if=gpu, hours=hours, data_tokens=parse_token_count(data))
                m, t, p = plan.model, plan.train, plan.prediction
                n = m.params_scaling()
                memory = estimate_memory_bytes(m, t.micro_batch, activation_bytes=2)
                limit = CUDA_MEMORY_FRACTION * plan.hardware.memory_bytes - CUDA_MEMORY_RESERVED
                ranks = f"×{t.world_size}" if t.world_size > 1 else ""
                batch = f"{t.micro_batch}×{t.grad_accum}{ranks}={human_count(t.tokens_per_step())}"
                print(f"{gpu:<10} {hours:>3g} {data:>5}  {m.label():<8} {human_count(non_embedding(m)):>9} "
                      f"{human_count(n):>7} {human_count(m.params_total()):>7} {human_count(p.tokens):>7} "
                      f"{p.tokens / n:>6.1f} {p.epochs:>6.2f} {batch:>17} {t.lr:>8.2e} {t.planned_steps:>7,} "
                      f"{p.loss:>6.3f} {p.mfu:>5.1%} {memory / 2**30:>6.1f}/{limit / 2**30:>5.1f} GiB")
                if data == args.tokens[0]:
                    chinchilla.append((gpu, hours, n, p.tokens))
    print()
    print(f"Chinchilla for the {args.tokens[0]}-token rows: C = 6·N·D with N as the laws count it (non-embedding "
          f"+ head); Chinchilla's rule D = {CHINCHILLA_TOKENS_PER_PARAM:g}·N gives N = sqrt(C / 120)")
    print(f"{'GPU':<10} {'h':>3} {'C (FLOPs)':>10} {'oneday N':>9} {'D':>7} {'D/N':>6} {'Chinchilla N':>13} "
          f"{'D':>7} {'N / N_chin':>10}")
    for gpu, hours, n, tokens in chinchilla:
        c = 6.0 * n * tokens
        n_chin = math.sqrt(c / (6.0 * CHINCHILLA_TOKENS_PER_PARAM))
        print(f"{gpu:<10} {hours:>3g} {c:>10.2e} {human_count(n):>9} {human_count(tokens):>7} {tokens / n:>6.1f} "
              f"{human_count(n_chin):>13} {human_count(CHINCHILLA_TOKENS_PER_PARAM * n_chin):>7} "
              f"{n / n_chin:>10.2f}")


if __name__ == "__main__":
    main()
