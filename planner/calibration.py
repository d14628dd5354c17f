"""A loss law fitted to the user's data (`oneday tune --calibrate`), read back by `oneday plan --calibration`.

Calibration file (`calibration=`), written by the tuner's calibration study (docs/design.md, Calibration): a JSON object

    {"format_version": 1, "name": "epoch-2024-calibrated", "E": 2.1, "A": 480.0, "B": 2085.0,
     "alpha": 0.3478, "beta": 0.3658, "source": "fitted on 3 runs of tinystories (2026-11-28)",
     "points": [[n, d, loss], ...], "created": "2026-11-28T12:00:00Z"}

E, A, B (≥ 0), alpha, beta (> 0) and source are required; name, format_version (1), points and created
are optional; any other key is refused (a typo would otherwise be ignored). The law replaces the default
(Epoch AI 2024) in `choose`; the Hoffmann 2022 fit stays the band; `prediction.calibrated` is true.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from oneday.errors import UserError
from oneday.planner.laws import LossLaw

_CALIBRATION_REQUIRED = ("E", "A", "B", "alpha", "beta", "source")
_CALIBRATION_OPTIONAL = ("name", "format_version", "points", "created")


def load_calibration(path: str | os.PathLike[str]) -> LossLaw:
    """A fitted loss law from a calibration file (format in the module docstring); UserError naming the
    file and the field on any problem."""
    path = Path(path).expanduser()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such calibration file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a calibration file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read calibration ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a calibration file holds a JSON object, got {type(raw).__name__}")
    allowed = (*_CALIBRATION_REQUIRED, *_CALIBRATION_OPTIONAL)
    for key in raw:
        if key not in allowed:
            raise UserError(f"{path}: {key}: unknown key (expected: {', '.join(allowed)})")
    for key in _CALIBRATION_REQUIRED:
        if key not in raw:
            raise UserError(f"{path}: {key}: missing")
    version = raw.get("format_version", 1)
    if version != 1:
        raise UserError(f"{path}: format_version: this oneday reads calibration format 1, got {version!r}")
    values: dict[str, float] = {}
    for key in ("E", "A", "B", "alpha", "beta"):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{path}: {key}: expected a finite number, got {value!r}")
        if key in ("alpha", "beta") and not 0 < value < 2:
            raise UserError(f"{path}: {key}: must be in (0, 2), got {value!r}")
        if value < 0:
            raise UserError(f"{path}: {key}: must be >= 0, got {value!r}")
        values[key] = float(value)
    if values["E"] + values["A"] + values["B"] <= 0:
        raise UserError(f"{path}: E, A and B are all 0: that law predicts a loss of 0")
    source = raw["source"]
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{path}: source: expected a non-empty string, got {source!r}")
    name = raw.get("name") or f"calibrated ({path.name})"
    if not isinstance(name, str):
        raise UserError(f"{path}: name: expected a string, got {name!r}")
    return LossLaw(name=name, source=source, **values)


__all__ = ["load_calibration"]
