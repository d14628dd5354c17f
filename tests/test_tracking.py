"""Tracking: names, metrics.jsonl, the MLflow worker (sqlite and an unreachable server), plot, summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import oneday
from oneday.runner.records import FanOut
from oneday.runner.summary import RunSummary, load_summary
from oneday.tracking.names import default_experiment
from oneday.tracking.plots import plot_loss_curve
from oneday.tracking.recorder import RunRecorder, read_metrics
from oneday.tracking.store import resolve_tracking_uri
from oneday.tracking.system import SystemSampler
from oneday.tracking.writer import MlflowTracker


@dataclass(frozen=True)
class Step:
    step: int
    tokens: int
    lr: float
    loss: float
    grad_norm: float
    tokens_per_s: float
    mfu: float
    train_elapsed: float
    budget_fraction: float
    epoch: float


@dataclass(frozen=True)
class Eval:
    step: int
    tokens: int
    val_loss: float
    val_bpb: float
    train_elapsed: float
    final: bool


def _step(i: int, loss: float | None = None) -> Step:
    return Step(step=i, tokens=256 * i, lr=1e-3, loss=6.0 - 0.01 * i if loss is None else loss, grad_norm=1.0,
                tokens_per_s=1000.0, mfu=0.01, train_elapsed=0.1 * i, budget_fraction=i / 100, epoch=0.0)


def test_resolve_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri() == "http://example:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("builtin:pydoc", "oneday/pydoc"),
        ("roneneldan/TinyStories", "oneday/TinyStories"),
        ("/data/corpus.txt", "oneday/corpus"),
        ("/data/books.jsonl.gz", "oneday/books"),
    ],
)
def test_default_experiment(source, expected):
    assert default_experiment(source) == expected


def test_run_name():
    from oneday.tracking.names import format_run_name

    assert format_run_name("tiny", budget_seconds=60, params=412_000) == "tiny-1m-412k"
    assert format_run_name("tiny-1m", budget_seconds=60, params=412_000) == "tiny-1m-412k"
    assert format_run_name("gpt", budget_seconds=86400, params=124e6) == "gpt-24h-124M"


def test_read_metrics_skips_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "st')
    assert read_metrics(path) == [{"kind": "step", "step": 1}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_recorder_writes_every_record_and_forwards(tmp_path):
    sent = []

    class FakeTracker:
        def log_metrics(self, values, *, step, timestamp=None):
            sent.append((step, dict(values)))

    path = tmp_path / "metrics.jsonl"
    recorder = RunRecorder(path, tracker=FakeTracker(), predicted_loss=5.0, predicted_tokens=1e6)
    recorder.on_start(step=0, tokens=0, resumed=False)
    recorder.on_step(_step(10))
    recorder.on_step(_step(20, loss=float("nan")))
    recorder.on_eval(Eval(step=20, tokens=5120, val_loss=5.5, val_bpb=2.0, train_elapsed=2.0, final=False))
    recorder.on_event("skip", "non-finite loss", step=21)
    # written and flushed before close
    kinds = [r["kind"] for r in read_metrics(path)]
    assert kinds == ["event", "step", "step", "eval", "event"]
    recorder.finish(step=30, tokens=7680, final_loss=5.4)
    records = read_metrics(path)
    assert records[2]["loss"] is None  # NaN is not valid JSON: written as null
    assert records[4]["event"] == "skip" and records[4]["step"] == 21
    assert all("time" in r for r in records)
    first_step, first = sent[0]
    assert first_step == 10 and first["train/loss"] == pytest.approx(5.9)
    assert first["predicted/loss"] == 5.0 and first["predicted/tokens"] == 1e6
    assert {"lr", "tokens", "tokens_per_s", "mfu", "grad_norm", "budget_fraction"} <= set(first)
    assert sent[2] == (20, {"val/loss": 5.5, "val/bpb": 2.0})
    last_step, last = sent[-1]
    assert last_step == 30 and last["gap/loss"] == pytest.approx(0.4) and last["gap/tokens"] == 7680 - 1e6


def test_fan_out_drops_a_failing_observer(caplog):
    seen = []

    class Bad:
        def on_step(self, record):
            raise RuntimeError("boom")

    class Good:
        def on_step(self, record):
            seen.append(record.step)

    fan = FanOut(Bad(), None, Good())
    with caplog.at_level(logging.ERROR):
        fan.on_step(_step(1))
        fan.on_step(_step(2))
    assert seen == [1, 2]
    assert sum("boom" in r.getMessage() or "failed" in r.getMessage() for r in caplog.records) == 1
    fan.on_event("checkpoint", "saved", step=2)  # observers without the method are skipped


def test_mlflow_tracker_sqlite(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {f"section.key{i:03d}": "v" * (7000 if i == 0 else 3) for i in range(230)}  # > 100 per batch
    tracker = MlflowTracker(uri=uri, experiment="oneday/test", run_name="tiny-1m-0.4M", params=params,
                            tags={"oneday.kind": "run"}, system_every=0.2, flush_every=0.2).start()
    for i in range(1, 1201):  # > 1000 metrics per batch
        tracker.log_metrics({"train/loss": 6 - i / 1000, "lr": 1e-3, "skip": float("nan")}, step=i)
    artifact = tmp_path / "plan.json"
    artifact.write_text("{}")
    tracker.log_artifact(artifact)
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    tracker.log_artifacts(folder, "model")
    run_id = tracker.wait_ready(60)
    assert run_id
    time.sleep(0.5)  # let a system sample happen
    assert tracker.close(timeout=60)
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tiny-1m-0.4M"
    assert run.data.tags["oneday.kind"] == "run"
    # the tags mlflow.start_run would have set, though the run was made with MlflowClient.create_run
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"]
    if (Path(oneday.__file__).resolve().parents[1] / ".git").exists():  # a git checkout: its commit
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert len(run.data.params) == 230 and len(run.data.params["section.key000"]) == 6000
    history = client.get_metric_history(run_id, "train/loss")
    assert len(history) == 1200 and history[-1].step == 1200 and history[0].timestamp > 0
    assert "skip" not in run.data.metrics  # non-finite values are not sent
    assert "system/process_rss_megabytes" in run.data.metrics
    assert {f.path for f in client.list_artifacts(run_id)} == {"plan.json", "model"}
    assert [f.path for f in client.list_artifacts(run_id, "model")] == ["model/config.json"]
    # artifacts live beside the database, not in the working directory
    assert str(tmp_path) in run.info.artifact_uri

    # resuming continues the same run
    again = MlflowTracker(uri=uri, experiment="oneday/test", run_name="x", resume_run_id=run_id).start()
    again.log_metrics({"train/loss": 1.0}, step=1201)
    assert again.wait_ready(60) == run_id and again.resumed
    assert again.close(timeout=60)
    assert len(client.get_metric_history(run_id, "train/loss")) == 1201


def test_unreachable_server_does_not_block(caplog):
    with caplog.at_level(logging.WARNING, logger="oneday.tracking.writer"):
        started = time.monotonic()
        tracker = MlflowTracker(uri="http://127.0.0.1:9", experiment="e", run_name="r", params={"a": "b"}).start()
        for i in range(2000):
            tracker.log_metrics({"train/loss": 1.0}, step=i)
        tracker.log_artifact(__file__)
        enqueue = time.monotonic() - started
        assert tracker.wait_ready(10) is None
        assert tracker.close(timeout=10) is False
        assert time.monotonic() - started < 5
    assert enqueue < 0.5
    assert tracker.failed
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1:9" in warnings[0].getMessage()


def test_failure_mid_run_warns_once(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri=uri, experiment="e", run_name="r", flush_every=0.05).start()
    assert tracker.wait_ready(60)

    class Broken:
        def log_batch(self, *args, **kwargs):
            raise ConnectionError("store went away")

        def set_terminated(self, *args, **kwargs):
            raise ConnectionError("store went away")

    tracker._client = Broken()
    with caplog.at_level(logging.WARNING, logger="oneday.tracking.writer"):
        for i in range(50):
            tracker.log_metrics({"train/loss": 1.0}, step=i)
            time.sleep(0.01)
        assert tracker.close(timeout=10) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "store went away" in warnings[0].getMessage()


def test_system_sampler_cpu():
    sampler = SystemSampler(gpu=True)  # no driver here: GPU sampling is skipped quietly
    first = sampler.sample()
    assert first["system/process_rss_megabytes"] > 1
    time.sleep(0.05)
    assert "system/process_cpu_percentage" in sampler.sample()
    sampler.close()


def test_plot_loss_curve(tmp_path):
    records = [{"kind": "step", "step": i, "tokens": 100 * i, "loss": 6 - i / 50} for i in range(1, 50)]
    records += [{"kind": "step", "step": 10, "tokens": 1000, "loss": 5.0}]  # a resumed step, drawn once
    records += [{"kind": "eval", "step": i, "tokens": 100 * i, "val_loss": 6 - i / 45} for i in (10, 30, 49)]
    records += [{"kind": "event", "event": "skip", "step": 3}, {"kind": "step", "step": 4, "tokens": 400, "loss": None}]
    out = plot_loss_curve(records, tmp_path / "loss.png", predicted_loss=5.2, band=(5.0, 5.5), title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000


def _summary(**overrides) -> RunSummary:
    base = dict(
        plan_name="tiny", plan_hash="abc", run_dir="runs/tiny", device="cpu", budget_seconds=60.0,
        planned_train_seconds=50.0, planned_tokens=200_000, planned_steps=800, predicted_tokens=200_000,
        predicted_loss=5.0, predicted_loss_band=(4.8, 5.3), predicted_tokens_per_s=4000.0, predicted_mfu=0.1,
        steps=700, tokens=180_000, train_seconds=49.0, wall_seconds=59.5, session_wall_seconds=59.5,
        final_val_loss=5.1, final_val_bpb=2.2, mean_tokens_per_s=3600.0, mfu=0.09, final_lr=0.0,
        skipped_steps=1, rollbacks=0, resumes=0, interrupted=False, finished=True,
        events=({"kind": "skip", "message": "nan", "step": 5},),
    )
    base.update(overrides)
    return RunSummary(**base)


def test_summary_round_trip(tmp_path):
    summary = _summary()
    assert summary.loss_gap() == pytest.approx(0.1)
    assert summary.within_band() is True
    assert summary.tokens_gap() == -20_000
    assert summary.tokens_ratio() == pytest.approx(0.9)
    assert summary.budget_used() == pytest.approx(59.5 / 60)
    (tmp_path / "summary.json").write_text(summary.to_json())
    raw = json.loads((tmp_path / "summary.json").read_text())
    assert raw["derived"]["loss_gap"] == pytest.approx(0.1)
    assert load_summary(tmp_path) == summary
    unfinished = _summary(final_val_loss=None, final_val_bpb=None)
    assert unfinished.loss_gap() is None and json.loads(unfinished.to_json())["final_val_loss"] is None


def test_load_summary_errors(tmp_path):
    from oneday.errors import UserError

    with pytest.raises(UserError, match="has not finished"):
        load_summary(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_summary(Path(tmp_path) / "summary.json")


def test_a_failed_tracker_waits_without_spinning() -> None:
    """After a failure the writer thread blocks until it is closed: it takes no CPU from training (it used to
    poll its queue with a zero timeout, and a dead store halved the tokens/s of a run)."""
    tracker = MlflowTracker(uri="http://127.0.0.1:9/", experiment="oneday/test", run_name="dead").start()
    tracker.wait_ready(timeout=30)
    assert tracker.failed
    tracker.log_metrics({"train/loss": 1.0}, step=1)  # dropped, and wakes nothing
    time.sleep(3.5)  # past the writer's first flush and system-metrics times
    before = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - before < 0.2  # a spinning thread would burn ~1 s of CPU here
    assert tracker.close(timeout=5) is False


class _Flaky:
    """An MlflowClient whose `log_batch` fails while `down` is set, then passes calls to the real client."""

    def __init__(self, real, *, down: bool = True) -> None:
        self.real, self.down, self.failures = real, down, 0

    def log_batch(self, *args, **kwargs):
        if self.down:
            self.failures += 1
            raise ConnectionError("store went away")
        return self.real.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_store_that_comes_back_gets_the_buffered_metrics(tmp_path, caplog):
    """After a failure the writer used to drop everything that followed."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri=uri, experiment="e", run_name="r", flush_every=0.05, retry_first=0.3).start()
    run_id = tracker.wait_ready(60)
    flaky = _Flaky(tracker._client)
    tracker._client = flaky
    with caplog.at_level(logging.INFO, logger="oneday.tracking.writer"):
        for i in range(1, 101):
            tracker.log_metrics({"train/loss": 1.0 / i}, step=i)
            time.sleep(0.005)
        time.sleep(1.0)  # a few failed retries, with backoff
        assert tracker.failed and flaky.failures >= 2
        failures = flaky.failures
        time.sleep(1.0)
        assert flaky.failures <= failures + 1, "retrying without backing off"
        flaky.down = False
        for i in range(101, 111):
            tracker.log_metrics({"train/loss": 1.0 / i}, step=i)
        assert tracker.close(timeout=30)
    assert not tracker.failed
    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 111))
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "store went away" in warnings[0].getMessage()
    assert "answers again" in caplog.text


def test_a_store_down_at_start_gets_the_run_when_it_comes_up(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from oneday.tracking import writer

    real, calls = writer.open_experiment, []

    def down_twice(uri, experiment):
        calls.append(uri)
        if len(calls) <= 2:
            raise ConnectionError("connection refused")
        return real(uri, experiment)

    monkeypatch.setattr(writer, "open_experiment", down_twice)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri=uri, experiment="e", run_name="r", flush_every=0.05, retry_first=0.2,
                            params={"a": "1"}).start()
    assert tracker.wait_ready(30) is None and tracker.failed
    tracker.log_metrics({"train/loss": 2.0}, step=1)
    deadline = time.monotonic() + 60
    while tracker.run_id is None and time.monotonic() < deadline:
        time.sleep(0.1)
    tracker.log_metrics({"train/loss": 1.0}, step=2)
    assert tracker.close(timeout=30)
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.params == {"a": "1"} and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "train/loss")] == [1, 2]


def test_a_hung_store_cannot_hold_the_end_of_a_run(hung_server, caplog):
    tracker = MlflowTracker(uri=hung_server, experiment="e", run_name="r", flush_every=0.05).start()
    for i in range(100):
        tracker.log_metrics({"train/loss": 1.0}, step=i)
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG):
        assert tracker.close(timeout=1.5) is False
    assert time.monotonic() - started < 2.5
    assert tracker.failed and "no answer within" in tracker.error
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and loud[0].name == "oneday.tracking.writer", [r.getMessage() for r in loud]
