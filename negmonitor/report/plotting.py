"""Matplotlib helpers: figures without pyplot (no global state, Agg rendering), atomic PNG writes, run colours."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from negmonitor.atomic import atomic_path

DPI = 110
SIGN_COLOURS = {"NN": "#3b6fb6", "PN": "#9b9b9b", "PP": "#d9622b"}
CONDITION_COLOURS = {"baseline": "#444444", "wasserstein": "#c0392b", "random": "#7f8c8d", "random_mean": "#7f8c8d",
                     "ppl_matched": "#2e86c1"}
CONDITION_NAMES = {"baseline": "baseline", "wasserstein": "Wasserstein (top WD)", "random": "random",
                   "random_mean": "random, mean ± sd of the draws", "ppl_matched": "perplexity-matched"}


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 4.0, **kwargs):
    """``(figure, axes[nrows, ncols])`` drawn by the Agg canvas, never registered with pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as PNG atomically and return the path."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def run_colour(index: int) -> str:
    """A distinct colour for the ``index``-th run (tab10)."""
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def step_axis(ax, steps: Sequence[int] | np.ndarray, label: str = "training step") -> None:
    """Label the step axis; symmetric-log scale when the steps span more than two decades."""
    values = np.asarray([s for s in steps if np.isfinite(s)], dtype=float)
    positive = values[values > 0]
    if positive.size and positive.max() / max(positive.min(), 1.0) > 100:
        ax.set_xscale("symlog", linthresh=max(1.0, float(positive.min())))
        ax.set_xlim(values.min(), values.max() * 1.15)  # from the first step (0 included), no empty negative half
    elif values.size > 1:
        ax.set_xlim(left=values.min() - 0.02 * np.ptp(values))
    ax.set_xlabel(label)


def no_data(ax, text: str) -> None:
    """Mark an axis that has nothing to show for one run of several (the figure as a whole has data)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="#777777", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
