"""Weight drift between snapshots, and top/bottom-fraction ranking and Jaccard overlap."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from negmonitor.errors import NegmonitorError
from negmonitor.metrics import bottom_k_indices, jaccard, top_k_indices, weight_drift
from negmonitor.metrics.ranking import count_for_fraction


# ------------------------------------------------------------------------------------------------ drift
def test_weight_drift_matches_a_loop() -> None:
    g = torch.Generator().manual_seed(0)
    prev = torch.randn(30, 12, generator=g, dtype=torch.float64)  # fp64 snapshots: fp64 maths
    cur = prev + 0.1 * torch.randn(30, 12, generator=g, dtype=torch.float64)
    got = weight_drift(prev, cur)
    p, c = prev.double().numpy(), cur.double().numpy()
    cos = np.array([p[i] @ c[i] / (np.linalg.norm(p[i]) * np.linalg.norm(c[i])) for i in range(30)])
    l2 = np.array([np.linalg.norm(c[i] - p[i]) for i in range(30)])
    np.testing.assert_allclose(got["cos_dissim"].numpy(), 1 - cos, rtol=1e-9)
    np.testing.assert_allclose(got["l2"].numpy(), l2, rtol=1e-12)
    np.testing.assert_allclose(got["cos_dissim_norm"].numpy(), (1 - cos) / (1 - cos).mean(), rtol=1e-9)
    np.testing.assert_allclose(got["l2_norm"].numpy(), l2 / l2.mean(), rtol=1e-12)
    assert set(got) == {"cos_dissim", "l2", "cos_dissim_norm", "l2_norm"}


def test_weight_drift_zero_rows_and_no_change() -> None:
    prev = torch.randn(4, 3)
    cur = prev.clone()
    prev[1] = 0.0
    cur[2] = 0.0
    cur[3] = -2 * prev[3]  # opposite direction: 1 - cos = 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = weight_drift(prev, cur)
    assert torch.isnan(got["cos_dissim"][[1, 2]]).all()
    assert got["cos_dissim"][0].item() == pytest.approx(0.0, abs=1e-15)
    assert got["cos_dissim"][3].item() == pytest.approx(2.0)
    assert torch.isfinite(got["l2"]).all()
    torch.testing.assert_close(got["cos_dissim_norm"][[0, 3]], torch.tensor([0.0, 2.0], dtype=torch.float64) / 1.0)
    still = weight_drift(prev, prev.clone())
    assert (still["l2"] == 0).all() and torch.isnan(still["l2_norm"]).all()


def test_weight_drift_tiny_angles_are_precise() -> None:
    """1 − cos for a 1e-6 rad rotation is 5e-13; the naive formula in fp32 would give 0."""
    theta = 1e-6
    prev = torch.tensor([[1.0, 0.0]])
    cur = torch.tensor([[math.cos(theta), math.sin(theta)]], dtype=torch.float64)
    got = weight_drift(prev, cur)["cos_dissim"].item()
    assert got == pytest.approx(1 - math.cos(theta), rel=1e-6)


def test_weight_drift_shape_mismatch() -> None:
    with pytest.raises(NegmonitorError, match="same shape"):
        weight_drift(torch.zeros(3, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------- ranking
def test_top_and_bottom_k() -> None:
    values = torch.tensor([0.5, math.nan, 3.0, -1.0, 2.0, math.nan, 1.0, 0.0, 9.0, -5.0])
    assert top_k_indices(values, 0.3).tolist() == [8, 2, 4]
    assert bottom_k_indices(values, 0.3).tolist() == [9, 3, 7]
    assert top_k_indices(values, 0.01).tolist() == [8]  # at least one
    everything = top_k_indices(values, 1.0)
    assert everything.tolist() == [8, 2, 4, 6, 0, 7, 3, 9]  # NaNs never selected
    assert top_k_indices(torch.full((4,), math.nan), 0.5).numel() == 0
    assert top_k_indices(values, 0.3).dtype == torch.long


def test_top_k_counts() -> None:
    assert count_for_fraction(200, 0.05) == 10
    assert count_for_fraction(2048, 0.05) == 102
    assert count_for_fraction(3, 0.05) == 1
    assert count_for_fraction(10, 0.3) == 3  # 0.3 * 10 is 3.0000000000000004 or 2.9999999999999996, still 3
    assert count_for_fraction(0, 0.5) == 0
    assert len(top_k_indices(torch.randn(2048), 0.05)) == 102


@pytest.mark.parametrize("frac", [0.0, -0.1, 1.5, math.nan])
def test_bad_fraction(frac: float) -> None:
    with pytest.raises(NegmonitorError, match=r"fraction must be in \(0, 1\], got"):
        top_k_indices(torch.randn(5), frac)
    with pytest.raises(NegmonitorError, match=r"fraction must be in \(0, 1\]"):
        bottom_k_indices(torch.randn(5), frac)


def test_jaccard() -> None:
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == pytest.approx(0.5)
    assert jaccard([1, 2], [1, 2]) == 1.0
    assert jaccard(torch.tensor([1]), torch.tensor([2])) == 0.0
    assert math.isnan(jaccard(torch.tensor([], dtype=torch.long), []))
    assert jaccard(top_k_indices(torch.arange(100.0), 0.1), torch.arange(90, 100)) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_drift_in_fp32_matches_fp64_from_large_to_tiny_angles(dtype) -> None:
    """Snapshots in fp32 or bf16 are compared in fp32: within 1e-3 relative of the fp64 result for every
    neuron, with 1 − cos from ~1e-1 down to ~1e-9 (what an fp32 snapshot between Pythia's early steps shows)."""
    torch.manual_seed(0)
    prev = torch.randn(64, 2048).to(dtype)
    scale = torch.logspace(-0.5, -4.5, 64)[:, None]  # 1 − cos ≈ scale² / 2
    cur = (prev.float() + scale * torch.randn(64, 2048)).to(dtype)
    exact = weight_drift(prev.double(), cur.double())
    got = weight_drift(prev, cur)
    assert got["cos_dissim"].dtype == torch.float64
    assert float(exact["cos_dissim"].min()) < 1e-8 or dtype == torch.bfloat16
    torch.testing.assert_close(got["cos_dissim"], exact["cos_dissim"], rtol=1e-3, atol=0)
    torch.testing.assert_close(got["l2"], exact["l2"], rtol=1e-5, atol=0)
