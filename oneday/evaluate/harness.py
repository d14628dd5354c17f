"""`evaluate_run`: score a run's final model on benchmarks with lm-evaluation-harness, and record the scores.

The scoring is lm_eval's own (`simple_evaluate` over its `HFLM` wrapper of the saved model and tokenizer):
nothing here computes an accuracy. This module resolves what the user asked for (the run folder's `final/`
model, task names or task YAML paths), turns lm_eval's failures into one-line `UserError`s (an unknown task, a
task whose data is not cached while the hub is unreachable), adds the chance level beside each score, and
writes the result to `RUN/eval.json` (atomically; a later evaluation of other tasks is merged in) and to the
run's MLflow run as `eval/<task>/<metric>` metrics (the run id is the one `run.json` records).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday.errors import UserError, first_line
from oneday.evaluate import tasks as task_names
from oneday.paths import write_atomic
from oneday.tracking import names

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
EVAL_KIND = "oneday-eval"
BATCH_SIZE = {"cpu": 16, "cuda": 64}
"""Sequences a forward pass scores at once: small models on short multiple-choice items fit either easily."""
BOOTSTRAP_ITERS = 100
"""Resamples for the stderr of metrics without a closed form (perplexity); accuracy's stderr is closed-form."""
PRIMARY_METRICS = ("acc_norm", "acc", "perplexity", "word_perplexity")
"""The score shown first: length-normalised accuracy where the task has it (the number small-model reports
quote for HellaSwag/ARC), else accuracy, else perplexity."""


@dataclass(frozen=True)
class TaskScore:
    """One task's scores as lm_eval reports them (filter suffix `,none` dropped), with its chance level."""

    task: str
    metrics: dict[str, float]
    items: int
    chance: float | None = None

    @property
    def primary(self) -> str | None:
        return next((name for name in PRIMARY_METRICS if name in self.metrics), next(iter(self.metrics), None))


@dataclass(frozen=True)
class EvalResult:
    """What `oneday eval` measured on one run (the content of `eval.json` for these tasks)."""

    run_dir: str
    model_dir: str
    device: str
    limit: int | None
    scores: tuple[TaskScore, ...]
    seconds: float
    """Scoring only (lm_eval's requests); loading the tasks' data and the model is `load_seconds`."""
    lm_eval_version: str
    finished: str = ""
    mlflow_run_id: str | None = None
    mlflow_note: str | None = None
    load_seconds: float = 0.0

    @property
    def items(self) -> int:
        return sum(score.items for score in self.scores)

    @property
    def seconds_per_1000_items(self) -> float | None:
        return 1000 * self.seconds / self.items if self.items else None

    def mlflow_metrics(self) -> dict[str, float]:
        """`eval/<task>/<metric>` -> value, finite values only (MLflow refuses NaN in some stores)."""
        return {f"{names.METRIC_EVAL_PREFIX}{score.task}/{name}": value for score in self.scores
                for name, value in score.metrics.items() if math.isfinite(value)}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scores"] = {score.task: {"metrics": score.metrics, "items": score.items, "chance": score.chance,
                                       "primary": score.primary} for score in self.scores}
        data["items"] = self.items
        data["seconds_per_1000_items"] = self.seconds_per_1000_items
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"


def check_options(*, limit: int | None, device: str | None, threads: int | None = None) -> None:
    """`UserError` naming the option that is out of range (as `oneday eval` spells it)."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads: must be >= 1, got {threads}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be >= 1 (items per task), got {limit}")
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: must be cpu, cuda or cuda:N, got {device!r}")


def final_model_dir(run_dir: str | Path) -> Path:
    """`RUN/final`, checked: `UserError` when the folder or its model is missing or cut short."""
    from oneday.runner.sample import check_safetensors_complete

    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: no such run folder")
    final = root / "final"
    if not (final / "config.json").is_file():
        raise UserError(f"{root}: holds no final model (final/config.json is missing: the run has not finished; "
                        "rerun `oneday run` to finish it)")
    for weights in sorted(final.glob("*.safetensors")):
        check_safetensors_complete(weights)
    return final


def _check_eval_file(path: Path) -> dict[str, Any]:
    """The earlier `eval.json` oneday wrote here (merged with the new scores), or {}; `UserError` when a file of
    that name is there that oneday did not write (it is never overwritten)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("kind") != EVAL_KIND:
        raise UserError(f"{path}: exists and was not written by `oneday eval`; move it away first")
    return data


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no GPU that torch can use")
    return device


def resolve_tasks(requested: Sequence[str], *, include_paths: Sequence[Path]) -> tuple[list[str], bool]:
    """The specs to load (names, or YAML paths) and whether lm_eval's built-in tasks are needed; `UserError`
    for a path that does not exist or a name no task file declares (with the closest names)."""
    included: set[str] = set()
    for folder in include_paths:
        if not folder.is_dir():
            raise UserError(f"--include-path {folder}: no such folder")
        included |= task_names.task_names_in(folder)
    specs: list[str] = []
    builtin_needed = False
    for task in requested:
        if task in included:
            specs.append(task)
        elif task_names.is_task_path(task):
            path = task_names.check_task_path(task)
            if path.is_dir():
                found = sorted(task_names.task_names_in(path, kinds=("task",)))
                if not found:
                    raise UserError(f"--tasks: {task}: the folder holds no task YAML (no `task:` line)")
                specs += found
            else:
                specs.append(str(path.resolve()))
        elif task in task_names.builtin_task_names():
            specs.append(task)
            builtin_needed = True
        else:
            raise task_names.unknown_task_error(task, included | task_names.builtin_task_names())
    return list(dict.fromkeys(specs)), builtin_needed


@dataclass(frozen=True)
class EvalRequest:
    """Benchmarks to run after training (`oneday run --eval`), checked before any training starts."""

    tasks: tuple[str, ...]
    limit: int | None = None


def check_eval_request(tasks: Sequence[str], *, limit: int | None = None) -> EvalRequest:
    """`UserError` (naming `--eval` / `--eval-limit`) for what would make the benchmarks fail after a whole run:
    lm_eval not installed, an unknown task or missing task file, a limit below 1. Imports neither lm_eval
    nor torch."""
    import importlib.util

    if limit is not None and limit < 1:
        raise UserError(f"--eval-limit: must be >= 1 (items per task), got {limit}")
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--eval needs lm-evaluation-harness: pip install 'oneday[eval]' (or lm_eval)")
    try:
        resolve_tasks(tasks, include_paths=())
    except UserError as exc:
        raise UserError(str(exc).replace("--tasks", "--eval", 1)) from None
    return EvalRequest(tasks=tuple(tasks), limit=limit)


def read_scores(run_dir: str | Path) -> tuple[TaskScore, ...]:
    """The scores `eval.json` in `run_dir` holds (every task evaluated so far), or () when there is none."""
    try:
        data = json.loads((Path(run_dir) / EVAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ()
    if not isinstance(data, dict) or data.get("kind") != EVAL_KIND:
        return ()
    return tuple(TaskScore(task=task, metrics=dict(entry.get("metrics") or {}), items=int(entry.get("items") or 0),
                           chance=entry.get("chance")) for task, entry in (data.get("scores") or {}).items())


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise UserError("oneday eval needs lm-evaluation-harness: pip install 'oneday[eval]' (or lm_eval)") from None
    return lm_eval


class _OnceFilter(logging.Filter):
    """Lets the first record containing `text` through and counts the rest (lm_eval warns once per request
    when an item is longer than the model's context: thousands of lines for a small model)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text not in record.getMessage():
            return True
        self.count += 1
        return self.count == 1


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm_eval logs every request batch at INFO, warns once per request truncated to the model's context, and
    runs `git describe` in the current folder (its stderr says "fatal: not a git repository" outside one, and
    inside one it records the user's repository, not the model's): keep its logging at WARNING, say the
    truncation once with the count, and skip the git call."""
    import lm_eval.evaluator as evaluator

    logger = logging.getLogger("lm_eval")
    model_logger = logging.getLogger("lm_eval.models.huggingface")
    truncated = _OnceFilter("exceeds model's maximum length")
    level, git_hash = logger.level, evaluator.get_git_commit_hash
    logger.setLevel(max(level, logging.WARNING) if not log.isEnabledFor(logging.DEBUG) else level)
    model_logger.addFilter(truncated)
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(level)
        model_logger.removeFilter(truncated)
        evaluator.get_git_commit_hash = git_hash
        if truncated.count > 1:
            log.warning("%d requests were longer than the model's context and lost their start (lm_eval truncates "
                        "from the left); a model trained with a longer seq_len scores them whole", truncated.count)


def load_tasks(specs: Sequence[str], *, include_paths: Sequence[Path], builtin_needed: bool) -> tuple[Any, list[Any]]:
    """lm_eval's TaskManager and the leaf Task objects for `specs` (their data loaded), one spec at a time so
    that a failure names its task. lm_eval's own task index is only built when a built-in task is asked for
    (it takes 15–20 s on a small CPU machine)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=builtin_needed)
    loaded: list[Any] = []
    for spec in specs:
        try:
            result = manager.load([spec])
        except KeyError:
            raise task_names.unknown_task_error(spec, manager.all_tasks) from None
        except Exception as exc:
            offline = task_names.offline_data_error(spec, exc)
            if offline is not None:
                raise offline from None
            raise UserError(f"task {spec}: cannot be loaded ({first_line(exc)})") from None
        loaded += [task for task in result["tasks"].values() if task not in loaded]
    return manager, loaded


def _hf_model(final: Path, *, device: str) -> Any:
    """lm_eval's HFLM over the saved model and tokenizer (fp32: small models, and scores that do not depend on
    the GPU's bf16 support)."""
    from lm_eval.models.huggingface import HFLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar; lm_eval's own bar shows the scoring
    try:
        return HFLM(pretrained=str(final), tokenizer=str(final), device=device, dtype="float32",
                    batch_size=BATCH_SIZE["cpu" if device == "cpu" else "cuda"])
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{final}: cannot load the model ({first_line(exc)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _chance(task: Any, *, limit: int | None) -> float | None:
    """Accuracy by guessing uniformly among each item's choices, over the items scored (multiple choice);
    else the known chance of the task (LAMBADA: ~0), or None."""
    name = task.config.task
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
        return task_names.CHANCE.get(name)
    try:
        docs = list(task.eval_docs)
        docs = docs[:limit] if limit is not None else docs
        counts = [len(task.doc_to_choice(doc)) for doc in docs]
    except Exception as exc:  # a chance level is not worth failing the evaluation for
        log.debug("no chance level for %s: %s", name, exc)
        return task_names.CHANCE.get(name)
    return sum(1 / n for n in counts if n) / len(counts) if counts else None


def _scores(results: dict[str, Any], task_objects: Sequence[Any], *, limit: int | None) -> tuple[TaskScore, ...]:
    by_name = {task.config.task: task for task in task_objects}
    samples = results.get("n-samples", {})
    scores = []
    for name, values in results["results"].items():
        if name not in by_name:  # a group's aggregate: its tasks are reported one by one
            continue
        metrics: dict[str, float] = {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
        items = int(samples.get(name, {}).get("effective", values.get("sample_len", 0)) or 0)
        scores.append(TaskScore(task=name, metrics=metrics, items=items,
                                chance=_chance(by_name[name], limit=limit)))
    return tuple(scores)


def find_mlflow_run(run_dir: Path) -> tuple[str | None, str | None]:
    """The MLflow store and run id `oneday run` recorded in `run.json` (None, None when it has none)."""
    try:
        data = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    mlflow = data.get("mlflow") if isinstance(data, dict) else None
    if not isinstance(mlflow, dict) or not mlflow.get("run_id"):
        return None, None
    return mlflow.get("uri"), mlflow["run_id"]


def log_to_mlflow(run_dir: Path, metrics: dict[str, float]) -> tuple[str | None, str | None]:
    """Log `metrics` to the run's MLflow run; (run id, None) when logged, else (run id or None, why not).
    A store that is down or gone costs a warning, never the evaluation."""
    from oneday.tracking.store import unreachable_reason

    uri, run_id = find_mlflow_run(run_dir)
    if run_id is None or uri is None:
        return None, f"{run_dir / 'run.json'} records no MLflow run"
    reason = unreachable_reason(uri)
    if reason is not None:
        return run_id, f"MLflow store {uri}: {reason}"
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        stamp = int(time.time() * 1000)
        MlflowClient(tracking_uri=uri).log_batch(
            run_id, metrics=[Metric(key, value, stamp, 0) for key, value in metrics.items()], synchronous=True)
    except Exception as exc:
        return run_id, f"MLflow store {uri}: {first_line(exc)}"
    return run_id, None


def _merged(earlier: dict[str, Any], result: EvalResult) -> str:
    """`eval.json`: the new scores, plus the earlier scores of tasks this evaluation did not run."""
    data = result.to_dict()
    kept = {task: score for task, score in (earlier.get("scores") or {}).items() if task not in data["scores"]}
    data["scores"] = {**kept, **data["scores"]}
    return json.dumps({"kind": EVAL_KIND, **data}, indent=2) + "\n"


def evaluate_run(
    run_dir: str | Path,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    device: str | None = None,
    include_paths: Sequence[str | Path] = (),
    threads: int | None = None,
    log_mlflow: bool = True,
    model_factory: Callable[[Path, str], Any] | None = None,
) -> EvalResult:
    """Score `run_dir/final` on `tasks` (names, task YAML files or folders; default `DEFAULT_TASKS`) with
    lm_eval, `limit` items per task (all when None); write `run_dir/eval.json` and log to the run's MLflow run.
    `threads`: torch's CPU threads (default: torch's own choice).

    `model_factory(final_dir, device)` builds the lm_eval model (default: lm_eval's `HFLM` over the saved model
    and tokenizer); tests pass a double. Every problem with the input raises `UserError` before scoring.
    """
    check_options(limit=limit, device=device, threads=threads)
    final = final_model_dir(run_dir)
    root = final.parent
    earlier = _check_eval_file(root / EVAL_FILE)
    includes = [Path(p).expanduser() for p in include_paths]
    specs, builtin_needed = resolve_tasks(tuple(tasks) if tasks else task_names.DEFAULT_TASKS,
                                          include_paths=includes)
    lm_eval = _import_lm_eval()
    dev = resolve_device(device)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    started = time.monotonic()
    with _quiet_lm_eval():
        manager, task_objects = load_tasks(specs, include_paths=includes, builtin_needed=builtin_needed)
        log.info("scoring %s on %s (%s items each) on %s", final, ", ".join(specs), limit or "all", dev)
        model = (model_factory or (lambda path, where: _hf_model(path, device=where)))(final, dev)
        loaded = time.monotonic()
        results = lm_eval.simple_evaluate(model=model, tasks=task_objects, task_manager=manager, limit=limit,
                                          bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, device=dev)
    seconds = time.monotonic() - loaded
    if not results or not results.get("results"):
        raise UserError(f"{root}: lm_eval returned no scores for {', '.join(specs)}")
    result = EvalResult(
        run_dir=str(root), model_dir=str(final), device=dev, limit=limit,
        scores=_scores(results, task_objects, limit=limit), seconds=round(seconds, 3),
        load_seconds=round(loaded - started, 3),
        lm_eval_version=getattr(lm_eval, "__version__", "unknown"),
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    if log_mlflow:
        run_id, note = log_to_mlflow(root, result.mlflow_metrics())
        result = replace(result, mlflow_run_id=run_id, mlflow_note=note)
        if note and run_id:
            log.warning("scores not logged to MLflow: %s", note)
    write_atomic(root / EVAL_FILE, _merged(earlier, result))
    return result


__all__ = [
    "EVAL_FILE",
    "EvalRequest",
    "EvalResult",
    "TaskScore",
    "check_eval_request",
    "evaluate_run",
    "final_model_dir",
    "find_mlflow_run",
    "read_scores",
]
