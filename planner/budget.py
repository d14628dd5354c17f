"""How the wall-clock budget splits: the time reserved for everything that is not a training step.

Pure Python. The probe, start-up and compile, evaluations, checkpoints and the final save are all paid out of
the person's budget (Cramming, Geiping & Goldstein 2023, counts the probing too); what is left is training time.
The per-item costs come from the runner's cost model (`oneday.runner.costs`).
"""

from __future__ import annotations

from dataclasses import dataclass

from oneday.errors import UserError


@dataclass(frozen=True)
class Reserve:
    """How the wall-clock budget splits: everything but training is reserved up front (seconds)."""

    budget_seconds: float
    probe_seconds: float
    compile_seconds: float
    eval_seconds: float
    checkpoint_seconds: float
    final_save_seconds: float

    def reserved_seconds(self) -> float:
        return (self.probe_seconds + self.compile_seconds + self.eval_seconds
                + self.checkpoint_seconds + self.final_save_seconds)

    def train_seconds(self) -> float:
        return self.budget_seconds - self.reserved_seconds()

    def train_fraction(self) -> float:
        return self.train_seconds() / self.budget_seconds


def reserve_seconds(
    *,
    budget_seconds: float,
    compile_seconds: float,
    eval_seconds_each: float,
    eval_count: int,
    checkpoint_seconds_each: float,
    checkpoint_count: int,
    final_save_seconds: float,
    probe_seconds: float,
) -> Reserve:
    """Training seconds = budget − (probe + compile/warm-up + evals + checkpoints + final save).

    The probing and measuring count against the budget, as in Cramming (Geiping & Goldstein 2023):
    the budget is the person's wall-clock, not the optimizer's. UserError when nothing is left.
    """
    if not budget_seconds > 0:
        raise UserError(f"budget must be positive, got {budget_seconds:.3g} s")
    parts = dict(compile_seconds=compile_seconds, eval_seconds_each=eval_seconds_each, eval_count=eval_count,
                 checkpoint_seconds_each=checkpoint_seconds_each, checkpoint_count=checkpoint_count,
                 final_save_seconds=final_save_seconds, probe_seconds=probe_seconds)
    for name, value in parts.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value!r}")
    reserve = Reserve(
        budget_seconds=budget_seconds,
        probe_seconds=probe_seconds,
        compile_seconds=compile_seconds,
        eval_seconds=eval_seconds_each * eval_count,
        checkpoint_seconds=checkpoint_seconds_each * checkpoint_count,
        final_save_seconds=final_save_seconds,
    )
    if reserve.train_seconds() <= 0:
        raise UserError(
            f"budget too small: {budget_seconds:.0f} s leaves nothing for training after "
            f"{reserve.reserved_seconds():.0f} s of probing ({probe_seconds:.0f}), compiling "
            f"({compile_seconds:.0f}), evaluation ({reserve.eval_seconds:.0f}), checkpoints "
            f"({reserve.checkpoint_seconds:.0f}) and the final save ({final_save_seconds:.0f})"
        )
    return reserve


__all__ = ["Reserve", "reserve_seconds"]
