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
    last = neurons[neurons.step == neurons.step.max()]
    members = set()
    for layer, group in last.groupby("layer"):
        k = count_for_fraction(len(group), frac)
        members |= {(layer, n) for n in group.nlargest(k, "wd").neuron}
    flags = pd.Series([(l, n) in members for l, n in zip(neurons.layer, neurons.neuron)], index=neurons.index)
    frame = neurons.assign(member=flags)
    per_layer = frame.groupby(["step", "layer", "member"]).wd.mean().unstack("member")
    curve = per_layer.groupby("step").mean()
    return pd.DataFrame({"step": curve.index.to_numpy(), "cohort": curve.get(True, pd.Series(dtype=float)).to_numpy(),
                         "rest": curve.get(False, pd.Series(dtype=float)).to_numpy()})
