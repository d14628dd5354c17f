"""μP proxies of a planned model, and their sizing to a slice of the tuning budget.

A proxy copies the planned model's depth, head size (d_head), sequence length, vocabulary and
tokens-per-parameter ratio, and is narrower: fewer heads, d_model = k·d_head, d_ff scaled in proportion.
It is built under μP (Yang et al. 2022, Tensor Programs V) with `mup_base_width` = its own width, so its
width_mult is 1 and a base learning rate found on it means the same thing for any wider μP model with that
base width: the tuned plan switches the target to `parametrization="mup"` with the same `mup_base_width`,
and `models.build.param_groups` divides the hidden-matrix LR by width_mult = d_target / d_proxy
(docs/design.md, Tuning).

Each trial is a complete short run of the proxy (`oneday.studies.short_run`).

Sizing (`size_proxy`). A trial must cost a fixed small slice of the tuning budget. The step time of the
narrowest proxy is measured with a few real training steps (forward, backward, AdamW, in the run's dtype);
wider proxies are estimated from it in proportion to FLOPs per token (6N + 12·L·d·T), which overestimates
them (small models run at lower MFU), so the estimate errs on the cheap side; the chosen width is then
measured itself and stepped down if it turns out more than 25% over its slice. Proxy tokens are
tokens-per-parameter × N_proxy at the plan's global batch (the batch is kept, so no batch-size correction of
the LR is needed), with at least `MIN_TRIAL_STEPS` steps (or the target's own, when it has fewer): shorter
runs rank learning rates by how fast they leave the initial plateau (measured, see the constant); if even the
narrowest proxy at that horizon costs more than a slice, its steps are cut (never below that minimum) and
the LR horizon correction, computed from the tokens actually trained, makes up for it. A budget that cannot
pay for one such trial is an error.

Trials run with `compile=False` (a compile per trial would cost more than the trial on a GPU) and no periodic
checkpoints; evaluations come about `EVALS_PER_TRIAL` times a trial (the loop's cadence is in training
seconds, set from the measured step time) on a fixed validation slice shared by every trial.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from oneday.errors import UserError
from oneday.formats import human_count
from oneday.models.spec import ModelSpec
from oneday.plan import Plan, TrainSpec
from oneday.planner.laws import lr_horizon_correction
from oneday.runner import costs
from oneday.studies.short_run import RunData, short_run

log = logging.getLogger(__name__)

MIN_TRIAL_STEPS = 64
"""Fewer steps rank learning rates by how fast a model leaves its initial plateau, not by how well it trains.
Measured on the CPU (4×32 μP proxy, 512-token batches, TinyStories, 1024-token BPE; LR grids ×2 apart): the
best LR was 0.006 at 29 steps (loss 5.64, still near the unigram plateau), 0.012 at 58 and 116 steps, 0.006 at
176 and 0.003–0.006 at 352 and 705 steps. The optimum rises over the first ~60 steps before it falls as D^−β,
so the horizon correction, which assumes the fall, is only applied from past that point: a 29-step proxy made
the tuned plan 5.2% worse than an LR grid on the target, at 705 target steps. Never more than the target's."""
MEASURE_STEPS = 6
"""Steps of a timing run (the first is warm-up and not timed)."""
EVALS_PER_TRIAL = 4
"""Intermediate evaluations land near 25%, 50% and 75% of a trial, then the final one."""
OVER_SLICE_TOLERANCE = 1.25
NO_PERIODIC_CHECKPOINTS = 1e9
EVAL_WINDOWS_MIN = 8
EVAL_FRACTION_OF_TRIAL = 0.1
"""Evaluation tokens per trial are ~10% of its training tokens (forward only: ~3% of its compute each)."""


class BudgetTooSmallError(UserError):
    """The tuning budget cannot pay for one trial; `trial_seconds` is what the shortest trial on the narrowest
    proxy costs (a slice that large is the least that fits one)."""

    def __init__(self, message: str, *, trial_seconds: float) -> None:
        super().__init__(message)
        self.trial_seconds = trial_seconds


# ------------------------------------------------------------------------------------------------------------
# Hyperparameters of one trial


@dataclass(frozen=True)
class TrialParams:
    """What a trial varies: the base LR and the schedule's warmup and cooldown fractions (β₂ and weight
    decay when the search includes them; None keeps the plan's)."""

    lr: float
    warmup_fraction: float
    cooldown_fraction: float
    beta2: float | None = None
    weight_decay: float | None = None

    def apply(self, train: TrainSpec) -> TrainSpec:
        """`train` with these hyperparameters."""
        changes: dict[str, Any] = {
            "lr": self.lr, "warmup_fraction": self.warmup_fraction, "cooldown_fraction": self.cooldown_fraction,
        }
        if self.beta2 is not None:
            changes["beta2"] = self.beta2
        if self.weight_decay is not None:
            changes["weight_decay"] = self.weight_decay
        return replace(train, **changes)

    def scaled(self, factor: float) -> TrialParams:
        """The same schedule at `factor` × the LR."""
        return replace(self, lr=self.lr * factor)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrialParams:
        return cls(**{k: float(v) for k, v in raw.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------------------
# The proxy


def proxy_model(target: ModelSpec, width: int) -> ModelSpec:
    """The μP proxy of `target` at `width` (a multiple of its head size): same depth, head size, vocabulary,
    sequence length; d_ff in the target's proportion; `mup_base_width` = `width` (width_mult 1)."""
    if width % target.head_dim or width <= 0:
        raise ValueError(f"proxy width {width} is not a positive multiple of the head size {target.head_dim}")
    d_ff = max(1, round(target.d_ff * width / target.d_model))
    return replace(target, d_model=width, n_head=width // target.head_dim, d_ff=d_ff, parametrization="mup",
                   mup_base_width=width)


def proxy_widths(target: ModelSpec) -> list[int]:
    """Candidate proxy widths, narrowest first: k·d_head for k = 1 .. n_head − 1 (the target itself when it
    has a single head: there is nothing narrower with the same head size)."""
    if target.n_head == 1:
        return [target.d_model]
    return [k * target.head_dim for k in range(1, target.n_head)]


def tokens_per_param(plan: Plan) -> float:
    """The plan's planned tokens per scaling parameter (non-embedding + head)."""
    return plan.train.planned_tokens / plan.model.params_scaling()


@dataclass(frozen=True)
class ProxySpec:
    """The proxy every trial of a study trains, with its measured cost. Stored in the study (as a dict), so
    every worker and every restart trains exactly the same proxy."""

    model: ModelSpec
    micro_batch: int
    grad_accum: int
    steps: int
    eval_tokens: int
    step_seconds: float
    overhead_seconds: float
    target_d_model: int
    target_params: int
    target_tokens: int
    notes: tuple[str, ...] = ()

    # -- derived ------------------------------------------------------------------------------------------
    def batch_tokens(self) -> int:
        return self.micro_batch * self.grad_accum * self.model.seq_len

    def tokens(self) -> int:
        """Tokens one trial trains on."""
        return self.steps * self.batch_tokens()

    def params(self) -> int:
        """N of the proxy (non-embedding + head)."""
        return self.model.params_scaling()

    def tokens_per_param(self) -> float:
        return self.tokens() / self.params()

    def horizon_correction(self) -> float:
        """LR factor from the proxy's token horizon to the target's: (D_target / D_proxy)^−0.32
        (Bjorck et al., ICLR 2025)."""
        return lr_horizon_correction(float(self.tokens()), float(self.target_tokens))

    def eval_seconds(self) -> float:
        """Estimated seconds of one evaluation: a no-grad forward pass, `costs.FORWARD_SPEEDUP` times faster a
        token than a training step (the runner's cost model)."""
        return self.step_seconds * self.eval_tokens / self.batch_tokens() / costs.FORWARD_SPEEDUP

    def train_seconds(self, steps: int | None = None) -> float:
        return (self.steps if steps is None else steps) * self.step_seconds

    def trial_seconds(self, *, width_scale: float = 1.0) -> float:
        """Expected wall seconds of one complete trial: set-up, steps, evaluations, final save.
        `width_scale` multiplies the per-token costs (a wider model at the same horizon)."""
        return self.overhead_seconds + width_scale * (self.train_seconds() + EVALS_PER_TRIAL * self.eval_seconds())

    def label(self) -> str:
        m = self.model
        return f"{m.n_layer}×{m.d_model} ({m.n_head} heads, {human_count(self.params())} params)"

    # -- the TrainSpec of one run ---------------------------------------------------------------------------
    def train_spec(self, base: TrainSpec, params: TrialParams, *, threads: int | None = None,
                   step_seconds: float | None = None) -> TrainSpec:
        """The plan's TrainSpec turned into this trial's: its hyperparameters, this proxy's batch and steps,
        the schedule keyed to steps, evaluations ~`EVALS_PER_TRIAL` times, no periodic checkpoints."""
        step_s = step_seconds or self.step_seconds
        train_s = max(1e-3, self.steps * step_s)
        spec = replace(
            base,
            budget_seconds=train_s,
            train_seconds=train_s,
            micro_batch=self.micro_batch,
            grad_accum=self.grad_accum,
            planned_steps=self.steps,
            planned_tokens=self.tokens(),
            max_steps=self.steps,
            compile=False,
            eval_every_seconds=train_s / EVALS_PER_TRIAL,
            eval_tokens=self.eval_tokens,
            checkpoint_every_seconds=NO_PERIODIC_CHECKPOINTS,
            keep_checkpoints=1,
            threads=threads if threads is not None else base.threads,
        )
        return params.apply(spec)

    # -- storage ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["notes"] = list(self.notes)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ProxySpec:
        raw = dict(raw)
        raw["model"] = ModelSpec(**raw["model"])
        raw["notes"] = tuple(raw.get("notes", ()))
        return cls(**raw)


# ------------------------------------------------------------------------------------------------------------
# Sizing


@dataclass(frozen=True)
class _Timing:
    step_seconds: float
    overhead_seconds: float


def _eval_tokens(plan: Plan, *, tokens: int, val_tokens: int) -> int:
    seq = plan.model.seq_len
    want = max(EVAL_WINDOWS_MIN * seq, int(tokens * EVAL_FRACTION_OF_TRIAL))
    want = min(want, plan.train.eval_tokens, max(seq, val_tokens - 1))
    return max(seq, want // seq * seq)


def min_trial_steps(plan: Plan) -> int:
    """The fewest steps a short run of `plan` may train: `MIN_TRIAL_STEPS`, or the target's own steps when it
    has fewer (a proxy never trains a longer horizon than the run it stands for)."""
    return max(1, min(MIN_TRIAL_STEPS, plan.train.planned_steps))


def proxy_steps(plan: Plan, model: ModelSpec) -> int:
    """Steps at the plan's batch that give `model` the plan's tokens per parameter (at least the minimum)."""
    tokens = tokens_per_param(plan) * model.params_scaling()
    return max(min_trial_steps(plan), round(tokens / plan.train.tokens_per_step()))


def warm_up(plan: Plan, data: RunData, *, threads: int | None = None) -> None:
    """Pay the process's one-off costs (importing torch and transformers, first-touch allocations, the first
    kernels) with two steps of the narrowest proxy, so that they do not inflate the first timing."""
    narrow = proxy_model(plan.model, proxy_widths(plan.model)[0])
    spec = replace(plan.train, micro_batch=1, grad_accum=1, max_steps=2, planned_steps=2, planned_tokens=2,
                   eval_tokens=plan.model.seq_len, checkpoint_every_seconds=NO_PERIODIC_CHECKPOINTS,
                   eval_every_seconds=NO_PERIODIC_CHECKPOINTS, compile=False, keep_checkpoints=1,
                   threads=threads if threads is not None else plan.train.threads)
    short_run(narrow, spec, data, cap=math.inf)


def measure_step(
    model: ModelSpec,
    plan: Plan,
    data: RunData,
    *,
    eval_tokens: int,
    threads: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> _Timing:
    """Time `MEASURE_STEPS` real training steps of `model` at the plan's batch: the mean step time, and the
    rest of the wall time (model build, first step, final evaluation and save) as fixed overhead."""
    train = plan.train
    probe = ProxySpec(
        model=model, micro_batch=train.micro_batch, grad_accum=train.grad_accum, steps=MEASURE_STEPS,
        eval_tokens=eval_tokens, step_seconds=0.05, overhead_seconds=0.0, target_d_model=plan.model.d_model,
        target_params=plan.model.params_scaling(), target_tokens=train.planned_tokens,
    )
    spec = probe.train_spec(train, TrialParams(lr=train.lr, warmup_fraction=0.0, cooldown_fraction=0.0),
                            threads=threads)
    outcome = short_run(model, spec, data, cap=math.inf, clock=clock)
    step = outcome.step_seconds() or max(outcome.wall_seconds / MEASURE_STEPS, 1e-4)
    eval_s = step * eval_tokens / train.tokens_per_step() / costs.FORWARD_SPEEDUP
    overhead = max(0.0, outcome.wall_seconds - (MEASURE_STEPS - 1) * step - eval_s)
    log.debug("measured %s: %.4f s/step, %.2f s overhead", model.d_model, step, overhead)
    return _Timing(step, overhead)


def size_proxy(
    plan: Plan,
    data: RunData,
    *,
    slice_seconds: float,
    threads: int | None = None,
    max_width: int | None = None,
    timings: dict[int, Any] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> ProxySpec:
    """The widest proxy (at most `max_width`) whose complete trial fits `slice_seconds` (module docstring);
    BudgetTooSmallError when even the narrowest cannot run `MIN_TRIAL_STEPS` steps in it. `timings`
    (width -> measured timing) caches measurements across calls."""
    if timings is None or not timings:
        warm_up(plan, data, threads=threads)
    timings = {} if timings is None else timings

    def measured(model: ModelSpec, eval_tokens: int) -> _Timing:
        if model.d_model not in timings:
            timings[model.d_model] = measure_step(model, plan, data, threads=threads, clock=clock,
                                                  eval_tokens=eval_tokens)
        return timings[model.d_model]

    target = plan.model
    train = plan.train
    widths = proxy_widths(target)
    widths = [w for w in widths if max_width is None or w <= max_width] or widths[:1]
    notes: list[str] = []
    B = train.tokens_per_step()

    def build(width: int, timing: _Timing, steps: int | None = None) -> ProxySpec:
        model = proxy_model(target, width)
        n_steps = steps if steps is not None else proxy_steps(plan, model)
        return ProxySpec(
            model=model, micro_batch=train.micro_batch, grad_accum=train.grad_accum, steps=n_steps,
            eval_tokens=_eval_tokens(plan, tokens=n_steps * B, val_tokens=len(data.val)),
            step_seconds=timing.step_seconds, overhead_seconds=timing.overhead_seconds,
            target_d_model=target.d_model, target_params=target.params_scaling(),
            target_tokens=train.planned_tokens, notes=tuple(notes),
        )

    narrow = proxy_model(target, widths[0])
    narrow_steps = proxy_steps(plan, narrow)
    timing0 = measured(narrow, _eval_tokens(plan, tokens=narrow_steps * B, val_tokens=len(data.val)))
    fpt0 = narrow.flops_per_token()

    def estimate(width: int) -> ProxySpec:
        scale = proxy_model(target, width).flops_per_token() / fpt0
        return build(width, _Timing(timing0.step_seconds * scale, timing0.overhead_seconds))

    fitting = [w for w in widths if estimate(w).trial_seconds() <= slice_seconds]
    if not fitting:
        # Even the narrowest is too dear at the plan's tokens per parameter: shorten its horizon.
        base = build(widths[0], timing0)
        per_step = base.step_seconds + EVALS_PER_TRIAL * base.eval_seconds() / base.steps
        # The tolerance keeps a slice of exactly `need` seconds (below) from rounding down to one step short.
        steps = math.floor((slice_seconds - base.overhead_seconds) / per_step + 1e-9) if per_step > 0 else 0
        fewest = min_trial_steps(plan)
        if steps < fewest:
            need = base.overhead_seconds + fewest * per_step
            raise BudgetTooSmallError(
                f"a trial may cost {slice_seconds:.1f} s, but the shortest trial on the narrowest proxy "
                f"({base.label()}) needs {need:.1f} s for {fewest} steps "
                f"({base.step_seconds:.3f} s a step, {base.overhead_seconds:.1f} s to set up)",
                trial_seconds=need,
            )
        notes.append(
            f"The narrowest proxy at the plan's {tokens_per_param(plan):.3g} tokens/parameter would need "
            f"{base.steps} steps; cut to {steps} to fit a trial's slice ({slice_seconds:.0f} s); the LR horizon "
            "correction uses the tokens actually trained."
        )
        return build(widths[0], timing0, steps=steps)

    width = fitting[-1]
    if width == widths[0]:
        return build(width, timing0)
    timing = measured(proxy_model(target, width), estimate(width).eval_tokens)
    chosen = build(width, timing)
    while chosen.trial_seconds() > OVER_SLICE_TOLERANCE * slice_seconds and width != widths[0]:
        # Measured slower than estimated: step down one width, scaling the new measurement.
        smaller = widths[widths.index(width) - 1]
        scale = proxy_model(target, smaller).flops_per_token() / chosen.model.flops_per_token()
        width = smaller
        chosen = build(width, _Timing(timing.step_seconds * scale, timing.overhead_seconds))
    return chosen


# ------------------------------------------------------------------------------------------------------------
# The transfer check's model


CHECK_MULTIPLIERS = (0.5, 1.0, 2.0)
"""The transfer check trains η*/2, η*, 2η*."""


def check_model(target: ModelSpec, proxy: ProxySpec, width: int) -> ModelSpec:
    """The transfer check's model: the target's shape at `width`, under μP with the proxy's base width."""
    return replace(proxy_model(target, width), mup_base_width=proxy.model.d_model)


def check_width(proxy: ProxySpec, target: ModelSpec, *, budget_seconds: float) -> int | None:
    """The transfer check's width: the widest multiple of d_head in (proxy, min(2·proxy, target)] whose three
    runs (at the proxy's steps, per-token cost scaled by FLOPs per token, which overestimates small widths)
    fit `budget_seconds`; the narrowest such width when none does; None when the proxy has the target's
    width (nothing wider to check)."""
    w_p, w_t, h = proxy.model.d_model, target.d_model, target.head_dim
    if w_t <= w_p:
        return None
    widths = list(range(w_p + h, min(2 * w_p, w_t) + 1, h)) or [w_t]
    fpt = proxy.model.flops_per_token()

    def cost(width: int) -> float:
        scale = proxy_model(target, width).flops_per_token() / fpt
        return len(CHECK_MULTIPLIERS) * proxy.trial_seconds(width_scale=scale)

    fitting = [w for w in widths if cost(w) <= budget_seconds]
    return fitting[-1] if fitting else widths[0]


def check_seconds(proxy: ProxySpec, timing: Any) -> float:
    """Wall seconds of the three check runs, from the check model's measured `timing`."""
    check = replace(proxy, step_seconds=timing.step_seconds, overhead_seconds=timing.overhead_seconds)
    return len(CHECK_MULTIPLIERS) * check.trial_seconds()


__all__ = [
    "CHECK_MULTIPLIERS",
    "EVALS_PER_TRIAL",
    "MIN_TRIAL_STEPS",
    "BudgetTooSmallError",
    "ProxySpec",
    "TrialParams",
    "check_model",
    "check_seconds",
    "check_width",
    "measure_step",
    "min_trial_steps",
    "proxy_model",
    "proxy_steps",
    "proxy_widths",
    "size_proxy",
    "tokens_per_param",
    "warm_up",
]
