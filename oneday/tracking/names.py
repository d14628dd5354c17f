"""The names every oneday MLflow run shares, so runs from `run`, `tune` and calibration compare side by side.

One module holds them: the runner and the tuner log under these names, and
`oneday compare` / `oneday ui` read by them. Pure Python, no mlflow import: the CLI imports this cheaply.

- Tracking store: see `oneday.tracking.store`.
- Experiment: one per data set, `oneday/<short data set name>` (`builtin:pydoc` -> `oneday/pydoc`).
- Run name: `<plan name>-<budget>-<model size>` (`tiny-12s-172k`, `base-8h-124M`), parts already in the plan
  name are not repeated.
- Params: the flattened plan (`Plan.flat_params()`: `model.n_layer`, `model.d_model`, `train.lr`,
  `budget.hours`, ...), the same keys in every run.
- Tags: `oneday.kind` (one of `KINDS`), `oneday.plan_hash`, `oneday.plan_name`, `oneday.version`,
  `oneday.device`; a tune trial also carries MLflow's own `mlflow.parentRunId`.
- Metrics: the `METRIC_*` names below; the step is the optimizer step and every value carries a wall-clock
  timestamp, so MLflow's step axis and time axis both work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oneday.data.sources import short_name
from oneday.formats import human_count, human_seconds

if TYPE_CHECKING:  # oneday.plan imports the model spec; keep this module import-light
    from oneday.plan import Plan

EXPERIMENT_PREFIX = "oneday/"

# -- what a run is: the `oneday.kind` tag --------------------------------------------------------------------
TAG_PREFIX = "oneday."
TAG_KIND = "oneday.kind"
TAG_PLAN_HASH = "oneday.plan_hash"
TAG_PLAN_NAME = "oneday.plan_name"
TAG_VERSION = "oneday.version"
TAG_DEVICE = "oneday.device"
TAG_RUN_DIR = "oneday.run_dir"
TAG_INTERRUPTED = "oneday.interrupted"
TAG_STUDY = "oneday.study"
# MLflow's own tags
TAG_MLFLOW_RUN_NAME = "mlflow.runName"
TAG_MLFLOW_PARENT = "mlflow.parentRunId"

KIND_RUN = "run"
KIND_TUNE_STUDY = "tune-study"
KIND_TUNE_TRIAL = "tune-trial"
KIND_CALIBRATION = "calibration"
KIND_PROBE = "probe"
KINDS = (KIND_RUN, KIND_TUNE_STUDY, KIND_TUNE_TRIAL, KIND_CALIBRATION, KIND_PROBE)

# -- metrics (stable names: the comparison views key on them) ----------------------------------------------
METRIC_TRAIN_LOSS = "train/loss"
METRIC_VAL_LOSS = "val/loss"
METRIC_VAL_BPB = "val/bpb"
METRIC_VAL_LOSS_SE = "val/loss_se"  # the standard error of val/loss over the validation batches
METRIC_LR = "lr"
METRIC_TOKENS = "tokens"
METRIC_TOKENS_PER_S = "tokens_per_s"
METRIC_MFU = "mfu"
METRIC_GRAD_NORM = "grad_norm"
METRIC_BUDGET_FRACTION = "budget_fraction"
METRIC_EPOCH = "epoch"
METRIC_PREDICTED_LOSS = "predicted/loss"
METRIC_PREDICTED_TOKENS = "predicted/tokens"
METRIC_GAP_LOSS = "gap/loss"  # achieved − predicted, logged at the end
METRIC_GAP_TOKENS = "gap/tokens"
METRIC_EVAL_PREFIX = "eval/"  # `oneday eval`: eval/<task>/<metric> (lm-evaluation-harness scores)
METRICS = (
    METRIC_TRAIN_LOSS, METRIC_VAL_LOSS, METRIC_VAL_BPB, METRIC_LR, METRIC_TOKENS, METRIC_TOKENS_PER_S,
    METRIC_MFU, METRIC_GRAD_NORM, METRIC_BUDGET_FRACTION, METRIC_EPOCH, METRIC_PREDICTED_LOSS,
    METRIC_PREDICTED_TOKENS, METRIC_GAP_LOSS, METRIC_GAP_TOKENS,
)
# Training-loop record field -> metric name (the loop's StepRecord / EvalRecord fields).
STEP_METRICS = {
    "loss": METRIC_TRAIN_LOSS,
    "lr": METRIC_LR,
    "tokens": METRIC_TOKENS,
    "tokens_per_s": METRIC_TOKENS_PER_S,
    "mfu": METRIC_MFU,
    "grad_norm": METRIC_GRAD_NORM,
    "budget_fraction": METRIC_BUDGET_FRACTION,
    "epoch": METRIC_EPOCH,
}
EVAL_METRICS = {"val_loss": METRIC_VAL_LOSS, "val_bpb": METRIC_VAL_BPB, "val_loss_se": METRIC_VAL_LOSS_SE}

# -- params the comparison reads (keys of `Plan.flat_params()`) ---------------------------------------------
PARAM_BUDGET_HOURS = "budget.hours"
PARAM_BUDGET_SECONDS = "train.budget_seconds"
PARAM_PARAMS_TOTAL = "model.params_total"
PARAM_PARAMS_SCALING = "model.params_scaling"  # N: non-embedding + LM head
PARAM_N_LAYER = "model.n_layer"
PARAM_D_MODEL = "model.d_model"
PARAM_LR = "train.lr"
PARAM_PREDICTED_LOSS = "prediction.loss"
PARAM_PREDICTED_TOKENS = "prediction.tokens"


# -- functions ---------------------------------------------------------------------------------------------


def default_experiment(source: str) -> str:
    """`oneday/<short name of the data set>`: `builtin:pydoc` -> `oneday/pydoc`, `roneneldan/TinyStories`
    -> `oneday/TinyStories`, `/data/corpus.txt` -> `oneday/corpus` (`oneday.data.sources.short_name`)."""
    return f"{EXPERIMENT_PREFIX}{short_name(source)}"


def experiment_name(plan: Plan) -> str:
    """The experiment a plan's runs go to: one per data set (`default_experiment` of the data spec)."""
    return default_experiment(plan.data.spec or plan.data.source)


def format_run_name(plan_name: str, *, budget_seconds: float, params: int) -> str:
    """`<plan name>-<budget>-<size>`, e.g. `tiny-12s-172k`; parts already in the plan name are not repeated."""
    parts = [plan_name]
    for extra in (human_seconds(budget_seconds), human_count(params)):
        if extra.lower() not in plan_name.lower().split("-"):
            parts.append(extra)
    return "-".join(parts)


def run_name(plan: Plan) -> str:
    """The MLflow run name of a plan's run: plan name, budget and total parameter count."""
    return format_run_name(plan.name, budget_seconds=plan.budget_seconds(), params=plan.model.params_total())


def run_tags(*, kind: str, plan_hash: str, plan_name: str, version: str, device: str) -> dict[str, str]:
    """The tags that say what a run is (`kind` one of `KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"oneday.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return {TAG_KIND: kind, TAG_PLAN_HASH: plan_hash, TAG_PLAN_NAME: plan_name, TAG_VERSION: version,
            TAG_DEVICE: device}


__all__ = [
    "EVAL_METRICS",
    "KINDS",
    "METRICS",
    "STEP_METRICS",
    "default_experiment",
    "experiment_name",
    "format_run_name",
    "run_name",
    "run_tags",
]
