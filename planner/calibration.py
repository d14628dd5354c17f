"""A loss law fitted to the user's data (`oneday tune --calibrate`), read back by `oneday plan --calibration`.

Calibration file (`calibration=`), written by the tuner's calibration study (docs/design.md, Calibration): a JSON object

    {"format_version": 1, "name": "epoch-2024-calibrated", "E": 2.1, "A": 480.0, "B": 2085.0,
     "alpha": 0.3478, "beta": 0.3658, "source": "fitted on 3 runs of tinystories (2026-11-28)",
     "points": [[n, d, loss], ...], "created": "2026-11-28T12:00:00Z"}

E, A, B (≥ 0), alpha, beta (> 0) and source are required; name, format_version (1), points and created
are optional (data: the fingerprint of the prepared data a cached calibration belongs to); any other key is
refused (a typo would otherwise be ignored). The law replaces the default
(Epoch AI 2024) in `choose`; the Hoffmann 2022 fit stays the band; `prediction.calibrated` is true.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from oneday.errors import UserError
from oneday.planner.laws import EPOCH_2024, LossLaw, fit_law_eab

log = logging.getLogger(__name__)

_CALIBRATION_REQUIRED = ("E", "A", "B", "alpha", "beta", "source")
_CALIBRATION_OPTIONAL = ("name", "format_version", "points", "created", "data")


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




def calibration_points(path: str | os.PathLike[str]) -> tuple[tuple[float, float, float], ...]:
    """The (n, d, loss) points a calibration file was fitted on (empty when it has none); the file is
    checked by `load_calibration` first."""
    load_calibration(path)
    raw = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    try:
        return tuple((float(n), float(d), float(loss)) for n, d, loss in raw.get("points") or ())
    except (TypeError, ValueError):
        raise UserError(f"{path}: points: expected a list of [n, d, loss] numbers") from None


# --------------------------------------------------------------------------------------------------
# A fit with its uncertainty (docs/design.md, Calibration)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LawFit:
    """A loss law fitted to (n, d, loss) points by least squares with α, β fixed, and what the points leave
    uncertain: `covariance` of the free coefficients (`free`, a subset of "E", "A", "B"; the others fixed),
    σ² = RSS / (points − free) (ordinary least squares; e.g. Seber & Lee 2003, §3.3)."""

    law: LossLaw
    points: tuple[tuple[float, float, float], ...]
    free: tuple[str, ...]
    covariance: tuple[tuple[float, ...], ...]
    sigma: float
    """Residual standard deviation (nats): inf when the points leave no degree of freedom."""

    def degrees_of_freedom(self) -> int:
        return len(self.points) - len(self.free)

    def loss_band(self, n: float, d: float, *, z: float | None = None) -> tuple[float, float]:
        """(low, high) = L(n, d) ± t·sqrt(xᵀ Σ x + σ²): the fit's uncertainty at (n, d) plus one run's own
        noise, a 95% prediction interval for a new run under normal errors (Seber & Lee 2003, §5.3), t the
        Student-t 97.5% quantile at the fit's degrees of freedom (`z` overrides it). Extrapolating far from the
        points widens it through x. Infinite when the points leave no degree of freedom."""
        centre = self.law.loss(n, d)
        if not math.isfinite(self.sigma):
            return (-math.inf, math.inf)
        x = [_design_row(name, n, d, self.law) for name in self.free]
        var = sum(x[i] * self.covariance[i][j] * x[j] for i in range(len(x)) for j in range(len(x)))
        t = student_t_975(self.degrees_of_freedom()) if z is None else z
        half = t * math.sqrt(max(0.0, var) + self.sigma**2)
        return (centre - half, centre + half)

    def decisive(self, n: float, d: float, *, tolerance: float) -> bool:
        """Whether the band at (n, d) is narrower than ±`tolerance` nats: calibrating further would not change
        what the plan says (its choice's near-ties are 0.5% apart; a prediction needs ~0.1 nats)."""
        low, high = self.loss_band(n, d)
        return (high - low) / 2.0 <= tolerance


_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
          12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


def student_t_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (standard tables; the next smaller
    tabulated dof, so never too narrow; 1.96 past 60)."""
    if dof < 1:
        return math.inf
    if dof > 60:
        return 1.96
    return _T_975[max(k for k in _T_975 if k <= dof)]


def _design_row(name: str, n: float, d: float, law: LossLaw) -> float:
    return {"E": 1.0, "A": n**-law.alpha, "B": d**-law.beta}[name]


def _inverse(matrix: list[list[float]]) -> list[list[float]] | None:
    """Gauss-Jordan inverse of a small symmetric positive matrix; None when singular."""
    k = len(matrix)
    aug = [row[:] + [1.0 if i == j else 0.0 for j in range(k)] for i, row in enumerate(matrix)]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(aug[r][col]))
        if abs(aug[pivot][col]) < 1e-300:
            return None
        aug[col], aug[pivot] = aug[pivot], aug[col]
        p = aug[col][col]
        aug[col] = [v / p for v in aug[col]]
        for r in range(k):
            if r != col and aug[r][col] != 0.0:
                f = aug[r][col]
                aug[r] = [a - f * b for a, b in zip(aug[r], aug[col], strict=True)]
    return [row[k:] for row in aug]


def fit_law(
    points: Sequence[tuple[float, float, float]],
    *,
    base: LossLaw = EPOCH_2024,
    fixed_e: float | None = None,
    max_e: float | None = None,
) -> LawFit:
    """Fit L = E + A/N^α + B/D^β (α, β from `base`) to (n, d, loss) points, with its uncertainty.

    Three coefficients need at least four points to leave a degree of freedom for σ; with fewer points, or
    when `fixed_e` is given, E is held (at `fixed_e`, else at `base.E` bounded by `max_e`) and only A and B
    are fitted: `loss − E = A·N^−α + B·D^−β`. E is the irreducible loss of the data and cannot exceed what
    the best context-free predictor reaches: `max_e` is the data's unigram entropy (`laws.unigram_entropy`);
    a free fit whose E passes it is refitted with E held there. Coefficients by exact non-negative least
    squares (`laws.fit_law_eab`; Lawson & Hanson 1974); a coefficient held at zero by the constraint is not free.
    """
    pts = tuple((float(n), float(d), float(loss)) for n, d, loss in points)
    if len(pts) < 2 or (fixed_e is None and len(pts) < 3):
        raise UserError(f"calibration: need at least 3 (n, d, loss) points, got {len(pts)}")
    e_held = fixed_e
    if e_held is None and len(pts) < 4:
        e_held = base.E if max_e is None else min(base.E, max_e)
    if e_held is None:
        law = fit_law_eab(pts, alpha=base.alpha, beta=base.beta, base=base)
        if max_e is not None and max_e < law.E:
            e_held = max_e
    if e_held is not None:
        shifted = [(n, d, loss - e_held) for n, d, loss in pts]
        ab = _fit_ab(shifted, base=base)
        law = replace(ab, E=e_held, source=f"A, B fitted on {len(pts)} runs with E held at {e_held:.3f} and "
                                            f"α={base.alpha}, β={base.beta} from {base.name}")
    free = tuple(name for name, value in (("E", law.E), ("A", law.A), ("B", law.B))
                 if value > 0 and not (name == "E" and e_held is not None))
    rows = [[_design_row(name, n, d, law) for name in free] for n, d, _ in pts]
    rss = sum((loss - law.loss(n, d)) ** 2 for n, d, loss in pts)
    dof = len(pts) - len(free)
    xtx = [[sum(r[i] * r[j] for r in rows) for j in range(len(free))] for i in range(len(free))]
    inv = _inverse(xtx) if free else []
    if dof <= 0 or inv is None:
        return LawFit(law=law, points=pts, free=free, covariance=(), sigma=math.inf)
    sigma2 = rss / dof
    cov = tuple(tuple(sigma2 * v for v in row) for row in inv)
    return LawFit(law=law, points=pts, free=free, covariance=cov, sigma=math.sqrt(sigma2))


def _fit_ab(points: Sequence[tuple[float, float, float]], *, base: LossLaw) -> LossLaw:
    """A, B ≥ 0 of loss = A·N^−α + B·D^−β (no constant): non-negative least squares over the active sets."""
    best: tuple[float, float, float] | None = None
    for a_on, b_on in ((True, True), (True, False), (False, True)):
        cols = ([[n**-base.alpha for n, _, _ in points]] if a_on else []) + (
            [[d**-base.beta for _, d, _ in points]] if b_on else [])
        y = [loss for _, _, loss in points]
        xtx = [[sum(ci[t] * cj[t] for t in range(len(y))) for cj in cols] for ci in cols]
        inv = _inverse(xtx)
        if inv is None:
            continue
        xty = [sum(c[t] * y[t] for t in range(len(y))) for c in cols]
        coef = [sum(inv[i][j] * xty[j] for j in range(len(cols))) for i in range(len(cols))]
        if any(c < 0 for c in coef):
            continue
        a = coef[0] if a_on else 0.0
        b = coef[-1] if b_on else 0.0
        rss = sum((loss - a * n**-base.alpha - b * d**-base.beta) ** 2 for n, d, loss in points)
        if best is None or rss < best[0]:
            best = (rss, a, b)
    _, a, b = best if best is not None else (0.0, 0.0, 0.0)
    return replace(base, A=a, B=b, name=f"{base.name}-calibrated")




# --------------------------------------------------------------------------------------------------
# What the plan presents: the prediction and an honest band
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Presented:
    """The loss a plan presents (`Prediction.loss`, `loss_band`, `basis`; oneday/plan.py)."""

    loss: float
    band: tuple[float, float]
    basis: str
    """"calibrated", "law" or "bound" (the law's figure was above `ceiling`, where it does not hold)."""
    ceiling: float


def presented_loss(
    *,
    law_loss: float,
    band_loss: float,
    laws: Sequence[LossLaw],
    vocab_size: int,
    unigram_entropy: float | None,
    fit_band: tuple[float, float] | None = None,
) -> Presented:
    """The prediction a plan shows, never a number the data rules out (docs/design.md, Calibration).

    The ceiling is what a model that learned anything reaches: the data's unigram entropy (`laws.unigram_entropy`),
    and at most ln V, the uniform guess. A calibrated law (`fit_band` given: `LawFit.loss_band` at the plan's N, D)
    presents its own figure with its fit's band, cut at the ceiling. An uncalibrated published law is fitted on
    models and data orders of magnitude larger than a short run and overestimates small runs 3-4× (issue 17:
    19.1 predicted, 4.61 reached): its band runs from the lowest irreducible loss E among `laws` (what web text
    approaches; only far more predictable text, or a much smaller vocabulary, goes below) up to the higher of
    the two laws' figures, cut at the ceiling. When the law's figure is itself above the ceiling it is not
    presented as the prediction: the plan shows the ceiling as an upper bound (`basis` "bound").
    """
    ceiling = math.log(vocab_size)
    if unigram_entropy is not None and 0 < unigram_entropy < ceiling:
        ceiling = unigram_entropy
    if fit_band is not None:
        low, high = fit_band
        low = max(0.0, low)
        high = min(ceiling, high)
        if law_loss <= ceiling and low <= high:
            return Presented(loss=law_loss, band=(low, high), basis="calibrated", ceiling=ceiling)
    floor = min([law.E for law in laws] + [law_loss, band_loss, ceiling])
    high = min(ceiling, max(law_loss, band_loss))
    if law_loss > ceiling:
        return Presented(loss=ceiling, band=(floor, ceiling), basis="bound", ceiling=ceiling)
    return Presented(loss=law_loss, band=(floor, high), basis="law", ceiling=ceiling)




# --------------------------------------------------------------------------------------------------
# Calibrations are kept with the data they were fitted on
# --------------------------------------------------------------------------------------------------
CACHE_FILE = "calibration.json"
"""A calibration's copy in the prepared data's cache entry (`<cache>/data/<key>/calibration.json`)."""


@dataclass(frozen=True)
class CachedCalibration:
    law: LossLaw
    points: tuple[tuple[float, float, float], ...]
    path: Path


def data_fingerprint(data_dir: str | os.PathLike[str]) -> dict[str, object]:
    """What identifies the prepared data (its meta.json): the cache key (which hashes the corpus, the tokenizer
    and the settings) and the checksum of the training tokens; and how the validation losses were scored
    (`VAL_WINDOWS_SCHEME`: a fit on other validation windows describes other numbers)."""
    from oneday.data.windows import VAL_WINDOWS_SCHEME

    meta = json.loads((Path(data_dir) / "meta.json").read_text(encoding="utf-8"))
    return {"key": meta.get("key"), "train_checksum": (meta.get("xxh3_64") or {}).get("train.bin"),
            "vocab_size": meta.get("vocab_size"), "val_windows": VAL_WINDOWS_SCHEME}


def save_cached_calibration(data_dir: str | os.PathLike[str], payload: dict[str, object]) -> Path | None:
    """Keep a calibration file's `payload` with the data it was fitted on, for later plans on the same data;
    None (and a warning) when the cache entry cannot be written: the calibration file itself is what counts."""
    from oneday.paths import write_atomic

    path = Path(data_dir) / CACHE_FILE
    try:
        record = {**payload, "data": data_fingerprint(data_dir)}
        write_atomic(path, json.dumps(record, indent=2) + "\n")
    except (OSError, ValueError, UserError) as exc:
        log.warning("calibration: not kept with the data (%s: %s)", path, exc)
        return None
    return path


def cached_calibration(data_dir: str | os.PathLike[str]) -> CachedCalibration | None:
    """The calibration kept with this prepared data, or None: none kept, or kept for other data (the token
    files changed since: stale, ignored with a note), or unreadable (ignored with a note)."""
    path = Path(data_dir) / CACHE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("data") != data_fingerprint(data_dir):
            log.info("calibration: %s was fitted on other data (the data, or how validation is scored, changed); "
                     "not used", path)
            return None
        law = load_calibration(path)
        points = tuple((float(n), float(d), float(loss)) for n, d, loss in raw.get("points") or ())
    except (OSError, ValueError, TypeError, UserError) as exc:
        log.warning("calibration: %s cannot be used (%s)", path, exc)
        return None
    return CachedCalibration(law=law, points=points, path=path)


__all__ = [
    "CACHE_FILE",
    "CachedCalibration",
    "LawFit",
    "Presented",
    "cached_calibration",
    "calibration_points",
    "data_fingerprint",
    "fit_law",
    "load_calibration",
    "presented_loss",
    "save_cached_calibration",
]
