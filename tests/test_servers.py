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
