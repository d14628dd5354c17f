"""What a run leaves behind after its loop: the final model and tokenizer, and the summary of planned vs achieved."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oneday import __version__
from oneday.formats import finite_or_none
from oneday.runner.records import LoopResult
from oneday.runner.session import Session
from oneday.runner.summary import RunSummary


def save_final(model: Any, *, tokenizer_dir: str | os.PathLike[str], out: Path, eot_id: int | None) -> Path:
    """`save_pretrained` the (uncompiled) model and the prepared tokenizer into `out`, replacing it whole.

    The generation config gets eos/pad = the end-of-text id, so `generate` stops there and does not warn.
    """
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    module = getattr(model, "module", model)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    if eot_id is not None:
        module.config.eos_token_id = eot_id
        module.generation_config.eos_token_id = eot_id
        module.generation_config.pad_token_id = eot_id
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on the console
    try:
        module.save_pretrained(tmp, safe_serialization=True)
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
    tokenizer.save_pretrained(tmp)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def build_summary(session: Session, result: LoopResult, *, prep_seconds: float, wall: float, run_id: str | None,
                  tracking_error: str | None) -> RunSummary:
    """The `RunSummary` of this session's `result` against its plan (`wall`: seconds charged to the budget)."""
    plan, spec, paths = session.plan, session.spec, session.paths
    pred = plan.prediction
    return RunSummary(
        plan_name=plan.name, plan_hash=session.digest, run_dir=str(paths.root), device=session.device,
        budget_seconds=spec.budget_seconds, planned_train_seconds=spec.train_seconds,
        planned_tokens=spec.planned_tokens, planned_steps=spec.planned_steps, predicted_tokens=pred.tokens,
        predicted_loss=pred.loss, predicted_loss_band=tuple(pred.loss_band),
        predicted_tokens_per_s=pred.tokens_per_s, predicted_mfu=pred.mfu,
        steps=result.steps, tokens=result.tokens, train_seconds=result.train_seconds,
        wall_seconds=round(wall, 3), session_wall_seconds=round(session.clock() - session.process_start, 3),
        final_val_loss=finite_or_none(result.final_val_loss), final_val_bpb=finite_or_none(result.final_val_bpb),
        mean_tokens_per_s=result.mean_tokens_per_s, mfu=result.mfu, final_lr=finite_or_none(result.final_lr),
        skipped_steps=result.skipped_steps, rollbacks=result.rollbacks, resumes=result.resumes,
        interrupted=result.interrupted, finished=not result.interrupted,
        events=tuple(asdict(e) for e in result.events), data_prep_seconds=round(prep_seconds, 3),
        model_dir=str(paths.final) if paths.final.exists() else None, mlflow_run_id=run_id,
        mlflow_experiment=session.experiment, tracking_uri=session.tracking_uri, tracking_error=tracking_error,
        oneday_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=session.notes,
    )


__all__ = ["build_summary", "save_final"]
