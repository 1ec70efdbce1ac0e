"""Per-layer figures at a run's last step: NN / PN / PP shares per layer (7a), the Jaccard overlap of top-5% sets
by WD, MD, skewness and kurtosis (A1), and the top-pair tables with tokens and context.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from negmonitor.metrics.ranking import jaccard, top_k_indices
from negmonitor.report.base import ReportContext, Skip, at_step, figure, last_snapshot, make, per_layer
from negmonitor.report.plotting import SIGN_COLOURS, new_figure, save_png

TOP_FRAC = 0.05
JACCARD_METRICS = {"WD": "wd", "MD": "md", "|skew|": "skew", "kurtosis": "kurtosis"}
PAIR_TABLE_NEURONS = 3
PAIR_TABLE_RANKS = 5


@figure("fig7a_pair_signs_per_layer", "Fig. 7a", "NN / PN / PP shares per layer")
def pair_signs_per_layer(ctx: ReportContext):
    """Stacked bars per layer of the sign-class shares among top pairs, at each run's last step."""
    panels = []
    for run in ctx.runs:
        frames = {sign: per_layer(run, f"pairs/{sign.lower()}_share") for sign in ("NN", "PN", "PP")}
        if frames["NN"].empty:
            continue
        step = int(frames["NN"].step.max())
        table = pd.DataFrame({sign: f[f.step == step].set_index("layer")["value"] for sign, f in frames.items()})
        table = table.dropna(how="all")
        if not table.empty:
            panels.append((run, step, table))
    if not panels:
        raise Skip("no pair-sign shares per layer (pairs/nn_share ...) in any run — needs records with the 'pairs' "
                   "family, or a probe folder")
    fig, axes = new_figure(len(panels), 1, max(5.0, 0.45 * max(len(t) for *_, t in panels) + 2.5),
                           2.5 * len(panels) + 0.6)
    rows, parts = [], []
    for ax, (run, step, table) in zip(axes[:, 0], panels):
        bottom = np.zeros(len(table))
        for sign in ("NN", "PN", "PP"):
            values = table[sign].fillna(0.0).to_numpy()
            ax.bar(table.index.astype(str), values, bottom=bottom, color=SIGN_COLOURS[sign], label=sign)
            bottom += values
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of top pairs")
        ax.set_title(f"{run.label} — {at_step(run, step)}", fontsize=9)
        ax.legend(fontsize=7, ncols=3, loc="upper right")
        rows += [(run.label, step, int(layer), sign, table.loc[layer, sign]) for layer in table.index
                 for sign in ("NN", "PN", "PP")]
        parts.append(f"{run.label} ({at_step(run, step)}, {len(table)} layers)")
    axes[-1, 0].set_xlabel("layer")
    png = save_png(fig, ctx.out / "fig7a_pair_signs_per_layer.png")
    caption = ("Sign classes of the top-100 pairs (by OI ratio) of each layer's top-5% MD neurons: NN (both "
               "pre-activations negative), PN (mixed), PP (both positive), per layer at each run's last measured "
               "step. Runs: " + "; ".join(parts) + ".")
    return make("fig7a_pair_signs_per_layer", caption, png=png,
                data=pd.DataFrame(rows, columns=["run", "step", "layer", "sign", "share"]))


@figure("figA1_jaccard", "Fig. A1", "Jaccard overlap of top-5% sets")
def jaccard_table(ctx: ReportContext):
    """Per layer, the Jaccard index of the top-5% neuron sets by WD, MD, |skewness| and kurtosis."""
    panels = []
    for run in ctx.runs:
        step, snap = last_snapshot(run.neurons)
        if step is None or "wd" not in snap.columns:
            continue
        rows = jaccard_rows(snap)
        if rows:
            panels.append((run, step, pd.DataFrame(rows, columns=["layer", "pair", "jaccard"])))
    if not panels:
        raise Skip("no per-neuron WD/MD/skewness/kurtosis in any run — needs neurons records or a probe folder")
    pairs = [f"{a}–{b}" for a, b in itertools.combinations(JACCARD_METRICS, 2)]
    n_layers = max(p[2].layer.nunique() for p in panels)
    fig, axes = new_figure(len(panels), 1, max(5.0, 0.55 * n_layers + 2.8), 2.6 * len(panels) + 0.5)
    frames, parts = [], []
    for ax, (run, step, frame) in zip(axes[:, 0], panels):
        grid = frame.pivot(index="pair", columns="layer", values="jaccard").reindex(pairs)
        image = ax.imshow(grid.to_numpy(float), vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_yticks(range(len(pairs)), pairs, fontsize=7)
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], fontsize=7)
        for (i, j), value in np.ndenumerate(grid.to_numpy(float)):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
        ax.set_title(f"{run.label} — {at_step(run, step)}", fontsize=9)
        ax.set_xlabel("layer")
        ax.figure.colorbar(image, ax=ax, shrink=0.8, label="Jaccard")
        frames.append(frame.assign(run=run.label, step=step))
        parts.append(f"{run.label} ({at_step(run, step)})")
    png = save_png(fig, ctx.out / "figA1_jaccard.png")
    data = pd.concat(frames, ignore_index=True)[["run", "step", "layer", "pair", "jaccard"]]
    table = data.pivot_table(index=["run", "step", "layer"], columns="pair", values="jaccard").reset_index()
    caption = ("Jaccard index |A∩B|/|A∪B| of each layer's top-5% neuron sets ranked by WD, MD (mapping "
               "difficulty), |skewness| and excess kurtosis of the pre-activations, at each run's last measured step "
               "(blank: the metric was not measured, e.g. MD without pairs). Runs: " + "; ".join(parts) + ".")
    return make("figA1_jaccard", caption, png=png, table=table, data=data)


def jaccard_rows(snap: pd.DataFrame) -> list[tuple[int, str, float]]:
    """``(layer, "A–B", jaccard)`` for every layer and pair of ranking metrics present in ``snap``."""
    rows = []
    for layer, group in snap.groupby("layer"):
        sets = {}
        for name, column in JACCARD_METRICS.items():
            if column not in group.columns:
                continue
            values = group.sort_values("neuron")[column].to_numpy(float)
            if name == "|skew|":
                values = np.abs(values)
            if np.isfinite(values).any():
                sets[name] = top_k_indices(torch.tensor(values), TOP_FRAC)
        for a, b in itertools.combinations(JACCARD_METRICS, 2):
            value = jaccard(sets[a], sets[b]) if a in sets and b in sets else float("nan")
            rows.append((int(layer), f"{a}–{b}", value))
    return rows


@figure("tab_top_pairs", "Pairs table", "Top differentiated token pairs")
def top_pairs(ctx: ReportContext):
    """Tables of the top pairs of each layer's top-MD neurons with tokens, sign and context (last step)."""
    tables, parts = [], []
    for run in ctx.runs:
        step, snap = last_snapshot(run.pairs)
        if step is None or "oi" not in snap.columns:
            continue
        tables.append(pair_table(snap).assign(run=run.label))
        parts.append(f"{run.label} ({at_step(run, step)})")
    if not tables:
        raise Skip("no top-pair records in any run — needs records with the 'pairs' family or a probe folder "
                   "(top_pairs.parquet)")
    table = pd.concat(tables, ignore_index=True)
    front = ["run", "step", "layer", "neuron", "md", "rank", "oi", "sign", "token_a", "token_b", "y_a", "y_b",
             "context_a", "context_b"]
    table = table[[c for c in front if c in table.columns]]
    caption = (f"The {PAIR_TABLE_RANKS} highest-OI token pairs of the {PAIR_TABLE_NEURONS} highest-MD neurons of each "
               "layer at each run's last measured step: pre-activations y_a, y_b, their sign class, the tokens and "
               "their preceding context (the token in [[ ]]). Runs: " + "; ".join(parts) + ".")
    return make("tab_top_pairs", caption, table=table, data=table)


def pair_table(snap: pd.DataFrame) -> pd.DataFrame:
    """The top ranks of each layer's highest-MD neurons in one step's pair rows."""
    chosen = []
    for _, group in snap.groupby("layer"):
        neurons = group.groupby("neuron")["md"].first().sort_values(ascending=False).head(PAIR_TABLE_NEURONS).index
        picked = group[group.neuron.isin(neurons) & (group["rank"] < PAIR_TABLE_RANKS)]
        chosen.append(picked.assign(_order=picked.neuron.map({n: i for i, n in enumerate(neurons)})))
    out = pd.concat(chosen, ignore_index=True).sort_values(["layer", "_order", "rank"])
    return out.drop(columns="_order").reset_index(drop=True)
