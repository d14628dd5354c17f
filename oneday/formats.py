"""How oneday writes numbers for people and values for JSON: the one home of every formatter and cleaner.

Pure Python, no imports beyond the standard library: the CLI, the planner, the runner and tracking all use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def human_count(n: float) -> str:
    """`172352` -> `172k`, `124e6` -> `124M`, `2.1e12` -> `2.1T`; below a thousand, whole numbers stay whole."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def human_seconds(seconds: float) -> str:
    """`12` -> `12s`, `90` -> `1.5m`, `28800` -> `8h`: a budget as a short label."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 3600:
        return f"{seconds / 3600:.3g}h"
    if seconds >= 60:
        return f"{seconds / 60:.3g}m"
    return f"{seconds:.3g}s"


def human_flops(flops: float) -> str:
    """`989.4e12` -> `989 TFLOP/s`."""
    for scale, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}FLOP/s"
    return f"{flops:.3g} FLOP/s"


def human_bytes(n: float) -> str:
    """`1536` -> `1.5 KiB`, `3.2e9` -> `2.98 GiB` (binary units, as `free` and `nvidia-smi` show memory)."""
    for power, unit in ((5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if abs(n) >= 1024**power:
            return f"{n / 1024**power:.3g} {unit}"
    return f"{n:.0f} B"


def clock_text(seconds: float) -> str:
    """Seconds as `h:mm:ss`, or `m:ss` under an hour (negative counts as 0)."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number_or(value: float | None, spec: str, missing: str = "–") -> str:
    """`value` formatted with `spec`, or `missing` for None and NaN: a cell of a table."""
    return missing if value is None or value != value else format(value, spec)


def finite_or_none(value: Any) -> float | None:
    """`value` as a finite float; None for None, NaN, ±inf and anything that is not a number."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def jsonable(value: Any, *, digits: int | None = None) -> Any:
    """`value` as plain JSON: mappings with string keys, lists for tuples, NaN/±inf as None (JSON has no NaN),
    numpy/torch scalars as floats, anything else as its string; floats rounded to `digits` when given."""
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return round(value, digits) if digits is not None else value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, digits=digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, digits=digits) for v in value]
    try:
        return jsonable(float(value), digits=digits)
    except (TypeError, ValueError):
        return str(value)


__all__ = ["clock_text", "finite_or_none", "human_bytes", "human_count", "human_flops", "human_seconds", "jsonable",
           "number_or"]
