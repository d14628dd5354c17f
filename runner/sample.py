"""`oneday sample`: generate text from a run's final model."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from oneday.errors import UserError, first_line

# A seed is what `torch.manual_seed` takes, kept to its non-negative half.
MAX_SEED = 2**64 - 1


def check_sampling_options(*, max_new_tokens: int, temperature: float, seed: int) -> None:
    """`UserError` naming the option (as `oneday sample` spells it) that is out of range."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"--temperature: must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed: must be in 0..{MAX_SEED}, got {seed}")


def check_safetensors_complete(path: Path) -> None:
    """`UserError` when the safetensors file at `path` is shorter or longer than its header says (a copy cut
    short, a disk that filled up) or its header is unreadable. Reads only the header, without torch.

    Format (github.com/huggingface/safetensors, README "Format"): 8 bytes little-endian header length N, N
    bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the
    data, whose size is the largest `end`."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
        data_len = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                       default=0)
    except (struct.error, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: truncated or corrupt (its header cannot be read: {first_line(exc)})") from None
    expected = 8 + header_len + data_len
    if size != expected:
        cut = "truncated" if size < expected else "corrupt"
        raise UserError(f"{path}: {cut} ({size:,} bytes where its header says {expected:,})")


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
    check_sampling_options(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"{root}: no such run folder")
    final = root / "final" if (root / "final").is_dir() else root
    if not (final / "config.json").exists():
        raise UserError(f"{root}: holds no final model (the run has not finished; rerun `oneday run` to finish it)")
    for weights in sorted(final.glob("*.safetensors")):
        check_safetensors_complete(weights)
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar before the text
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(final))
        model = AutoModelForCausalLM.from_pretrained(str(final)).to(device).eval()
    except (OSError, ValueError, SafetensorError) as exc:
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


__all__ = ["check_safetensors_complete", "check_sampling_options", "sample_run"]
