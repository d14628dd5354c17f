"""`oneday tune` on bad input (one line, exit 2) and as separate processes: two `--worker`s on one journal study,
and a worker killed in the middle of a trial whose study a restarted tune then finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from oneday.cli import app
from oneday.plan import save_plan
from tests.factories import make_plan, one_error_line
from tests.test_tune_helpers import fake_step_timings, prepared_data, subprocess_env, tiny_plan, write_plan

runner = CliRunner()
ONEDAY = str(Path(sys.executable).with_name("oneday"))


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["tune", *args])
    return result.exit_code, result.stderr



@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def test_a_plan_that_fails_validation(tmp_path):
    raw = make_plan().to_dict()
    raw["train"]["warmup_fraction"] = 2.0
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    code, err = _invoke(str(path))
    assert code == 2
    assert "train.warmup_fraction: must be in [0, 1)" in one_error_line(err)
    assert not (tmp_path / "plan.tune.journal").exists()


def test_zero_trials(tmp_path):
    path = save_plan(make_plan(), tmp_path / "plan.json")
    code, err = _invoke(str(path), "--trials", "0")
    assert code == 2
    assert "--trials: must be at least 1" in one_error_line(err)


def test_a_budget_smaller_than_one_trial(prepared, tmp_path):
    path = write_plan(tiny_plan(prepared), tmp_path)
    code, err = _invoke(str(path), "--hours", "0.0001", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 2
    line = one_error_line(err)
    assert "--hours 0.0001" in line and "one trial" in line
    assert not (tmp_path / "plan.tuned.json").exists()


def test_a_refused_tune_leaves_nothing_behind(prepared, tmp_path, monkeypatch):
    fake_step_timings(monkeypatch)
    path = write_plan(tiny_plan(prepared), tmp_path)
    code, err = _invoke(str(path), "--hours", "0.00001", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 2
    assert "one trial" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no empty journal, no MLflow store


def test_a_refusal_keeps_an_existing_journal_untouched(prepared, tmp_path, monkeypatch):
    import optuna

    from oneday.studies.storage import open_storage

    fake_step_timings(monkeypatch)
    path = write_plan(tiny_plan(prepared), tmp_path)
    journal = tmp_path / "plan.tune.journal"
    optuna.create_study(storage=open_storage(str(journal)), study_name="earlier")  # a study the user keeps
    before = journal.read_bytes()
    code, err = _invoke(str(path), "--hours", "0.00001")
    assert code == 2
    assert "one trial" in one_error_line(err)
    assert journal.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "plan.tune.journal"]


def test_trials_and_hours_that_cannot_pay_for_them(prepared, tmp_path, monkeypatch):
    fake_step_timings(monkeypatch)
    path = write_plan(tiny_plan(prepared), tmp_path)
    code, err = _invoke(str(path), "--trials", "4", "--hours", "0.00001")
    assert code == 2
    line = one_error_line(err)
    assert "--hours 1e-05" in line and "--trials 4" in line and "at least --hours" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_an_unreachable_storage(prepared, tmp_path):
    path = write_plan(tiny_plan(prepared), tmp_path)
    started = time.monotonic()
    code, err = _invoke(str(path), "--storage", "postgresql://127.0.0.1:1/x", "--study", "s")
    assert code == 2
    assert "--storage postgresql://127.0.0.1:1/x" in one_error_line(err)
    assert time.monotonic() - started < 20


def test_a_storage_folder_that_does_not_exist(prepared, tmp_path):
    path = write_plan(tiny_plan(prepared), tmp_path)
    code, err = _invoke(str(path), "--storage", str(tmp_path / "nope" / "study.journal"))
    assert code == 2
    assert "does not exist" in one_error_line(err)


_STORAGES: dict[str, object] = {}


def _study(storage: Path | str, name: str):
    import optuna

    from oneday.studies.storage import open_storage

    if str(storage) not in _STORAGES:
        _STORAGES[str(storage)] = open_storage(str(storage))
    return optuna.load_study(study_name=name, storage=_STORAGES[str(storage)])


def _worker(plan_path: Path, storage: Path | str, name: str, mlflow_db: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [ONEDAY, "tune", str(plan_path), "--worker", "--storage", str(storage), "--study", name,
         "--tracking-uri", f"sqlite:///{mlflow_db}"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def test_two_workers_share_one_study(prepared, tmp_path):
    from oneday.studies.tune import prepare_study

    plan_path = write_plan(tiny_plan(prepared, name="workers"), tmp_path)
    storage, db = tmp_path / "shared.journal", tmp_path / "mlflow.db"
    name, settings = prepare_study(plan_path, trials=6, storage=str(storage), study_name="shared",
                                   tracking_uri=f"sqlite:///{db}")
    assert settings.n_trials == 6
    workers = [_worker(plan_path, storage, name, db) for _ in range(2)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out
    study = _study(storage, name)
    trials = study.trials
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 6 <= len(finished) <= 7  # two workers may both start the last missing trial
    assert not [t for t in trials if t.state.name in ("FAIL", "RUNNING", "WAITING")]
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none twice
    pids = {w.pid for w in workers}
    ran = [t.user_attrs["pid"] for t in trials]
    assert set(ran) == pids, "both workers made progress"
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)
    # the planner's default (enqueued) ran exactly once, as trial 0
    assert trials[0].user_attrs.get("note") == "planner default"


def test_a_killed_worker_trial_is_failed_and_the_restart_finishes_the_study(prepared, tmp_path):
    """On an RDB storage (sqlite here, as PostgreSQL would be): the study, then a worker, killed mid-trial."""
    from oneday.studies.tune import prepare_study, tune_plan

    plan_path = write_plan(tiny_plan(prepared, name="killed"), tmp_path)
    storage, db = f"sqlite:///{tmp_path / 'optuna.db'}", tmp_path / "mlflow.db"
    name, _ = prepare_study(plan_path, trials=4, storage=str(storage), study_name="killed",
                            tracking_uri=f"sqlite:///{db}")
    worker = _worker(plan_path, storage, name, db)
    victim = None
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            running = [t for t in _study(storage, name).trials
                       if t.state.name == "RUNNING" and t.user_attrs.get("pid") == worker.pid]
            done = [t for t in _study(storage, name).trials if t.state.name in ("COMPLETE", "PRUNED")]
            if running and done:  # at least one finished trial, and one in flight: kill it there
                # Freeze the worker first, so the trial cannot finish between looking and killing (a race
                # under load); then look again and kill it only with a trial still in flight.
                os.kill(worker.pid, signal.SIGSTOP)
                running = [t for t in _study(storage, name).trials
                           if t.state.name == "RUNNING" and t.user_attrs.get("pid") == worker.pid]
                if running:
                    victim = running[0].number
                    os.kill(worker.pid, signal.SIGKILL)
                    break
                os.kill(worker.pid, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        worker.kill()
        worker.communicate()
    assert victim is not None, "the worker never had a trial in flight after a finished one"
    before = {t.number: (t.state.name, t.params) for t in _study(storage, name).trials
              if t.state.name in ("COMPLETE", "PRUNED")}
    assert _study(storage, name).trials[victim].state.name == "RUNNING"  # left behind by the dead process

    events = []
    result = tune_plan(plan_path, storage=str(storage), study_name=name, tracking_uri=f"sqlite:///{db}",
                       on_trial=events.append)
    study = _study(storage, name)
    assert study.trials[victim].state.name == "FAIL"
    assert "process died" in study.trials[victim].user_attrs["error"]
    after = {t.number: (t.state.name, t.params) for t in study.trials if t.number in before}
    assert after == before  # finished trials were not repeated or changed
    new = sorted({e.number for e in events if e.state == "running"})
    assert all(n > victim for n in new)
    assert len(new) == 4 - len(before)
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials) == 4
    assert result.out is not None and result.out.exists()


def test_the_trial_table_ends_its_line_in_a_log_file(capsys):
    """Off a terminal rich leaves the live table's last line open; what follows must start a line of its own."""
    from oneday.commands.tune import TrialView
    from oneday.studies.proxy import TrialParams
    from oneday.studies.results import TrialResult

    view = TrialView()
    params = TrialParams(lr=3e-3, warmup_fraction=0.1, cooldown_fraction=0.2)
    view.on_trial(TrialResult(number=0, state="running", params=params))
    view.on_trial(TrialResult(number=0, state="complete", params=params, value=5.25, seconds=1.0))
    view.close()
    err = capsys.readouterr().err
    assert "5.2500" in err and err.rstrip(" ").endswith("┘\n"), repr(err[-80:])
