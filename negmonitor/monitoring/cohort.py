"""The paper's cohort, computed after the fact from per-neuron snapshots.

A live run fixes its cohort while training (it cannot know the future); the paper instead takes the top-WD neurons
at the final checkpoint and follows them back through every earlier one. The per-neuron snapshot records hold
everything needed to do the same for any run, after it ends: :func:`final_cohort_curve` from snapshots in memory,
:func:`recorded_cohorts` one record file at a time (a Pythia-12B replay's snapshots are 113M rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from negmonitor.metrics.ranking import count_for_fraction
from negmonitor.records import RecordStore

CURVE_COLUMNS = ["step", "cohort", "rest"]


def final_cohort_curve(neurons: pd.DataFrame, frac: float = 0.05) -> pd.DataFrame:
    """``step, cohort, rest``: mean WD (over layers) of the last snapshot's top-``frac`` neurons and of the rest."""
    if neurons is None or neurons.empty or "wd" not in neurons or neurons.step.nunique() < 2:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    neurons = neurons.drop_duplicates(["step", "layer", "neuron"], keep="last")
    members = _final_members(neurons[neurons.step == neurons.step.max()], frac)
    means = [_step_means(group, members).assign(step=step) for step, group in neurons.groupby("step")]
    return _curve(means)


@dataclass
class RecordedCohort:
    """One run's cohort history from its records: the paper's curve (:func:`final_cohort_curve`'s columns) and the
    first step with live-cohort members (None: no live cohort recorded)."""

    curve: pd.DataFrame
    first_live_step: int | None


def recorded_cohorts(store: RecordStore, frac: float = 0.05) -> dict[str, RecordedCohort]:
    """Per run of ``store``: the paper's cohort curve and the live cohort's first step, read one snapshot file at a
    time, only the columns needed (memory: one step's ``layer, neuron, wd``, not every step's every column).

    Equal to :func:`final_cohort_curve` over :meth:`RecordStore.read_neurons`: a step's files are merged as the
    reader merges them (last write wins)."""
    by_run: dict[str, set[int]] = {}
    for _, run, step in store.file_runs("neurons"):
        by_run.setdefault(run, set()).add(step)
    out = {}
    for run, steps in by_run.items():
        last = store.read("neurons", columns=["wd"], steps=[max(steps)], run=run)
        members = _final_members(last, frac) if len(steps) >= 2 else None
        means, first_live = [], None
        for step in sorted(steps):  # one step at a time: its files merged as the reader merges them
            part = store.read("neurons", columns=["wd", "in_cohort"], steps=[step], run=run)
            if members is not None and "wd" in part:
                means.append(_step_means(part, members).assign(step=step))
            if first_live is None and "in_cohort" in part and part.in_cohort.eq(True).any():
                first_live = step
        out[run] = RecordedCohort(_curve(means) if members is not None else pd.DataFrame(columns=CURVE_COLUMNS),
                                  first_live)
    return out


def _step_means(frame: pd.DataFrame, members: pd.MultiIndex) -> pd.DataFrame:
    """``layer, member, wd``: one step's mean WD per layer of the cohort members and of the rest."""
    flagged = frame.assign(member=pd.MultiIndex.from_frame(frame[["layer", "neuron"]]).isin(members))
    return flagged.groupby(["layer", "member"], as_index=False).wd.mean()


def _curve(means: list[pd.DataFrame]) -> pd.DataFrame:
    """The per-step means of the layers' cohort and rest means."""
    if not means:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    per_layer = pd.concat(means, ignore_index=True).pivot_table(index=["step", "layer"], columns="member",
                                                                 values="wd", aggfunc="first", dropna=False)
    per_layer = per_layer.reindex(columns=[True, False])
    curve = per_layer.groupby("step").mean()
    return pd.DataFrame({"step": curve.index.to_numpy(), "cohort": curve[True].to_numpy(),
                         "rest": curve[False].to_numpy()})


def _final_members(last: pd.DataFrame, frac: float) -> pd.MultiIndex:
    """``(layer, neuron)`` of each layer's top-``frac`` neurons by WD in the last snapshot ``last``.

    A ``MultiIndex``, so every snapshot's rows are flagged by one ``isin`` (a per-row Python lookup took ~30 s
    for 100 snapshots of a 36-layer, 20,480-neuron model)."""
    last = last.drop_duplicates(["layer", "neuron"], keep="last")
    top = [group.nlargest(count_for_fraction(len(group), frac), "wd") for _, group in last.groupby("layer")]
    return pd.MultiIndex.from_frame((pd.concat(top) if top else last.iloc[:0])[["layer", "neuron"]])
