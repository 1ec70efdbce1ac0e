"""Figures from the ablation protocol: perplexity against the fraction of neurons perturbed (3a), the A.2 table of
baseline / Wasserstein / perplexity-matched / random, and the layer-group heatmaps, single and cumulative (5).

Sources: ``negmonitor ablate --out`` tables (``ablation.csv``, ``fraction_sweep.csv``, ``layer_groups.csv``) and,
for A.2, the ablation rows of monitored runs (``ablation/ppl_ratio/...``, ``ablation/acc/<suite>/...``) at their
last step with ablation.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from negmonitor.report.base import (ReportContext, Skip, checkpoint_words, figure, make, metrics_like,
                                    whole_model)
from negmonitor.report.plotting import CONDITION_COLOURS, CONDITION_NAMES, new_figure, no_data, run_colour, save_png

CONDITIONS = ("baseline", "wasserstein", "random", "ppl_matched")
HOW_STYLES = {"top": ("-o", "top WD"), "random": ("--s", "random"), "bottom": (":^", "bottom WD")}


def _settings_words(run) -> str:
    settings = (run.meta.get("ablation_meta") or {}).get("settings") or {}
    mode = settings.get("mode", "zero_negative")
    metric = settings.get("metric", "wd")
    return f"{checkpoint_words(run)}; mode {mode}, ranked by {metric}"


# ----------------------------------------------------------------------------------------------------------------
# 3a


@figure("fig3a_ppl_vs_fraction", "Fig. 3a", "Perplexity vs fraction of neurons perturbed")
def ppl_vs_fraction(ctx: ReportContext):
    """Perplexity under ablation of the top / random / bottom fraction of neurons per layer, per fraction."""
    usable = [(i, run, run.table("fraction_sweep")) for i, run in enumerate(ctx.runs)]
    usable = [(i, run, t) for i, run, t in usable if t is not None and "ppl" in t.columns]
    if not usable:
        raise Skip("no fraction sweep (fraction_sweep.csv) in any run — run negmonitor ablate --fractions "
                   "0.001,0.01,0.05 --out DIR and pass DIR")
    fig, axes = new_figure(1, 1, 6.4, 4.2)
    ax = axes[0, 0]
    rows, parts = [], []
    for index, run, table in usable:
        table = table.assign(how=table["how"].fillna(""))
        base = table[table.condition == "baseline"]
        colour = run_colour(index)
        if len(base):
            ax.axhline(float(base.ppl.iloc[0]), color=colour, lw=0.8, alpha=0.6)
        for how, (style, name) in HOW_STYLES.items():
            part = table[table.how == how].sort_values("fraction")
            if part.empty:
                continue
            ax.plot(part.fraction, part.ppl, style, color=colour, ms=4, label=f"{run.label}: {name}")
            rows += [(run.label, how, f, n, p) for f, n, p in zip(part.fraction, part.n_neurons, part.ppl)]
        fractions = sorted(table.loc[table.how != "", "fraction"].unique())
        parts.append(f"{run.label} (fractions {', '.join(f'{f:g}' for f in fractions)}; {_settings_words(run)})")
    ax.set_xscale("log")
    ax.set_xlabel("fraction of neurons per layer perturbed")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    png = save_png(fig, ctx.out / "fig3a_ppl_vs_fraction.png")
    caption = ("Perplexity when the top-WD, random or bottom-WD fraction of each layer's neurons is ablated "
               "(negative pre-activations zeroed unless stated), against the fraction; the thin horizontal line is "
               "the unablated perplexity. Runs: " + "; ".join(parts) + ".")
    return make("fig3a_ppl_vs_fraction", caption, png=png,
                data=pd.DataFrame(rows, columns=["run", "how", "fraction", "n_neurons", "ppl"]))


# ----------------------------------------------------------------------------------------------------------------
# A.2


@figure("tabA2_ablation", "Table A.2", "Ablation: baseline / Wasserstein / perplexity-matched / random")
def ablation_table(ctx: ReportContext):
    """The protocol's condition table per run (ablate folders, and monitored runs at their last ablation step)."""
    frames, parts = [], []
    for run in ctx.runs:
        table = run.table("ablation")
        if table is not None:
            frames.append(table.assign(run=run.label, source="ablate", step=np.nan))
            parts.append(f"{run.label} (ablate folder; {_settings_words(run)})")
        records = records_table(run)
        if records is not None:
            frames.append(records.assign(run=run.label, source="records"))
            parts.append(f"{run.label} (ablation records at step {int(records.step.iloc[0])})")
    if not frames:
        raise Skip("no ablation table (ablation.csv) and no ablation records in any run — run negmonitor ablate "
                   "--out DIR, or monitor with ablation")
    table = pd.concat(frames, ignore_index=True)
    base = table[table.condition == "baseline"].set_index(["run", "source"])["ppl"]
    table["ppl_ratio"] = [p / base.get((r, s), np.nan) for p, r, s in zip(table.ppl, table.run, table.source)]
    accuracy = [c for c in table.columns if c.endswith("_acc") or c.startswith("lm_eval:")]
    front = ["run", "source", "step", "condition", "fraction", "n_neurons", "ppl", "ppl_ratio"]
    table = table[[c for c in front if c in table.columns] + accuracy]
    png = _ablation_bars(ctx, table, accuracy)
    caption = ("The ablation protocol: the unablated model, the top-WD fraction of each layer's neurons "
               "(Wasserstein), the same number of random neurons, and the bottom-WD neurons whose ablation matches "
               "the Wasserstein perplexity (perplexity-matched). Bars: perplexity relative to the baseline and each "
               "minimal-pair accuracy; the table lists every number. Runs: " + "; ".join(parts) + ".")
    return make("tabA2_ablation", caption, png=png, table=table, data=table)


def records_table(run) -> pd.DataFrame | None:
    """An A.2-shaped table from the ablation rows of a monitored run, at its last step with ablation."""
    ratios = {c: whole_model(run, f"ablation/ppl_ratio/{c}") for c in CONDITIONS[1:]}
    base_ppl = whole_model(run, "ablation/ppl/baseline")
    accs = [m for m in metrics_like(run, "ablation/acc/")]
    steps = set(base_ppl.step) | {s for r in ratios.values() for s in r.step} | {
        s for m in accs for s in whole_model(run, m).step}
    if not steps:
        return None
    step = max(steps)
    rows = []
    for condition in CONDITIONS:
        row = {"condition": condition, "step": step}
        ppl = base_ppl[base_ppl.step == step].value
        base = float(ppl.iloc[0]) if len(ppl) else np.nan
        if condition == "baseline":
            row["ppl"] = base
        else:
            ratio = ratios[condition][ratios[condition].step == step].value
            row["ppl"] = base * float(ratio.iloc[0]) if len(ratio) else np.nan
        for metric in accs:
            suite, cond = metric.split("/")[2:4]
            if cond == condition:
                value = whole_model(run, metric)
                value = value[value.step == step].value
                row[f"{suite}_acc"] = float(value.iloc[0]) if len(value) else np.nan
        if condition == "ppl_matched":
            frac = whole_model(run, "ablation/ppl_matched_fraction")
            frac = frac[frac.step == step].value
            row["fraction"] = float(frac.iloc[0]) if len(frac) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _ablation_bars(ctx: ReportContext, table: pd.DataFrame, accuracy: list[str]):
    measures = ["ppl_ratio"] + accuracy
    fig, axes = new_figure(1, len(measures), 3.6 * len(measures) + 0.6, 3.6)
    keys = list(dict.fromkeys(zip(table.run, table.source)))
    width = 0.8 / max(1, len(keys))
    for ax, measure in zip(axes[0], measures):
        for k, (run, source) in enumerate(keys):
            part = table[(table.run == run) & (table.source == source)].set_index("condition")
            values = [float(part.loc[c, measure]) if c in part.index and measure in part.columns else np.nan
                      for c in CONDITIONS]
            x = np.arange(len(CONDITIONS)) + (k - (len(keys) - 1) / 2) * width
            bars = ax.bar(x, np.nan_to_num(values), width, color=[CONDITION_COLOURS[c] for c in CONDITIONS],
                          alpha=1.0 - 0.5 * k / max(1, len(keys)), edgecolor="black", lw=0.4,
                          label=f"{run} ({source})")
            ax.bar_label(bars, labels=[f"{v:.3g}" if np.isfinite(v) else "" for v in values], fontsize=6)
        ax.set_xticks(range(len(CONDITIONS)), [CONDITION_NAMES[c].split(" ")[0] for c in CONDITIONS], fontsize=7,
                      rotation=20)
        ax.set_title("perplexity / baseline" if measure == "ppl_ratio" else measure, fontsize=9)
        if measure == "ppl_ratio":  # bars from zero; the value on each bar, the baseline's 1 dashed
            finite = table[measure].to_numpy(float)
            finite = finite[np.isfinite(finite)]
            ax.set_ylim(0, max(1.0, finite.max() if finite.size else 1.0) * 1.15)
            ax.axhline(1.0, color="#555555", lw=0.8, ls="--")
        else:
            ax.set_ylim(0, 1.1)
        if len(keys) > 1:
            ax.legend(fontsize=6)
    return save_png(fig, ctx.out / "tabA2_ablation.png")


# ----------------------------------------------------------------------------------------------------------------
# 5


@figure("fig5_layer_groups", "Fig. 5", "Layer-group ablation heatmaps")
def layer_groups(ctx: ReportContext):
    """Damage of ablating each group of layers alone and all groups up to it (cumulative)."""
    usable = [(run, run.table("layer_groups")) for run in ctx.runs]
    usable = [(run, t) for run, t in usable if t is not None and "scope" in t.columns]
    if not usable:
        raise Skip("no layer-group sweep (layer_groups.csv) in any run — run negmonitor ablate --layer-groups G "
                   "--out DIR and pass DIR")
    fig, axes = new_figure(len(usable), 2, 10.0, 2.2 * len(usable) + 1.2)
    frames, parts = [], []
    for row, (run, table) in enumerate(usable):
        grid = group_damage(table)
        frames.append(grid.assign(run=run.label))
        for col, scope in enumerate(("alone", "cumulative")):
            ax = axes[row, col]
            part = grid[grid.scope == scope]
            if part.empty:
                no_data(ax, f"{run.label}: no {scope} rows")
                continue
            _heatmap(ax, part)
            words = "each group alone" if scope == "alone" else "all groups up to this one"
            ax.set_title(f"{run.label} — {words}", fontsize=9)
        parts.append(f"{run.label} (groups {', '.join(grid.group.unique())}; {_settings_words(run)})")
    png = save_png(fig, ctx.out / "fig5_layer_groups.png")
    data = pd.concat(frames, ignore_index=True)
    caption = ("Ablating the top-WD neurons of one group of consecutive layers (left) or of every group up to it "
               "(right, cumulative). Rows: perplexity relative to the unablated model and the minimal-pair accuracy "
               "lost (baseline − ablated); each cell shows the value, colour is scaled per row (darker = more "
               "damage). Runs: " + "; ".join(parts) + ".")
    return make("fig5_layer_groups", caption, png=png, data=data)


def group_damage(table: pd.DataFrame) -> pd.DataFrame:
    """``scope, group, measure, value`` from a layer-group table: ppl ratio and accuracy drops per group.

    The first group's cumulative cell is the group alone (the sweep writes no separate row for it).
    """
    group_column = "layer_group" if "layer_group" in table.columns else "group"  # older files: "group"
    table = table.assign(how=table["how"].fillna(""), group=table[group_column].astype(str))
    base = table[table.condition == "baseline"].iloc[0]
    accuracy = [c for c in table.columns if c.endswith("_acc") or c.startswith("lm_eval:")]
    rows = []
    top = table[table.how.isin(["top", ""]) & (table.condition != "baseline")]
    groups = list(dict.fromkeys(top[top.scope == "alone"].group))
    for scope in ("alone", "cumulative"):
        for index, group in enumerate(groups):
            match = top[(top.scope == scope) & (top.group == group)]
            if match.empty and scope == "cumulative" and index == 0:
                match = top[(top.scope == "alone") & (top.group == group)]
            if match.empty:
                continue
            cell = match.iloc[0]
            if "ppl" in table.columns:
                rows.append((scope, group, "perplexity / baseline", float(cell.ppl) / float(base.ppl)))
            for column in accuracy:
                rows.append((scope, group, f"{column} drop", float(base[column]) - float(cell[column])))
    return pd.DataFrame(rows, columns=["scope", "group", "measure", "value"])


def _heatmap(ax, part: pd.DataFrame) -> None:
    grid = part.pivot(index="measure", columns="group", values="value")
    grid = grid[list(dict.fromkeys(part.group))]
    values = grid.to_numpy(float)
    baseline = np.array([1.0 if m.startswith("perplexity") else 0.0 for m in grid.index])[:, None]
    damage = values - baseline
    scale = np.nanmax(np.abs(damage), axis=1, keepdims=True)
    shaded = np.divide(damage, scale, out=np.zeros_like(damage), where=scale > 0)
    ax.imshow(shaded, cmap="Reds", vmin=-0.2, vmax=1.0, aspect="auto")
    ax.set_yticks(range(len(grid.index)), list(grid.index), fontsize=7)
    ax.set_xticks(range(len(grid.columns)), [f"L{c}" for c in grid.columns], fontsize=7)
    ax.set_xlabel("layer group")
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.4g}", ha="center", va="center", fontsize=6)
