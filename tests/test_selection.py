"""Neuron selection: top/bottom/random per layer or group, NaN handling, counts, frames and round trips."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from negmonitor.adapters import find_sites
from negmonitor.errors import NegmonitorError
from negmonitor.interventions import MaskedActivation, ablate
from negmonitor.metrics.ranking import top_k_indices
from negmonitor.result import ProbeResult
from negmonitor.selection import Selection, select_neurons
from tiny_models import tiny_causal_lm

N = 200


@pytest.fixture()
def values() -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {layer: torch.rand(N, generator=gen, dtype=torch.float64) for layer in range(4)}
    out[1][[5, 17]] = math.nan
    out[1][6] = 10.0  # a clear top neuron
    return out


def test_top_and_bottom_pick_the_extremes_in_rank_order(values):
    top = select_neurons(values, "top", frac=0.05)
    bottom = select_neurons(values, "bottom", frac=0.05)
    for layer, v in values.items():
        k = len(top_k_indices(v, 0.05))
        assert len(top[layer]) == k == len(bottom[layer]) == 10
        finite = v[torch.isfinite(v)]
        assert torch.equal(v[top[layer]], finite.sort(descending=True).values[:k])
        assert torch.equal(v[bottom[layer]], finite.sort().values[:k])
        torch.testing.assert_close(top.scores[layer], v[top[layer]])
    assert int(top[1][0]) == 6


@pytest.mark.parametrize("how", ["top", "bottom"])
def test_nan_neurons_are_never_selected(values, how):
    everything = select_neurons(values, how, frac=1.0)
    assert 5 not in everything[1].tolist() and 17 not in everything[1].tolist()
    assert len(everything[1]) == N - 2 and len(everything[0]) == N


def test_random_matches_top_counts_and_is_seeded(values):
    top = select_neurons(values, "top", frac=0.05)
    first = select_neurons(values, "random", frac=0.05, seed=3)
    again = select_neurons(values, "random", frac=0.05, seed=3)
    other = select_neurons(values, "random", frac=0.05, seed=4)
    assert first.counts == top.counts
    assert first == again and first != other
    for layer in first:
        idx = first[layer]
        assert len(set(idx.tolist())) == len(idx) and int(idx.min()) >= 0 and int(idx.max()) < N
    only_two = select_neurons(values, "random", frac=0.05, seed=3, layers=[2])
    assert torch.equal(only_two[2], first[2])  # a layer's draw does not depend on the other layers
    assert first.seed == 3 and top.seed is None


def test_random_count_follows_top_when_nan_limits_it():
    values = {0: torch.tensor([1.0, math.nan, math.nan, math.nan])}
    assert select_neurons(values, "top", frac=1.0).counts == {0: 1}
    assert select_neurons(values, "random", frac=1.0).counts == {0: 1}


def test_group_ranking_spans_layers(values):
    shifted = {layer: v + 10 * layer for layer, v in values.items()}  # later layers rank higher
    grouped = select_neurons(shifted, "top", frac=0.05, per="group", group_size=2)
    assert grouped.counts[0] == 0 and grouped.counts[2] == 0
    assert grouped.counts[1] + grouped.counts[0] == len(top_k_indices(torch.cat([shifted[0], shifted[1]]), 0.05))
    assert grouped.counts[3] == len(top_k_indices(torch.cat([shifted[2], shifted[3]]), 0.05))
    whole = select_neurons(shifted, "top", frac=0.05, per="group")
    assert set(whole.counts) == {0, 1, 2, 3} and whole.counts[3] == whole.n_neurons
    rand = select_neurons(shifted, "random", frac=0.05, per="group", group_size=2)
    assert rand.counts == grouped.counts


def test_layer_restriction(values):
    sel = select_neurons(values, "top", frac=0.1, layers=[0, -1])
    assert list(sel) == [0, 3]
    with pytest.raises(NegmonitorError, match="layer 7 is not in the probe result"):
        select_neurons(values, "top", frac=0.1, layers=[7])


@pytest.mark.parametrize("frac", [0, -0.1, 1.5, math.nan])
def test_bad_fraction(values, frac):
    with pytest.raises(NegmonitorError, match=r"fraction must be in \(0, 1\]"):
        select_neurons(values, "top", frac=frac)


def test_bad_choices(values):
    with pytest.raises(NegmonitorError, match="unknown selection 'best' — use one of top, bottom, random"):
        select_neurons(values, "best")
    with pytest.raises(NegmonitorError, match="unknown per 'model'"):
        select_neurons(values, per="model")
    with pytest.raises(NegmonitorError, match="group_size must be a positive integer"):
        select_neurons(values, per="group", group_size=0)


def test_frame_round_trip_through_parquet(values, tmp_path):
    sel = select_neurons(values, "random", frac=0.05, seed=9, label="random")
    frame = sel.to_frame()
    assert list(frame.columns[:5]) == ["layer", "neuron", "selection", "how", "metric"]
    assert len(frame) == sel.n_neurons and (frame["rank"] >= 0).all()
    frame.to_parquet(tmp_path / "sel.parquet")
    back = Selection.from_frame(pd.read_parquet(tmp_path / "sel.parquet"))
    assert back == sel
    assert (back.how, back.metric, back.fraction, back.seed, back.name) == ("random", "wd", 0.05, 9, "random")
    torch.testing.assert_close(back.scores[2], sel.scores[2])


def test_from_frame_with_several_selections_needs_a_name(values):
    a = select_neurons(values, "top", frac=0.05, label="wasserstein").to_frame()
    b = select_neurons(values, "bottom", frac=0.05).to_frame()
    both = pd.concat([a, b], ignore_index=True)
    with pytest.raises(NegmonitorError, match="several selections"):
        Selection.from_frame(both)
    assert Selection.from_frame(both, name="wasserstein") == select_neurons(values, "top", frac=0.05)
    with pytest.raises(NegmonitorError, match="no selection 'x'"):
        Selection.from_frame(both, name="x")


def test_empty_selection_frame_has_the_columns():
    frame = Selection({}).to_frame()
    assert frame.empty and "neuron" in frame.columns and frame["layer"].dtype == np.int64


def test_selection_from_probe_result_by_metric():
    neurons = pd.DataFrame({"layer": np.repeat([0, 1], 4), "neuron": np.tile(np.arange(4), 2),
                            "wd": [0.1, 0.9, 0.5, np.nan, 0.3, 0.2, 0.8, 0.1],
                            "md": [4.0, 3.0, 2.0, 1.0, 1.0, 2.0, 3.0, 4.0]})
    result = ProbeResult(neurons=neurons, layers=pd.DataFrame())
    assert select_neurons(result, "top", frac=0.25)[0].tolist() == [1]
    assert select_neurons(result, "top", frac=0.25, metric="md")[1].tolist() == [3]
    with pytest.raises(NegmonitorError, match="unknown metric 'xx'"):
        select_neurons(result, metric="xx")


def test_selection_plugs_into_ablate():
    model = tiny_causal_lm("neox")
    sel = select_neurons({0: torch.rand(64), 1: torch.rand(64)}, "top", frac=0.1, layers=[1])
    with ablate(model, sel, "zero_negative"):
        sites = find_sites(model)
        assert isinstance(sites[1].activation, MaskedActivation)
        assert not isinstance(sites[0].activation, MaskedActivation)
        assert int(sites[1].activation.mask.sum()) == sel.n_neurons
