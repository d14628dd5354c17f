"""MLflow logging for a tuning study (its plots are drawn by `oneday.tracking.plots`).

The study is a parent run (`oneday.kind=tune-study`): the plan's params, then the best value and best
params, an optimization-history PNG and an LR-vs-loss PNG, and the tuned plan. Each trial is a child run
(`oneday.kind=tune-trial`, MLflow's `mlflow.parentRunId`) with its hyperparameters as params (under the
flattened-plan keys `train.lr`, `train.warmup_fraction`, ... so trials line up with runs in the compare
view), its loss curves (`val/loss`, `train/loss`, `lr` per optimizer step) and its state: the tag
`oneday.trial.state` (complete / pruned / failed / diverged) and the run status (FINISHED / KILLED for pruned
/ FAILED for failed and diverged). The transfer-check runs are children too (`oneday.tune.stage`).

Logged directly with `MlflowClient` (optuna-integration's `MLflowCallback` is deprecated since 4.9): calls
are few per trial and synchronous. A tracking store that cannot be reached, or fails part way, never stops
tuning: the first failure logs ONE warning and tracking is off for the rest of the process; the Optuna study
holds every result anyway. For an HTTP store the port is probed first (3 s) and MLflow's HTTP retries are
capped, so an outage costs seconds, not minutes. mlflow and matplotlib are imported when first used.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oneday import __version__
from oneday.errors import first_line
from oneday.formats import finite_or_none
from oneday.tracking.names import (
    KIND_TUNE_STUDY,
    KIND_TUNE_TRIAL,
    METRIC_LR,
    METRIC_TRAIN_LOSS,
    METRIC_VAL_LOSS,
    TAG_MLFLOW_PARENT,
    TAG_MLFLOW_RUN_NAME,
    TAG_STUDY,
    run_tags,
)
from oneday.tracking.store import open_experiment, standard_run_tags
from oneday.tracking.writer import MAX_PARAM_VALUE, MAX_PARAMS_PER_BATCH

log = logging.getLogger(__name__)

TAG_TRIAL_STATE = "oneday.trial.state"
TAG_TRIAL_NUMBER = "oneday.trial.number"
TAG_STAGE = "oneday.tune.stage"
STATUS_OF_STATE = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "diverged": "FAILED"}


class StudyTracker:
    """Parent and child runs of one study in one experiment. Every method returns quietly after a failure
    (one warning, then tracking is off); methods that create runs return the run id or None."""

    def __init__(self, uri: str, experiment: str, *, plan_hash: str, plan_name: str, device: str,
                 study: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self.study = study
        self._base_tags = {**run_tags(kind=KIND_TUNE_TRIAL, plan_hash=plan_hash, plan_name=plan_name,
                                      version=__version__, device=device), TAG_STUDY: study}
        self._client: Any = None
        self._experiment_id: str | None = None
        self.error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    # -- plumbing -----------------------------------------------------------------------------------------
    def _fail(self, doing: str, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"MLflow tracking at {self.uri} failed while {doing}: {first_line(exc)}"
            log.warning("%s; tuning goes on without MLflow (the study keeps every result)", self.error)

    def _ensure(self) -> bool:
        if self.failed:
            return False
        if self._client is not None:
            return True
        try:
            self._client, self._experiment_id = open_experiment(self.uri, self.experiment)
            return True
        except Exception as exc:
            self._fail("connecting", exc)
            return False

    def _batch(self, run_id: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
               metrics: Sequence[tuple[str, float, int]] = ()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        items_p = [Param(k, str(v)[:MAX_PARAM_VALUE]) for k, v in sorted((params or {}).items())]
        items_t = [RunTag(k, str(v)[:8000]) for k, v in (tags or {}).items()]
        items_m = [Metric(k, v, now, step) for k, value, step in metrics if (v := finite_or_none(value)) is not None]
        for i in range(0, max(len(items_p), len(items_t), 1), MAX_PARAMS_PER_BATCH):
            p, t = items_p[i:i + MAX_PARAMS_PER_BATCH], items_t[i:i + MAX_PARAMS_PER_BATCH]
            if p or t:
                self._client.log_batch(run_id, params=p, tags=t, synchronous=True)
        for i in range(0, len(items_m), 1000):
            self._client.log_batch(run_id, metrics=items_m[i:i + 1000], synchronous=True)

    # -- runs -----------------------------------------------------------------------------------------------
    def start_parent(self, *, run_name: str, params: Mapping[str, Any], resume_run_id: str | None = None) -> str | None:
        """Create the study's parent run (or mark an earlier one RUNNING again); its run id."""
        if not self._ensure():
            return None
        try:
            if resume_run_id:
                try:
                    run = self._client.get_run(resume_run_id)
                    if run.info.experiment_id == self._experiment_id and run.info.lifecycle_stage == "active":
                        self._client.update_run(resume_run_id, status="RUNNING")
                        return resume_run_id
                except Exception:
                    pass
            tags = {**standard_run_tags(), **self._base_tags, "oneday.kind": KIND_TUNE_STUDY,
                    TAG_MLFLOW_RUN_NAME: run_name}
            run = self._client.create_run(self._experiment_id, run_name=run_name, tags=tags)
            self._batch(run.info.run_id, params=params)
            return run.info.run_id
        except Exception as exc:
            self._fail("creating the study's run", exc)
            return None

    def start_child(self, *, parent_run_id: str | None, run_name: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any] | None = None) -> str | None:
        """A child run of the study (a trial or a transfer-check run); its run id."""
        if not self._ensure():
            return None
        try:
            all_tags = {**standard_run_tags(), **self._base_tags, TAG_MLFLOW_RUN_NAME: run_name, **(tags or {})}
            if parent_run_id:
                all_tags[TAG_MLFLOW_PARENT] = parent_run_id
            # str(): an HTTP server's protobuf takes only strings (a store on disk took the int trial number)
            run = self._client.create_run(self._experiment_id, run_name=run_name,
                                          tags={k: str(v) for k, v in all_tags.items()})
            self._batch(run.info.run_id, params=params)
            return run.info.run_id
        except Exception as exc:
            self._fail(f"creating run {run_name}", exc)
            return None

    def log(self, run_id: str | None, *, metrics: Sequence[tuple[str, float, int]] = (),
            params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None) -> None:
        """Metrics as (name, value, step); non-finite values are left out."""
        if run_id is None or not self._ensure():
            return
        try:
            self._batch(run_id, params=params, tags=tags, metrics=metrics)
        except Exception as exc:
            self._fail("logging", exc)

    def artifact(self, run_id: str | None, path: str | os.PathLike[str]) -> None:
        if run_id is None or not self._ensure() or not Path(path).exists():
            return
        try:
            self._client.log_artifact(run_id, str(path))
        except Exception as exc:
            self._fail(f"uploading {Path(path).name}", exc)

    def end(self, run_id: str | None, *, status: str = "FINISHED") -> None:
        if run_id is None or not self._ensure():
            return
        try:
            self._client.set_terminated(run_id, status=status)
        except Exception as exc:
            self._fail("ending a run", exc)


class TrialCurve:
    """An `Observer` that collects one trial's curves and sends them to its child run at each evaluation
    (a handful of log_batch calls per trial)."""

    def __init__(self, tracker: StudyTracker | None, run_id: str | None) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self._pending: list[tuple[str, float, int]] = []

    def on_step(self, record: Any) -> None:
        self._pending += [(METRIC_TRAIN_LOSS, record.loss, record.step), (METRIC_LR, record.lr, record.step)]

    def on_eval(self, record: Any) -> None:
        self._pending.append((METRIC_VAL_LOSS, record.val_loss, record.step))
        self.flush()

    def flush(self) -> None:
        if self.tracker is not None and self._pending:
            self.tracker.log(self.run_id, metrics=self._pending)
        self._pending = []


__all__ = ["STATUS_OF_STATE", "TAG_STAGE", "TAG_TRIAL_NUMBER", "TAG_TRIAL_STATE", "StudyTracker", "TrialCurve"]
