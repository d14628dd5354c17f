"""Proxies: their shape, their sizing against a slice of the budget, one short run, the capped loss, the pruner."""

from __future__ import annotations

import math

import pytest

from oneday.models.spec import ModelSpec
from tests.test_tune_helpers import PROXY_STEPS, prepared_data, tiny_plan


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def test_proxy_keeps_depth_head_size_and_sequence_and_is_its_own_mup_base():
    from oneday.studies.proxy import proxy_model, proxy_widths

    target = ModelSpec(n_layer=6, d_model=384, n_head=6, d_ff=1024, vocab_size=4096, seq_len=256)
    assert proxy_widths(target) == [64, 128, 192, 256, 320]
    proxy = proxy_model(target, 128)
    assert (proxy.n_layer, proxy.head_dim, proxy.seq_len, proxy.vocab_size) == (6, 64, 256, 4096)
    assert proxy.n_head == 2 and proxy.d_ff == round(1024 / 3)
    assert proxy.parametrization == "mup" and proxy.mup_base_width == 128 and proxy.width_mult() == 1.0
    # one head: nothing narrower with the same head size
    assert proxy_widths(ModelSpec(n_layer=2, d_model=64, n_head=1, d_ff=128, vocab_size=256, seq_len=32)) == [64]
    with pytest.raises(ValueError):
        proxy_model(target, 100)


def test_proxy_spec_numbers_and_round_trip():
    from oneday.studies.proxy import ProxySpec, proxy_model

    target = ModelSpec(n_layer=2, d_model=128, n_head=4, d_ff=384, vocab_size=512, seq_len=32)
    spec = ProxySpec(model=proxy_model(target, 64), micro_batch=4, grad_accum=2, steps=50, eval_tokens=512,
                     step_seconds=0.02, overhead_seconds=0.5, target_d_model=128,
                     target_params=target.params_scaling(), target_tokens=256_000, notes=("n",))
    assert spec.batch_tokens() == 256 and spec.tokens() == 12_800
    assert spec.horizon_correction() == pytest.approx((256_000 / 12_800) ** -0.32)
    # an evaluation is a no-grad forward pass: FORWARD_SPEEDUP (3) times cheaper a token than a step (runner.costs)
    assert spec.trial_seconds() == pytest.approx(0.5 + 50 * 0.02 + 4 * 0.02 * 512 / 256 / 3)
    assert ProxySpec.from_dict(spec.to_dict()) == spec


def test_capped_loss_is_a_nat_above_uniform():
    from oneday.studies.short_run import RunOutcome, capped_loss

    assert capped_loss(512) == pytest.approx(math.log(512) + 1)
    nan_run = RunOutcome(final_loss=math.nan, diverged=False, stopped=False, steps=3, tokens=1, wall_seconds=1,
                         train_seconds=1, warmup_seconds=0, skipped_steps=0)
    assert nan_run.value(7.0) == 7.0
    assert RunOutcome(final_loss=5.0, diverged=True, stopped=False, steps=3, tokens=1, wall_seconds=1,
                      train_seconds=1, warmup_seconds=0, skipped_steps=0).value(7.0) == 7.0


def test_size_proxy_fits_the_slice_and_refuses_a_slice_too_small(prepared):
    from oneday.studies.proxy import MIN_TRIAL_STEPS, BudgetTooSmallError, size_proxy
    from oneday.studies.short_run import load_run_data

    plan = tiny_plan(prepared, d_model=96, n_head=3)  # proxies 32 and 64 wide
    data = load_run_data(plan)
    timings: dict = {}
    roomy = size_proxy(plan, data, slice_seconds=1e4, timings=timings)
    assert roomy.model.d_model == 64  # the widest that fits
    assert roomy.model.mup_base_width == 64
    # tokens per parameter kept: proxy tokens / N_proxy == plan tokens / N_target (up to rounding of steps)
    plan_tpp = plan.train.planned_tokens / plan.model.params_scaling()
    assert roomy.tokens() / roomy.params() == pytest.approx(plan_tpp, rel=0.05)
    # a slice the narrowest proxy just fits (from the same cached timings, so not a race against load)
    narrow = size_proxy(plan, data, slice_seconds=1e4, max_width=32, timings=timings)
    assert narrow.trial_seconds() < roomy.trial_seconds()
    tight = size_proxy(plan, data, slice_seconds=narrow.trial_seconds() * 1.05, timings=timings)
    assert tight.model.d_model == 32
    assert tight.steps >= MIN_TRIAL_STEPS
    with pytest.raises(BudgetTooSmallError, match="shortest trial"):
        size_proxy(plan, data, slice_seconds=1e-3, timings=timings)


def test_a_trial_trains_the_minimum_steps_but_never_more_than_the_target(prepared):
    from oneday.studies.proxy import MIN_TRIAL_STEPS, min_trial_steps, size_proxy
    from oneday.studies.short_run import load_run_data

    long = tiny_plan(prepared, proxy_steps=24)  # tokens per parameter would give the proxy 24 steps: lifted
    assert long.train.planned_steps > MIN_TRIAL_STEPS
    assert size_proxy(long, load_run_data(long), slice_seconds=1e4).steps == MIN_TRIAL_STEPS
    short = tiny_plan(prepared, proxy_steps=3)  # the target itself trains fewer steps than the minimum
    assert short.train.planned_steps < MIN_TRIAL_STEPS
    assert min_trial_steps(short) == short.train.planned_steps
    assert size_proxy(short, load_run_data(short), slice_seconds=1e4).steps == short.train.planned_steps


def test_a_budget_for_few_trials_says_how_much_would_do(prepared, caplog, monkeypatch):
    from oneday.studies import proxy, study
    from oneday.studies.short_run import load_run_data

    # Fixed step times (a width's cost in proportion to its d_model) and a clock that never moves: the sizing
    # is arithmetic, not a race against this machine's load.
    def fake_measure(model, *args, **kwargs):
        return proxy._Timing(step_seconds=1e-3 * model.d_model / 32, overhead_seconds=0.1)

    monkeypatch.setattr(proxy, "warm_up", lambda *args, **kwargs: None)
    monkeypatch.setattr(proxy, "measure_step", fake_measure)
    monkeypatch.setattr(study, "measure_step", fake_measure)
    plan = tiny_plan(prepared)
    data = load_run_data(plan)

    def decide(hours: float):
        return study._decide(plan, data, trials=None, hours=hours, seed=0, beta2=False, weight_decay=False,
                            schedule="auto", clock=lambda: 0.0)

    roomy = decide(1.0)
    assert roomy.n_trials >= study.FEW_TRIALS and "too few" not in caplog.text
    # a budget that pays for the transfer check and three and a half trials
    per_trial, check = roomy.proxy.trial_seconds(), 1.1 * roomy.check_seconds
    budget = check + 3.5 * per_trial
    if study.CHECK_SHARE * budget > check:
        budget = 3.5 * per_trial / (1 - study.CHECK_SHARE)
    tight = decide(budget / 3600)
    assert tight.proxy.steps == roomy.proxy.steps and tight.n_trials == 3
    assert "pays for only 3 trials" in caplog.text and "too few to search; about --hours" in caplog.text


def test_short_run_trains_and_reports_divergence(prepared, monkeypatch):
    from oneday.runner.faults import INJECT_NAN_ENV
    from oneday.studies.proxy import TrialParams, proxy_model
    from oneday.studies.short_run import capped_loss, load_run_data, short_run
    from oneday.studies.tune import tune_plan  # noqa: F401  (the module imports cleanly)

    plan = tiny_plan(prepared)
    data = load_run_data(plan)
    model = proxy_model(plan.model, 32)
    from dataclasses import replace

    spec = TrialParams(lr=3e-3, warmup_fraction=0.1, cooldown_fraction=0.3).apply(
        replace(plan.train, max_steps=PROXY_STEPS, planned_steps=PROXY_STEPS, eval_tokens=512,
                checkpoint_every_seconds=1e9))
    cap = capped_loss(512)
    good = short_run(model, spec, data, cap=cap)
    assert good.steps == PROXY_STEPS and not good.diverged and not good.stopped
    assert good.final_loss < math.log(512)  # it learned something
    assert good.value(cap) == good.final_loss

    monkeypatch.setenv(INJECT_NAN_ENV, "3-")
    bad = short_run(model, spec, data, cap=cap)
    assert bad.diverged and bad.value(cap) == cap
    assert bad.steps < PROXY_STEPS  # ended early
    assert "non-finite" in bad.reason


def test_pruner_stops_only_clear_losers():
    import optuna

    from oneday.studies.pruning import TolerantHalvingPruner

    pruner = TolerantHalvingPruner(min_resource=10, reduction_factor=2, tolerance=0.02)
    study = optuna.create_study(pruner=pruner)
    decisions = {}
    for name, value in (("first", 5.0), ("near", 5.05), ("far", 6.0), ("better", 4.8), ("nan", math.nan)):
        trial = study.ask()
        trial.report(value + 1, step=5)  # before the rung: not pruned (unless not finite)
        assert trial.should_prune() == (name == "nan")
        trial.report(value, step=12)
        decisions[name] = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if decisions[name] else None,
                   values=None if decisions[name] else value)
    assert decisions == {"first": False, "near": False, "far": True, "better": False, "nan": True}
