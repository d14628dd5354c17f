"""`oneday compare` and the comparison library: reading runs back (sqlite fast path and MlflowClient agree),
rows, sorting, blanks for older runs, bad input, JSON, the plot, the UI links, and the shared names.

Runs are logged through `MlflowClient` the way the runner logs them (same names from
`oneday.tracking.names`): a few seconds, no training. `log_fake_run` is also used by bench/compare_speed.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from oneday.cli import app
from oneday.errors import UserError
from oneday.plan import Plan
from oneday.tracking import names
from oneday.tracking import store as tracking_store
from tests.factories import make_plan, tiny_model

cli = CliRunner()


# --------------------------------------------------------------------------------------------------------
# Fake runs, logged like the runner logs them


def fake_plan(*, name: str = "tiny", d_model: int = 64, lr: float = 3e-3, budget_seconds: float = 60.0) -> Plan:
    plan = make_plan(model=tiny_model(d_model=d_model, d_ff=3 * d_model), lr=lr, budget_seconds=budget_seconds,
                     train_seconds=budget_seconds)
    return replace(plan, name=name)


def log_fake_run(client: Any, experiment_id: str, plan: Plan, *, val_loss: float | None, tokens: int,
                 kind: str = names.KIND_RUN, steps: int = 5, start_ms: int | None = None,
                 extra_metrics: dict[str, float] | None = None) -> str:
    """One finished run as `oneday run` leaves it: flattened plan params, the oneday tags, per-step
    train/loss and speed metrics, val loss/bpb, predicted and gap metrics. Returns the run id."""
    from mlflow.entities import Metric, Param

    tags = names.run_tags(kind=kind, plan_hash=f"{abs(hash(plan.name)) % 10**16:016d}", plan_name=plan.name,
                          version="test", device="cpu (test cpu)")
    run = client.create_run(experiment_id, run_name=names.run_name(plan), tags=tags, start_time=start_ms)
    run_id = run.info.run_id
    params = [Param(k, v[:6000]) for k, v in sorted(plan.flat_params().items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
    t0 = start_ms or 1_700_000_000_000
    metrics = []
    for step in range(1, steps + 1):
        ts = t0 + 1000 * step
        metrics += [
            Metric(names.METRIC_TRAIN_LOSS, 6.0 - 0.1 * step - 0.001 * plan.model.d_model, ts, step),
            Metric(names.METRIC_TOKENS, tokens * step / steps, ts, step),
            Metric(names.METRIC_TOKENS_PER_S, 1000.0 + plan.model.d_model, ts, step),
            Metric(names.METRIC_MFU, 0.01 * plan.model.d_model / 64, ts, step),
        ]
    end = t0 + 1000 * (steps + 1)
    predicted = {names.METRIC_PREDICTED_LOSS: plan.prediction.loss,
                 names.METRIC_PREDICTED_TOKENS: float(plan.prediction.tokens)}
    metrics += [Metric(k, v, t0 + 1000, 1) for k, v in predicted.items()]
    final = dict(predicted)
    final[names.METRIC_GAP_TOKENS] = tokens - plan.prediction.tokens
    if val_loss is not None:
        final[names.METRIC_VAL_LOSS] = val_loss
        final[names.METRIC_VAL_BPB] = val_loss / math.log(2) / 4.0
        final[names.METRIC_GAP_LOSS] = val_loss - plan.prediction.loss
    final.update(extra_metrics or {})
    metrics += [Metric(k, v, end, steps) for k, v in final.items()]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    client.set_terminated(run_id, "FINISHED", end_time=end)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict[str, Any]:
    """Three oneday runs in `oneday/test`, a tune trial beside them, an older-oneday run with almost nothing,
    and a plain MLflow experiment with a non-oneday run."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("oneday/test")
    t = 1_700_000_000_000
    ids = {
        "a": log_fake_run(client, exp, fake_plan(name="a", d_model=64, lr=3e-3, budget_seconds=7200),
                          val_loss=4.5, tokens=150_000, start_ms=t),
        "b": log_fake_run(client, exp, fake_plan(name="b", d_model=128, lr=1e-3, budget_seconds=28800),
                          val_loss=4.1, tokens=210_000, start_ms=t + 60_000),
        "c": log_fake_run(client, exp, fake_plan(name="c", d_model=64, lr=2e-3, budget_seconds=86400),
                          val_loss=4.3, tokens=90_000, start_ms=t + 120_000),
        "trial": log_fake_run(client, exp, fake_plan(name="trial"), val_loss=3.0, tokens=1000,
                              kind=names.KIND_TUNE_TRIAL, start_ms=t + 180_000),
    }
    # An older oneday: a version tag and a val loss, nothing else (no kind, no params, no predictions).
    old = client.create_run(exp, run_name="old-run", tags={names.TAG_VERSION: "0.0.1"}, start_time=t - 60_000)
    client.log_metric(old.info.run_id, names.METRIC_VAL_LOSS, float("nan"), step=3)
    client.log_metric(old.info.run_id, names.METRIC_TOKENS, 5000.0, step=3)
    client.set_terminated(old.info.run_id, "FINISHED")
    ids["old"] = old.info.run_id
    plain = client.create_experiment("plain")
    other = client.create_run(plain, run_name="not-oneday")
    client.log_metric(other.info.run_id, "accuracy", 0.9)
    return {"uri": uri, "db": root / "mlflow.db", "ids": ids, "experiment_id": exp, "plain_id": plain}


def run_cli(*args: str) -> tuple[int, str, str]:
    result = cli.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


# --------------------------------------------------------------------------------------------------------
# The library


def test_compare_rows(store):
    from oneday.compare.runs import compare_runs

    comparison = compare_runs(store["uri"])
    assert comparison.experiment == "oneday/test"
    assert [r.name for r in comparison.rows][:3] == ["b-8h-558k", "c-24h-172k", "a-2h-172k"]
    # the older run sorts last (no val loss) and the tune trial is left out by default
    assert [r.name for r in comparison.rows] == ["b-8h-558k", "c-24h-172k", "a-2h-172k", "old-run"]
    b = comparison.rows[0]
    assert b.budget_hours == 8 and b.d_model == 128 and b.lr == 1e-3
    assert b.params_scaling == fake_plan(d_model=128).model.params_scaling()
    assert b.tokens == 210_000 and b.predicted_tokens == 200_000
    assert b.val_loss == 4.1 and b.predicted_loss == 5.0 and b.gap_loss == pytest.approx(-0.9)
    assert b.gap_tokens == 10_000 and b.mfu == pytest.approx(0.02) and b.tokens_per_s == 1128
    assert b.kind == "run" and b.status == "FINISHED" and b.device == "cpu (test cpu)"
    assert comparison.best() == b
    assert comparison.seconds < 3


def test_older_run_gives_blanks(store):
    from oneday.compare.runs import compare_runs

    old = next(r for r in compare_runs(store["uri"]).rows if r.name == "old-run")
    assert old.kind == "run" and old.tokens == 5000
    for field in ("budget_hours", "params_scaling", "val_loss", "val_bpb", "predicted_loss", "gap_loss", "mfu",
                  "tokens_per_s", "lr", "d_model"):
        assert getattr(old, field) is None, field  # NaN val loss is blank too


def test_sqlite_reader_agrees_with_mlflow_client(store):
    from oneday.compare.readers import ClientReader, SqliteReader
    from oneday.compare.runs import row_from_record, select_runs

    fast = select_runs(SqliteReader(store["db"]), last=50, kinds=None)
    slow = select_runs(ClientReader(store["uri"]), last=50, kinds=None)
    assert fast.experiment == slow.experiment == "oneday/test"
    assert [r.run_id for r in fast.records] == [r.run_id for r in slow.records]
    for a, b in zip(fast.records, slow.records, strict=True):
        assert dict(a.params) == dict(b.params)
        assert {k: v for k, v in a.tags.items() if not k.startswith("mlflow.")} == \
            {k: v for k, v in b.tags.items() if not k.startswith("mlflow.")}
        ra, rb = row_from_record(a), row_from_record(b)
        assert ra == rb


def test_last_kinds_and_experiment(store):
    from oneday.compare.runs import compare_runs

    assert [r.name for r in compare_runs(store["uri"], last=2, sort="start").rows] == ["c-24h-172k", "b-8h-558k"]
    every = compare_runs(store["uri"], kinds=None)
    assert {r.kind for r in every.rows} == {"run", "tune-trial"}
    trials = compare_runs(store["uri"], kinds=["tune-trial"])
    assert [r.name for r in trials.rows] == ["trial-1m-172k"]
    assert compare_runs(store["uri"], experiment="oneday/test").experiment_id == store["experiment_id"]


@pytest.mark.parametrize(("key", "first"), [
    ("val_loss", "b-8h-558k"), ("-val_loss", "a-2h-172k"), ("budget", "a-2h-172k"), ("tokens", "b-8h-558k"),
    ("params", "c-24h-172k"), ("gap", "b-8h-558k"), ("name", "a-2h-172k"), ("tok/s", "b-8h-558k"),
    ("start", "c-24h-172k"), ("lr", "b-8h-558k"),
])
def test_sort(store, key, first):
    from oneday.compare.runs import compare_runs

    rows = compare_runs(store["uri"], sort=key).rows
    assert rows[0].name == first
    assert rows[-1].name == "old-run" or key in ("name", "start", "tokens", "-val_loss")


def test_differing_params(store):
    from oneday.compare.runs import compare_runs

    comparison = compare_runs(store["uri"])
    diff = comparison.differing_params
    for key in ("model.d_model", "train.lr", "budget.hours", "name"):
        assert key in diff
    assert "train.seed" not in diff and "provenance.created" not in diff
    assert diff["model.d_model"][:3] == ["128", "64", "64"]  # in row order
    assert diff["model.d_model"][3] is None  # the older run has no params


def test_plot(store, tmp_path):
    from oneday.compare.runs import compare_runs

    out = tmp_path / "cmp.png"
    comparison = compare_runs(store["uri"], plot=out)
    assert comparison.plot == str(out) and out.read_bytes()[:4] == b"\x89PNG"
    out2 = tmp_path / "tokens.png"
    compare_runs(store["uri"], plot=out2, plot_x="tokens")
    assert out2.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="does not exist"):
        compare_runs(store["uri"], plot=tmp_path / "nope" / "x.png")


def test_bad_input(store, tmp_path):
    from oneday.compare.runs import compare_runs

    with pytest.raises(UserError, match="holds no oneday runs"):
        compare_runs(store["uri"], experiment="plain")
    with pytest.raises(UserError, match=r"no experiment named 'nope'.*oneday/test"):
        compare_runs(store["uri"], experiment="nope")
    with pytest.raises(UserError, match="--sort: unknown key"):
        compare_runs(store["uri"], sort="bogus")
    with pytest.raises(UserError, match="--kind: unknown kind"):
        compare_runs(store["uri"], kinds=["bogus"])
    missing = tmp_path / "none.db"
    with pytest.raises(UserError, match="no MLflow store at"):
        compare_runs(f"sqlite:///{missing}")
    assert not missing.exists()
    junk = tmp_path / "junk.db"
    junk.write_text("not a database at all " * 100)
    with pytest.raises(UserError, match="not an MLflow store"):
        compare_runs(f"sqlite:///{junk}")
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(UserError, match=r"not an MLflow store \(no table experiments\)"):
        compare_runs(f"sqlite:///{empty}")
    assert empty.stat().st_size == 0  # no tables created in it


def test_empty_store(tmp_path):
    from mlflow.tracking import MlflowClient

    from oneday.compare.runs import compare_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the tables and the Default experiment
    with pytest.raises(UserError, match="no oneday runs of kind run in this store"):
        compare_runs(uri)


def test_links():
    from oneday.compare.ui import compare_url, experiment_url, metric_url

    assert experiment_url("http://h:1/", "7") == "http://h:1/#/experiments/7"
    assert compare_url("http://h:1", ["r1", "r2"], ["7", "7"]) == \
        'http://h:1/#/compare-runs?runs=["r1","r2"]&experiments=["7"]'
    url = metric_url("http://h:1", ["r1"], ["7"])
    assert url.startswith('http://h:1/#/metric/?runs=["r1"]&metric=%22train%2Floss%22&experiments=["7"]')
    assert "plot_metric_keys=%5B%22train%2Floss%22%5D" in url and "x_axis=step" in url


# --------------------------------------------------------------------------------------------------------
# The command


def test_cli_table(store):
    code, out, err = run_cli("compare", "--tracking-uri", store["uri"])
    assert code == 0, err
    for text in ("oneday/test", "b-8h-558k", "c-24h-172k", "a-2h-172k", "old-run", "4.100", "5.000", "-0.900",
                 "8h", "24h", "492k", "210k", "2.0%", "1.13k", "differing params:", "model.d_model"):
        assert text in out, text
    assert "trial" not in out


def test_cli_json(store):
    code, out, _ = run_cli("compare", "--tracking-uri", store["uri"], "--json", "--last", "3", "--sort", "budget")
    assert code == 0
    data = json.loads(out)
    assert [r["name"] for r in data["runs"]] == ["a-2h-172k", "b-8h-558k", "c-24h-172k"]
    assert data["best_run_id"] == store["ids"]["b"]
    assert data["runs"][0]["val_loss"] == 4.5 and data["runs"][0]["budget_hours"] == 2
    assert set(data["differing_params"]) >= {"model.d_model", "train.lr"}
    code, out, _ = run_cli("compare", "--tracking-uri", store["uri"], "--json", "--kind", "all")
    assert {r["kind"] for r in json.loads(out)["runs"]} == {"run", "tune-trial"}


def test_cli_older_run_json_has_nulls(store):
    code, out, _ = run_cli("compare", "--tracking-uri", store["uri"], "--json")
    assert code == 0
    old = next(r for r in json.loads(out)["runs"] if r["name"] == "old-run")
    assert old["val_loss"] is None and old["budget_hours"] is None and old["tokens"] == 5000


def test_cli_plot(store, tmp_path):
    out_png = tmp_path / "p.png"
    code, out, err = run_cli("compare", "--tracking-uri", store["uri"], "--plot", str(out_png), "--plot-x", "tokens")
    assert code == 0, err
    assert f"plot: {out_png}" in out and out_png.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--experiment", "plain"], "experiment 'plain' holds no oneday runs (it holds 1 run not made by oneday)"),
    (["--experiment", "nope"], "no experiment named 'nope'"),
    (["--sort", "bogus"], "--sort: unknown key 'bogus'"),
    (["--kind", "bogus"], "--kind: unknown kind bogus"),
    (["--plot-x", "hours"], "--plot-x: must be budget or tokens"),
])
def test_cli_bad_input(store, args, message):
    code, _, err = run_cli("compare", "--tracking-uri", store["uri"], *args)
    assert code == 2
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_cli_missing_store_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = run_cli("compare")
    assert code == 2
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in " ".join(err.split())
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_reads_env_uri(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    code, out, _ = run_cli("compare", "--json", "--last", "1", "--sort", "start")
    assert code == 0 and json.loads(out)["runs"][0]["name"] == "c-24h-172k"


def test_cli_import_stays_light():
    code = ("import sys, oneday.cli; heavy = [m for m in ('mlflow', 'matplotlib', 'torch') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------------------------------------
# Shared names


def test_names(monkeypatch, tmp_path):
    plan = fake_plan(name="base-8h", budget_seconds=28800, d_model=128)
    assert names.run_name(plan) == "base-8h-558k"
    assert names.run_name(fake_plan(budget_seconds=12)) == "tiny-12s-172k"
    assert names.experiment_name(plan) == "oneday/test"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_store.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://x:5000")
    assert tracking_store.resolve_tracking_uri() == "http://x:5000"
    assert tracking_store.resolve_tracking_uri("sqlite:///a.db") == "sqlite:///a.db"
    assert tracking_store.sqlite_path("sqlite:///a.db") == tmp_path / "a.db"
    assert tracking_store.sqlite_path("sqlite:////abs/b.db") == Path("/abs/b.db")
    assert tracking_store.sqlite_path("sqlite:///:memory:") is None and tracking_store.sqlite_path("http://x") is None
    assert names.run_tags(kind="tune-study", plan_hash="h", plan_name="p", version="v", device="d") == {
        "oneday.kind": "tune-study", "oneday.plan_hash": "h", "oneday.plan_name": "p", "oneday.version": "v",
        "oneday.device": "d"}
    with pytest.raises(ValueError, match=r"oneday\.kind"):
        names.run_tags(kind="trial", plan_hash="h", plan_name="p", version="v", device="d")
    assert set(names.METRICS) >= {"train/loss", "val/loss", "val/bpb", "tokens", "tokens_per_s", "mfu",
                                  "predicted/loss", "predicted/tokens", "gap/loss", "gap/tokens"}
