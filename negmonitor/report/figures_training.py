"""Figures over training steps: WD distribution and emergence (2a, 2b), weight drift (2c), WD vs accuracy (2d),
pair-sign shares over training (7b) and ablation damage against the cohort's WD (7c, 7d).

All read the tidy scalar rows (per-layer ``neuron = -1``, whole-model ``layer = -1``) and per-neuron snapshots.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from negmonitor.metrics.ranking import top_k_indices
from negmonitor.monitoring.cohort import final_cohort_curve
from negmonitor.report.base import (ReportContext, Skip, at_step, cohort_fraction, cohort_step, describe_steps,
                                    figure, fmt, last_snapshot, make, metrics_like, per_layer, whole_model)
from negmonitor.report.plotting import (CONDITION_COLOURS, CONDITION_NAMES, SIGN_COLOURS, new_figure, no_data,
                                        run_colour, save_png, step_axis)

CONDITIONS = ("wasserstein", "random", "ppl_matched")
MARKERS = "osD^vP*X"


def _grid(n: int, per_row: int = 3) -> tuple[int, int]:
    cols = min(n, per_row)
    return -(-n // cols), cols


def _cohort_words(run) -> str:
    step, frac = cohort_step(run), cohort_fraction(run)
    if step is None:
        return "no cohort"
    return f"cohort = top {frac:.0%} WD per layer at step {step}" if frac else f"cohort fixed at step {step}"


def paper_cohort_curve(run) -> pd.DataFrame:
    """``step, cohort, rest`` of the paper's cohort: computed from the records when the run was read from them
    (one file at a time), else from the snapshots in memory."""
    return run.cohort_curve if run.cohort_curve is not None else final_cohort_curve(run.neurons)


def cohort_wd(run) -> tuple[pd.DataFrame, str]:
    """``step, cohort_wd`` and what the cohort is: the paper's (top 5% WD at the last measured step, followed back
    through the per-neuron snapshots) where the run has snapshots at two or more steps, else the live cohort (fixed
    during the run), labelled as such."""
    retro = paper_cohort_curve(run)
    if len(retro) >= 2:
        last = int(retro.step.max())
        return (retro[["step", "cohort"]].rename(columns={"cohort": "cohort_wd"}),
                f"paper's cohort: top 5% WD per layer at step {last}, followed back")
    live = whole_model(run, "wd/cohort_mean").rename(columns={"value": "cohort_wd"})
    return live[["step", "cohort_wd"]] if len(live) else live, f"live {_cohort_words(run)} (no per-neuron snapshots)"


# ----------------------------------------------------------------------------------------------------------------
# 2a


@figure("fig2a_wd_distribution", "Fig. 2a", "WD distribution per run")
def wd_distribution(ctx: ReportContext):
    """Histogram of per-neuron WD at each run's last step, the cohort (or current top 5%) outlined."""
    usable = []
    for index, run in enumerate(ctx.runs):
        step, snap = last_snapshot(run.neurons)
        if step is not None and "wd" in snap.columns and np.isfinite(snap.wd.astype(float)).any():
            usable.append((index, run, step, snap))
    if not usable:
        raise Skip("no per-neuron WD in any run — needs neurons records (a monitored run or a replay) or a probe "
                   "folder")
    finite = np.concatenate([s.wd.to_numpy(float)[np.isfinite(s.wd.to_numpy(float))] for *_, s in usable])
    bins = np.linspace(0.0, float(finite.max()) * 1.02 + 1e-9, 50)
    fig, axes = new_figure(len(usable), 1, 6.4, 1.7 * len(usable) + 0.9, sharex=True)
    frames, parts = [], []
    for ax, (index, run, step, snap) in zip(axes[:, 0], usable):
        marked, how = _marked(snap)
        wd = snap.wd.to_numpy(float)
        ok = np.isfinite(wd)
        ax.hist(wd[ok], bins, color=run_colour(index), alpha=0.6, label=f"all neurons ({ok.sum()})")
        ax.hist(wd[ok & marked], bins, histtype="step", color="black", lw=1.4, label=f"{how} ({(ok & marked).sum()})")
        ax.set_yscale("log")
        ax.set_ylabel("neurons")
        ax.set_title(f"{run.label} — {at_step(run, step)}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
        frames.append(pd.DataFrame({"run": run.label, "step": step, "layer": snap.layer, "neuron": snap.neuron,
                                    "wd": wd, "marked": marked}))
        parts.append(f"{run.label} ({at_step(run, step)}, {ok.sum()} neurons, outline: {how})")
    axes[-1, 0].set_xlabel("WD (1-Wasserstein distance of standardised pre-activations to N(0,1))")
    png = save_png(fig, ctx.out / "fig2a_wd_distribution.png")
    caption = ("Distribution of per-neuron WD over all layers at each run's last measured step (log count). The "
               "black outline marks the fixed cohort where the run followed one, else the current top 5% WD neurons "
               "of each layer. Runs: " + "; ".join(parts) + ".")
    return make("fig2a_wd_distribution", caption, png=png, data=pd.concat(frames, ignore_index=True))


def _marked(snap: pd.DataFrame) -> tuple[np.ndarray, str]:
    if "in_cohort" in snap.columns and snap.in_cohort.astype(bool).any():
        return snap.in_cohort.astype(bool).to_numpy(), "cohort"
    marked = np.zeros(len(snap), dtype=bool)
    for _, group in snap.groupby("layer"):
        top = top_k_indices(torch.tensor(group.wd.to_numpy(float)), 0.05).numpy()
        marked[group.index.to_numpy()[top]] = True
    return marked, "top 5% per layer"


# ----------------------------------------------------------------------------------------------------------------
# 2b


@figure("fig2b_emergence", "Fig. 2b", "Emergence of the cohort's WD")
def emergence(ctx: ReportContext):
    """Left: the live cohort (fixed during the run) vs the rest. Right: the paper's cohort — the top-WD neurons of
    the last snapshot, followed back through every earlier snapshot — vs the rest."""
    series = [(i, run, whole_model(run, "wd/cohort_mean"), whole_model(run, "wd/rest_mean"), paper_cohort_curve(run))
              for i, run in enumerate(ctx.runs)]
    series = [s for s in series if len(s[2]) >= 1 or len(s[4]) >= 2]
    if not any(len(s[2]) >= 2 or len(s[4]) >= 2 for s in series):
        raise Skip("no run has the cohort's mean WD (wd/cohort_mean) or per-neuron snapshots at two or more steps — "
                   "needs a monitored run or a replay over several measurements")
    fig, axes = new_figure(1, 2, 11.0, 4.0)
    live_ax, paper_ax = axes[0]
    rows, parts, live_steps, paper_steps = [], [], [], []
    for index, run, cohort, rest, retro in series:
        colour = run_colour(index)
        live_ax.plot(cohort.step, cohort.value, "-o", ms=3, color=colour, label=f"{run.label}: cohort")
        live_ax.plot(rest.step, rest.value, "--", color=colour, label=f"{run.label}: rest")
        rows += [(run.label, s, "live cohort", v) for s, v in zip(cohort.step, cohort.value)]
        rows += [(run.label, s, "live rest", v) for s, v in zip(rest.step, rest.value)]
        if len(retro):
            paper_ax.plot(retro.step, retro.cohort, "-o", ms=3, color=colour, label=f"{run.label}: final-step top")
            paper_ax.plot(retro.step, retro.rest, "--", color=colour, label=f"{run.label}: rest")
            rows += [(run.label, s, "final-step cohort", v) for s, v in zip(retro.step, retro.cohort)]
            rows += [(run.label, s, "final-step rest", v) for s, v in zip(retro.step, retro.rest)]
            paper_steps += retro.step.tolist()
        live_steps += cohort.step.tolist()
        parts.append(f"{run.label} ({describe_steps(cohort.step if len(cohort) else retro.step)}; "
                     f"{_cohort_words(run)})")
    for ax, steps in ((live_ax, live_steps), (paper_ax, paper_steps)):  # each axis from its own first step
        if not steps:
            no_data(ax, "no data")
            continue
        step_axis(ax, steps)
        ax.set_ylabel("mean WD (averaged over layers)")
        ax.legend(fontsize=7)
    live_ax.set_title("cohort fixed during the run", fontsize=9)
    paper_ax.set_title("cohort = top 5% WD at the last step, followed back", fontsize=9)
    png = save_png(fig, ctx.out / "fig2b_emergence.png")
    caption = ("Emergence. Left: mean WD of the cohort fixed during the run (solid) and of all other neurons "
               "(dashed), averaged over layers. Right: the paper's definition — the top 5% WD neurons of each layer at "
               "the last snapshot, followed back through every earlier snapshot (solid), against the rest (dashed). "
               "Runs: " + "; ".join(parts) + ".")
    return make("fig2b_emergence", caption, png=png,
                data=pd.DataFrame(rows, columns=["run", "step", "group", "wd_mean"]))


# ----------------------------------------------------------------------------------------------------------------
# 2c


@figure("fig2c_weight_drift", "Fig. 2c", "Weight drift of the cohort vs the rest")
def weight_drift(ctx: ReportContext):
    """Layer-normalised weight drift (1 = the layer's average) of the cohort and the rest, and their ratio."""
    series = [(i, run, whole_model(run, "drift/cohort"), whole_model(run, "drift/rest"),
               whole_model(run, "drift/cohort_vs_rest")) for i, run in enumerate(ctx.runs)]
    series = [s for s in series if len(s[2])]
    if not series:
        raise Skip("no weight-drift rows (drift/cohort, drift/rest) in any run — needs a monitored run or replay "
                   "with the 'drift' family and at least two measurements after the cohort is fixed")
    fig, axes = new_figure(1, 2, 9.6, 3.8)
    left, right = axes[0]
    rows, parts, steps = [], [], []
    for index, run, cohort, rest, ratio in series:
        colour = run_colour(index)
        left.plot(cohort.step, cohort.value, "-o", ms=3, color=colour, label=f"{run.label}: cohort")
        left.plot(rest.step, rest.value, "--", color=colour, label=f"{run.label}: rest")
        right.plot(ratio.step, ratio.value, "-o", ms=3, color=colour, label=run.label)
        for name, frame in (("cohort", cohort), ("rest", rest), ("cohort_vs_rest", ratio)):
            rows += [(run.label, s, name, v) for s, v in zip(frame.step, frame.value)]
        steps += cohort.step.tolist()
        parts.append(f"{run.label} ({describe_steps(cohort.step)}; {_cohort_words(run)})")
    for ax in (left, right):
        ax.axhline(1.0, color="#999999", lw=0.8)
        step_axis(ax, steps)
        ax.legend(fontsize=7)
    left.set_ylabel("cosine dissimilarity / layer mean")
    right.set_ylabel("cohort drift / rest drift")
    png = save_png(fig, ctx.out / "fig2c_weight_drift.png")
    caption = ("Weight drift: cosine dissimilarity of each neuron's input weights since the previous measurement, "
               "divided by its layer's mean (1 = moves like the layer's average), averaged over the cohort (solid) "
               "and the rest (dashed), mean over layers; right: the ratio. Runs: " + "; ".join(parts) + ".")
    return make("fig2c_weight_drift", caption, png=png,
                data=pd.DataFrame(rows, columns=["run", "step", "series", "value"]))


# ----------------------------------------------------------------------------------------------------------------
# 2d


@figure("fig2d_wd_vs_accuracy", "Fig. 2d", "Cohort WD vs minimal-pair accuracy")
def wd_vs_accuracy(ctx: ReportContext):
    """Cohort mean WD against baseline minimal-pair accuracy across steps, with Pearson and Spearman r."""
    from scipy import stats

    panels = []
    for index, run in enumerate(ctx.runs):
        wd, which = cohort_wd(run)
        for metric in metrics_like(run, "ablation/acc/"):
            if not metric.endswith("/baseline"):
                continue
            suite = metric.split("/")[2]
            acc = whole_model(run, metric).rename(columns={"value": "accuracy"})
            joined = wd.merge(acc, on="step")
            if len(joined) >= 3:
                panels.append((index, run, suite, joined, which))
    if not panels:
        raise Skip("no run has the cohort's mean WD and the baseline minimal-pair accuracy "
                   "(ablation/acc/<suite>/baseline) at three or more common steps — add ablation with minimal pairs "
                   "to the monitor (AblationMonitor or ablation=..., minimal_pairs=...)")
    nrows, ncols = _grid(len(panels))
    fig, axes = new_figure(nrows, ncols, 4.2 * ncols, 3.6 * nrows)
    rows, summary, parts = [], [], []
    for ax, (index, run, suite, joined, which) in zip(axes.flat, panels):
        r, rp, rho, rhop = _correlations(stats, joined.cohort_wd.to_numpy(), joined.accuracy.to_numpy())
        ax.plot(joined.cohort_wd, joined.accuracy, "-", color=run_colour(index), lw=0.8, alpha=0.6)
        points = ax.scatter(joined.cohort_wd, joined.accuracy, c=joined.step, cmap="viridis", s=22, zorder=3)
        fig.colorbar(points, ax=ax, label="step", shrink=0.8)
        ax.set_title(f"{run.label} — {suite}\nPearson r={fmt(r, 2)} (p={fmt(rp, 2)}), "
                     f"Spearman ρ={fmt(rho, 2)} (p={fmt(rhop, 2)})", fontsize=8)
        ax.set_xlabel("cohort mean WD")
        ax.set_ylabel(f"{suite} accuracy (baseline)")
        rows += [(run.label, suite, s, w, a) for s, w, a in zip(joined.step, joined.cohort_wd, joined.accuracy)]
        summary.append({"run": run.label, "suite": suite, "n_steps": len(joined), "pearson_r": r, "pearson_p": rp,
                        "spearman_rho": rho, "spearman_p": rhop})
        parts.append(f"{run.label}/{suite} ({describe_steps(joined.step)}; {which})")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    png = save_png(fig, ctx.out / "fig2d_wd_vs_accuracy.png")
    caption = ("Mean WD of the cohort (averaged over layers) against the unablated model's minimal-pair "
               "accuracy at the same steps (colour: step), with Pearson r and Spearman ρ across steps (n/a when one "
               "of them is constant). The cohort is the paper's — the top 5% WD neurons of the last measured step, "
               "followed back through the per-neuron snapshots — where a run has snapshots; else the cohort the run "
               "fixed while training (said per run). Runs/suites: " + "; ".join(parts) + ".")
    return make("fig2d_wd_vs_accuracy", caption, png=png, table=pd.DataFrame(summary),
                data=pd.DataFrame(rows, columns=["run", "suite", "step", "cohort_wd", "accuracy"]))


def _correlations(stats, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return (np.nan,) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pearson = stats.pearsonr(x, y)
        spearman = stats.spearmanr(x, y)
    return float(pearson[0]), float(pearson[1]), float(spearman[0]), float(spearman[1])


# ----------------------------------------------------------------------------------------------------------------
# 7b


@figure("fig7b_pair_signs_over_training", "Fig. 7b", "NN / PN / PP shares over training")
def pair_signs_over_training(ctx: ReportContext):
    """Shares of the sign classes among the top pairs of the top-MD neurons, mean over layers, per step."""
    panels = []
    for index, run in enumerate(ctx.runs):
        shares = {sign: per_layer(run, f"pairs/{sign.lower()}_share").groupby("step")["value"].mean()
                  for sign in ("NN", "PN", "PP")}
        frame = pd.DataFrame(shares).dropna()
        if len(frame) >= 2:
            panels.append((index, run, frame))
    if not panels:
        raise Skip("no run has pair-sign shares (pairs/nn_share, pn_share, pp_share) at two or more steps — needs a "
                   "monitored run or replay with the 'pairs' family")
    fig, axes = new_figure(len(panels), 1, 6.4, 2.4 * len(panels) + 0.6)
    rows, parts = [], []
    for ax, (index, run, frame) in zip(axes[:, 0], panels):
        ax.stackplot(frame.index, frame.NN, frame.PN, frame.PP, colors=[SIGN_COLOURS[s] for s in ("NN", "PN", "PP")],
                     labels=["NN", "PN", "PP"], alpha=0.9)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of top pairs")
        ax.set_title(run.label, fontsize=9)
        step_axis(ax, frame.index)
        ax.legend(fontsize=7, loc="upper left", ncols=3)
        rows += [(run.label, s, sign, frame.loc[s, sign]) for s in frame.index for sign in ("NN", "PN", "PP")]
        parts.append(f"{run.label} ({describe_steps(frame.index)})")
    png = save_png(fig, ctx.out / "fig7b_pair_signs_over_training.png")
    caption = ("Sign classes of the top-100 pairs (by OI ratio) of each layer's top-5% MD neurons over training: NN "
               "(both pre-activations negative), PN (mixed), PP (both positive), averaged over layers. Runs: "
               + "; ".join(parts) + ".")
    return make("fig7b_pair_signs_over_training", caption, png=png,
                data=pd.DataFrame(rows, columns=["run", "step", "sign", "share"]))


# ----------------------------------------------------------------------------------------------------------------
# 7c, 7d


def _damage(ctx: ReportContext, key: str, kind: str):
    """Damage (``acc_drop`` per suite, or ``ppl_ratio``) of each condition against the cohort's mean WD."""
    groups: dict[str, list] = {}
    cohorts: dict[str, str] = {}
    for index, run in enumerate(ctx.runs):
        wd, which = cohort_wd(run)
        if wd.empty:
            continue
        names = metrics_like(run, "ablation/acc_drop/") if kind == "acc" else metrics_like(run, "ablation/ppl_ratio/")
        for metric in names:
            condition = metric.rsplit("/", 1)[1]
            if condition == "random_sd":
                continue  # the spread of the random draws is drawn as error bars on their mean
            panel = metric.split("/")[2] if kind == "acc" else "perplexity"
            joined = wd.merge(whole_model(run, metric), on="step")
            if condition == "random_mean":
                spread = whole_model(run, metric[: -len("_mean")] + "_sd").rename(columns={"value": "sd"})
                joined = joined.merge(spread[["step", "sd"]], on="step", how="left")
            if len(joined):
                groups.setdefault(panel, []).append((index, run, condition, joined))
                cohorts[run.label] = which
    if not groups:
        what = "ablation/acc_drop/<suite>/<condition>" if kind == "acc" else "ablation/ppl_ratio/<condition>"
        raise Skip(f"no run has ablation rows ({what}) together with the cohort's mean WD — run the monitor with "
                   "ablation (AblationMonitor, or ablation=... in NegativeDifferentiationMonitor / replay --ablate)")
    fig, axes = new_figure(1, len(groups), 5.0 * len(groups), 4.0)
    rows, parts = [], set()
    run_index = {run.label: i for i, run in enumerate(ctx.runs)}
    for ax, (panel, entries) in zip(axes[0], sorted(groups.items())):
        for index, run, condition, joined in entries:
            marker = MARKERS[list(run_index).index(run.label) % len(MARKERS)]
            style = dict(marker=marker, ms=4, lw=0.9, color=CONDITION_COLOURS.get(condition, "black"),
                         label=f"{run.label}: {CONDITION_NAMES.get(condition, condition)}")
            if "sd" in joined.columns:
                ax.errorbar(joined.cohort_wd, joined.value, yerr=joined.sd.to_numpy(float), ls="--", capsize=2,
                            **style)
            else:
                ax.plot(joined.cohort_wd, joined.value, "-", **style)
            sd = joined.sd if "sd" in joined.columns else [float("nan")] * len(joined)
            rows += [(run.label, panel, condition, s, w, v, e) for s, w, v, e in zip(joined.step, joined.cohort_wd,
                                                                                     joined.value, sd)]
            parts.add(f"{run.label} ({describe_steps(joined.step)}; {cohorts[run.label]})")
        if kind == "acc":
            ax.axhline(0.0, color="#999999", lw=0.8)
            ax.set_ylabel(f"{panel} accuracy drop (baseline − ablated)")
        else:
            ax.axhline(1.0, color="#999999", lw=0.8)
            ax.set_ylabel("perplexity ablated / baseline")
        ax.set_xlabel("cohort mean WD")
        ax.legend(fontsize=7)
    png = save_png(fig, ctx.out / f"{key}.png")
    what = ("minimal-pair accuracy lost" if kind == "acc" else "perplexity ratio") + " under sign-specific ablation"
    caption = (f"Ablation damage ({what}: negative pre-activations zeroed) of the top-WD neurons (Wasserstein), "
               "the same number of random neurons (with several random draws also their mean, dashed, ± one sd "
               "across draws), and the bottom-WD neurons matched in perplexity, against the "
               "mean WD of the cohort at the same step (one point per measured step, joined in step order; the "
               "paper's cohort — top 5% WD at the last step, followed back — where the run has per-neuron "
               "snapshots, so WD grows with training along x). "
               "Runs: " + "; ".join(sorted(parts)) + ".")
    data = pd.DataFrame(rows, columns=["run", "panel", "condition", "step", "cohort_wd", "value", "sd"])
    return make(key, caption, png=png, data=data)


@figure("fig7c_damage_accuracy", "Fig. 7c", "Accuracy damage vs cohort WD")
def damage_accuracy(ctx: ReportContext):
    """Minimal-pair accuracy drop of each ablation condition against the cohort's mean WD."""
    return _damage(ctx, "fig7c_damage_accuracy", "acc")


@figure("fig7d_damage_perplexity", "Fig. 7d", "Perplexity damage vs cohort WD")
def damage_perplexity(ctx: ReportContext):
    """Perplexity ratio of each ablation condition against the cohort's mean WD."""
    return _damage(ctx, "fig7d_damage_perplexity", "ppl")


# ----------------------------------------------------------------------------------------------------------------
# ablation damage over training (the run's causal headline)

DAMAGE_MEASURES = (("margin_drop", "minimal-pair margin drop (relative)"), ("acc_drop", "minimal-pair accuracy drop"),
                   ("ppl_ratio", "perplexity ablated / baseline"))


@figure("fig7e_damage_over_training", "Fig. 7c-d (steps)", "Ablation damage over training vs the controls")
def damage_over_training(ctx: ReportContext):
    """Each damage measure over steps: Wasserstein, the perplexity-matched control, and the random draws' mean ± sd
    band (a single random control as a line)."""
    panels: dict[str, list] = {}
    for index, run in enumerate(ctx.runs):
        for measure, label in DAMAGE_MEASURES:
            prefix = f"ablation/{measure}/"
            for metric in metrics_like(run, prefix):
                parts = metric[len(prefix):].split("/")
                suite, condition = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
                if condition not in (*CONDITIONS, "random_mean"):
                    continue
                frame = whole_model(run, metric)
                if len(frame):
                    title = f"{label}{' — ' + suite if suite else ''}"
                    panels.setdefault(title, []).append((index, run, condition, frame, metric))
    panels = {t: e for t, e in panels.items() if {c for _, _, c, _, _ in e} & {"wasserstein"}}
    if not panels:
        raise Skip("no run has ablation rows over steps (ablation/margin_drop/..., acc_drop/..., ppl_ratio/...) — run "
                   "the monitor with ablation (ablation=..., minimal_pairs=...) or replay --ablate")
    titles = [t for measure, label in DAMAGE_MEASURES for t in panels if t.startswith(label)]
    fig, axes = new_figure(1, len(titles), 4.6 * len(titles), 3.8)
    rows, parts = [], set()
    for ax, title in zip(axes[0], titles):
        steps: list = []
        for index, run, condition, frame, metric in panels[title]:
            marker = MARKERS[index % len(MARKERS)]
            has_mean = any(c == "random_mean" and r is run for _, r, c, _, _ in panels[title])
            if condition == "random" and has_mean:
                continue  # the draws' mean and band stand for the random control
            colour = CONDITION_COLOURS.get("random" if condition == "random_mean" else condition, "black")
            name = "random (mean ± sd of draws)" if condition == "random_mean" else CONDITION_NAMES.get(condition,
                                                                                                         condition)
            ax.plot(frame.step, frame.value, marker=marker, ms=3, lw=1.0, color=colour,
                    ls="--" if condition == "random_mean" else "-", label=f"{run.label}: {name}")
            sd = pd.Series(np.nan, index=frame.index)
            if condition == "random_mean":
                spread = whole_model(run, metric[: -len("_mean")] + "_sd").set_index("step").value
                sd = frame.step.map(spread).astype(float)
                ax.fill_between(frame.step, frame.value - sd, frame.value + sd, color=colour, alpha=0.2, lw=0)
            rows += [(run.label, title, condition, s, v, e) for s, v, e in zip(frame.step, frame.value, sd)]
            steps += frame.step.tolist()
            parts.add(f"{run.label} ({describe_steps(frame.step)})")
        ax.axhline(1.0 if title.startswith("perplexity") else 0.0, color="#999999", lw=0.8)
        ax.set_ylabel(title, fontsize=8)
        step_axis(ax, steps)
        ax.legend(fontsize=6)
    png = save_png(fig, ctx.out / "fig7e_damage_over_training.png")
    caption = ("Ablation damage over training (negative pre-activations zeroed) for the top-WD neurons (Wasserstein), "
               "the bottom-WD neurons matched in perplexity, and random neurons of the same count: with several random "
               "draws their mean (dashed) ± one sd across draws (band) — the Wasserstein damage means something "
               "where it stands out of the band. Margin drop = relative loss of the mean log-probability margin "
               "good − bad (it moves while accuracy is saturated); accuracy drop = baseline − ablated accuracy; "
               "perplexity ratio = ablated / baseline. Runs: " + "; ".join(sorted(parts)) + ".")
    return make("fig7e_damage_over_training", caption, png=png,
                data=pd.DataFrame(rows, columns=["run", "panel", "condition", "step", "value", "random_sd"]))
