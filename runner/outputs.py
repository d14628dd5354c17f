"""What a run leaves behind after its loop: the final model and tokenizer, and the summary of planned vs achieved."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday import __version__
from oneday.errors import UserError, first_line
from oneday.formats import finite_or_none
from oneday.paths import write_failed_for_space
from oneday.runner.records import LoopResult
from oneday.runner.session import Session
from oneday.runner.speed_watch import speed_note
from oneday.runner.summary import RunSummary

log = logging.getLogger(__name__)


def save_final(model: Any, *, tokenizer_dir: str | os.PathLike[str], out: Path, eot_id: int | None) -> Path:
    """`save_pretrained` the (uncompiled) model and the prepared tokenizer into `out`, replacing it whole.

    The generation config gets eos/pad = the end-of-text id, so `generate` stops there and does not warn. It is
    written to a temporary folder first; an earlier `out` is then replaced, and deleted only when it holds
    nothing but files this save also wrote (an earlier session's model): anything else in it is kept, moved
    aside. A write that fails (disk full) raises `UserError` naming the place; the temporary folder is removed.
    """
    from safetensors import SafetensorError

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(model, tokenizer_dir=tokenizer_dir, into=tmp, eot_id=eot_id)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        full = write_failed_for_space(exc, out.parent)
        raise UserError(f"{out}: cannot save the final model ({reason}{'; the disk is full' if full else ''}); "
                        "the last checkpoint is kept: make room and rerun the same command to save it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        old = out.with_name(f"{out.name}.old-{stamp}")
        out.rename(old)
        tmp.rename(out)
        written = {p.name for p in out.iterdir()}
        if old.is_dir() and {p.name for p in old.iterdir()} <= written:
            shutil.rmtree(old, ignore_errors=True)
        else:
            log.warning("%s held files oneday did not write: kept them in %s", out, old)
    else:
        tmp.rename(out)
    return out


def _write_model(model: Any, *, tokenizer_dir: str | os.PathLike[str], into: Path, eot_id: int | None) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    into.mkdir(parents=True)
    module = getattr(model, "module", model)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    if eot_id is not None:
        module.config.eos_token_id = eot_id
        module.generation_config.eos_token_id = eot_id
        module.generation_config.pad_token_id = eot_id
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on the console
    try:
        module.save_pretrained(into, safe_serialization=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if eot_id is not None:
        eot = tokenizer.convert_ids_to_tokens(eot_id)
        if tokenizer.eos_token is None and eot is not None:
            tokenizer.eos_token = eot
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(into)


def build_summary(session: Session, result: LoopResult, *, prep_seconds: float, wall: float, run_id: str | None,
                  tracking_error: str | None) -> RunSummary:
    """The `RunSummary` of this session's `result` against its plan (`wall`: seconds charged to the budget)."""
    plan, spec, paths = session.plan, session.spec, session.paths
    pred = plan.prediction
    speed = run_speed_note(session, result)
    return RunSummary(
        plan_name=plan.name, plan_hash=session.digest, run_dir=str(paths.root), device=session.device,
        budget_seconds=spec.budget_seconds, planned_train_seconds=spec.train_seconds,
        planned_tokens=spec.planned_tokens, planned_steps=spec.planned_steps, predicted_tokens=pred.tokens,
        predicted_loss=pred.loss, predicted_loss_band=tuple(pred.loss_band), predicted_basis=pred.basis,
        predicted_tokens_per_s=pred.tokens_per_s, predicted_mfu=pred.mfu,
        steps=result.steps, tokens=result.tokens, train_seconds=result.train_seconds,
        wall_seconds=round(wall, 3), session_wall_seconds=round(session.clock() - session.process_start, 3),
        final_val_loss=finite_or_none(result.final_val_loss), final_val_bpb=finite_or_none(result.final_val_bpb),
        mean_tokens_per_s=result.mean_tokens_per_s, mfu=result.mfu, final_lr=finite_or_none(result.final_lr),
        skipped_steps=result.skipped_steps, rollbacks=result.rollbacks, resumes=result.resumes,
        interrupted=result.interrupted, finished=not result.interrupted,
        events=tuple(asdict(e) for e in result.events), data_prep_seconds=round(prep_seconds, 3),
        micro_batch_changes=result.micro_batch_changes,
        model_dir=str(paths.final) if paths.final.exists() else None, mlflow_run_id=run_id,
        mlflow_experiment=session.experiment, tracking_uri=session.tracking_uri, tracking_error=tracking_error,
        oneday_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=session.notes + ((speed,) if speed else ()),
    )


def measured_as_planned(session: Session) -> bool:
    """Whether this session trains under the conditions the plan's speed was measured in: the plan's device (a
    what-if plan was never timed here), its number of ranks and, on a CPU, its thread count."""
    plan = session.plan
    if session.device != plan.train.device or session.device != plan.hardware.device:
        return False
    if (session.dist.world_size if session.dist is not None else 1) != plan.train.world_size:
        return False
    return session.device != "cpu" or session.spec.threads == (plan.train.threads or plan.hardware.threads)


def run_speed_note(session: Session, result: LoopResult) -> str | None:
    """`speed_watch.speed_note` for this session's result, when it trained as the plan measured."""
    if not measured_as_planned(session):
        return None
    pred = session.plan.prediction
    return speed_note(mean_tokens_per_s=result.mean_tokens_per_s, planned_tokens_per_s=pred.tokens_per_s,
                      tokens=result.tokens, planned_tokens=pred.tokens)


__all__ = ["build_summary", "measured_as_planned", "run_speed_note", "save_final"]
