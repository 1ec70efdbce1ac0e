"""TensorBoard view of a measurement: per-layer curves, WD histograms, pre-activation images, top-pair tables.

Tag scheme (documented in the README): ``negmonitor/<family>/<stat>/layer_NN`` for per-layer values and
``negmonitor/<family>/<stat>`` for whole-model values, e.g. ``negmonitor/wd/cohort_mean/layer_03`` or
``negmonitor/ablation/ppl_ratio/wasserstein``. TensorBoard gets per-layer summaries only, never per-neuron curves.

The builders (:func:`scalar_metrics`, :func:`wd_by_layer`, :func:`top_neuron_figures`, :func:`pair_tables`) make
the same values for any destination; the ``log_*`` functions and :class:`WriterSink` send them to a
``SummaryWriter``; ``negmonitor.callbacks.loggers`` sends them to Lightning loggers.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import pandas as pd


def tag(metric: str, layer: int) -> str:
    """The TensorBoard tag of a record's ``metric`` at ``layer`` (``-1``: whole model)."""
    return f"negmonitor/{metric}" if layer < 0 else f"negmonitor/{metric}/layer_{layer:02d}"


def supports(writer: object, method: str) -> bool:
    """Whether the logger's writer can take ``method`` (histograms, images and text are TensorBoard-only)."""
    return callable(getattr(writer, method, None))


def scalar_metrics(scalars: pd.DataFrame) -> dict[str, float]:
    """``{tag: value}`` of every finite per-layer / whole-model scalar (per-neuron rows are records-only)."""
    rows = scalars[scalars.neuron < 0]
    return {tag(str(metric), int(layer)): float(value)
            for layer, metric, value in zip(rows.layer, rows.metric, rows.value) if math.isfinite(value)}


def wd_by_layer(neurons: pd.DataFrame) -> Iterator[tuple[str, np.ndarray]]:
    """``(tag, finite WD values)`` per layer: the WD-distribution histograms."""
    for layer, group in neurons.groupby("layer"):
        wd = group.wd.to_numpy()
        wd = wd[np.isfinite(wd)]
        if wd.size:
            yield tag("wd/distribution", int(layer)), wd


def top_neuron_figures(samples: dict[int, tuple[list[int], np.ndarray]], step: int) -> Iterator[tuple[str, Any]]:
    """``(tag, matplotlib Figure)`` per layer: pre-activation histograms of its top-WD neurons (pair positions)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for layer, (neurons, values) in (samples or {}).items():
        if not neurons:
            continue
        fig = Figure(figsize=(3 * len(neurons), 2.4), dpi=80)  # no pyplot: no global state, no GUI backend
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(neurons), squeeze=False)
        for ax, neuron, column in zip(axes[0], neurons, values.T):
            column = column[np.isfinite(column)]
            counts, edges = np.histogram(column, bins=60)
            ax.stairs(counts, edges, fill=True, color="tab:blue")  # one artist (ax.hist draws 60 patches: ~4x slower)
            ax.axvline(0.0, color="k", lw=0.8)
            ax.set_title(f"L{layer} n{neuron}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_yticks([])  # token counts: the shape is what is read, and tick layout is most of the drawing
            ax.set_xticks(*_range_ticks(float(edges[0]), float(edges[-1])))  # the auto locator took 40% of drawing
        fig.suptitle(f"pre-activations of top-WD neurons, layer {layer}, step {step}", fontsize=8)
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.8, wspace=0.25)
        yield tag("images/top_neurons", int(layer)), fig


def _range_ticks(low: float, high: float) -> tuple[list[float], list[str]]:
    """x ticks of a top-neuron histogram: its range, and zero (the line drawn) where it does not crowd them."""
    span = max(high, 0.0) - min(low, 0.0) or 1.0
    ticks = [low, high] + ([0.0] if min(abs(low), abs(high)) > 0.12 * span else [])
    ticks = sorted(ticks)
    return ticks, [f"{t:.3g}" for t in ticks]


def figure_rgb(fig: Any) -> np.ndarray:
    """The figure drawn as an ``[H, W, 3]`` uint8 array (what loggers without ``add_figure`` take)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


PAIR_COLUMNS = ["neuron", "OI", "sign", "token a", "token b", "y_a", "y_b"]


def pair_tables(top_pairs: pd.DataFrame | None, rows_per_layer: int = 10) -> Iterator[tuple[str, pd.DataFrame]]:
    """``(tag, table)`` per layer: the top differentiated token pairs with their sign classes (columns ``PAIR_COLUMNS``)."""
    if top_pairs is None or top_pairs.empty:
        return
    for layer, group in top_pairs.groupby("layer"):
        best = group.sort_values("oi", ascending=False).head(rows_per_layer)
        rows = [[int(row.neuron), round(float(row.oi), 2), str(row.sign),
                 _cell(getattr(row, "context_a", getattr(row, "token_a", row.token_a_id))),
                 _cell(getattr(row, "context_b", getattr(row, "token_b", row.token_b_id))),
                 round(float(row.y_a), 3), round(float(row.y_b), 3)] for row in best.itertuples(index=False)]
        yield tag("pairs/top", int(layer)), pd.DataFrame(rows, columns=PAIR_COLUMNS)


def log_scalars(writer: object, scalars: pd.DataFrame, step: int) -> int:
    """Write every finite per-layer / whole-model scalar; return how many were written."""
    metrics = scalar_metrics(scalars)
    WriterSink(writer).log_scalars(metrics, step)
    return len(metrics)


def log_histograms(writer: object, neurons: pd.DataFrame, step: int) -> None:
    """Histogram of WD across the neurons of each layer."""
    if not supports(writer, "add_histogram"):
        return
    for name, wd in wd_by_layer(neurons):
        writer.add_histogram(name, wd, int(step))


def log_images(writer: object, samples: dict[int, tuple[list[int], np.ndarray]], step: int) -> None:
    """One image per layer: pre-activation histograms of its top-WD neurons (at the probe's pair positions)."""
    if not supports(writer, "add_figure") or not samples:
        return
    for name, fig in top_neuron_figures(samples, step):
        writer.add_figure(name, fig, int(step), close=False)


def log_text(writer: object, top_pairs: pd.DataFrame, step: int, rows_per_layer: int = 10) -> None:
    """Markdown table per layer of the top differentiated token pairs with their sign classes."""
    if not supports(writer, "add_text"):
        return
    for name, table in pair_tables(top_pairs, rows_per_layer):
        lines = ["| " + " | ".join(PAIR_COLUMNS) + " |", "|" + "---|" * len(PAIR_COLUMNS)]
        lines += ["| " + " | ".join(f"{v:.2f}" if c == "OI" else f"{v:.3f}" if c in ("y_a", "y_b") else str(v)
                                    for c, v in zip(PAIR_COLUMNS, row)) + " |" for row in table.itertuples(index=False, name=None)]
        writer.add_text(name, "\n".join(lines), int(step))


class WriterSink:
    """Curves and media of each measurement to one ``SummaryWriter`` (the HF callback's and the replay's writer).

    A *sink* is what the monitor logs a measurement to: ``log_scalars(metrics, step)``, ``log_media(measurement,
    step, pairs)`` and ``flush()``; ``media`` says whether it takes histograms, images and text.
    """

    media = True

    def __init__(self, writer: Any, name: str = "tensorboard") -> None:
        self.writer, self.name = writer, name

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, int(step))

    def log_media(self, measurement: Any, step: int, pairs: bool = True) -> None:
        log_histograms(self.writer, measurement.neurons, step)
        log_images(self.writer, measurement.samples, step)
        if pairs:
            log_text(self.writer, measurement.result.top_pairs, step)

    def flush(self) -> None:
        self.writer.flush()


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:80]
