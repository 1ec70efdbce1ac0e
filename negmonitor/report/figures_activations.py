"""Histograms of the pre-activations (Fig. 1c) and post-activations (Fig. 6b) of each run's top neurons, with the
values of their top differentiated pairs marked. Values come from :mod:`negmonitor.report.activations`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from negmonitor.report.activations import NeuronValues, RunActivations, run_activations
from negmonitor.report.base import ReportContext, Skip, at_step, figure, fmt, make
from negmonitor.report.plotting import SIGN_COLOURS, new_figure, run_colour, save_png

MARKED_PAIRS = 3


def _histograms(ctx: ReportContext, key: str, post: bool):
    found: list[tuple[int, RunActivations]] = []
    for index, run in enumerate(ctx.runs):
        values = run_activations(ctx, run)
        if values is not None and any(v.pre.size or v.hist is not None for v in values.neurons):
            found.append((index, values))
    left_out = ctx.cache.get("activation_skips", {})
    if not found:
        reasons = "; ".join(f"{label}: {why}" for label, why in left_out.items())
        raise Skip("no run's pre-activations could be recomputed — " + (reasons or "no per-neuron data in any run "
                   "to choose top neurons from (needs neurons or pairs records, or a probe folder)"))
    ncols = max(len(v.neurons) for _, v in found)
    fig, axes = new_figure(len(found), ncols, 3.0 * ncols + 0.4, 3.3 * len(found) + 0.5)
    rows, parts = [], []
    for row, (index, values) in enumerate(found):
        for col in range(ncols):
            ax = axes[row, col]
            if col >= len(values.neurons) or not (values.neurons[col].pre.size or values.neurons[col].hist):
                ax.set_visible(False)
                continue
            item = values.neurons[col]
            counts, edges = _counts(item, post)
            ax.stairs(counts, edges, fill=True, color=run_colour(index), alpha=0.75)
            ax.axvline(0.0, color="black", lw=0.7)
            marked = _mark_pairs(ax, item, post)
            ax.set_title(f"{values.run.label}: L{item.layer} n{item.neuron}, WD {fmt(item.wd, 3)}", fontsize=8)
            ax.set_xlabel("post-activation" if post else "pre-activation", fontsize=7)
            ax.tick_params(labelsize=6)
            if marked:
                ax.legend(fontsize=5, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=1, frameon=False)
            kind = "post" if post else "pre"
            rows += [(values.run.label, values.step, item.layer, item.neuron, kind, lo, hi, int(n))
                     for lo, hi, n in zip(edges[:-1], edges[1:], counts)]
        parts.append(f"{values.run.label} ({at_step(values.run, values.step)}; {values.how})")
    png = save_png(fig, ctx.out / f"{key}.png")
    which = "post-activations (the nonlinearity applied)" if post else "pre-activations (input of the nonlinearity)"
    caption = (f"Histograms of the {which} of each run's top neurons — the highest-WD neurons among those with "
               f"stored top pairs (the top-MD neurons) — with the {MARKED_PAIRS} highest-OI pairs marked (solid: "
               "token a, dashed: token b; colour: NN blue, PN grey, PP orange). Runs: " + "; ".join(parts) + "."
               + "".join(f" Not drawn: {label} ({why})." for label, why in left_out.items()))
    data = pd.DataFrame(rows, columns=["run", "step", "layer", "neuron", "kind", "bin_left", "bin_right", "count"])
    return make(key, caption, png=png, data=data)


def _counts(item: NeuronValues, post: bool) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of the neuron's values, or its recorded histogram (post: the bin centres through the nonlinearity,
    re-binned with their counts as weights)."""
    if item.hist is None:
        data = item.post if post else item.pre
        return np.histogram(data, bins=min(60, max(8, data.size // 10)))
    counts, edges = item.hist
    if not post:
        return counts, edges
    centres = torch.as_tensor((edges[:-1] + edges[1:]) / 2, dtype=torch.float32)
    with torch.no_grad():
        mapped = item.act(centres).numpy()
    return np.histogram(mapped, bins=len(counts), weights=counts)


def _mark_pairs(ax, item: NeuronValues, post: bool) -> bool:
    pairs = item.pairs
    if pairs is None or pairs.empty:
        return False
    for row in pairs.head(MARKED_PAIRS).itertuples(index=False):
        ya, yb = float(row.y_a), float(row.y_b)
        if post:
            with torch.no_grad():
                ya, yb = (float(item.act(torch.tensor([v], dtype=torch.float32))[0]) for v in (ya, yb))
        colour = SIGN_COLOURS.get(str(row.sign), "black")
        label = f"#{row.rank} {row.sign}: {_token(row, 'a')}/{_token(row, 'b')}"
        ax.axvline(ya, color=colour, lw=1.2, label=label)
        ax.axvline(yb, color=colour, lw=1.2, ls="--")
    return True


def _token(row, side: str) -> str:
    token = getattr(row, f"token_{side}", None)
    if token is None or (isinstance(token, float) and np.isnan(token)):
        token = getattr(row, f"token_{side}_id")
    return repr(str(token))[1:-1].strip()[:12]


@figure("fig1c_preactivations", "Fig. 1c", "Pre-activation histograms of top neurons")
def preactivations(ctx: ReportContext):
    """Pre-activation histograms of the top neurons with their top pairs marked."""
    return _histograms(ctx, "fig1c_preactivations", post=False)


@figure("fig6b_postactivations", "Fig. 6b", "Post-activation histograms of top neurons")
def postactivations(ctx: ReportContext):
    """Post-activation histograms of the same neurons with their top pairs marked."""
    return _histograms(ctx, "fig6b_postactivations", post=True)
