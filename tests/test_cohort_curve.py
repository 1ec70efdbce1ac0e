"""The paper's retrospective cohort: top WD at the last snapshot, followed back through earlier ones."""

from __future__ import annotations

import pandas as pd

from negmonitor.monitoring.cohort import final_cohort_curve


def test_final_step_cohort_is_followed_back() -> None:
    rows = []
    for step, wd in ((0, [0.1, 0.1, 0.1, 0.1]), (10, [0.1, 0.3, 0.1, 0.2]), (20, [0.1, 0.5, 0.1, 0.2])):
        for layer in (0, 1):
            rows += [{"step": step, "layer": layer, "neuron": n, "wd": w} for n, w in enumerate(wd)]
    curve = final_cohort_curve(pd.DataFrame(rows), frac=0.25)  # one neuron per layer: neuron 1 at step 20
    assert curve.step.tolist() == [0, 10, 20]
    assert curve.cohort.round(6).tolist() == [0.1, 0.3, 0.5]
    assert curve.rest.round(6).tolist() == [0.1, round(0.4 / 3, 6), round(0.4 / 3, 6)]


def test_needs_two_snapshots() -> None:
    one = pd.DataFrame({"step": [0, 0], "layer": [0, 0], "neuron": [0, 1], "wd": [0.1, 0.2]})
    assert final_cohort_curve(one).empty
