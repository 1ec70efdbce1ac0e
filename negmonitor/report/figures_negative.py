"""Where the non-Gaussianity sits: the negative-side share of WD per layer and over training (the message of the
paper's Figure 1: in GELU/SiLU models it concentrates in the negative pre-activation region, far less in ReLU ones).

The share is the one the monitor logs (``wd/neg_share``, ``wd/neg_share_top``): per layer ``Σ wd_neg / Σ wd`` over
the layer's neurons (all of them, or its top-5% WD), where ``wd_neg`` is the part of a neuron's W1 integral
contributed by its negative pre-activation values (see :mod:`negmonitor.metrics.wasserstein`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from negmonitor.metrics.ranking import top_k_indices
from negmonitor.report.base import (ReportContext, Skip, at_step, describe_steps, figure, last_snapshot, make,
                                    whole_model)
from negmonitor.report.plotting import new_figure, run_colour, save_png, step_axis

TOP_FRAC = 0.05
COLUMNS = ["run", "step", "layer", "neurons", "share_all", "share_top", "neg_frac_all", "neg_frac_top"]


def layer_shares(snap: pd.DataFrame) -> pd.DataFrame:
    """Per layer: ``neurons, share_all, share_top`` (``Σ wd_neg / Σ wd`` over all / the top-5% WD neurons) and
    ``neg_frac_all, neg_frac_top`` (the WD-weighted mean share of negative values: the share a neuron's WD would
    have if it were spread evenly over its values)."""
    rows = []
    for layer, group in snap.groupby("layer", sort=True):
        wd, neg = group.wd.to_numpy(float), group.wd_neg.to_numpy(float)
        ok = np.isfinite(wd) & np.isfinite(neg)
        if not ok.any():
            continue
        wd, neg = wd[ok], neg[ok]
        frac = group.neg_frac.to_numpy(float)[ok] if "neg_frac" in group.columns else np.full(len(wd), np.nan)
        top = top_k_indices(torch.tensor(wd), TOP_FRAC).numpy()
        rows.append((int(layer), int(ok.sum()), _ratio(neg.sum(), wd.sum()), _ratio(neg[top].sum(), wd[top].sum()),
                     _ratio((frac * wd).sum(), wd.sum()), _ratio((frac[top] * wd[top]).sum(), wd[top].sum())))
    return pd.DataFrame(rows, columns=COLUMNS[2:])


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 and np.isfinite(num) else float("nan")


def _family(run) -> str:
    family = run.meta.get("family")
    return f" ({family})" if family else ""


@figure("fig1b_negative_share", "Fig. 1b", "Negative-side share of WD")
def negative_share(ctx: ReportContext):
    """Per layer at each run's last step, the share of WD from negative pre-activations (all neurons and the top 5%
    WD); over training, the whole-model ``wd/neg_share`` and ``wd/neg_share_top``."""
    layers, curves = [], []
    for index, run in enumerate(ctx.runs):
        step, snap = last_snapshot(run.neurons)
        if step is not None and {"wd", "wd_neg"} <= set(snap.columns):
            table = layer_shares(snap)
            if not table.empty:
                layers.append((index, run, step, table))
        share, top = whole_model(run, "wd/neg_share"), whole_model(run, "wd/neg_share_top")
        if len(share) >= 2:
            curves.append((index, run, share, top))
    if not layers and not curves:
        raise Skip("no per-neuron wd/wd_neg and no wd/neg_share over two or more steps in any run — needs neurons "
                   "records (a monitored run or a replay) or a probe folder")
    panels = int(bool(layers)) + int(bool(curves))
    fig, axes = new_figure(1, panels, 5.6 * panels, 4.0)
    frames, parts = [], []
    if layers:
        ax = axes[0, 0]
        for index, run, step, table in layers:
            colour = run_colour(index)
            ax.plot(table.layer, table.share_all, "-o", ms=4, color=colour, label=f"{run.label}{_family(run)}")
            ax.plot(table.layer, table.share_top, "--s", ms=4, color=colour, mfc="white")
            ax.plot(table.layer, table.neg_frac_all, "x", ms=8, mew=1.5, color=colour, zorder=3)
            frames.append(table.assign(run=run.label, step=step))
            parts.append(f"{run.label}{_family(run)} ({at_step(run, step)}, {int(table.neurons.sum())} neurons in "
                         f"{len(table)} layers)")
        n_layers = max(int(t.layer.max()) for *_, t in layers) + 1
        ax.set_xticks(range(n_layers) if n_layers <= 16 else np.linspace(0, n_layers - 1, 9).round().astype(int))
        ax.set_xlabel("layer")
        ax.set_title("per layer, last measured step", fontsize=9)
        _share_axis(ax, ("all neurons", f"top {TOP_FRAC:.0%} WD", "share of values < 0 (WD-weighted)"))
    if curves:
        ax = axes[0, panels - 1]
        steps = []
        for index, run, share, top in curves:
            colour = run_colour(index)
            ax.plot(share.step, share.value, "-o", ms=3, color=colour, label=f"{run.label}{_family(run)}")
            if len(top):
                ax.plot(top.step, top.value, "--s", ms=3, color=colour, mfc="white")
            steps += share.step.tolist()
            parts.append(f"{run.label} over {describe_steps(share.step)}")
        step_axis(ax, steps)
        ax.set_title("whole model (mean over layers) over training", fontsize=9)
        _share_axis(ax, ("wd/neg_share (all neurons)", "wd/neg_share_top (top 5% WD)"))
    png = save_png(fig, ctx.out / "fig1b_negative_share.png")
    caption = ("Negative-side share of the non-Gaussianity: each neuron's WD (the 1-Wasserstein distance of its "
               "standardised pre-activations to N(0,1), written as W1 = ∫₀¹ |F⁻¹(u) − Φ⁻¹(u)| du) is split by the "
               "sign of the pre-activation: wd_neg is the part of the integral over the quantiles u of the neuron's "
               "negative values (u below its share of negative values), and the share is Σ wd_neg / Σ wd over a "
               "layer's neurons (solid: all; dashed, open markers: its top 5% by WD). 1 means all of the WD comes "
               "from negative pre-activations, 0.5 (dotted line) an even split, as for a neuron symmetric about 0. "
               "Crosses: the share of values that are negative, weighted by WD — the share a neuron's WD would have "
               "if it were spread evenly over its values; a share above its cross means the non-Gaussianity "
               "concentrates on the negative side beyond the negative values' share. The paper's Figure 1 finds it "
               "concentrated in the negative region in GELU/SiLU models, far less in ReLU ones. Right (runs with "
               "two or more measurements): the whole-model means over layers, wd/neg_share (all neurons) and "
               "wd/neg_share_top (top 5%), over training. Runs: " + "; ".join(parts) + ".")
    for index, run, share, top in curves:  # whole-model rows: layer -1
        frames.append(share.rename(columns={"value": "share_all"}).merge(
            top.rename(columns={"value": "share_top"}), on="step", how="left").assign(run=run.label, layer=-1))
    data = pd.concat(frames, ignore_index=True).reindex(columns=COLUMNS)
    return make("fig1b_negative_share", caption, png=png, data=data)


def _share_axis(ax, styles: tuple[str, ...]) -> None:
    """Axis from 0 to 1 with the even split dotted; one legend for the runs (colours), one for the line styles."""
    from matplotlib.lines import Line2D

    ax.set_ylim(0.0, 1.0)
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    ax.set_ylabel("negative-side share of WD")
    runs = ax.legend(fontsize=6, loc="lower left", title="run", title_fontsize=6)
    looks = [Line2D([], [], color="black", ls="-", marker="o", ms=4), Line2D([], [], color="black", ls="--",
             marker="s", ms=4, mfc="white"), Line2D([], [], color="black", ls="none", marker="x", ms=6, mew=1.5)]
    ax.legend(looks[:len(styles)], styles, fontsize=6, loc="lower right")
    ax.add_artist(runs)
