"""Every picture oneday draws: a run's loss curve, a study's history and LR-vs-loss, the comparison of runs.

Drawn on matplotlib's Agg canvas (`Figure` + `FigureCanvasAgg`): no display, no pyplot state shared between
threads. matplotlib is imported inside each function (about 1.5 s), never when this module is imported.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from oneday.errors import UserError
from oneday.formats import finite_or_none

if TYPE_CHECKING:
    from oneday.compare.runs import RunRow


def _figure() -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def plot_loss_curve(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    predicted_loss: float | None = None,
    band: tuple[float, float] | None = None,
    title: str = "",
) -> Path:
    """Train and validation loss against tokens, with the plan's predicted final loss (a dashed line) and its
    band (shaded). Drawn with matplotlib's Agg canvas (no display, no pyplot state). A step logged twice (a
    resumed run repeats the steps after its last checkpoint) is drawn once, with its latest value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train: dict[int, tuple[float, float]] = {}
    val: dict[int, tuple[float, float]] = {}
    for record in records:
        kind = record.get("kind")
        tokens = finite_or_none(record.get("tokens"))
        step = record.get("step")
        if tokens is None or not isinstance(step, int):
            continue
        if kind == "step" and (loss := finite_or_none(record.get("loss"))) is not None:
            train[step] = (tokens, loss)
        elif kind == "eval" and (loss := finite_or_none(record.get("val_loss"))) is not None:
            val[step] = (tokens, loss)
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    if train:
        xs, ys = zip(*(train[s] for s in sorted(train)), strict=True)
        ax.plot(xs, ys, label="train loss", color="tab:blue", linewidth=1.2, alpha=0.8)
    if val:
        xs, ys = zip(*(val[s] for s in sorted(val)), strict=True)
        ax.plot(xs, ys, "o-", label="val loss", color="tab:orange", linewidth=1.5, markersize=4)
    if band is not None and all(finite_or_none(b) is not None for b in band):
        ax.axhspan(min(band), max(band), color="tab:green", alpha=0.12, label="predicted band")
    if predicted_loss is not None:
        ax.axhline(predicted_loss, color="tab:green", linestyle="--", label=f"predicted {predicted_loss:.3f}")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    figure.tight_layout()
    out = Path(path)
    figure.savefig(out, format="png")
    return out


_STYLE = {
    "complete": dict(marker="o", color="tab:blue"),
    "pruned": dict(marker="v", color="tab:orange"),
    "diverged": dict(marker="x", color="tab:red"),
    "failed": dict(marker="x", color="tab:gray"),
}


_LABEL = {"pruned": "pruned (loss when stopped)", "diverged": "diverged (capped loss)"}


def plot_history(points: Iterable[tuple[int, float, str]], path: str | os.PathLike[str], *,
                 title: str = "") -> Path:
    """Optimization history: each trial's value (pruned: its last reported loss) against its number, by
    state, with the best complete value so far as a step line."""
    figure, ax = _figure()
    rows = sorted((n, v, s) for n, v, s in points if finite_or_none(v) is not None)
    for state, style in _STYLE.items():
        xs = [n for n, _v, s in rows if s == state]
        ys = [v for _n, v, s in rows if s == state]
        if xs:
            ax.scatter(xs, ys, label=_LABEL.get(state, state), s=30, **style)
    best: list[tuple[int, float]] = []
    for n, v, s in rows:
        if s == "complete" and (not best or v < best[-1][1]):
            best.append((n, v))
        elif best:
            best.append((n, best[-1][1]))
    if best:
        ax.step([b[0] for b in best], [b[1] for b in best], where="post", color="tab:green", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "optimization history")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(Path(path), format="png")
    return Path(path)


def plot_lr_vs_loss(points: Iterable[tuple[float, float, str]], path: str | os.PathLike[str], *,
                    chosen_lr: float | None = None, default_lr: float | None = None, title: str = "") -> Path:
    """Validation loss against the proxy's base LR (log x), by state, with the chosen and default LRs."""
    figure, ax = _figure()
    rows = [(lr, v, s) for lr, v, s in points
            if finite_or_none(v) is not None and finite_or_none(lr) is not None and lr > 0]
    for state, style in _STYLE.items():
        xs = [lr for lr, _v, s in rows if s == state]
        ys = [v for _lr, v, s in rows if s == state]
        if xs:
            ax.scatter(xs, ys, label=_LABEL.get(state, state), s=30, **style)
    if chosen_lr:
        ax.axvline(chosen_lr, color="tab:green", linestyle="--", label=f"best {chosen_lr:.3g}")
    if default_lr:
        ax.axvline(default_lr, color="tab:gray", linestyle=":", label=f"planner default {default_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("proxy base learning rate")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "learning rate vs loss")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(Path(path), format="png")
    return Path(path)


def plot_comparison(rows: Sequence[RunRow], path: str | os.PathLike[str], *, x: str = "budget",
                    title: str = "") -> Path:
    """Val loss of each run (filled) against its budget in hours (or its tokens), and the planner's predicted
    loss (hollow, joined to the achieved one by a dotted line; at the predicted tokens when x is tokens).
    Agg canvas: no display, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    if not out.parent.is_dir():
        raise UserError(f"--plot: the folder {out.parent} does not exist")
    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    xs_all: list[float] = []
    drawn = 0
    for row, color in zip(rows, colors, strict=True):
        if x == "budget":
            xa = xp = row.budget_hours
        else:
            xa, xp = row.tokens, row.predicted_tokens
        if xa is not None and row.val_loss is not None:
            ax.plot([xa], [row.val_loss], "o", color=color, markersize=8, label=row.name)
            ax.annotate(row.name, (xa, row.val_loss), textcoords="offset points", xytext=(6, 4), fontsize=8)
            xs_all.append(xa)
            drawn += 1
        if xp is not None and row.predicted_loss is not None:
            ax.plot([xp], [row.predicted_loss], "o", markerfacecolor="none", markeredgecolor=color, markersize=8)
            xs_all.append(xp)
            if xa is not None and row.val_loss is not None:
                ax.plot([xa, xp], [row.val_loss, row.predicted_loss], ":", color=color, linewidth=1)
    # legend entries for the two marker styles
    ax.plot([], [], "o", color="0.3", label="achieved val loss")
    ax.plot([], [], "o", markerfacecolor="none", markeredgecolor="0.3", label="predicted (plan)")
    positive = [v for v in xs_all if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("budget (hours)" if x == "budget" else "tokens")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"{title}: val loss vs {'budget' if x == 'budget' else 'tokens'}" if title else "")
    if not drawn:
        ax.text(0.5, 0.5, "no run has a val loss yet", transform=ax.transAxes, ha="center", va="center")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(out, format="png")
    except OSError as exc:
        raise UserError(f"--plot: cannot write {out} ({exc.strerror or exc})") from None
    return out


__all__ = ["plot_comparison", "plot_history", "plot_loss_curve", "plot_lr_vs_loss"]
