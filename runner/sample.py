"""`oneday sample`: generate text from a run's final model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from oneday.errors import UserError, first_line


def sample_run(
    run_dir: str | os.PathLike[str],
    *,
    prompt: str = "",
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    seed: int = 0,
    device: str = "cpu",
) -> str:
    """Generate text from `run_dir/final` (or a folder holding the model directly). Returns prompt + text."""
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"{root}: no such run folder")
    final = root / "final" if (root / "final").is_dir() else root
    if not (final / "config.json").exists():
        raise UserError(f"{root}: holds no final model (the run has not finished; rerun `oneday run` to finish it)")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"--temperature: must be >= 0, got {temperature}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar before the text
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(final))
        model = AutoModelForCausalLM.from_pretrained(str(final)).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UserError(f"{final}: cannot load the model ({first_line(exc)})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else None
    if ids is None or ids.shape[1] == 0:
        start = model.generation_config.eos_token_id
        if isinstance(start, list):
            start = start[0]
        ids = torch.tensor([[start if start is not None else 0]])
        skip = 1
    else:
        skip = 0
    ids = ids.to(device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "attention_mask": torch.ones_like(ids)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    return tokenizer.decode(out[0][skip:], skip_special_tokens=True)


__all__ = ["sample_run"]
