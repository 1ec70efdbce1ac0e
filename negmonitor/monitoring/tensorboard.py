"""TensorBoard view of a measurement: per-layer curves, WD histograms, pre-activation images, top-pair tables.

Tag scheme (documented in the README): ``negmonitor/<family>/<stat>/layer_NN`` for per-layer values and
``negmonitor/<family>/<stat>`` for whole-model values, e.g. ``negmonitor/wd/cohort_mean/layer_03`` or
``negmonitor/ablation/ppl_ratio/wasserstein``. TensorBoard gets per-layer summaries only, never per-neuron curves.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def tag(metric: str, layer: int) -> str:
    """The TensorBoard tag of a record's ``metric`` at ``layer`` (``-1``: whole model)."""
    return f"negmonitor/{metric}" if layer < 0 else f"negmonitor/{metric}/layer_{layer:02d}"


def supports(writer: object, method: str) -> bool:
    """Whether the logger's writer can take ``method`` (histograms, images and text are TensorBoard-only)."""
    return callable(getattr(writer, method, None))


def log_scalars(writer: object, scalars: pd.DataFrame, step: int) -> int:
    """Write every finite per-layer / whole-model scalar; return how many were written."""
    count = 0
    for row in scalars[scalars.neuron < 0].itertuples(index=False):
        if math.isfinite(row.value):
            writer.add_scalar(tag(row.metric, int(row.layer)), float(row.value), int(step))
            count += 1
    return count


def log_histograms(writer: object, neurons: pd.DataFrame, step: int) -> None:
    """Histogram of WD across the neurons of each layer."""
    if not supports(writer, "add_histogram"):
        return
    for layer, group in neurons.groupby("layer"):
        wd = group.wd.to_numpy()
        wd = wd[np.isfinite(wd)]
        if wd.size:
            writer.add_histogram(tag("wd/distribution", int(layer)), wd, int(step))


def log_images(writer: object, samples: dict[int, tuple[list[int], np.ndarray]], step: int) -> None:
    """One image per layer: pre-activation histograms of its top-WD neurons (at the probe's pair positions)."""
    if not supports(writer, "add_figure") or not samples:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for layer, (neurons, values) in samples.items():
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
        fig.suptitle(f"pre-activations of top-WD neurons, layer {layer}, step {step}", fontsize=8)
        fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.8, wspace=0.25)
        writer.add_figure(tag("images/top_neurons", int(layer)), fig, int(step), close=False)


def log_text(writer: object, top_pairs: pd.DataFrame, step: int, rows_per_layer: int = 10) -> None:
    """Markdown table per layer of the top differentiated token pairs with their sign classes."""
    if not supports(writer, "add_text") or top_pairs is None or top_pairs.empty:
        return
    for layer, group in top_pairs.groupby("layer"):
        best = group.sort_values("oi", ascending=False).head(rows_per_layer)
        lines = ["| neuron | OI | sign | token a | token b | y_a | y_b |", "|---|---|---|---|---|---|---|"]
        for row in best.itertuples(index=False):
            token_a = _cell(getattr(row, "context_a", getattr(row, "token_a", row.token_a_id)))
            token_b = _cell(getattr(row, "context_b", getattr(row, "token_b", row.token_b_id)))
            lines.append(f"| {row.neuron} | {row.oi:.2f} | {row.sign} | {token_a} | {token_b} | "
                         f"{row.y_a:.3f} | {row.y_b:.3f} |")
        writer.add_text(tag("pairs/top", int(layer)), "\n".join(lines), int(step))


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:80]
