"""plan.json: the contract between `oneday plan`, `oneday tune` and `oneday run` (docs/design.md, The plan).

One frozen dataclass per section. Loading is strict: unknown keys, wrong types and impossible values are
rejected with a `PlanError` naming the field (`train.lr: must be > 0, got -1`); `schema_version` is
checked. Each component receives only its slice: the model builder the `ModelSpec`, the training loop the
`TrainSpec`. Pure Python: no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from oneday.errors import UserError
from oneday.formats import jsonable
from oneday.models.spec import ModelSpec, SpecError
from oneday.paths import write_atomic

SCHEMA_VERSION = 2
"""2: `train.reserve_seconds` is derived (`TrainSpec.reserve_seconds()`), not stored; version 1 plans still load."""


class PlanError(UserError):
    """plan.json is malformed or holds an impossible value; the message names the field."""


def _require(condition: bool, field_path: str, message: str) -> None:
    if not condition:
        raise PlanError(f"{field_path}: {message}")


MAX_NAME_LENGTH = 120


def plan_name_problem(name: str) -> str | None:
    """Why `name` cannot be a plan name, or None. The name becomes a folder (`runs/<name>`) and part of MLflow and
    study names: one path component that cannot climb out of `runs/`, start hidden or hold control characters."""
    if len(name) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if "/" in name or "\\" in name:
        return "must be one folder name, without / or \\"
    if name.startswith(".") or name != name.strip():
        return "must not start with '.' nor start or end with a space"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not hold control characters"
    return None


@dataclass(frozen=True)
class HardwareInfo:
    """What the planner probed, and the peak FLOP/s it used for MFU."""

    device: Literal["cuda", "cpu"]
    name: str
    count: int
    memory_bytes: int
    peak_flops: float
    peak_flops_source: str
    dtype: Literal["bf16", "fp16", "fp32"]
    torch_version: str
    threads: int = 1
    free_memory_bytes: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None
    compute_capability: str | None = None
    bf16_supported: bool = False
    power_limit_w: float | None = None
    sm_clock_max_mhz: int | None = None
    cpu_flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(self.count >= 1, "hardware.count", f"must be >= 1, got {self.count}")
        _require(self.memory_bytes > 0, "hardware.memory_bytes", f"must be > 0, got {self.memory_bytes}")
        _require(self.peak_flops > 0, "hardware.peak_flops", f"must be > 0, got {self.peak_flops}")
        _require(self.threads >= 1, "hardware.threads", f"must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class DataInfo:
    """The prepared data the plan was made for (see `oneday.data.prepare.PreparedData`)."""

    source: str
    key: str
    path: str
    tokenizer: str
    vocab_size: int
    train_tokens: int
    val_tokens: int
    bytes_per_token: float
    # How the data was requested, so a missing cache entry can be prepared again.
    spec: str = ""
    tokenizer_spec: str | None = None
    text_column: str | None = None
    assumed: bool = False
    """True when no data was prepared (`oneday plan --data-tokens`): the token counts are assumed, and the plan
    cannot be run."""
    config: str | None = None  # a hub dataset's configuration and split, and the cap on tokens taken
    split: str | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_tokens is None or self.max_tokens > 0, "data.max_tokens",
                 f"must be > 0, got {self.max_tokens}")
        _require(self.vocab_size >= 2, "data.vocab_size", f"must be >= 2, got {self.vocab_size}")
        _require(self.train_tokens > 0, "data.train_tokens", f"must be > 0, got {self.train_tokens}")
        _require(self.val_tokens > 0, "data.val_tokens", f"must be > 0, got {self.val_tokens}")
        _require(self.bytes_per_token > 0, "data.bytes_per_token", f"must be > 0, got {self.bytes_per_token}")


@dataclass(frozen=True)
class TrainSpec:
    """Everything the training loop needs, and nothing else.

    Times are wall-clock seconds. `budget_seconds` is the run's own budget, from process start to exit: the
    budget the user asked for minus the planner's probe time (`provenance.probe_seconds`), which counted
    against it. `train_seconds` is the part of it left for training steps after the run's reserves
    (`reserve_seconds()`: start-up, compile/warm-up, evals, checkpoints, final save). The LR schedule is keyed to
    progress = elapsed training seconds / train_seconds: linear warmup over `warmup_fraction`, constant,
    then a cooldown of shape `cooldown_shape` over the last `cooldown_fraction` to `final_lr_fraction`·lr.
    """

    budget_seconds: float
    train_seconds: float
    seq_len: int
    micro_batch: int
    grad_accum: int
    world_size: int = dataclasses.field(default=1, kw_only=True)  # keyword-only: the fields after it have no default
    """The number of data-parallel ranks this plan is sized for; `micro_batch` and `grad_accum` are PER RANK."""
    lr: float
    planned_tokens: int
    planned_steps: int
    device: Literal["cuda", "cpu"] = "cpu"
    precision: Literal["bf16", "fp16", "fp32"] = "fp32"
    """fp16: autocast with a grad scaler, for GPUs without bf16 (compute capability < 8.0)."""
    compile: bool = False
    threads: int | None = None
    optimizer: Literal["adamw"] = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_fraction: float = 0.02
    cooldown_fraction: float = 0.2
    cooldown_shape: Literal["1-sqrt", "linear", "cosine"] = "1-sqrt"
    final_lr_fraction: float = 0.0
    eval_every_seconds: float = 60.0
    eval_tokens: int = 65536
    checkpoint_every_seconds: float = 600.0
    keep_checkpoints: int = 2
    seed: int = 0
    # Test/benchmark setting: stop after exactly this many optimizer steps, with the schedule keyed to
    # steps instead of the clock (makes runs bitwise reproducible). None in real plans.
    max_steps: int | None = None

    def __post_init__(self) -> None:
        p = "train"
        _require(self.budget_seconds > 0, f"{p}.budget_seconds", f"must be > 0, got {self.budget_seconds}")
        _require(
            0 < self.train_seconds <= self.budget_seconds,
            f"{p}.train_seconds",
            f"must be in (0, budget_seconds={self.budget_seconds}], got {self.train_seconds}",
        )
        for name in ("seq_len", "micro_batch", "grad_accum", "world_size", "planned_steps", "eval_tokens",
                     "keep_checkpoints"):
            value = getattr(self, name)
            _require(value >= 1, f"{p}.{name}", f"must be >= 1, got {value}")
        _require(self.planned_tokens >= 1, f"{p}.planned_tokens", f"must be >= 1, got {self.planned_tokens}")
        _require(0 < self.lr < 1, f"{p}.lr", f"must be in (0, 1), got {self.lr}")
        _require(0 <= self.beta1 < 1, f"{p}.beta1", f"must be in [0, 1), got {self.beta1}")
        _require(0 <= self.beta2 < 1, f"{p}.beta2", f"must be in [0, 1), got {self.beta2}")
        _require(0 < self.eps < 1, f"{p}.eps", f"must be in (0, 1), got {self.eps}")
        _require(self.weight_decay >= 0, f"{p}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.grad_clip > 0, f"{p}.grad_clip", f"must be > 0, got {self.grad_clip}")
        warmup, cooldown = self.warmup_fraction, self.cooldown_fraction
        _require(0 <= warmup < 1, f"{p}.warmup_fraction", f"must be in [0, 1), got {warmup}")
        _require(0 <= cooldown <= 1, f"{p}.cooldown_fraction", f"must be in [0, 1], got {cooldown}")
        _require(
            warmup + cooldown <= 1,
            f"{p}.cooldown_fraction",
            f"warmup_fraction + cooldown_fraction must be <= 1, got {warmup + cooldown}",
        )
        final = self.final_lr_fraction
        _require(0 <= final <= 1, f"{p}.final_lr_fraction", f"must be in [0, 1], got {final}")
        _require(self.eval_every_seconds > 0, f"{p}.eval_every_seconds", f"must be > 0, got {self.eval_every_seconds}")
        _require(
            self.checkpoint_every_seconds > 0,
            f"{p}.checkpoint_every_seconds",
            f"must be > 0, got {self.checkpoint_every_seconds}",
        )
        _require(self.threads is None or self.threads >= 1, f"{p}.threads", f"must be >= 1, got {self.threads}")
        _require(self.max_steps is None or self.max_steps >= 1, f"{p}.max_steps", f"must be >= 1, got {self.max_steps}")
        _require(
            not (self.device == "cpu" and self.precision == "bf16"),
            f"{p}.precision",
            "bf16 on CPU is ~50x slower than fp32 on these machines; use fp32",
        )
        _require(not (self.device == "cpu" and self.precision == "fp16"), f"{p}.precision",
                 "fp16 (with a grad scaler) is for GPUs without bf16; use fp32 on the CPU")

    def reserve_seconds(self) -> float:
        """The run's budget that is not training: start-up, compile, evaluations, checkpoints, the final save."""
        return self.budget_seconds - self.train_seconds

    def tokens_per_step(self) -> int:
        """Global batch in tokens: micro_batch · grad_accum · world_size · seq_len (the first two are per rank)."""
        return self.micro_batch * self.grad_accum * self.world_size * self.seq_len


@dataclass(frozen=True)
class Prediction:
    """What the planner expects this run to achieve."""

    tokens_per_s: float
    mfu: float
    tokens: int
    loss: float
    loss_band: tuple[float, float]
    law: str
    band_law: str
    epochs: float = 0.0
    effective_tokens: float = 0.0
    calibrated: bool = False
    data_parallel_efficiency: float = 1.0
    """Per-GPU throughput on `hardware.count` GPUs as a share of one GPU's (assumed unless measured; see the
    reasons); `tokens_per_s` is the aggregate."""
    basis: str = "law"
    """What `loss` is: "law" (a published law's prediction), "calibrated" (a law fitted on this data; the band
    is the fit's uncertainty) or "bound" (the published law predicted more than the unigram entropy of the
    data, where it does not hold: `loss` is then that upper bound, not a prediction; `law_loss` keeps the law's)."""
    law_loss: float = 0.0
    """The law's own figure before any bound (equal to `loss` unless `basis` is "bound")."""

    def __post_init__(self) -> None:
        _require(self.tokens_per_s > 0, "prediction.tokens_per_s", f"must be > 0, got {self.tokens_per_s}")
        _require(0 <= self.mfu <= 1.5, "prediction.mfu", f"must be in [0, 1.5], got {self.mfu}")
        _require(self.loss > 0, "prediction.loss", f"must be > 0, got {self.loss}")
        _require(len(self.loss_band) == 2, "prediction.loss_band", "must hold two numbers")
        efficiency = self.data_parallel_efficiency
        _require(0 < efficiency <= 1, "prediction.data_parallel_efficiency", f"must be in (0, 1], got {efficiency}")
        _require(self.basis in ("law", "calibrated", "bound"), "prediction.basis",
                 f"must be law, calibrated or bound, got {self.basis!r}")


@dataclass(frozen=True)
class Candidate:
    """One row of the table the planner considered."""

    n_layer: int
    d_model: int
    n_head: int
    params_total: int
    params_scaling: int
    tokens_per_s: float
    mfu: float
    measured: bool
    micro_batch: int
    peak_memory_bytes: int
    tokens: int
    epochs: float
    predicted_loss: float
    band_loss: float
    chosen: bool = False


@dataclass(frozen=True)
class Provenance:
    oneday_version: str
    created: str
    command: str
    probe_seconds: float = 0.0
    # Filled by `oneday tune`: study name, storage, trials, best value, corrections applied.
    tuning: dict[str, Any] | None = None
    calibration: str | None = None
    # Filled by `oneday plan --what-if`: the hardware planned for (not probed) and what was assumed about it.
    what_if: dict[str, Any] | None = None
    calibration_seconds: float = 0.0
    """Seconds `oneday plan` spent calibrating on its own (its first probe and the calibration runs), part of
    the budget."""


@dataclass(frozen=True)
class Plan:
    name: str
    hardware: HardwareInfo
    data: DataInfo
    model: ModelSpec
    train: TrainSpec
    prediction: Prediction
    provenance: Provenance
    candidates: tuple[Candidate, ...] = ()
    reasons: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _require(bool(self.name.strip()), "name", "must not be empty")
        problem = plan_name_problem(self.name)
        _require(problem is None, "name", f"{problem}, got {self.name!r}")
        _require(
            self.train.seq_len == self.model.seq_len,
            "train.seq_len",
            f"must equal model.seq_len ({self.model.seq_len}), got {self.train.seq_len}",
        )
        _require(
            self.model.vocab_size >= self.data.vocab_size,
            "model.vocab_size",
            f"must be >= data.vocab_size ({self.data.vocab_size}), got {self.model.vocab_size}",
        )
        _require(
            self.train.device == self.hardware.device,
            "train.device",
            f"must match hardware.device ({self.hardware.device!r}), got {self.train.device!r}",
        )

    def budget_seconds(self) -> float:
        """The budget the user asked for: the run's budget plus the planner's probe time."""
        return self.train.budget_seconds + self.provenance.probe_seconds + self.provenance.calibration_seconds

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def digest(self) -> str:
        """sha256 of the plan's canonical JSON, 16 hex digits: what ties a run folder, its checkpoints, a study
        and the MLflow runs to this exact plan (any change to the plan gives another digest)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def flat_params(self) -> dict[str, str]:
        """The plan flattened to `section.key` strings, for MLflow params (candidates left out)."""
        flat: dict[str, str] = {}
        for section in ("hardware", "data", "model", "train", "prediction", "provenance"):
            for key, value in jsonable(dataclasses.asdict(getattr(self, section))).items():
                flat[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        flat["name"] = self.name
        flat["budget.hours"] = f"{self.budget_seconds() / 3600:.4g}"
        flat["model.params_total"] = str(self.model.params_total())
        flat["model.params_scaling"] = str(self.model.params_scaling())
        flat["train.tokens_per_step"] = str(self.train.tokens_per_step())
        return flat

    @classmethod
    def from_dict(cls, raw: Any) -> Plan:
        if not isinstance(raw, dict):
            raise PlanError(f"plan: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise PlanError(f"schema_version: missing or not an integer ({version!r})")
        if version > SCHEMA_VERSION:
            raise PlanError(
                f"schema_version: this plan is version {version}, made by a newer oneday; "
                f"this oneday reads version {SCHEMA_VERSION} (upgrade oneday)"
            )
        if version < 1:
            raise PlanError(f"schema_version: must be >= 1, got {version}")
        if version == 1:
            raw = _from_version_1(raw)
        return _build(cls, raw, "")


def _from_version_1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version 1 plan as version 2: `train.reserve_seconds` was stored, and is now derived."""
    train = raw.get("train")
    if isinstance(train, dict):
        raw = {**raw, "train": {k: v for k, v in train.items() if k != "reserve_seconds"}}
    return {**raw, "schema_version": SCHEMA_VERSION}


T = TypeVar("T")


def _build(cls: type[T], raw: dict[str, Any], prefix: str) -> T:
    """Build dataclass `cls` from `raw`, checking keys and types; errors name the dotted field."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in fields:
            raise PlanError(f"{prefix}{key}: unknown key (expected one of: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{path}: missing")
            continue
        kwargs[name] = _convert(hints[name], raw[name], path)
    try:
        return cls(**kwargs)
    except SpecError as exc:  # ModelSpec validates with its own field names (model.*)
        raise PlanError(f"{prefix}{str(exc).split('.', 1)[-1]}") from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _convert(arg, value, path)
            except PlanError as exc:
                errors.append(str(exc))
        raise PlanError(errors[0] if len(errors) == 1 else f"{path}: wrong type {type(value).__name__}")
    if origin is Literal:
        if value not in args:
            raise PlanError(f"{path}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise PlanError(f"{path}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise PlanError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{path}: expected an object, got {type(value).__name__}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise PlanError(f"{path}: expected an object, got {type(value).__name__}")
        return _build(hint, value, f"{path}.")
    if hint is bool:
        if not isinstance(value, bool):
            raise PlanError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise PlanError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise PlanError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise PlanError(f"{path}: must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise PlanError(f"{path}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"plan schema: unsupported type {hint!r} at {path}")  # a bug in this module, not user input


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate plan.json; every problem is a `UserError` naming the file or field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such plan file (make one with `oneday plan`)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read plan ({exc})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    try:
        return Plan.from_dict(raw)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from None


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write plan.json atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    write_atomic(path, plan.to_json())
    return path




__all__ = [
    "SCHEMA_VERSION",
    "Candidate",
    "DataInfo",
    "HardwareInfo",
    "Plan",
    "PlanError",
    "Prediction",
    "Provenance",
    "TrainSpec",
    "load_plan",
    "plan_name_problem",
    "save_plan",
]
