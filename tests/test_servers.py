"""oneday against real servers, started by the tests on 127.0.0.1 (tests/servers.py; one PostgreSQL and one
`mlflow server` for the whole session): a shared Optuna study on PostgreSQL with workers, one of them on "another
machine" (its own hostname, so only the heartbeat can tell that it died), and `oneday run`, `compare` and `ui`
against an MLflow server with a PostgreSQL store and served artifacts, which is stopped and restarted mid-run.

Skipped without PostgreSQL's binaries, except under `CI=true`, where they fail (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import unavailable
from tests.test_tune_helpers import prepared_data, subprocess_env, tiny_plan, write_plan

ONEDAY = str(Path(sys.executable).with_name("oneday"))
OTHER_HOST = "othermachine"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_data(tmp_path_factory)


def _on_another_machine(command: list[str]) -> list[str]:
    """`command` in its own UTS namespace named OTHER_HOST: to oneday it runs on another machine (same pids, so
    the test can still kill it)."""
    if shutil.which("unshare") is None:
        unavailable("no unshare (util-linux) to give a worker a hostname of its own")
    rootless = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    probe = subprocess.run(["unshare", *rootless, "--uts", "true"], capture_output=True)
    if probe.returncode != 0:
        unavailable(f"unshare --uts is not allowed here: {probe.stderr.decode(errors='replace').strip()}")
    return ["unshare", *rootless, "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_HOST, *command]


def _trials(url: str, name: str):
    import optuna

    from oneday.studies.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(url)).trials


def test_workers_share_a_postgresql_study_and_a_dead_machines_trial_goes_stale(prepared, postgres, mlflow_server,
                                                                                tmp_path):
    from mlflow.tracking import MlflowClient

    from oneday.plan import load_plan
    from oneday.studies.storage import HEARTBEAT_ENV, HOST
    from oneday.tracking.names import experiment_name

    url = postgres.create_database("tune")
    plan_path = write_plan(tiny_plan(prepared, name="pgtune"), tmp_path)
    env = {**subprocess_env(), HEARTBEAT_ENV: "1"}  # stale after 3 s instead of 3 minutes
    common = ["--storage", url, "--study", "shared", "--tracking-uri", mlflow_server.uri]
    worker = [ONEDAY, "tune", str(plan_path), "--worker", *common]
    started = time.monotonic()
    processes = {
        "coordinator": subprocess.Popen([ONEDAY, "tune", str(plan_path), "--trials", "6", *common], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "local": subprocess.Popen(worker, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "remote": subprocess.Popen(_on_another_machine(worker), env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True),
    }
    remote = processes["remote"]
    victim = None
    try:
        while victim is None and time.monotonic() - started < 240 and remote.poll() is None:
            time.sleep(0.1)
            try:
                trials = _trials(url, "shared")
            except Exception:  # the study is not created yet
                continue
            done = any(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
            if done and any(t.state.name == "RUNNING" and t.user_attrs.get("host") == OTHER_HOST for t in trials):
                os.kill(remote.pid, signal.SIGSTOP)  # freeze, look again, then kill with the trial in flight
                running = [t for t in _trials(url, "shared")
                           if t.state.name == "RUNNING" and t.user_attrs.get("host") == OTHER_HOST]
                if running:
                    victim = running[0].number
                    os.kill(remote.pid, signal.SIGKILL)
                else:
                    os.kill(remote.pid, signal.SIGCONT)
        assert victim is not None, "the worker on the other machine never had a trial in flight after a finished one"
        outputs = {name: p.communicate(timeout=300)[0] for name, p in processes.items() if name != "remote"}
    finally:
        for process in processes.values():
            process.kill()
            process.communicate()
    for name in ("coordinator", "local"):
        assert processes[name].returncode == 0, outputs[name]
    assert (tmp_path / "plan.tuned.json").exists()
    trials = _trials(url, "shared")
    assert trials[victim].user_attrs["host"] == OTHER_HOST
    assert trials[victim].state.name == "FAIL"  # failed by its stale heartbeat: no pid could tell
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert 6 <= len(finished) <= 8  # the killed trial was replaced; two more processes may each start one extra
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none twice
    assert {t.user_attrs["host"] for t in trials} == {HOST, OTHER_HOST}
    pids = {t.user_attrs["pid"] for t in finished}
    assert {processes["coordinator"].pid, processes["local"].pid} <= pids, "both local processes ran trials"
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.get_experiment_by_name(experiment_name(load_plan(plan_path)))
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) >= len(finished) + 1, outputs["coordinator"]  # the parent run and a run per trial
    print(f"tune on PostgreSQL: {time.monotonic() - started:.1f} s")


def _runs(client, plan):
    from oneday.tracking.names import experiment_name

    experiment = client.get_experiment_by_name(experiment_name(plan))
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _steps_logged(run_dir: Path) -> int:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines()[-5:] if line.endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def served_run(prepared, mlflow_server, tmp_path_factory):
    """`oneday run` logging to the MLflow server, which is stopped for a while mid-run and started again."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("served")
    plan = tiny_plan(prepared, name="served", budget_seconds=75.0)  # room for a slow restart under load
    plan = replace(plan, train=replace(plan.train, eval_every_seconds=3.0, checkpoint_every_seconds=20.0))
    plan_path = write_plan(plan, root)
    run_dir = root / "run"
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    process = subprocess.Popen([ONEDAY, "run", str(plan_path), "--run-dir", str(run_dir), "--tracking-uri",
                                mlflow_server.uri], env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    outage: dict[str, float] = {}
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:  # the run is on the server, with metrics
            runs = _runs(client, plan)
            if runs and "train/loss" in runs[0].data.metrics and _steps_logged(run_dir) > 0:
                break
            time.sleep(0.5)
        assert process.poll() is None, process.communicate()[0]
        outage["step_down"] = _steps_logged(run_dir)
        outage["down_at"] = time.monotonic() - started
        mlflow_server.stop(crash=True)
        outage["stopped_at"] = time.monotonic() - started
        time.sleep(3.0)  # down for ~3 s plus the restart (seconds to tens of seconds under load)
        mlflow_server.start()
        outage["step_up"] = _steps_logged(run_dir)
        outage["up_at"] = time.monotonic() - started
        output = process.communicate(timeout=300)[0]
        outage["ended_at"] = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        if mlflow_server.process is None:
            mlflow_server.start()
    assert process.returncode == 0, output
    return {"plan": plan, "run_dir": run_dir, "output": output, "client": client, "outage": outage}


def test_a_run_logs_to_an_mlflow_server_through_an_outage(served_run, mlflow_server):
    import json

    from mlflow.entities import LoggedModelStatus

    plan, run_dir, client, outage = (served_run[k] for k in ("plan", "run_dir", "client", "outage"))
    summary = json.loads((run_dir / "summary.json").read_text())
    said = [line for line in served_run["output"].splitlines() if "MLflow" in line or "mlflow" in line]
    assert summary["tracking_error"] is None, f"{outage} {said}"
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params == plan.flat_params()
    assert {"mlflow.user", "mlflow.source.name", "mlflow.source.type"} <= set(run.data.tags)
    # every step's loss arrived, those logged while the server was down included
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    local = sorted({r["step"] for r in logged if r.get("kind") == "step"})
    during = [step for step in local if outage["step_down"] < step <= outage["step_up"]]
    assert len(during) >= 3, outage  # training went on (and logged) while the server was down
    assert set(during) <= set(steps), outage
    assert sorted(set(steps)) == local
    # the artifacts were uploaded through the server into its artifact root, not written beside the run
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    stored = {p.name for p in mlflow_server.artifacts.rglob("*") if p.is_file()}
    assert {"plan.json", "summary.json", "loss.png", "metrics.jsonl"} <= stored
    (logged_model,) = client.search_logged_models([run.info.experiment_id],
                                                  filter_string=f"source_run_id = '{run.info.run_id}'")
    assert logged_model.status == LoggedModelStatus.READY
    files = {Path(f.path).name for f in client.list_logged_model_artifacts(logged_model.model_id)}
    assert {"MLmodel", "config.json", "model.safetensors", "tokenizer.json"} <= files
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == plan.data.key
    client.create_registered_model("served")  # the registry takes the logged model
    version = client.create_model_version("served", f"models:/{logged_model.model_id}", run_id=run.info.run_id,
                                          model_id=logged_model.model_id)
    assert version.version == "1"


def test_compare_and_ui_against_the_server(served_run, mlflow_server):
    import json

    from typer.testing import CliRunner

    from oneday.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["compare", "--tracking-uri", mlflow_server.uri, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["runs"]
    assert any(r["name"].startswith("served") and r["val_loss"] is not None for r in rows), rows
    result = runner.invoke(app, ["ui", "--tracking-uri", mlflow_server.uri])
    assert result.exit_code == 0, result.output
    assert f"{mlflow_server.uri}/#/experiments/" in result.stdout
    assert f"{mlflow_server.uri}/#/compare-runs?runs=" in result.stdout


def test_a_bad_heartbeat_setting_is_one_line(monkeypatch):
    from oneday.errors import UserError
    from oneday.studies.storage import HEARTBEAT_ENV, heartbeat_seconds

    monkeypatch.setenv(HEARTBEAT_ENV, "soon")
    with pytest.raises(UserError, match=r"\$ONEDAY_TUNE_HEARTBEAT='soon': must be a whole number of seconds"):
        heartbeat_seconds()
    monkeypatch.setenv(HEARTBEAT_ENV, "5")
    assert heartbeat_seconds() == 5
    monkeypatch.delenv(HEARTBEAT_ENV)
    assert heartbeat_seconds() == 60
