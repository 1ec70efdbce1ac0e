"""The paper's retrospective cohort: top WD at the last snapshot, followed back through earlier ones."""

from __future__ import annotations

import pandas as pd
import pytest

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


def test_cohort_is_matched_by_layer_and_neuron_together() -> None:
    """Layers of different widths (their own top count), the same neuron index in both layers but a member of one
    only, sparse neuron ids, shuffled rows and a superseded duplicate (the last row of a key wins)."""
    wd = {0: {(0, 0): 0.4, (0, 1): 0.2, (0, 7): 0.6, (0, 9): 0.0, (1, 0): 0.3, (1, 1): 0.1},
          20: {(0, 0): 0.9, (0, 1): 0.1, (0, 7): 0.8, (0, 9): 0.2, (1, 0): 0.1, (1, 1): 0.7}}
    rows = [{"step": step, "layer": layer, "neuron": neuron, "wd": w}
            for step, values in wd.items() for (layer, neuron), w in values.items()]
    stale = {"step": 20, "layer": 1, "neuron": 0, "wd": 0.95}  # superseded: else (1, 0) would be layer 1's top
    shuffled = pd.DataFrame(rows).sample(frac=1.0, random_state=3)
    frame = pd.concat([pd.DataFrame([stale]), shuffled], ignore_index=True)
    curve = final_cohort_curve(frame, frac=0.5)  # members: (0, 0), (0, 7) of four; (1, 1) of two
    assert curve.step.tolist() == [0, 20]
    # step 0: layer 0 cohort (0.4 + 0.6) / 2, rest (0.2 + 0.0) / 2; layer 1 cohort 0.1, rest 0.3
    # step 20: layer 0 cohort (0.9 + 0.8) / 2, rest (0.1 + 0.2) / 2; layer 1 cohort 0.7, rest 0.1
    assert curve.cohort.tolist() == pytest.approx([(0.5 + 0.1) / 2, (0.85 + 0.7) / 2], abs=1e-12)
    assert curve.rest.tolist() == pytest.approx([(0.1 + 0.3) / 2, (0.15 + 0.1) / 2], abs=1e-12)


def test_a_cohort_of_every_neuron_has_no_rest() -> None:
    """``frac=1.0`` (accepted as a cohort fraction): every neuron is in the cohort; the rest is NaN, not an error."""
    rows = [{"step": s, "layer": 0, "neuron": n, "wd": 0.1 * (s + n)} for s in (0, 1) for n in (0, 1)]
    curve = final_cohort_curve(pd.DataFrame(rows), frac=1.0)
    assert curve.step.tolist() == [0, 1] and curve.cohort.round(6).tolist() == [0.05, 0.15]
    assert curve.rest.isna().all()


def test_the_records_are_followed_one_file_at_a_time_and_the_report_keeps_only_the_last_step(tmp_path) -> None:
    """A Pythia-12B replay's snapshots are 113M rows (~37 GB in pandas, an ~90 GB peak while the report read them):
    the report now reads each run's last step of the per-neuron and pair records, and the paper's cohort curve one
    file at a time — equal to the curve over every snapshot in memory, for two runs in one folder, with a step
    rewritten by a later file (last write wins) and the live cohort's first step found."""
    import numpy as np

    from negmonitor.monitoring.cohort import recorded_cohorts
    from negmonitor.records import RecordStore
    from negmonitor.report.sources import load_records

    store = RecordStore(tmp_path / "negmonitor")
    rng = np.random.default_rng(0)
    for step in (0, 10, 20, 30):
        for run in ("a", "b"):
            frame = pd.DataFrame({"layer": np.repeat([0, 1], 50), "neuron": np.tile(np.arange(50), 2),
                                  "wd": rng.random(100), "md": rng.random(100),
                                  "in_cohort": np.tile(np.arange(50) < 3, 2) & (step >= 20)})
            store.write_neurons(run, step, step, frame, key=run)
            store.write_pairs(run, step, step, pd.DataFrame({"layer": [0], "neuron": [1], "rank": [0], "md": [0.5]}),
                              key=run)
        store.write_scalars("a", step, step, pd.DataFrame({"layer": [-1], "neuron": [-1], "metric": ["wd/max"],
                                                           "value": [1.0]}), key="a")
    rewritten = pd.DataFrame({"layer": np.repeat([0, 1], 50), "neuron": np.tile(np.arange(50), 2),
                              "wd": rng.random(100), "md": rng.random(100), "in_cohort": False})
    store.write_neurons("a", 10, 10, rewritten, key="0")  # sorts before step 10's "a" file: that one wins
    for key, layers in (("k1", [0, 1]), ("k2", [2, 3])):  # run "b" at step 40: two monitors, other layers each
        store.write_neurons("b", 40, 40, pd.DataFrame({"layer": np.repeat(layers, 50),
                                                        "neuron": np.tile(np.arange(50), 2), "wd": rng.random(100),
                                                        "md": rng.random(100), "in_cohort": False}), key=key)
    every = store.read_neurons()
    # stored in float32 (the statistics are fp32 sums; float64 only doubled ~12 GB of Pythia-12B records)
    assert every.wd.dtype == "float32" and every.layer.dtype == "int64" and every.in_cohort.dtype == bool
    assert store.read("pairs").md.dtype == "float32"
    cohorts = recorded_cohorts(store)
    for run in ("a", "b"):
        expected = final_cohort_curve(every[every.run == run])
        pd.testing.assert_frame_equal(cohorts[run].curve.astype(float), expected.astype(float))
        assert cohorts[run].first_live_step == 20
    runs = {run.label: run for run in load_records(store.root)}
    assert set(runs) == {"a", "b"}
    assert set(runs["a"].neurons.step) == {30} and len(runs["a"].neurons) == 100  # the last step only
    assert set(runs["b"].neurons.step) == {40} and len(runs["b"].neurons) == 200  # both monitors' layers
    assert set(runs["b"].pairs.step) == {30} and runs["a"].neuron_steps == [0, 10, 20, 30]
    from negmonitor.report.base import snapshot_at

    earlier = snapshot_at(runs["b"], 30)  # where b's pairs end, a step before its last snapshot: from the records
    assert len(earlier) == 100 and set(earlier.step) == {30} and set(earlier.run) == {"b"} and earlier.wd.notna().all()
    pd.testing.assert_frame_equal(runs["a"].cohort_curve, cohorts["a"].curve)
    assert store.read("neurons", columns=["wd"], steps=[20]).columns.tolist() == ["run", "step", "layer", "neuron",
                                                                                   "wd"]
