"""WD to N(0, 1): the exact sort-based reference against scipy, and the streaming accumulator against the reference."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch

from negmonitor.errors import NegmonitorError
from negmonitor.metrics import NeuronStatsAccumulator, wasserstein_to_gaussian, wasserstein_to_gaussian_split
from negmonitor.metrics.streaming import SUPPORTED_N_BINS, _filled_bins_in_order, _raw_bin_geometry, _raw_bins

BATCH = 2048
TOKENS = 16_384  # the accuracy bar is stated for neurons with >= 10,000 tokens


def _quad_w1(column: np.ndarray) -> tuple[float, float]:
    """``(∫_{z<0}|F − Φ|, ∫_{z≥0}|F − Φ|)`` of a standardised sample by adaptive quadrature (the slow truth)."""
    z = np.sort((column - column.mean()) / column.std())

    def gap(t: float) -> float:
        return abs(np.searchsorted(z, t, side="right") / len(z) - scipy.stats.norm.cdf(t))

    kw = dict(limit=1000, epsabs=1e-12, epsrel=1e-12)
    neg = scipy.integrate.quad(gap, -40, 0, points=[p for p in z if -40 < p < 0], **kw)[0]
    pos = scipy.integrate.quad(gap, 0, 40, points=[p for p in z if 0 < p < 40], **kw)[0]
    return neg, pos


def _suite(tokens: int = TOKENS, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Neurons the streaming WD must get right, including ones whose first batch misleads the grid."""
    g = np.random.default_rng(seed)
    n = tokens
    cols = {
        "gaussian": g.standard_normal(n),
        "gaussian_far_from_zero": 50 + 0.3 * g.standard_normal(n),
        "student_t2": g.standard_t(2, n),
        "student_t3": g.standard_t(3, n),
        "cauchy_clipped": np.clip(g.standard_cauchy(n), -1e3, 1e3),
        "mixture_2": np.where(g.random(n) < 0.3, g.normal(-4, 0.5, n), g.normal(1, 1, n)),
        "mixture_3_narrow": np.choose(g.integers(0, 3, n), [g.normal(-6, 0.2, n), g.normal(0, 0.2, n),
                                                            g.normal(3, 0.1, n)]),
        "lognormal": g.lognormal(0, 1, n),
        "neg_lognormal": -g.lognormal(0, 1.5, n),
        "neg_exponential": -g.exponential(1, n),
        "near_constant": np.where(g.random(n) < 0.999, 1.0, g.normal(1, 3, n)),
        "near_constant_zero": np.where(g.random(n) < 0.999, 0.0, g.normal(0, 1, n)),
        "two_values": np.where(g.random(n) < 0.5, -1.0, 2.0),
        "relu_like": np.maximum(g.standard_normal(n), 0),
        "bf16_quantised": torch.tensor(2 * g.standard_normal(n) - 1).bfloat16().double().numpy(),
        "tiny_scale_offset": 3 + 1e-4 * g.standard_normal(n),
    }
    shifted = g.standard_normal(n)
    shifted[BATCH:] += 8
    cols["shift_after_first_batch"] = shifted
    narrow_first = g.normal(5, 1, n)
    narrow_first[:BATCH] = 0.01 * g.standard_normal(BATCH)
    cols["narrow_first_batch"] = narrow_first
    wide_first = g.normal(0, 0.5, n)
    wide_first[:BATCH] = 10 * g.standard_normal(BATCH)
    cols["wide_first_batch"] = wide_first
    constant_first = g.normal(0, 1e-3, n)
    constant_first[:BATCH] = 0.0
    cols["constant_first_batch"] = constant_first
    outlier = g.standard_normal(n)
    outlier[5] = 1e4
    cols["huge_outlier_in_first_batch"] = outlier
    names = list(cols)
    return names, torch.tensor(np.stack([cols[k] for k in names], axis=1), dtype=torch.float32)


def _stream(x: torch.Tensor, batch: int = BATCH, **kwargs) -> dict[str, torch.Tensor]:
    acc = NeuronStatsAccumulator(x.shape[1], **kwargs)
    for start in range(0, x.shape[0], batch):
        acc.update(x[start : start + batch])
    return acc.compute()


@pytest.fixture(autouse=True)
def _one_thread():
    """Numerics tests: one intra-op thread (OpenMP barriers crawl when the cores are shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def suite() -> tuple[list[str], torch.Tensor, tuple[torch.Tensor, ...]]:
    names, x = _suite()
    return names, x, wasserstein_to_gaussian_split(x)


# ------------------------------------------------------------------------------------------- exact reference
@pytest.mark.parametrize("dist", ["normal", "neg_exponential", "student_t2", "two_point"])
def test_exact_matches_quadrature(dist: str) -> None:
    """The closed-form segment integrals equal scipy's adaptive quadrature of |F − Φ|, split at zero."""
    g = np.random.default_rng(1)
    column = {
        "normal": g.standard_normal(23),
        "neg_exponential": -g.exponential(size=31),
        "student_t2": g.standard_t(2, size=17),
        "two_point": np.array([0.0] * 9 + [1.0] * 3),
    }[dist]
    wd, neg, pos = wasserstein_to_gaussian_split(torch.tensor(column[:, None]))
    want_neg, want_pos = _quad_w1(column)
    assert neg.item() == pytest.approx(want_neg, abs=1e-9)
    assert pos.item() == pytest.approx(want_pos, abs=1e-9)
    assert wd.item() == pytest.approx(want_neg + want_pos, abs=1e-9)


def test_exact_matches_scipy_wasserstein_distance() -> None:
    """Against scipy's W1 to a dense sample of normal quantiles (which converges to N(0, 1))."""
    g = np.random.default_rng(2)
    x = np.stack([g.standard_normal(400), g.lognormal(size=400), g.uniform(size=400)], axis=1)
    quantiles = scipy.stats.norm.ppf((np.arange(400_000) + 0.5) / 400_000)
    got = wasserstein_to_gaussian(torch.tensor(x, dtype=torch.float32))
    for j in range(x.shape[1]):
        z = (x[:, j] - x[:, j].mean()) / x[:, j].std()
        assert got[j].item() == pytest.approx(scipy.stats.wasserstein_distance(z, quantiles), abs=2e-4)


def test_exact_properties() -> None:
    """wd = neg + pos, affine invariance, mirror symmetry, dtype handling."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 4, generator=g) ** 3
    wd, neg, pos = wasserstein_to_gaussian_split(x)
    torch.testing.assert_close(wd, neg + pos)
    torch.testing.assert_close(wasserstein_to_gaussian(3.0 * x - 7.0), wd, atol=1e-5, rtol=0)
    wd_m, neg_m, pos_m = wasserstein_to_gaussian_split(-x)
    torch.testing.assert_close(neg_m, pos, atol=1e-6, rtol=0)
    torch.testing.assert_close(pos_m, neg, atol=1e-6, rtol=0)
    assert wd.dtype == torch.float64 and wd.shape == (4,)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        low = x.to(dtype)
        torch.testing.assert_close(wasserstein_to_gaussian(low), wasserstein_to_gaussian(low.double()))


def test_exact_nan_for_degenerate_neurons_without_warnings() -> None:
    x = torch.randn(100, 4)
    x[:, 1] = 2.5  # constant
    x[7, 2] = math.nan
    x[9, 3] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wd, neg, pos = wasserstein_to_gaussian_split(x)
    assert torch.isfinite(wd[0])
    assert torch.isnan(wd[1:]).all() and torch.isnan(neg[1:]).all() and torch.isnan(pos[1:]).all()
    assert torch.isnan(wasserstein_to_gaussian(torch.randn(1, 3))).all()


def test_exact_converges_to_the_population_distance() -> None:
    """A large Gaussian sample is near 0; a large exponential sample near the population W1 (quadrature)."""
    g = torch.Generator().manual_seed(4)
    x = torch.stack([torch.randn(50_000, generator=g), torch.empty(50_000).exponential_(generator=g)], dim=1)
    wd = wasserstein_to_gaussian(x)

    def gap(z: float) -> float:  # standardised Exp(1) is Exp(1) − 1
        return abs(scipy.stats.expon.cdf(z + 1) - scipy.stats.norm.cdf(z))

    population = scipy.integrate.quad(gap, -40, -1)[0] + scipy.integrate.quad(gap, -1, 40, limit=200)[0]
    assert wd[0] < 0.01
    assert wd[1].item() == pytest.approx(population, abs=0.01)


# ------------------------------------------------------------------------------------------------- streaming
def test_streaming_meets_the_accuracy_bar(suite) -> None:
    """Every neuron of >= 10k tokens within 0.005 of the exact WD, wd_neg and wd_pos."""
    names, x, exact = suite
    got = _stream(x)
    for key, want in zip(("wd", "wd_neg", "wd_pos"), exact):
        err = (got[key] - want).abs()
        bad = {n: round(e, 5) for n, e in zip(names, err.tolist()) if not e <= 0.005}
        assert not bad, f"{key} misses the 0.005 bar on {bad}"


def test_streaming_accuracy_holds_for_long_probes() -> None:
    """Near-Gaussian neurons are the worst case and their binning error grows with tokens; 2^18 stays in the bar."""
    g = np.random.default_rng(12)
    tokens = 1 << 18
    cols = []
    for shift in (0.0, 1.0, 3.0):
        col = g.standard_normal(tokens)
        col[BATCH:] += shift  # first batch off-centre by `shift` sigma
        cols.append(col)
    cols.append(-g.exponential(1, tokens))
    x = torch.tensor(np.stack(cols, axis=1), dtype=torch.float32)
    got = _stream(x, batch=8192)
    for key, want in zip(("wd", "wd_neg", "wd_pos"), wasserstein_to_gaussian_split(x)):
        assert (got[key] - want).abs().max() <= 0.005, key


def test_streaming_error_shrinks_with_bins(suite) -> None:
    """More bins means a finer grid: the worst error must fall (a check that n_bins is really used)."""
    names, x, exact = suite
    errs = [(_stream(x, n_bins=b)["wd"] - exact[0]).abs().max().item() for b in (1024, 4096)]
    assert errs[1] < errs[0] / 3


def test_streaming_moments(suite) -> None:
    names, x, _ = suite
    got = _stream(x)
    x64 = x.double().numpy()
    assert (np.abs(got["mean"].numpy() - x64.mean(0)) <= 1e-6 * x64.std(0) + 1e-7 * np.abs(x64.mean(0))).all()
    np.testing.assert_allclose(got["std"].numpy(), x64.std(0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(got["skew"].numpy(), scipy.stats.skew(x64, axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["kurtosis"].numpy(), scipy.stats.kurtosis(x64, axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(got["neg_frac"].numpy(), (x64 < 0).mean(0))
    np.testing.assert_array_equal(got["count"].numpy(), np.full(x.shape[1], x.shape[0]))
    np.testing.assert_array_equal(got["min"].numpy(), x64.min(0))
    np.testing.assert_array_equal(got["max"].numpy(), x64.max(0))
    assert (got["nonfinite"] == 0).all()


def test_streaming_accepts_float_dtypes_and_leading_axes() -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4096, 6, generator=g) * 2).to(torch.bfloat16)
    ref = _stream(x.float())
    for low in (x, x.half(), x.double(), x.float().view(2, 2048, 6)):
        got = _stream(low.reshape(-1, 6) if low.dim() == 3 else low)
        for key in ("wd", "mean", "std"):
            torch.testing.assert_close(got[key], ref[key], atol=1e-9, rtol=1e-9)
    acc = NeuronStatsAccumulator(6)
    acc.update(x.float().view(2, 2048, 6))  # [batch, seq, neurons] is flattened
    torch.testing.assert_close(acc.compute()["wd"], _stream(x.float(), batch=4096)["wd"])


def test_streaming_nonfinite_counted_and_skipped() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12_000, 3, generator=g)
    x[::7, 0] = math.nan
    x[5, 1] = math.inf
    x[100:110, 1] = -math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _stream(x)
    np.testing.assert_array_equal(got["nonfinite"].numpy(), [len(range(0, 12_000, 7)), 11, 0])
    for j in range(3):
        clean = x[torch.isfinite(x[:, j]), j : j + 1]
        assert got["count"][j].item() == clean.shape[0]
        assert got["wd"][j].item() == pytest.approx(wasserstein_to_gaussian(clean).item(), abs=0.005)
        assert got["mean"][j].item() == pytest.approx(clean.double().mean().item(), abs=1e-9)
        assert got["neg_frac"][j].item() == pytest.approx((clean < 0).double().mean().item(), abs=1e-12)
        assert got["max"][j].item() == clean.max().item()


def test_streaming_degenerate_neurons_nan_without_warnings() -> None:
    x = torch.randn(50, 4)
    x[:, 1] = 3.0  # constant: mean known, std 0, no shape
    x[1:, 2] = math.nan  # a single finite value (< min_count)
    x[:, 3] = math.nan  # nothing finite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _stream(x)
    assert torch.isfinite(got["wd"][0])
    assert got["mean"][1].item() == 3.0 and got["std"][1].item() == 0.0
    for key in ("wd", "wd_neg", "wd_pos", "skew", "kurtosis"):
        assert torch.isnan(got[key][1:]).all(), key
    for key in ("mean", "std"):
        assert torch.isnan(got[key][2:]).all(), key
    assert got["count"].tolist() == [50, 50, 1, 0]
    assert math.isnan(got["neg_frac"][3].item())


def test_streaming_merge_equals_single_pass(suite) -> None:
    """Two accumulators on halves, merged (torchmetrics-style or by summing states), equal one on everything."""
    _, x, _ = suite
    half = x.shape[0] // 2
    single = NeuronStatsAccumulator(x.shape[1])
    first, second = NeuronStatsAccumulator(x.shape[1]), NeuronStatsAccumulator(x.shape[1])
    for start in range(0, x.shape[0], BATCH):
        single.update(x[start : start + BATCH])
    for start in range(0, half, BATCH):
        first.update(x[start : start + BATCH])
    second.copy_grid(first)
    for start in range(half, x.shape[0], BATCH):
        second.update(x[start : start + BATCH])
    manual = {name: getattr(first, name) + getattr(second, name) for name in ("hist", "tails", "count")}
    first.merge_state(second)
    want, got = single.compute(), first.compute()
    for key in want:  # only the order of fp64 additions differs
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-9, equal_nan=True, msg=key)
    for name, value in manual.items():
        torch.testing.assert_close(value, getattr(single, name), rtol=0, atol=0)  # integer / exact sums
    assert torch.equal(first.hist, single.hist)


def test_streaming_on_two_threads_equals_one_thread(suite) -> None:
    """Blocks of neurons split across threads (fast and exact-path blocks alike) give bit-identical state."""
    _, x, _ = suite
    x = torch.cat([x, x.flip(0)], dim=1)  # more neurons: more blocks
    x[7, 3] = math.nan  # one block takes the exact fp64 path
    states = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        acc = NeuronStatsAccumulator(x.shape[1], block_elements=3 * BATCH)
        for start in range(0, x.shape[0], BATCH):
            acc.update(x[start : start + BATCH])
        states.append({name: getattr(acc, name).clone() for name in acc._defaults})
    assert int(states[1]["nonfinite"].sum()) == 1
    for name in states[0]:
        assert torch.equal(states[0][name].nan_to_num(), states[1][name].nan_to_num()), name


def test_default_blocks_widen_on_threads_and_give_the_same_state() -> None:
    """The default block width grows with the thread count (fewer GIL hand-offs) and never leaves a thread idle;
    the state does not depend on it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 600, generator=g) * torch.rand(600, generator=g) * 3
    x[:, ::7] = x[:, ::7].exp()  # skewed neurons
    widths, states, results = [], [], []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        acc = NeuronStatsAccumulator(x.shape[1])
        widths.append(acc._block_width(x[:2048]))
        for start in range(0, x.shape[0], 2048):
            acc.update(x[start : start + 2048])
        states.append({name: getattr(acc, name).clone() for name in acc._defaults})
        results.append(acc.compute())
    assert widths == [(1 << 17) // 2048, (1 << 19) // 2048]
    torch.set_num_threads(2)
    assert NeuronStatsAccumulator(100)._block_width(x[:2048]) == 50  # one block per thread at least
    for name in states[0]:  # fp32 block sums round differently in other block shapes; the rest is exact
        if name != "power_sums":
            assert torch.equal(states[0][name], states[1][name]), name
    for key in ("wd", "wd_neg", "mean", "std", "skew", "kurtosis"):
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)


def test_run_split_waits_for_every_thread_and_re_raises() -> None:
    """A failing block raises in the caller after all threads are done, and torch's thread count is restored."""
    from negmonitor.metrics._threads import run_split

    torch.set_num_threads(2)
    done: list[int] = []

    def work(part) -> None:
        for item in part:
            if item == 5:
                raise ValueError("block 5 failed")
            done.append(item)

    with pytest.raises(ValueError, match="block 5 failed"):
        run_split(work, list(range(8)), workers=2)
    assert sorted(done) == [0, 1, 2, 3, 4] and torch.get_num_threads() == 2


def test_streaming_merge_rejects_different_grids() -> None:
    a, b = NeuronStatsAccumulator(2), NeuronStatsAccumulator(2)
    a.update(torch.randn(100, 2))
    b.update(torch.randn(100, 2) * 5 + 3)
    with pytest.raises(NegmonitorError, match="different histogram grids"):
        a.merge_state(b)
    empty = NeuronStatsAccumulator(2)
    empty.merge_state(a)  # an empty accumulator takes the other's grid
    torch.testing.assert_close(empty.compute()["wd"], a.compute()["wd"])


def test_streaming_state_is_bounded_and_summable() -> None:
    """State size is independent of tokens, within 64 MiB per 1,000 neurons, and reduced only by sum/min/max."""
    acc = NeuronStatsAccumulator(1000)
    before = acc.state_bytes()
    for _ in range(3):
        acc.update(torch.randn(512, 1000))
    assert acc.state_bytes() == before
    assert before <= 64 * 2**20
    assert all(isinstance(v, torch.Tensor) for v in acc.metric_state.values())  # no list states
    fns = {getattr(fn, "__name__", fn) for fn in acc._reductions.values()}
    assert fns <= {"dim_zero_sum", "dim_zero_min", "dim_zero_max", "_nan_aware_max"}


def test_streaming_reset_and_validation() -> None:
    acc = NeuronStatsAccumulator(3)
    acc.update(torch.randn(64, 3))
    acc.reset()
    acc.update(100 + torch.randn(64, 3))  # a new grid after reset, not the old one
    assert (acc.compute()["mean"] > 90).all()
    with pytest.raises(NegmonitorError, match=r"\[tokens, 3\]"):
        acc.update(torch.randn(10, 4))
    with pytest.raises(NegmonitorError, match="n_bins"):
        NeuronStatsAccumulator(3, n_bins=1000)
    with pytest.raises(NegmonitorError, match="after update"):
        acc.set_grid(torch.zeros(3), torch.ones(3))


def test_streaming_holds_its_state_once_through_moves_and_resets() -> None:
    """torchmetrics keeps a default beside every state; the histogram's must not be a second full-size copy,
    after construction, a move or a reset, and a reset accumulator gives what a fresh one gives."""
    def held_bytes(acc: NeuronStatsAccumulator) -> int:
        tensors = [*acc._defaults.values(), *(getattr(acc, name) for name in acc._defaults)]
        return sum(t.numel() * t.element_size() for t in tensors)

    x = torch.randn(3_000, 64, generator=torch.Generator().manual_seed(3)) ** 3
    acc = NeuronStatsAccumulator(64)
    assert held_bytes(acc) < 1.05 * acc.state_bytes()
    acc.update(x[:1_000] + 5)
    acc = acc.to("cpu")
    acc.reset()
    assert held_bytes(acc) < 1.05 * acc.state_bytes() and acc.hist.shape == (64 * acc.n_bins,)
    assert int(acc.hist.count_nonzero()) == 0
    acc.update(x)
    fresh = NeuronStatsAccumulator(64)
    fresh.update(x)
    for key, value in fresh.compute().items():
        torch.testing.assert_close(acc.compute()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_explicit_grid_and_forward() -> None:
    acc = NeuronStatsAccumulator(2)
    acc.set_grid(torch.tensor([0.0, 10.0]), torch.tensor([1.0, 2.0]))
    x = torch.randn(20_000, 2) * torch.tensor([1.0, 2.0]) + torch.tensor([0.0, 10.0])
    acc(x[:10_000])  # forward == update
    acc.update(x[10_000:])
    exact = wasserstein_to_gaussian(x)
    torch.testing.assert_close(acc.compute()["wd"], exact, atol=0.005, rtol=0)
    center, unit = acc.grid
    torch.testing.assert_close(unit, torch.tensor([1.0, 2.0]))


def test_raw_bins_rebuild_every_value_and_come_back_in_value_order() -> None:
    """Each d's bin and low bits rebuild its float16 value exactly; the filled bins come back in value order."""
    for n_bins in SUPPORTED_N_BINS:
        shift = 16 - int(math.log2(n_bins))
        low_bits = 40
        g = torch.Generator().manual_seed(n_bins)
        d = torch.cat([torch.randn(5000, generator=g) * 10.0 ** torch.randint(-8, 5, (5000,), generator=g),
                       torch.tensor([0.0, -1e-3, 65000.0, -65000.0])])
        col, packed = _raw_bins(d, shift, low_bits)
        buffers = (torch.empty(d.shape, dtype=torch.float16), torch.empty(d.shape, dtype=torch.long),
                   torch.empty(d.shape, dtype=torch.long))  # the update's in-place form gives the same
        in_place = _raw_bins(d, shift, low_bits, buffers)
        assert torch.equal(in_place[0], col) and torch.equal(in_place[1], packed)
        assert col.min() >= 0 and col.max() < n_bins
        base, step = _raw_bin_geometry(shift, n_bins, torch.device("cpu"))
        rebuilt = base[col] + (packed & ((1 << low_bits) - 1)).double() * step[col]
        torch.testing.assert_close(rebuilt, d.half().double(), rtol=0, atol=0)
        # One neuron's histogram of all these values: its filled bins, put in order, have ascending centroids.
        hist = torch.zeros(n_bins, dtype=torch.long).scatter_add_(0, col, packed)[None]
        row, position, centroid, count, filled = _filled_bins_in_order(hist, low_bits, shift)
        ordered = torch.empty_like(centroid)
        ordered[position] = centroid
        assert (ordered.diff() >= 0).all() and int(count.sum()) == d.numel() and int(filled[0]) == centroid.numel()
        assert torch.equal(torch.sort(position).values, torch.arange(position.numel()))


_DDP_WORKER = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from negmonitor.metrics import NeuronStatsAccumulator
rank, store, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
x = torch.load(data)
half = x.shape[0] // 2
mine = x[:half] if rank == 0 else x[half:]
acc = NeuronStatsAccumulator(x.shape[1])
for start in range(0, mine.shape[0], 1000):
    acc.update(mine[start : start + 1000])
result = acc.compute()  # torchmetrics syncs the states of the two ranks here
if rank == 0:
    torch.save(result, out)
dist.barrier()
dist.destroy_process_group()
"""


def test_streaming_ddp_sync_equals_single_process(tmp_path) -> None:
    """Two gloo ranks on halves: rank 0's grid is broadcast, states sum, and compute() gives the one-process answer."""
    names, x = _suite(tokens=8000, seed=11)
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    args = [str(tmp_path / "store"), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")]
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    got = torch.load(tmp_path / "out.pt")
    single = NeuronStatsAccumulator(x.shape[1])
    for start in range(0, x.shape[0], 1000):
        single.update(x[start : start + 1000])
    want = single.compute()
    for key in want:  # only the order of fp64 additions differs
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-9, equal_nan=True, msg=key)
