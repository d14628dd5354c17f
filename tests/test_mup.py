"""μP coordinate check (Yang et al. 2022, Tensor Programs V, appendix "coordinate check").

Models of widths 64, 128, 256, 512 (depth 2, head size 16 so the head count grows with width, d_ff = 4·d,
vocab 128, seq 32, batch 4, random tokens, μP base width 64, init_std 0.02) are trained for 5 AdamW steps
at one shared, fairly large learning rate (3e-3, β = (0.9, 0.95), no weight decay) with `param_groups`.
At each step t = 1..5 we record, in the forward pass after t updates (on the next, unseen batch), the
mean |x| per coordinate of the embedding output, of each block's output (the residual stream) and of the
logits; μP averages seeds 0 and 1, the others use seed 0. Under μP these stay flat across widths; under
SP with the same LR they grow with width. Observed (torch 2.13 CPU; `python -m tests.test_mup` prints
steps 1 and 5):

    step 5   width   embed   block0  block1  logits
    μP          64   0.0163  0.0180  0.0221  0.0748
               128   0.0163  0.0180  0.0221  0.0712
               256   0.0164  0.0178  0.0203  0.0537
               512   0.0165  0.0178  0.0200  0.0480      log-log slope: 0.00 -0.01 -0.06 -0.23
    SP          64   0.0168  0.0196  0.0259  0.1581
               128   0.0169  0.0330  0.0874  0.2916
               256   0.0171  0.1544  0.4998  0.4934
               512   0.0172  0.6916  1.4933  0.8080      log-log slope: 0.01  1.76  2.01  0.78

Under μP the embedding and blocks are flat to ≤ 11% at every step. The logits drift *down* with width at
these small widths (step 1: 0.0225, 0.0163, 0.0122, 0.0098, slope -0.40) and level off: up to width 1024
each doubling shrinks the step-1 logits less (×0.72, 0.75, 0.80, 0.83), and from step 3 on 512 -> 1024 is
flat (0.0331 -> 0.0312, 0.0445 -> 0.0467, 0.0480 -> 0.0465). The readout starts at zero and its first Adam
updates carry a finite-width term ∝ 1/sqrt(width) on top of the width-independent one; a drift down that
fades is not the failure μP guards against.

Tolerances asserted at every step 1..5 under μP (max/min over widths; least-squares slope of log
activation vs log width): embedding and blocks ≤ 1.3 and |slope| ≤ 0.1; logits ≤ 3.0 and slope in
[-0.6, 0.3] (a head scaled by 1/width_mult twice would give ≈ -1.4, no logits scaling ≈ +0.6..0.8). The check
has teeth: SP's last block must grow ≥ 10× from width 64 to 512 (observed 58×) and its logits ≥ 3× (5.1×),
and two broken μP variants must fail too: hidden matrices at the base LR (no 1/width_mult) blow block1 up
55×, logits not divided by width_mult grow 4.0×.
"""

from __future__ import annotations

import math

import pytest
import torch

from oneday.models.build import build_model, param_groups
from oneday.models.spec import ModelSpec

WIDTHS = (64, 128, 256, 512)
BASE_WIDTH = 64
HEAD_DIM = 16
VOCAB = 128
SEQ = 32
BATCH = 4
STEPS = 5
LR = 3e-3
SEEDS = (0, 1)
LAYERS = ("embed", "block0", "block1", "logits")


def _spec(width: int, parametrization: str) -> ModelSpec:
    return ModelSpec(
        n_layer=2,
        d_model=width,
        n_head=width // HEAD_DIM,
        d_ff=4 * width,
        vocab_size=VOCAB,
        seq_len=SEQ,
        parametrization=parametrization,
        mup_base_width=BASE_WIDTH,  # type: ignore[arg-type]
    )


def _train_and_record(spec: ModelSpec, seed: int, variant: str = "") -> list[dict[str, float]]:
    """Train STEPS AdamW steps; after each, mean |activation| of each layer on a fixed probe batch."""
    model = build_model(spec, seed=seed)
    if variant == "no_logits_scaling":
        model.config.logits_scaling = 1.0  # Granite reads it at forward time
    groups = param_groups(model, spec, lr=LR, weight_decay=0.0)
    if variant == "no_hidden_lr_scale":
        for group in groups:
            group["lr"] = LR
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same data for every width
    batches = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS + 1)]

    acts: dict[str, float] = {}

    def hook(name):
        def record(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            acts[name] = out.detach().abs().mean().item()

        return record

    inner = model.model
    handles = [inner.embed_tokens.register_forward_hook(hook("embed_raw"))]
    handles += [layer.register_forward_hook(hook(f"block{i}")) for i, layer in enumerate(inner.layers)]
    history = []
    try:
        for t, batch in enumerate(batches):
            out = model(input_ids=batch, labels=batch)
            if t:  # the forward pass after t updates
                row = dict(acts)
                row["embed"] = row.pop("embed_raw") * spec.embedding_multiplier
                row["logits"] = out.logits.detach().abs().mean().item()
                history.append(row)
            if t == STEPS:
                break
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
    return history


def coord_check(
    parametrization: str, variant: str = "", seeds: tuple[int, ...] = SEEDS
) -> list[dict[int, dict[str, float]]]:
    """table[step][width][layer] = mean |activation| after `step`+1 updates, averaged over `seeds`."""
    runs = {w: [_train_and_record(_spec(w, parametrization), s, variant) for s in seeds] for w in WIDTHS}
    return [
        {w: {k: sum(run[t][k] for run in runs[w]) / len(seeds) for k in LAYERS} for w in WIDTHS} for t in range(STEPS)
    ]


def _slope(values: dict[int, float]) -> float:
    xs = [math.log(w) for w in values]
    ys = [math.log(v) for v in values.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def _column(step: dict[int, dict[str, float]], layer: str) -> dict[int, float]:
    return {w: step[w][layer] for w in WIDTHS}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (max/min over widths, lowest and highest log-log slope) allowed under μP, per layer.
MUP_TOLERANCE = {
    "embed": (1.3, -0.1, 0.1),
    "block0": (1.3, -0.1, 0.1),
    "block1": (1.3, -0.1, 0.1),
    "logits": (3.0, -0.6, 0.3),
}


def test_mup_coordinates_stay_flat_across_width():
    table = coord_check("mup")
    for t, step in enumerate(table, start=1):
        for layer, (max_ratio, min_slope, max_slope) in MUP_TOLERANCE.items():
            col = _column(step, layer)
            ratio = max(col.values()) / min(col.values())
            slope = _slope(col)
            assert ratio <= max_ratio, f"μP step {t} {layer}: max/min over widths {ratio:.2f}: {col}"
            assert min_slope <= slope <= max_slope, f"μP step {t} {layer}: log-log slope {slope:.2f}: {col}"


def test_sp_coordinates_grow_with_width():
    last = coord_check("sp", seeds=(0,))[-1]
    block = _column(last, "block1")
    logits = _column(last, "logits")
    assert block[512] / block[64] >= 10, block
    assert logits[512] / logits[64] >= 3, logits


@pytest.mark.parametrize(
    ("variant", "layer", "factor"),
    [("no_hidden_lr_scale", "block1", 10.0), ("no_logits_scaling", "logits", 3.0)],
)
def test_broken_mup_fails_the_check(variant, layer, factor):
    last = coord_check("mup", variant, seeds=(0,))[-1]
    col = _column(last, layer)
    assert col[512] / col[64] >= factor, col


if __name__ == "__main__":  # print the tables quoted in the module docstring
    torch.set_num_threads(1)
    for par, variant in (("mup", ""), ("sp", ""), ("mup", "no_hidden_lr_scale"), ("mup", "no_logits_scaling")):
        table = coord_check(par, variant)
        for t in (0, STEPS - 1):
            print(f"{par} {variant or ''} step {t + 1}")
            print("width " + " ".join(f"{k:>9}" for k in LAYERS))
            for w in WIDTHS:
                print(f"{w:5d} " + " ".join(f"{table[t][w][k]:9.4f}" for k in LAYERS))
            print("slope " + " ".join(f"{_slope(_column(table[t], k)):9.2f}" for k in LAYERS))
