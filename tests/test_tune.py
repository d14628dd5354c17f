"""`tune_plan`: a study on a tiny plan, its tuned plan (validates and trains), MLflow parent/child runs, a
resumed study that runs only the missing trials, a failing trial, and every trial diverging.

One study of 4 trials is run once (module fixture, ~30 s on a busy 2-core machine) and checked from every side.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest

from oneday.plan import load_plan
from tests.test_tune_helpers import PROXY_STEPS, fake_step_timings, prepared_data, tiny_plan, write_plan


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def tuned(prepared, tmp_path_factory):
    from oneday.studies.tune import tune_plan

    folder = tmp_path_factory.mktemp("tune")
    plan_path = write_plan(tiny_plan(prepared), folder)
    events = []
    result = tune_plan(plan_path, trials=4, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", on_trial=events.append)
    return {"folder": folder, "plan_path": plan_path, "result": result, "events": events}


def _study(tuned):
    import optuna

    from oneday.studies.storage import open_storage

    return optuna.load_study(study_name=tuned["result"].study, storage=open_storage(tuned["result"].storage))


def test_tuned_plan_validates_and_trains(tuned, prepared):
    from oneday.studies.short_run import capped_loss, load_run_data, short_run

    result = tuned["result"]
    plan = load_plan(result.out)
    assert result.out == tuned["plan_path"].with_name("plan.tuned.json")
    assert plan.name == "tiny-tuned"
    assert plan.model.parametrization == "mup"
    assert plan.model.mup_base_width == result.proxy.model.d_model == 32
    assert plan.model.width_mult() == 2.0
    best = result.best
    assert best is not None and best.params is not None
    assert plan.train.lr == pytest.approx(best.params.lr * result.proxy.horizon_correction(), rel=1e-6)
    # the proxy runs 30 steps, the target 97: too short for its schedule fractions to carry over
    original = load_plan(tuned["plan_path"])
    assert plan.provenance.tuning["schedule"]["searched_and_transferred"] is False
    assert (plan.train.warmup_fraction, plan.train.cooldown_fraction) == (
        original.train.warmup_fraction, original.train.cooldown_fraction)
    # the tuned plan trains: a few steps through the loop in max_steps mode
    spec = replace(plan.train, max_steps=4, planned_steps=4, eval_tokens=512, checkpoint_every_seconds=1e9)
    outcome = short_run(plan.model, spec, load_run_data(plan), cap=capped_loss(plan.model.vocab_size))
    assert outcome.steps == 4 and not outcome.diverged
    assert outcome.final_loss is not None and math.isfinite(outcome.final_loss)


def test_provenance_records_the_study(tuned):
    result = tuned["result"]
    text = Path(result.out).read_text()
    assert "NaN" not in text and "Infinity" not in text
    tuning = json.loads(text)["provenance"]["tuning"]
    assert tuning["study"] == result.study
    assert tuning["storage"] == str(tuned["plan_path"].with_name("plan.tune.journal").resolve())
    assert tuning["result"] == "tuned"
    assert tuning["best_value"] == pytest.approx(result.best.value, abs=1e-6)
    assert set(tuning["best_params"]) == {"lr", "warmup_fraction", "cooldown_fraction"}
    assert tuning["trials"]["total"] == 4
    assert tuning["lr"]["horizon_correction"] == pytest.approx(
        (tuning["proxy"]["tokens"] / load_plan(tuned["plan_path"]).train.planned_tokens) ** 0.32, rel=1e-4)
    assert tuning["mup"] == {"base_width": 32, "target_width": 64, "width_mult": 2.0,
                             "hidden_lr": pytest.approx(result.tuned_lr / 2)}
    schedule = tuning["schedule"]
    assert (schedule["proxy_steps"], schedule["target_steps"]) == (64, 206)
    assert "do not carry over" in schedule["reason"]
    assert {e.params.cooldown_fraction for e in tuned["events"]} == {0.2}  # not searched: the planner's
    check = tuning["transfer_check"]
    assert check["width"] == 64 and [r["multiplier"] for r in check["runs"]] == [0.5, 1.0, 2.0]
    assert isinstance(check["ok"], bool)
    assert tuning["proxy"]["d_model"] == 32 and tuning["proxy"]["n_layer"] == 2
    # the planner's default went first
    first = min(tuned["events"], key=lambda t: t.number)
    assert first.number == 0
    assert first.params.lr == pytest.approx(tuning["default"]["proxy_lr"], rel=1e-6)
    assert (tuned["folder"] / "plan.tuned.plots" / "lr_vs_loss.png").stat().st_size > 1000
    assert (tuned["folder"] / "plan.tuned.plots" / "optimization_history.png").stat().st_size > 1000


def test_mlflow_parent_and_child_runs(tuned):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tuned['folder'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("oneday/pydoc")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("oneday.kind") == "tune-study"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_id == tuned["result"].mlflow_run_id
    assert parent.data.metrics["best/value"] == pytest.approx(tuned["result"].best.value, rel=1e-6)
    assert "best/lr" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"optimization_history.png", "lr_vs_loss.png", "plan.tuned.json"} <= artifacts
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = [r for r in children if "oneday.trial.number" in r.data.tags]
    checks = [r for r in children if r.data.tags.get("oneday.tune.stage") == "transfer-check"]
    assert len(trials) == 4 and len(checks) == 3
    study = _study(tuned)
    by_number = {t.number: t for t in study.trials}
    expected_status = {"complete": "FINISHED", "pruned": "KILLED", "diverged": "FAILED", "failed": "FAILED"}
    for run in trials:
        assert run.data.tags["oneday.kind"] == "tune-trial"
        number = int(run.data.tags["oneday.trial.number"])
        state = run.data.tags["oneday.trial.state"]
        assert state == {"COMPLETE": "complete", "PRUNED": "pruned"}[by_number[number].state.name]
        assert run.info.status == expected_status[state]
        assert float(run.data.params["train.lr"]) == pytest.approx(by_number[number].params["lr"], rel=1e-6)
        history = client.get_metric_history(run.info.run_id, "val/loss")
        assert history, f"trial {number} has no val/loss curve"


def test_resumed_tune_runs_only_the_missing_trials(tuned):
    from oneday.studies.tune import tune_plan

    before = {t.number: t.params for t in _study(tuned).trials}
    events = []
    result = tune_plan(tuned["plan_path"], trials=6, tracking_uri=f"sqlite:///{tuned['folder'] / 'mlflow.db'}",
                       on_trial=events.append)
    started = sorted({e.number for e in events if e.state == "running"})
    assert started == [4, 5]
    study = _study(tuned)
    assert len(study.trials) == 6
    assert {t.number: t.params for t in study.trials if t.number in before} == before
    assert result.mlflow_run_id == tuned["result"].mlflow_run_id  # the same parent run, continued
    assert load_plan(result.out).provenance.tuning["trials"]["total"] == 6


def test_trials_without_hours_get_the_budget_they_need(prepared, monkeypatch, caplog):
    from oneday.errors import UserError
    from oneday.studies import study
    from oneday.studies.short_run import load_run_data

    fake_step_timings(monkeypatch)
    plan = tiny_plan(prepared, budget_seconds=2.0)  # its default tuning budget (0.4 s) cannot pay for 4 trials
    data = load_run_data(plan)

    def decide(trials: int, hours: float | None = None) -> study.StudySettings:
        return study._decide(plan, data, trials=trials, hours=hours, seed=0, beta2=False, weight_decay=False,
                             schedule="auto", clock=lambda: 0.0)

    with caplog.at_level(logging.INFO, logger=study.__name__):
        settings = decide(4)
    assert settings.n_trials == 4
    assert (settings.proxy.model.d_model, settings.proxy.steps) == (32, PROXY_STEPS)  # the cheapest trial
    assert settings.budget_seconds >= 4 * settings.proxy.trial_seconds() + 1.1 * settings.check_seconds
    assert settings.budget_seconds > study.DEFAULT_TUNE_SHARE * plan.train.budget_seconds
    assert "4 trials need" in caplog.text and "of the plan's 2s budget" in caplog.text
    # with --hours too, a budget that cannot pay for them stays an error naming both
    with pytest.raises(UserError, match="--trials 4") as refused:
        decide(4, hours=settings.budget_seconds / 3600 / 10)
    assert "--hours" in str(refused.value)


def test_a_worker_that_finds_no_study_leaves_no_journal(prepared, tmp_path):
    from oneday.errors import UserError
    from oneday.studies.tune import run_worker

    plan_path = write_plan(tiny_plan(prepared, name="alone"), tmp_path)
    with pytest.raises(UserError, match="no study"):
        run_worker(plan_path, wait_seconds=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_schedule_rule_and_search_space():
    import optuna

    from oneday.studies.proxy import TrialParams
    from oneday.studies.space import SearchSpace, schedule_rule

    assert schedule_rule(30, 97)[0] is False and "do not carry over" in schedule_rule(30, 97)[1]
    assert schedule_rule(50, 97)[0] is True
    assert schedule_rule(30, 97, "transfer")[0] is True and schedule_rule(90, 97, "keep")[0] is False
    default = TrialParams(lr=1e-3, warmup_fraction=0.05, cooldown_fraction=0.25)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lr_only = SearchSpace.around(default, schedule=False)
    assert lr_only.enqueue_params(default) == {"lr": 1e-3}
    params = lr_only.suggest(study.ask())
    assert (params.warmup_fraction, params.cooldown_fraction) == (0.05, 0.25)
    assert 1e-3 / 5 <= params.lr <= 1e-3 * 5
    full = SearchSpace.around(default, schedule=True, beta2=True)
    params = full.suggest(study.ask())
    assert 0 <= params.warmup_fraction <= 0.2 and 0.1 <= params.cooldown_fraction <= 0.6
    assert 0.9 <= params.beta2 <= 0.999
    assert SearchSpace.from_dict(full.to_dict()) == full


def test_fitted_lr_reads_the_vertex_and_refuses_bad_fits():
    import math

    from oneday.studies.proxy import TrialParams
    from oneday.studies.results import TrialResult
    from oneday.studies.transfer import fitted_lr

    def trial(n, lr, value, state="complete"):
        return TrialResult(number=n, state=state, params=TrialParams(lr=lr, warmup_fraction=0.1,
                                                                     cooldown_fraction=0.2), value=value)

    # loss = 3 + (ln lr − ln 4e-3)², sampled around the minimum, with one noisy near-tie
    lrs = [1e-3, 2e-3, 3e-3, 5e-3, 8e-3, 1.6e-2]
    trials = [trial(i, lr, 3 + (math.log(lr) - math.log(4e-3)) ** 2) for i, lr in enumerate(lrs)]
    lr, info = fitted_lr(trials)
    assert info["used"] and lr == pytest.approx(4e-3, rel=0.05)
    assert fitted_lr(trials[:4])[0] is None  # too few
    concave = [trial(i, lr, 3 - (math.log(lr) - math.log(4e-3)) ** 2) for i, lr in enumerate(lrs)]
    assert fitted_lr(concave)[0] is None
    edge = [trial(i, lr, 3 + (math.log(lr) - math.log(1e-1)) ** 2) for i, lr in enumerate(lrs)]
    assert fitted_lr(edge)[0] is None  # the minimum is beyond the LRs tried


def test_a_failing_trial_is_marked_failed_and_the_study_goes_on(prepared, tmp_path, monkeypatch):
    import optuna

    from oneday.studies import trials as trials_module
    from oneday.studies import tune as tune_module
    from oneday.studies.storage import open_storage

    real = trials_module.short_run
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash inside a trial")
        return real(*args, **kwargs)

    monkeypatch.setattr(trials_module, "short_run", flaky)
    plan_path = write_plan(tiny_plan(prepared, name="flaky"), tmp_path)
    result = tune_module.tune_plan(plan_path, trials=2, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    study = optuna.load_study(study_name=result.study, storage=open_storage(result.storage))
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1
    assert states.count("COMPLETE") + states.count("PRUNED") == 2
    failed = next(t for t in study.trials if t.state.name == "FAIL")
    assert "simulated crash" in failed.user_attrs["error"]
    assert load_plan(result.out).provenance.tuning["trials"]["failed"] == 1


def test_every_trial_diverging_keeps_the_default_lr(prepared, tmp_path, monkeypatch):
    import optuna

    from oneday.runner.faults import INJECT_NAN_ENV
    from oneday.studies.short_run import capped_loss
    from oneday.studies.storage import open_storage
    from oneday.studies.tune import tune_plan

    monkeypatch.setenv(INJECT_NAN_ENV, "1-")
    plan = tiny_plan(prepared, name="nan")
    plan_path = write_plan(plan, tmp_path)
    result = tune_plan(plan_path, trials=3, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.all_diverged and result.best is None
    assert result.tuned_lr == plan.train.lr
    assert any("diverged" in w for w in result.warnings)
    text = Path(result.out).read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = load_plan(result.out)
    assert written.train.lr == plan.train.lr
    assert written.model == plan.model  # left as the planner made it
    assert written.provenance.tuning["result"] == "all-diverged"
    study = optuna.load_study(study_name=result.study, storage=open_storage(result.storage))
    assert len(study.trials) == 3
    for trial in study.trials:
        assert trial.state.name == "COMPLETE" and trial.user_attrs["diverged"] is True
        assert trial.value == pytest.approx(capped_loss(512))


def test_an_interrupted_tune_marks_its_trial_failed_and_a_restart_continues(prepared, tmp_path, monkeypatch):
    import optuna

    from oneday.studies import trials as trials_module
    from oneday.studies import tune as tune_module
    from oneday.studies.storage import open_storage

    real = trials_module.short_run
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which the tuner turns into one) during trial 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trials_module, "short_run", interrupted)
    plan_path = write_plan(tiny_plan(prepared, name="interrupted"), tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(KeyboardInterrupt):
        tune_module.tune_plan(plan_path, trials=2, tracking_uri=uri)
    monkeypatch.setattr(trials_module, "short_run", real)
    result = tune_module.tune_plan(plan_path, trials=2, tracking_uri=uri)
    study = optuna.load_study(study_name=result.study, storage=open_storage(result.storage))
    states = [t.state.name for t in study.trials]
    assert states[:2] == ["COMPLETE", "FAIL"] and len(states) == 3 and states[2] in ("COMPLETE", "PRUNED")
    assert load_plan(result.out).provenance.tuning["trials"]["failed"] == 1
