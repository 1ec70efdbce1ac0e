"""The paper's cohort, computed after the fact from per-neuron snapshots.

A live run fixes its cohort while training (it cannot know the future); the paper instead takes the top-WD neurons
at the final checkpoint and follows them back through every earlier one. The per-neuron snapshot records hold
everything needed to do the same for any run, after it ends.
"""

from __future__ import annotations

import pandas as pd

from negmonitor.metrics.ranking import count_for_fraction


def final_cohort_curve(neurons: pd.DataFrame, frac: float = 0.05) -> pd.DataFrame:
    """``step, cohort, rest``: mean WD (over layers) of the last snapshot's top-``frac`` neurons and of the rest."""
    if neurons is None or neurons.empty or "wd" not in neurons or neurons.step.nunique() < 2:
        return pd.DataFrame(columns=["step", "cohort", "rest"])
    neurons = neurons.drop_duplicates(["step", "layer", "neuron"], keep="last")
    members = _final_members(neurons[neurons.step == neurons.step.max()], frac)
    frame = neurons.assign(member=pd.MultiIndex.from_frame(neurons[["layer", "neuron"]]).isin(members))
    per_layer = frame.groupby(["step", "layer", "member"]).wd.mean().unstack("member").reindex(columns=[True, False])
    curve = per_layer.groupby("step").mean()
    return pd.DataFrame({"step": curve.index.to_numpy(), "cohort": curve.get(True, pd.Series(dtype=float)).to_numpy(),
                         "rest": curve.get(False, pd.Series(dtype=float)).to_numpy()})


def _final_members(last: pd.DataFrame, frac: float) -> pd.MultiIndex:
    """``(layer, neuron)`` of each layer's top-``frac`` neurons by WD in the last snapshot ``last``.

    A ``MultiIndex``, so every snapshot's rows are flagged by one ``isin`` (a per-row Python lookup took ~30 s
    for 100 snapshots of a 36-layer, 20,480-neuron model)."""
    top = [group.nlargest(count_for_fraction(len(group), frac), "wd") for _, group in last.groupby("layer")]
    return pd.MultiIndex.from_frame((pd.concat(top) if top else last.iloc[:0])[["layer", "neuron"]])
