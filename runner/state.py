"""`TrainState`: everything a resume needs besides the weights and the optimizer — the checkpoint's state.

One object, written as `state.pt` in every checkpoint (plain values and tensors only, so it loads with
`torch.load(weights_only=True)`) and read back whole: the loop never restores a counter by its string key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class TrainState:
    """The loop's progress. Counts cover every session of the run (they continue across resumes)."""

    step: int = 0
    """Optimizer steps taken, skipped ones included."""
    tokens: int = 0
    """Tokens trained on, all ranks."""
    tokens_timed: int = 0
    """Tokens of the timed steps (each session's first step is warm-up and not timed): for the mean tok/s."""
    cursor: int = 0
    """The data position: the next training window's number (`oneday.data.windows.WindowSampler`)."""
    train_elapsed: float = 0.0
    """Wall seconds spent in training steps (evaluations, checkpoints and warm-up excluded)."""
    wall_elapsed: float = 0.0
    """Wall seconds inside `train()`, all sessions."""
    skipped_steps: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0
    """Halved at every rollback, so a resumed run keeps the lower LR."""
    resumes: int = 0
    plan_hash: str = ""
    world_size: int = 1
    grad_scaler: dict[str, Any] | None = None
    """The fp16 loss scaler's `state_dict()` (its scale and growth counter: plain numbers); None otherwise."""

    def to_dict(self, *, rng: dict[str, Any]) -> dict[str, Any]:
        """The `state.pt` payload: these fields and the RNG states (`checkpoint.capture_rng`)."""
        return {**asdict(self), "rng": rng}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainState:
        """A state read from `state.pt` (its RNG states are left in `raw["rng"]`)."""
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


__all__ = ["TrainState"]
