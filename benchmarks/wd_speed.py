"""Benchmark: streaming WD and vectorised MD against the per-neuron way of the paper's public code.

Synthetic pre-activations, 65,536 tokens x 2,048 neurons (a tenth non-Gaussian: Student-t, negated lognormal,
mixtures, shifted-after-the-first-batch). In one run it times:

(a) the per-neuron baseline: ``scipy.stats.wasserstein_distance`` of each standardised neuron against a fresh
    random N(0, 1) sample of the same size, over a 2-process ``multiprocessing`` pool (pool start-up not timed).
    It is timed on a subset of neurons and extrapolated linearly to all of them (the output says so);
(b) negmonitor's streaming path: ``NeuronStatsAccumulator`` fed 2,048-token batches, then ``compute()``
    (which also gives mean, std, skew, kurtosis, negative fraction, min and max), on as many torch threads as
    the baseline has processes (the same cores for both), and again on one thread; and once more with torch's
    elementwise passes in place of the fused CPU update (numba), to show what the kernel pays.

Both (a) and (b) are timed ``--repeats`` times (default 3) and the best run counts (the first streaming run also
pays for allocating the state; it is printed too);

and prints both times, the speed ratio, the largest absolute difference from the exact sort-based WD (for the
streaming path and, on its subset, for the baseline), and the size of the streaming state. Then MD for all
neurons with P = 1,000 pairs: ``mapping_difficulty(..., with_oi=False)`` against a per-neuron Python loop (numpy
inside the loop), both computing MD alone; the time with the ``[P, n]`` OI ratios as well is printed beside it.

Run from the repository root::

    python benchmarks/wd_speed.py            # full size, ~2-4 minutes on 2 cores
    python benchmarks/wd_speed.py --quick    # 16,384 tokens x 512 neurons
    python benchmarks/wd_speed.py --md-only  # MD alone, ~10 s
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from negmonitor.metrics import _fused_cpu, streaming  # noqa: E402
from negmonitor.metrics import (  # noqa: E402
    NeuronStatsAccumulator,
    mapping_difficulty,
    sample_pairs,
    wasserstein_to_gaussian_split,
)

BATCH = 2048


def synthetic_activations(tokens: int, neurons: int, seed: int = 0) -> torch.Tensor:
    """Gaussian neurons with random mean/scale; every tenth neuron one of five non-Gaussian shapes."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((tokens, neurons), dtype=np.float32)
    x *= g.uniform(0.3, 3.0, neurons).astype(np.float32)
    x += g.normal(-0.5, 1.0, neurons).astype(np.float32)
    for k, j in enumerate(range(0, neurons, 10)):
        kind = k % 5
        if kind == 0:
            col = g.standard_t(2.5, tokens)
        elif kind == 1:
            col = -g.lognormal(0.0, 1.0, tokens)
        elif kind == 2:
            col = np.where(g.random(tokens) < 0.3, g.normal(-3, 0.5, tokens), g.normal(1, 1, tokens))
        elif kind == 3:
            col = np.where(g.random(tokens) < 0.99, -0.2 + 0.01 * g.standard_normal(tokens),
                           g.normal(2, 2, tokens))
        else:
            col = g.standard_normal(tokens)
            col[BATCH:] += 4.0  # the first batch misleads the grid
        x[:, j] = col
    return torch.from_numpy(x)


# ---------------------------------------------------------------------------------------------- baseline
def _scipy_one(args: tuple[np.ndarray, int]) -> float:
    """The paper's per-neuron way: standardise, then W1 against a fresh N(0, 1) sample of the same size."""
    column, seed = args
    z = (column - column.mean()) / column.std()
    gaussian = np.random.default_rng(seed).standard_normal(len(column))
    return float(scipy.stats.wasserstein_distance(z, gaussian))


def time_baseline(
    x: torch.Tensor, n_sample: int, processes: int, repeats: int
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Best pool seconds for ``n_sample`` evenly spaced neurons, serial seconds per neuron, values and indices."""
    idx = np.linspace(0, x.shape[1] - 1, n_sample).round().astype(int)
    columns = [(np.ascontiguousarray(x[:, j].numpy(), dtype=np.float64), int(j)) for j in idx]
    with mp.get_context("fork").Pool(processes) as pool:
        pool.map(_scipy_one, columns[:processes])  # warm the workers (imports) outside the timing
        seconds = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            values = pool.map(_scipy_one, columns, chunksize=4)
            seconds = min(seconds, time.perf_counter() - start)
    n_serial = max(1, n_sample // 8)
    start = time.perf_counter()
    for column in columns[:n_serial]:
        _scipy_one(column)
    serial = (time.perf_counter() - start) / n_serial
    return seconds, serial, np.array(values), idx


# --------------------------------------------------------------------------------------------- streaming
def time_streaming(x: torch.Tensor) -> tuple[float, float, dict[str, torch.Tensor], NeuronStatsAccumulator]:
    """Update and compute seconds of one streaming pass over ``x``, its statistics and the accumulator."""
    acc = NeuronStatsAccumulator(x.shape[1])
    start = time.perf_counter()
    for s in range(0, x.shape[0], BATCH):
        acc.update(x[s : s + BATCH])
    updated = time.perf_counter()
    stats = acc.compute()
    done = time.perf_counter()
    return updated - start, done - updated, stats, acc


def best_streaming(
    x: torch.Tensor, repeats: int
) -> tuple[float, float, float, dict[str, torch.Tensor], NeuronStatsAccumulator, int]:
    """The fastest of ``repeats`` passes (update and compute seconds), the first pass's total, stats, accumulator,
    and the first pass's peak growth of resident memory in bytes (it allocates the state and the scratch)."""
    with ResidentPeak() as peak:
        runs = [time_streaming(x)]
    runs += [time_streaming(x) for _ in range(repeats - 1)]
    upd, comp, stats, acc = min(runs, key=lambda run: run[0] + run[1])
    return upd, comp, runs[0][0] + runs[0][1], stats, acc, peak.growth


class ResidentPeak:
    """Peak growth of this process's resident memory inside a ``with`` block, sampled every millisecond.

    The streaming path's memory is torch's, which ``tracemalloc`` does not see; the resident set does. A thread
    reads ``/proc/self/statm`` (Linux); elsewhere the growth of ``ru_maxrss`` is used (a lower bound if the
    process peaked higher before). Short spikes between samples can be missed; the state lives for the whole
    block.
    """

    def __enter__(self) -> "ResidentPeak":
        self._stop, self.growth = threading.Event(), 0
        self._base = _resident_bytes()
        if self._base is None:
            self._max_rss = _max_rss_bytes()
        else:
            self._peak = self._base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _resident_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            self.growth = _max_rss_bytes() - self._max_rss
            return
        self._stop.set()
        self._thread.join()
        self.growth = max(self._peak, _resident_bytes() or 0) - self._base


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# -------------------------------------------------------------------------------------------------- MD
def md_loop(x_a: np.ndarray, x_b: np.ndarray, y_a: np.ndarray, y_b: np.ndarray) -> np.ndarray:
    """MD one neuron at a time (numpy over pairs inside a Python loop over neurons)."""
    dx = np.linalg.norm(x_a - x_b, axis=1)
    keep = dx > 0
    d_in = dx[keep] / dx[keep].max()
    md = np.full(y_a.shape[1], np.nan)
    for j in range(y_a.shape[1]):
        diff = np.abs(y_a[keep, j] - y_b[keep, j])
        median = np.median(diff)
        if median > 0:
            md[j] = np.mean(diff / median / d_in)
    return md


def run_md(x: torch.Tensor, n_pairs: int, d_model: int, repeats: int = 11) -> None:
    g = torch.Generator().manual_seed(1)
    pairs = sample_pairs(x.shape[0], n_pairs, seed=0)
    inputs = torch.randn(2 * n_pairs, d_model, generator=g)  # the pair tokens' MLP input vectors
    x_a, x_b = inputs[:n_pairs], inputs[n_pairs:]
    y_a, y_b = x[pairs[:, 0]].contiguous(), x[pairs[:, 1]].contiguous()
    loop_args = [t.numpy() for t in (x_a, x_b, y_a, y_b)]
    # Each side timed back to back, best of ``repeats`` (as timeit does): interleaving them let the loop evict the
    # vectorised path's buffers from the cache between its runs.
    loop_s = min(_timed(lambda: md_loop(*loop_args)) for _ in range(repeats))
    vec_s = min(_timed(lambda: mapping_difficulty(x_a, x_b, y_a, y_b, with_oi=False)) for _ in range(repeats))
    with_oi_s = min(_timed(lambda: mapping_difficulty(x_a, x_b, y_a, y_b)) for _ in range(repeats))
    threads = torch.get_num_threads()  # the benchmark's own setting (main); negmonitor never changes it
    md, _ = mapping_difficulty(x_a, x_b, y_a, y_b, with_oi=False)
    reference = md_loop(*loop_args)
    diff = np.nanmax(np.abs(md.double().numpy() - reference) / np.abs(reference))
    print(f"MD, {x.shape[1]:,} neurons, P = {n_pairs:,} pairs, d_model = {d_model} (best of {repeats}):")
    print(f"  per-neuron Python loop (numpy inside): {loop_s * 1e3:9.1f} ms")
    print(f"  mapping_difficulty (vectorised, {threads} thread(s)): {vec_s * 1e3:6.1f} ms "
          f"({with_oi_s * 1e3:.1f} ms with the OI ratios of every pair too)")
    print(f"  speed-up: {loop_s / vec_s:.1f}x ({loop_s / with_oi_s:.1f}x with OI)   (goal >= 20x)   "
          f"max relative difference: {diff:.1e}")
    rows = (y_a - y_b).abs_().t().contiguous().numpy().view(np.int32)  # the medians' selection, as MD runs it
    select_s = min(_timed(lambda: rows.copy().partition(n_pairs // 2, axis=1)) for _ in range(repeats))
    copy_s = min(_timed(rows.copy) for _ in range(repeats))
    print(f"  of which numpy's row selection (np.partition, {x.shape[1]:,} rows of {n_pairs:,}): "
          f"{(select_s - copy_s) * 1e3:.1f} ms{_slow_numpy_sort_note()}")


def _slow_numpy_sort_note() -> str:
    """Why the selection may be slow here: numpy's AVX-512 sort (x86-simd-sort) stores with ``vpcompressd`` to
    memory, which AMD Zen 4 (family 0x19) microcodes (numpy/x86-simd-sort#6); numpy has no switch for it but the
    process-wide ``NPY_DISABLE_CPU_FEATURES`` set before numpy is imported."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    if not ("AuthenticAMD" in info and "\ncpu family\t: 25\n" in info):
        return ""
    try:  # numpy >= 2 selects with x86-simd-sort's AVX-512 path where it finds AVX-512
        avx512 = int(np.__version__.split(".")[0]) >= 2 and any(
            "AVX512" in f for f in np.show_config(mode="dicts")["SIMD Extensions"].get("found", []))
    except (TypeError, KeyError, ValueError):
        return ""
    return (" (AMD Zen 4 with numpy's AVX-512 sort: its microcoded compress-stores make numpy's selection several "
            "times slower than on other x86 machines, see numpy/x86-simd-sort#6)") if avx512 else ""


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16,384 tokens x 512 neurons, 32-neuron baseline")
    parser.add_argument("--md-only", action="store_true", help="time MD only (skip the WD comparison)")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--neurons", type=int, default=None)
    parser.add_argument("--baseline-neurons", type=int, default=None, help="neurons the scipy baseline runs on")
    parser.add_argument("--processes", type=int, default=2, help="baseline pool size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of (a) and of (b); the best of each counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for negmonitor (default: as many as the baseline's processes, so both "
                             "sides use the same cores); the streaming path is also timed on 1 thread")
    args = parser.parse_args()
    tokens = args.tokens or (16_384 if args.quick else 65_536)
    neurons = args.neurons or (512 if args.quick else 2_048)
    n_base = min(neurons, args.baseline_neurons or (32 if args.quick else 128))
    threads = args.threads or args.processes
    torch.set_num_threads(threads)

    print(f"synthetic pre-activations: {tokens:,} tokens x {neurons:,} neurons (fp32), a tenth non-Gaussian")
    print(f"machine: {mp.cpu_count()} CPUs; torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"load average {' '.join(f'{v:.1f}' for v in _loadavg())}")
    x = synthetic_activations(tokens, neurons)
    if not args.md_only:
        run_wd(x, args, n_base, threads)
    run_md(x, n_pairs=1000 if tokens >= 2000 else tokens // 2, d_model=512)
    if threads > 1:
        torch.set_num_threads(1)
        print("same on 1 thread:")
        run_md(x, n_pairs=1000 if tokens >= 2000 else tokens // 2, d_model=512)


def run_wd(x: torch.Tensor, args: argparse.Namespace, n_base: int, threads: int) -> None:
    """(a) against (b), accuracy against the exact WD, and the state size."""
    neurons = x.shape[1]
    base_s, serial_s, base_vals, base_idx = time_baseline(x, n_base, args.processes, args.repeats)
    base_all = base_s * neurons / n_base
    ideal_all = serial_s * neurons / args.processes
    print(f"\n(a) scipy.stats.wasserstein_distance per neuron vs a random N(0,1) sample, {args.processes}-process "
          f"pool:\n    timed on {n_base} of {neurons:,} neurons (best of {args.repeats}): {base_s:.2f} s  ->  "
          f"EXTRAPOLATED linearly to "
          f"all {neurons:,}: {base_all:.1f} s\n    (calibration: {serial_s * 1e3:.1f} ms per neuron in one process, "
          f"so a perfectly parallel {args.processes}-process pool would need {ideal_all:.1f} s)")

    # The fused CPU update loads numba and compiles its kernel (or loads it from numba's disk cache) once per
    # process, at the first real-width update: timed apart, so the first pass's memory is the measurement's own.
    wide_enough = BATCH * x.shape[1] >= streaming._FUSED_MIN_VALUES  # smaller chunks keep torch's passes
    with ResidentPeak() as load:
        start = time.perf_counter()
        fused = wide_enough and _fused_cpu.available(x.device)
        load_s = time.perf_counter() - start
    if fused:
        print(f"fused CPU update (numba): loaded or compiled once per process in {load_s:.2f} s, resident memory "
              f"+{load.growth / 2**20:.0f} MiB (numba, LLVM and the kernel; not part of any measurement's state)")
    upd_s, comp_s, first_s, stats, acc, peak = best_streaming(x, args.repeats)
    stream_s = upd_s + comp_s
    print(f"(b) negmonitor NeuronStatsAccumulator, {BATCH:,}-token batches, {threads} thread(s), best of "
          f"{args.repeats}: update {upd_s:.2f} s + compute {comp_s:.2f} s = {stream_s:.2f} s for all {neurons:,} "
          f"neurons (first run {first_s:.2f} s)")
    print(f"    speed-up (a)/(b): {base_all / stream_s:.1f}x as measured; {ideal_all / stream_s:.1f}x against the "
          f"perfectly parallel pool   (goal >= 50x)")
    if fused:  # what the fused CPU update (numba) pays, in this run
        before, streaming._FUSED_ON_CPU = streaming._FUSED_ON_CPU, False
        try:
            passes_upd, passes_comp, _, _, _, _ = best_streaming(x, args.repeats)
        finally:
            streaming._FUSED_ON_CPU = before
        print(f"    with torch's passes instead of the fused CPU update: update {passes_upd:.2f} s + compute "
              f"{passes_comp:.2f} s ({base_all / (passes_upd + passes_comp):.1f}x); the fused update is "
              f"{passes_upd / upd_s:.2f}x faster")
    elif wide_enough:
        print("    (numba is not installed: the update ran torch's passes)")
    else:
        print(f"    ({BATCH:,} x {x.shape[1]:,} chunks are below the fused CPU update's {streaming._FUSED_MIN_VALUES:,} "
              "values: the update ran torch's passes)")
    if threads > 1:
        torch.set_num_threads(1)
        one_upd, one_comp, _, _, _, _ = best_streaming(x, args.repeats)
        torch.set_num_threads(threads)
        print(f"    on 1 thread (best of {args.repeats}): {one_upd + one_comp:.2f} s, "
              f"{base_all / (one_upd + one_comp):.1f}x")

    start = time.perf_counter()
    exact = wasserstein_to_gaussian_split(x)
    exact_s = time.perf_counter() - start
    errs = {k: float((stats[k] - e).abs().max()) for k, e in zip(("wd", "wd_neg", "wd_pos"), exact)}
    base_err = float(np.abs(base_vals - exact[0][torch.from_numpy(base_idx)].numpy()).max())
    print(f"\naccuracy against the exact sort-based WD ({exact_s:.1f} s to compute exactly):")
    print(f"    streaming: max |wd - exact| = {errs['wd']:.5f}, wd_neg {errs['wd_neg']:.5f}, "
          f"wd_pos {errs['wd_pos']:.5f}   (bar 0.005)")
    print(f"    scipy baseline (random-sample noise), on its {n_base} neurons: max |wd - exact| = {base_err:.5f}")
    state = acc.state_bytes()
    print(f"streaming state: {state:,} bytes = {state / 2**20:.1f} MiB for {neurons:,} neurons = "
          f"{state / 2**20 / neurons * 1000:.1f} MiB per 1,000 neurons (goal <= 64), independent of token count")
    print(f"peak memory of the streaming path: resident memory grew by {peak / 2**20:.1f} MiB at most during its "
          f"first pass (state + each call's scratch; the {x.numel() * 4 / 2**20:,.0f} MiB input excluded); "
          f"planned_bytes bound {NeuronStatsAccumulator.planned_bytes(neurons, acc.n_bins, BATCH, acc._block(x.device)) / 2**20:.1f} MiB "
          f"(of torch's allocations; resident memory also counts the heap glibc keeps after frees); "
          f"process peak {_max_rss_bytes() / 2**20:,.0f} MiB\n")


def _loadavg() -> tuple[float, float, float]:
    try:
        import os

        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


if __name__ == "__main__":
    main()
