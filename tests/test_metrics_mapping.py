"""Mapping difficulty, OI ratios, pair sampling and pair sign shares against plain per-neuron loops."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from negmonitor.errors import NegmonitorError
from negmonitor.metrics import mapping_difficulty, pair_sign_shares, sample_pairs, sign_classes, top_pairs
from negmonitor.metrics.mapping import NN, PN, PP


def _loop_md(x_a, x_b, y_a, y_b) -> tuple[np.ndarray, np.ndarray]:
    """The definition, one neuron and one pair at a time (float64 numpy)."""
    x_a, x_b, y_a, y_b = (np.asarray(t, dtype=np.float64) for t in (x_a, x_b, y_a, y_b))
    n_pairs, n_neurons = y_a.shape
    dx = [math.sqrt(sum((x_a[i, k] - x_b[i, k]) ** 2 for k in range(x_a.shape[1]))) for i in range(n_pairs)]
    keep = [i for i in range(n_pairs) if dx[i] > 0]
    top = max(dx[i] for i in keep)
    md = np.full(n_neurons, np.nan)
    oi = np.full((n_pairs, n_neurons), np.nan)
    for j in range(n_neurons):
        diffs = [abs(y_a[i, j] - y_b[i, j]) for i in keep]
        median = float(np.median(diffs))
        if median == 0:
            continue
        for i in keep:
            oi[i, j] = (abs(y_a[i, j] - y_b[i, j]) / median) / (dx[i] / top)
        md[j] = np.mean([oi[i, j] for i in keep])
    return md, oi


def _pairs_data(n_pairs: int = 60, d: int = 5, n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_a, x_b = torch.randn(n_pairs, d, generator=g), torch.randn(n_pairs, d, generator=g)
    y_a, y_b = torch.randn(n_pairs, n, generator=g) * 2 - 0.5, torch.randn(n_pairs, n, generator=g)
    return x_a, x_b, y_a, y_b


# ------------------------------------------------------------------------------------------------ pairs
def test_sample_pairs_disjoint_seeded_and_in_range() -> None:
    pairs = sample_pairs(1000, 300, seed=7)
    assert pairs.shape == (300, 2) and pairs.dtype == torch.long
    flat = pairs.reshape(-1)
    assert flat.unique().numel() == 600
    assert flat.min() >= 0 and flat.max() < 1000
    assert torch.equal(pairs, sample_pairs(1000, 300, seed=7))
    assert not torch.equal(pairs, sample_pairs(1000, 300, seed=8))
    assert sample_pairs(10, 0, seed=0).shape == (0, 2)
    assert sample_pairs(10, 5, seed=0).reshape(-1).sort().values.tolist() == list(range(10))  # exactly fits


def test_sample_pairs_says_how_many_tokens_are_needed() -> None:
    with pytest.raises(NegmonitorError, match="need 2000 distinct tokens but only 1999"):
        sample_pairs(1999, 1000, seed=0)
    with pytest.raises(NegmonitorError):
        sample_pairs(10, -1, seed=0)


# ---------------------------------------------------------------------------------------------------- MD
def test_mapping_difficulty_matches_the_loop() -> None:
    x_a, x_b, y_a, y_b = _pairs_data()
    md, oi = mapping_difficulty(x_a, x_b, y_a, y_b)
    want_md, want_oi = _loop_md(x_a, x_b, y_a, y_b)
    assert md.shape == (7,) and oi.shape == (60, 7)
    np.testing.assert_allclose(md.numpy(), want_md, rtol=1e-5)
    np.testing.assert_allclose(oi.numpy(), want_oi, rtol=1e-5)


def test_mapping_difficulty_guards_degenerate_pairs_and_neurons() -> None:
    """A repeated input is left out; a neuron with zero median difference is NaN; no warnings."""
    x_a, x_b, y_a, y_b = _pairs_data(n_pairs=41)
    x_b[3] = x_a[3]  # zero input distance
    x_b[10] = x_a[10]
    y_b[:, 2] = y_a[:, 2]  # neuron 2: all output differences zero
    y_b[:30, 4] = y_a[:30, 4]  # neuron 4: median difference zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        md, oi = mapping_difficulty(x_a, x_b, y_a, y_b)
    want_md, want_oi = _loop_md(x_a, x_b, y_a, y_b)
    np.testing.assert_allclose(md.numpy(), want_md, rtol=1e-5)
    np.testing.assert_allclose(oi.numpy(), want_oi, rtol=1e-5)
    assert torch.isnan(oi[[3, 10]]).all() and torch.isfinite(oi[0, [0, 1, 3]]).all()
    assert torch.isnan(md[[2, 4]]).all() and torch.isfinite(md[[0, 1, 3, 5, 6]]).all()


def test_mapping_difficulty_all_inputs_equal_and_dtypes() -> None:
    x_a, x_b, y_a, y_b = _pairs_data(n_pairs=8, n=3)
    md, oi = mapping_difficulty(x_a, x_a.clone(), y_a, y_b)
    assert torch.isnan(md).all() and torch.isnan(oi).all() and md.shape == (3,)
    ref, _ = mapping_difficulty(x_a, x_b, y_a, y_b)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = [t.to(dtype) for t in (x_a, x_b, y_a, y_b)]
        want, _ = _loop_md(*[t.double() for t in low])
        got, _ = mapping_difficulty(*low)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
    with pytest.raises(NegmonitorError):
        mapping_difficulty(x_a, x_b[:4], y_a, y_b)


@pytest.mark.parametrize("block", [16 * 60, 7 * 60, 1])
def test_mapping_difficulty_in_column_blocks(block: int) -> None:
    """Many column blocks (the last one partial; one neuron per block) with a left-out pair and a dead neuron:
    MD and OI as the loop; ``with_oi=False`` gives the same MD and no OI; torch's thread count is untouched."""
    x_a, x_b, y_a, y_b = _pairs_data(n_pairs=60, n=70, seed=4)
    x_b[7] = x_a[7]
    y_b[:, 33] = y_a[:, 33]
    threads = torch.get_num_threads()
    md, oi = mapping_difficulty(x_a, x_b, y_a, y_b, block_elements=block)
    md_alone, no_oi = mapping_difficulty(x_a, x_b, y_a, y_b, with_oi=False, block_elements=block)
    assert torch.get_num_threads() == threads
    want_md, want_oi = _loop_md(x_a, x_b, y_a, y_b)
    np.testing.assert_allclose(md.numpy(), want_md, rtol=1e-5)
    np.testing.assert_allclose(oi.numpy(), want_oi, rtol=1e-5)
    assert no_oi is None
    torch.testing.assert_close(md_alone, md, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(md[33]) and torch.isnan(oi[7]).all()


def test_mapping_difficulty_planned_bytes_bound_its_allocations() -> None:
    """What ``mapping_difficulty`` allocates (outputs included) stays within ``planned_bytes``; smaller blocks
    plan and use less."""
    from negmonitor.metrics.mapping import planned_bytes
    from tests.test_metrics_wasserstein import _peak_allocated

    x_a, x_b, y_a, y_b = _pairs_data(n_pairs=500, d=64, n=3000, seed=2)
    x_b[3] = x_a[3]
    for block, with_oi in ((None, True), (None, False), (500 * 64, False)):
        peak = _peak_allocated(lambda: mapping_difficulty(x_a, x_b, y_a, y_b, with_oi=with_oi,
                                                          block_elements=block))
        planned = planned_bytes(500, 64, 3000, with_oi=with_oi, block_elements=block)
        assert peak <= planned, (block, with_oi, peak, planned)
    assert planned_bytes(500, 64, 3000, False, 500 * 64) < planned_bytes(500, 64, 3000, False)


@pytest.mark.parametrize("mode", ["requires_grad", "inference_mode"])
def test_mapping_difficulty_under_autograd_modes(mode: str) -> None:
    """Inputs that require grad, and calls under inference mode, give the plain result; the median helper too."""
    from negmonitor.metrics._median import median_along_first_axis

    x_a, x_b, y_a, y_b = _pairs_data(n_pairs=300, n=40, seed=6)
    x_b[3] = x_a[3]
    want_md, want_oi = _loop_md(x_a, x_b, y_a, y_b)
    if True:
        if mode == "requires_grad":
            inputs = [t.clone().requires_grad_(True) for t in (x_a, x_b, y_a, y_b)]
            md, oi = mapping_difficulty(*inputs)
            median = median_along_first_axis(inputs[2].detach())
            all_kept, _ = mapping_difficulty(inputs[0], inputs[0] + 1, inputs[2], inputs[3])  # no pair left out
            assert torch.isfinite(all_kept).all()
        else:
            with torch.inference_mode():
                md, oi = mapping_difficulty(x_a, x_b, y_a, y_b)
                median = median_along_first_axis(y_a)
        md_again, _ = mapping_difficulty(x_a, x_b, y_a, y_b)
    assert not md.requires_grad and not oi.requires_grad
    np.testing.assert_allclose(md.numpy(), want_md, rtol=1e-5)
    np.testing.assert_allclose(oi.numpy(), want_oi, rtol=1e-5)
    torch.testing.assert_close(md_again, md, rtol=0, atol=0)
    assert torch.equal(median, torch.from_numpy(np.median(y_a.numpy(), axis=0)))


def test_mapping_difficulty_scale_behaviour() -> None:
    """MD is invariant to scaling a neuron's outputs or all inputs (both distances are normalised)."""
    x_a, x_b, y_a, y_b = _pairs_data()
    md, _ = mapping_difficulty(x_a, x_b, y_a, y_b)
    md2, _ = mapping_difficulty(3 * x_a, 3 * x_b, 5 * y_a + 1, 5 * y_b + 1)
    torch.testing.assert_close(md2, md, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------- signs and top pairs
def test_sign_classes() -> None:
    y_a = torch.tensor([[-1.0, -1.0, 2.0, 0.0, -0.5]])
    y_b = torch.tensor([[-2.0, 3.0, -1.0, 0.0, 0.0]])
    assert sign_classes(y_a, y_b).tolist() == [[NN, PN, PN, PP, PN]]


def test_top_pairs_sorted_with_nan_last() -> None:
    oi = torch.tensor([[1.0, 5.0], [math.nan, 1.0], [3.0, 2.0], [2.0, math.nan]])
    best = top_pairs(oi, 4)
    assert best.shape == (4, 2)
    assert best[:, 0].tolist() == [2, 3, 0, 1]
    assert best[:, 1].tolist() == [0, 2, 1, 3]
    assert top_pairs(oi, 0).shape == (0, 2)
    with pytest.raises(NegmonitorError, match="number of pairs"):
        top_pairs(oi, 5)


def _loop_shares(oi, y_a, y_b, md, frac, m):
    """Reference: sort neurons by MD (NaN out), take floor(frac·n) ≥ 1, each one's top-m finite-OI pairs."""
    n = md.numel()
    valid = [j for j in range(n) if not math.isnan(md[j].item())]
    chosen = sorted(valid, key=lambda j: -md[j].item())[: max(1, int(frac * n))]
    counts = [0, 0, 0]
    for j in chosen:
        ranked = sorted(range(oi.shape[0]), key=lambda i: -(oi[i, j].item() if math.isfinite(oi[i, j].item())
                                                            else -math.inf))
        for i in ranked[:m]:
            if math.isfinite(oi[i, j].item()):
                counts[(y_a[i, j] >= 0).int().item() + (y_b[i, j] >= 0).int().item()] += 1
    total = sum(counts)
    return [c / total for c in counts], len(chosen), total


@pytest.mark.parametrize("frac,m", [(0.05, 100), (0.3, 10), (1.0, 1000)])
def test_pair_sign_shares_match_the_loop(frac: float, m: int) -> None:
    x_a, x_b, y_a, y_b = _pairs_data(n_pairs=200, n=40, seed=3)
    x_b[5] = x_a[5]  # one excluded pair
    md, oi = mapping_difficulty(x_a, x_b, y_a, y_b)
    md[7] = math.nan  # never chosen
    got = pair_sign_shares(oi, y_a, y_b, md, top_neuron_frac=frac, top_pairs=m)
    shares, n_chosen, total = _loop_shares(oi, y_a, y_b, md, frac, m)
    assert [got["nn"], got["pn"], got["pp"]] == pytest.approx(shares, abs=1e-12)
    assert got["n_neurons"] == n_chosen and got["n_counted"] == total
    assert got["n_pairs"] == min(m, 200)
    assert got["nn"] + got["pn"] + got["pp"] == pytest.approx(1.0)
    # a ranking taken once for more pairs (as the summary shares it with the top-pair table) gives the same shares
    ranked = top_pairs(oi, min(200, m + 7))
    assert pair_sign_shares(oi, y_a, y_b, md, top_neuron_frac=frac, top_pairs=m, ranked=ranked) == got


def test_pair_sign_shares_find_an_all_negative_neuron() -> None:
    """A neuron whose hardest pairs are both-negative gives NN share 1 when it is the top-MD neuron."""
    g = torch.Generator().manual_seed(9)
    n_pairs = 1000
    x_a = torch.randn(n_pairs, 4, generator=g)
    step = torch.nn.functional.normalize(torch.randn(n_pairs, 4, generator=g), dim=1)
    x_b = x_a + step * (0.5 + 0.5 * torch.rand(n_pairs, 1, generator=g))  # input distances within 2x
    y_a, y_b = torch.rand(n_pairs, 20, generator=g), torch.rand(n_pairs, 20, generator=g)  # all PP, diffs < 1
    hard = torch.arange(0, 100)
    y_a[hard, 11] = -11.0 - 50 * torch.rand(100, generator=g)  # >= 10 apart, both negative
    y_b[hard, 11] = -1.0
    md, oi = mapping_difficulty(x_a, x_b, y_a, y_b)
    assert int(torch.argmax(md)) == 11
    got = pair_sign_shares(oi, y_a, y_b, md)  # defaults: top 5% of 20 neurons = 1, top 100 pairs
    assert got["n_neurons"] == 1 and got["n_pairs"] == 100
    assert got["nn"] == 1.0 and got["pn"] == 0.0 and got["pp"] == 0.0


def test_pair_sign_shares_nothing_to_count() -> None:
    oi = torch.full((5, 3), math.nan)
    got = pair_sign_shares(oi, torch.zeros(5, 3), torch.zeros(5, 3), torch.full((3,), math.nan))
    assert got["n_neurons"] == 0 and math.isnan(got["nn"])


def test_median_along_first_axis_is_numpys_median():
    """Even and odd lengths, widths that are and are not multiples of the transpose tile, strided input, counts
    below the length (the rest NaN, sorted last), on the numpy and the torch sort."""
    from negmonitor.metrics._median import median_along_first_axis

    from negmonitor.metrics import _median
    from negmonitor.metrics._median import column_medians

    g = torch.Generator().manual_seed(5)
    for m, n in ((1000, 2048), (999, 33), (1, 5), (4, 16)):
        x = torch.randn(m, n, generator=g) ** 3
        expected = torch.from_numpy(np.median(x.numpy(), axis=0)).float()
        assert torch.equal(median_along_first_axis(x), expected), (m, n)
    strided = torch.randn(300, 64, generator=g)[::3]
    assert torch.equal(median_along_first_axis(strided), torch.from_numpy(np.median(strided.numpy(), axis=0)))
    x = torch.randn(400, 30, generator=g)
    count = torch.randint(1, 401, (30,), generator=g)
    padded = torch.where(torch.arange(400)[:, None] < count, x, math.nan)
    expected = torch.tensor([float(np.median(x[: int(k), j].numpy())) for j, k in enumerate(count)])
    assert torch.equal(column_medians(padded, count, block_elements=400 * 7), expected)
    # The non-CPU branch (torch.sort and a gather at the middle ranks), run here on CPU tensors.
    got = _median._torch_row_medians(padded.t().contiguous(), count)
    assert torch.equal(got, expected)
    assert torch.equal(_median._torch_row_medians(x.t().contiguous(), 400), median_along_first_axis(x))


@pytest.mark.parametrize("m", [256, 257, 1000, 1001, 4096])
def test_row_medians_by_partition_equal_whole_sorts(m: int) -> None:
    """The partition at the lower middle rank and the least value above it equal the midpoint of whole sorted rows,
    bit for bit, on random rows, ties, constant rows, sorted and reversed rows, +-inf and NaN (sorted last, as
    numpy sorts), also with a count below the length (the rest +inf, as MD's left-out pairs)."""
    from negmonitor.metrics._median import _row_medians

    rng = np.random.default_rng(m)
    cases = {
        "random": rng.standard_normal((64, m)).astype(np.float32) ** 3,
        "ties": np.round(rng.standard_normal((64, m)) * 2).astype(np.float32),
        "constant": np.full((8, m), 1.5, dtype=np.float32),
        "disjoint halves": np.sort(rng.standard_normal((16, m)).astype(np.float32), axis=1),
        "reversed halves": np.sort(rng.standard_normal((16, m)).astype(np.float32), axis=1)[:, ::-1].copy(),
        "float64": rng.standard_normal((16, m)),
    }
    special = rng.standard_normal((16, m)).astype(np.float32)
    special[:4, ::7], special[4:8, ::5], special[8:12, 3] = np.inf, -np.inf, np.nan
    special[12:, : m // 2 + 3] = np.nan  # NaN past the middle: the midpoint is NaN
    cases["inf and nan"] = special
    for name, rows in cases.items():
        whole = np.sort(rows, axis=1)
        expected = (whole[:, (m - 1) // 2] + whole[:, m // 2]) * 0.5
        got = _row_medians(rows.copy(), m)
        assert got.dtype == rows.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
    for count in (m - 1, m // 2 + 1, 2, 1):
        rows = cases["random"].copy()
        rows[:, count:] = np.inf
        whole = np.sort(rows, axis=1)
        expected = (whole[:, (count - 1) // 2] + whole[:, count // 2]) * 0.5
        np.testing.assert_array_equal(_row_medians(rows, count), expected, err_msg=f"count {count}")


@pytest.mark.parametrize("m", [100, 256, 1001])
def test_nonnegative_rows_ordered_as_int32_bits_give_the_float_medians(m: int) -> None:
    """MD's medians order |Δy| rows as int32 bits: bit for bit the float medians, with ties, zeros, +inf and NaN
    (from ``abs_``: sign bit clear), for a shared count and for per-row counts."""
    from negmonitor.metrics._median import row_medians_

    rng = np.random.default_rng(m)
    rows = torch.from_numpy(rng.standard_normal((48, m)).astype(np.float32) ** 3)
    rows[:8] = rows[:8].round()  # ties and zeros (-0.0 among them before abs_)
    rows[8:12, ::7] = math.inf
    rows[12:16, 3] = math.nan
    rows[16:20, : m // 2 + 3] = -math.nan  # NaN past the middle, sign bit set until abs_
    rows.abs_()
    for count in (m, m - 1, m // 2 + 1, 1, torch.full((48,), m - 3), torch.randint(1, m + 1, (48,))):
        padded = rows.clone()
        k = count if isinstance(count, int) else count[:, None]
        padded[torch.arange(m)[None, :].expand(48, m) >= torch.as_tensor(k)] = math.inf  # past the count: last
        expected = row_medians_(padded.clone(), count)
        got = row_medians_(padded.clone(), count, nonnegative=True)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"count {count}")
