"""Streaming per-neuron statistics: moments, negative fraction and the Wasserstein distance to N(0, 1).

:class:`NeuronStatsAccumulator` sees each batch of pre-activations ``[tokens, neurons]`` once and keeps only
fixed-size, summable state, so a probe pass never stores activations and DDP's sum-reduction gives the
single-process answer.

How WD streams (one pass):
    ``W1 = ∫|F − Φ|`` needs the CDF of the *standardised* values, but the mean and std are only known at the end.
    So the histogram lives in raw units on a grid fixed by the first batch: per neuron a centre ``c`` (median) and
    a unit ``u`` (robust spread), and ``d = (x − c) / u``. The bins are *log-spaced* in ``|d|`` on each side of
    the centre: the float16 code of ``d`` (sign and magnitude) shifted right keeps the sign, the exponent and the
    top mantissa bits, so a bin is a fixed fraction (1/64 at the default 4096 bins) of its distance from ``c``,
    from ``2^-24 u`` to ``65504 u``; values beyond are kept as exact count-and-sum tails. Being relative, the grid
    keeps its resolution near the bulk when later batches are wider, narrower or shifted.
    Each bin keeps its count and the sum of the dropped low code bits, i.e. the bin's centroid (at float16
    precision, a 1e-5 effect on WD). Collapsing a bin's mass to its centroid leaves ``∫F`` over the bin unchanged,
    so the only error comes from bins inside which ``F − Φ`` changes sign; tails are exact. At compute time the
    non-empty bins are put in value order, their centroids standardised with the exact moments, and
    :func:`~negmonitor.metrics.wasserstein.w1_points_to_gaussian` integrates the point masses exactly.
    Count and low-bit sum share one int64 per bin, so the hot loop is a single ``scatter_add_`` per block of
    neurons, along each neuron's row of bins (the codes are laid out neuron-major for it).

Speed: the update copies each block of neurons into contiguous per-thread scratch buffers (no allocation per
block) and splits the blocks over ``torch.get_num_threads()`` threads; blocks are cache-sized on one thread and
4x larger on several (each op hands the GIL over, so fewer, longer ops scale better). ``benchmarks/wd_speed.py``
measures it. What bounds it on CPU is the histogram's random access into its 32 KiB per neuron.

Measured against the exact sort-based value (max absolute error over Gaussian, heavy-tailed, multimodal, skewed,
near-constant and first-batch-misleading neurons): 4096 bins (default) 0.0004 at 16k tokens, 0.0016 at 1M tokens;
2048 bins 0.0017 and 0.0039. The error floor is a near-Gaussian neuron (F − Φ changes sign in many bins), and
it grows towards about a quarter of the mean bin width (in σ) as the token count grows, hence the default.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from negmonitor.errors import NegmonitorError
from negmonitor.metrics._median import median_along_first_axis
from negmonitor.metrics._threads import block_width, run_split, scratch, worker_count
from negmonitor.metrics.wasserstein import w1_points_to_gaussian

__all__ = ["NeuronStatsAccumulator", "SUPPORTED_N_BINS"]

# float16 codes: 16 bits; shifting right by r leaves 2^(16-r) bins (both signs), 2^(10-r) per octave.
SUPPORTED_N_BINS = (512, 1024, 2048, 4096, 8192)
_FP16_MAX = 65504.0  # |d| at or beyond this goes to the exact tail sums instead of a bin
_MAX_ROWS = 1 << 16  # token rows per internal chunk: fp32 sums of a chunk's signs stay exact
_CPU_BLOCK_ELEMENTS = 1 << 17  # one thread: temporaries of a block stay in cache
_CPU_THREADED_BLOCK_ELEMENTS = 1 << 19  # several threads: fewer GIL hand-offs per element
_GPU_BLOCK_ELEMENTS = 1 << 26  # on GPU a block is as wide as fits ~0.5 GiB of int64 temporaries


def _nan_aware_max(stacked: Tensor) -> Tensor:
    """DDP/merge reduction for grid states: the (shared) value of the ranks whose grid is set (NaN = unset)."""
    filled = torch.where(torch.isnan(stacked), -math.inf, stacked).amax(dim=0)
    return torch.where(torch.isinf(filled) & (filled < 0), math.nan, filled)


class NeuronStatsAccumulator(Metric):
    """Per-neuron moments, negative fraction and WD to N(0, 1) over a stream of ``[tokens, neurons]`` batches.

    State is fixed-size (one int64 per bin plus a few vectors: 32 KiB per neuron at the default) and reduced by
    sum/min/max, so DDP gives the single-process answer; every rank must share the histogram grid, which
    the first :meth:`update` broadcasts from rank 0 when ``torch.distributed`` is initialised (so every rank must
    call :meth:`update` at least once), or which :meth:`set_grid` sets explicitly.

    Args:
        n_neurons: number of neurons (last axis of every batch).
        n_bins: histogram bins per neuron, one of :data:`SUPPORTED_N_BINS`; 4096 gives bins 1/64 to 1/128 of their
            distance from the grid centre (WD error under 0.002 up to 1M tokens); each halving roughly doubles
            to triples the error. A bin holds up to 2^((63 - log2(65536 / n_bins)) // 2) values (2^29 at 4096).
        min_count: neurons with fewer finite values get NaN WD and moments.
        block_elements: CPU batches are processed in blocks of neurons of about this many elements; by default
            2^17 on one thread (cache-sized temporaries and state slices) and 2^19 when several threads share
            the work (fewer, longer ops: each op hands the GIL to the other threads, measured 25% faster at 2
            threads); GPU blocks are up to 2^26 elements.
        sync_grid: broadcast rank 0's grid at the first update under ``torch.distributed``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        NegmonitorError: for a bad ``n_neurons``, ``n_bins`` or ``min_count``, or a batch of the wrong width.

    Example::

        >>> acc = NeuronStatsAccumulator(n_neurons=3)
        >>> acc.update(torch.randn(4096, 3))
        >>> sorted(acc.compute())[:4]
        ['count', 'kurtosis', 'max', 'mean']
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    center: Tensor
    inv_unit: Tensor
    hist: Tensor
    tails: Tensor
    power_sums: Tensor
    count: Tensor
    nonfinite: Tensor
    negative: Tensor
    min_value: Tensor
    max_value: Tensor

    def __init__(
        self,
        n_neurons: int,
        n_bins: int = 4096,
        min_count: int = 2,
        block_elements: int | None = None,
        sync_grid: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if n_neurons < 1:
            raise NegmonitorError(f"n_neurons must be at least 1, got {n_neurons}")
        if n_bins not in SUPPORTED_N_BINS:
            raise NegmonitorError(f"n_bins must be one of {SUPPORTED_N_BINS}, got {n_bins}")
        if min_count < 1:
            raise NegmonitorError(f"min_count must be at least 1, got {min_count}")
        self.n_neurons, self.n_bins, self.min_count = int(n_neurons), int(n_bins), int(min_count)
        self.block_elements = None if block_elements is None else int(block_elements)
        self.sync_grid = bool(sync_grid)
        self._code_shift = 16 - int(math.log2(n_bins))
        self._count_bits = (63 - self._code_shift) // 2  # packed bin: count << low_bits | sum of low code bits
        self._low_bits = 63 - self._count_bits
        self._grid_set = False
        n = self.n_neurons
        self.add_state("center", torch.full((n,), math.nan), dist_reduce_fx=_nan_aware_max)
        self.add_state("inv_unit", torch.full((n,), math.nan), dist_reduce_fx=_nan_aware_max)
        # torchmetrics keeps a copy of every state's default (for reset) and moves it with the metric: for the
        # histogram, ~all of the state, that would double the memory. Its default is one element; reset() rebuilds.
        self.add_state("hist", torch.zeros(1, dtype=torch.long), dist_reduce_fx="sum")
        self.hist = torch.zeros(n * n_bins, dtype=torch.long)
        # Exact tails beyond |d| = 65504: count and sum of d below and above.
        self.add_state("tails", torch.zeros(4, n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("power_sums", torch.zeros(4, n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negative", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("min_value", torch.full((n,), math.inf), dist_reduce_fx="min")
        self.add_state("max_value", torch.full((n,), -math.inf), dist_reduce_fx="max")

    # ----------------------------------------------------------------------------------------------- grid
    @property
    def grid(self) -> tuple[Tensor, Tensor]:
        """``(center, unit)`` per neuron, raw units (NaN until the first update or :meth:`set_grid`)."""
        return self.center.clone(), (1.0 / self.inv_unit.double()).float()

    def copy_grid(self, other: "NeuronStatsAccumulator") -> None:
        """Use exactly ``other``'s grid, so the two states can be merged. Call before updating."""
        if other.n_neurons != self.n_neurons or other.n_bins != self.n_bins:
            raise NegmonitorError("copy_grid needs an accumulator with the same n_neurons and n_bins")
        if not other._grid_ready():
            raise NegmonitorError("the other accumulator has no grid yet — update it (or set_grid) first")
        self._check_no_data()
        self.center = other.center.clone()
        self.inv_unit = other.inv_unit.clone()
        self._grid_set = True

    def set_grid(self, center: Tensor, unit: Tensor) -> None:
        """Fix the histogram grid: per-neuron centre and (positive) unit, raw units. Call before updating."""
        center = torch.as_tensor(center, dtype=torch.float32, device=self.center.device).expand(self.n_neurons)
        unit = torch.as_tensor(unit, dtype=torch.float32, device=self.center.device).expand(self.n_neurons)
        if not (torch.isfinite(center).all() and torch.isfinite(unit).all() and (unit > 0).all()):
            raise NegmonitorError("grid centre must be finite and unit finite and positive for every neuron")
        self._check_no_data()
        self.center = center.clone()
        self.inv_unit = (1.0 / unit).clone()
        self._grid_set = True

    def init_grid(self, x: Tensor) -> None:
        """Set the grid from a calibration batch ``[tokens, neurons]`` (median and robust spread per neuron)."""
        center, unit = _grid_from_batch(self._as_rows(x))
        center, unit = self._broadcast_grid(center, unit)
        self.set_grid(center, unit)

    def _broadcast_grid(self, center: Tensor, unit: Tensor) -> tuple[Tensor, Tensor]:
        """Under ``torch.distributed`` every rank takes rank 0's grid, so histogram states sum across ranks."""
        dist = torch.distributed
        if not (self.sync_grid and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return center, unit
        packed = torch.stack([center.float(), unit.float()])
        group = self.process_group
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(packed, src=src, group=group)
        return packed[0], packed[1]

    def _check_no_data(self) -> None:
        if bool(self.count.sum() + self.nonfinite.sum() > 0):
            raise NegmonitorError("cannot change the histogram grid after update() — call reset() first")

    def _shift(self, j0: int = 0, j1: int | None = None) -> Tensor:
        """``−c/u`` as used in fp32 by the update: ``d = x/u − c/u``."""
        return -(self.center[j0:j1] * self.inv_unit[j0:j1])

    def _grid_ready(self) -> bool:
        if not self._grid_set:
            self._grid_set = bool(torch.isfinite(self.center[:1]).all())
        return self._grid_set

    # --------------------------------------------------------------------------------------------- update
    def _as_rows(self, x: Tensor) -> Tensor:
        x = x.detach()
        if x.dim() < 1 or x.shape[-1] != self.n_neurons:
            raise NegmonitorError(
                f"expected pre-activations [tokens, {self.n_neurons}], got shape {tuple(x.shape)}"
            )
        x = x.reshape(-1, self.n_neurons)
        if not x.is_floating_point():
            raise NegmonitorError(f"expected floating-point pre-activations, got {x.dtype}")
        return x.to(device=self.center.device, dtype=torch.float32)

    def update(self, x: Tensor) -> None:
        """Add a batch ``[tokens, neurons]`` (any float dtype; leading axes are flattened)."""
        rows = self._as_rows(x)
        if rows.shape[0] == 0:
            return
        if not self._grid_ready():
            self.init_grid(rows)
        for r0 in range(0, rows.shape[0], _MAX_ROWS):
            chunk = rows[r0 : r0 + _MAX_ROWS]
            self._update_chunk(chunk, self._block_width(chunk))

    def _block_width(self, chunk: Tensor) -> int:
        """Neurons per block: about ``block_elements`` (else a default by device and thread count), and at least
        one block per thread."""
        workers = worker_count(chunk.device, self.n_neurons)
        if chunk.device.type != "cpu":
            budget = _GPU_BLOCK_ELEMENTS
        elif self.block_elements is not None:
            budget = self.block_elements
        else:
            budget = _CPU_BLOCK_ELEMENTS if workers == 1 else _CPU_THREADED_BLOCK_ELEMENTS
        return block_width(chunk.shape[0], self.n_neurons, budget, workers)

    def forward(self, x: Tensor) -> None:  # type: ignore[override]
        """Same as :meth:`update` (a per-batch WD would need its own grid; call :meth:`compute` at the end)."""
        self.update(x)

    def _update_chunk(self, chunk: Tensor, step: int) -> None:
        """One chunk of rows, in cache-sized blocks of neurons, split across torch's CPU threads.

        The heavy per-element work runs block by block; the per-neuron results of the fast fp32 path land in
        chunk-wide buffers that are folded into the state once per chunk, so small per-neuron ops are not
        repeated for every block. Blocks with non-finite values or far tails take the exact fp64 path instead.
        Blocks own disjoint slices of every state tensor, so threads never write the same element.
        """
        n, t = self.n_neurons, chunk.shape[0]
        stats = torch.empty(8, n, dtype=torch.float32, device=chunk.device)  # mean, se, c2, c3, c4, neg, min, max
        fast = torch.ones(n, dtype=torch.bool, device=chunk.device)
        blocks = [(j0, min(n, j0 + step)) for j0 in range(0, n, step)]

        def work(part: Sequence[tuple[int, int]]) -> None:
            for j0, j1 in part:
                if not self._update_block(chunk[:, j0:j1], j0, stats[:, j0:j1]):
                    fast[j0:j1] = False
                    self._update_block_exact(chunk[:, j0:j1], j0)

        run_split(work, blocks, worker_count(chunk.device, len(blocks)))
        if not bool(fast.any()):
            return
        mean, se, c2, c3, c4, neg = stats[:6].double().unbind(0)
        expanded = _expand_power_sums(t, mean, se, c2, c3, c4)
        self.power_sums += torch.where(fast, expanded, 0.0)
        self.count += torch.where(fast, t, 0)
        self.negative -= torch.where(fast, neg.long(), 0)
        self.min_value = torch.where(fast, torch.minimum(self.min_value, stats[6]), self.min_value)
        self.max_value = torch.where(fast, torch.maximum(self.max_value, stats[7]), self.max_value)

    def _update_block(self, xb: Tensor, j0: int, out: Tensor) -> bool:
        """Fast fp32 path for one block ``[tokens, nb]``: histogram, and per-neuron sums written to ``out``.

        ``out`` rows: block mean of ``d``, centred sums of ``e..e⁴``, minus the negative count, min, max. Every
        temporary is a per-thread scratch buffer and every op writes in place (no allocation per block).
        Returns False (histogram untouched) when the block needs the exact path: non-finite values, or values
        beyond the histogram's range.
        """
        j1 = j0 + xb.shape[1]
        inv, shift = self.inv_unit[j0:j1], self._shift(j0, j1)
        shape, device = tuple(xb.shape), xb.device
        if not xb.is_contiguous():  # a column block of the batch: one copy makes every later read contiguous
            xb = scratch(6, shape, torch.float32, device).copy_(xb)
        torch.amin(xb, dim=0, out=out[6])
        torch.amax(xb, dim=0, out=out[7])
        if not bool(((out[6] * inv + shift > -_FP16_MAX) & (out[7] * inv + shift < _FP16_MAX)).all()):
            return False  # non-finite values, or tails beyond the bins
        d, e, e2 = (scratch(slot, shape, torch.float32, device) for slot in range(3))
        torch.addcmul(shift, xb, inv, out=d)  # (x - c) / u
        torch.mean(d, dim=0, out=out[0])
        torch.sub(d, out[0], out=e)  # centred on the block mean: well-conditioned fp32 powers
        torch.sum(e, dim=0, out=out[1])
        torch.mul(e, e, out=e2)
        torch.sum(e2, dim=0, out=out[2])
        torch.sum(e.mul_(e2), dim=0, out=out[3])
        torch.sum(e2.square_(), dim=0, out=out[4])
        torch.sum(torch.sign(xb, out=e).clamp_(max=0), dim=0, out=out[5])
        buffers = (scratch(3, shape, torch.float16, device), scratch(4, shape[::-1], torch.int64, device),
                   scratch(5, shape[::-1], torch.int64, device))
        column, packed = _raw_bins(d, self._code_shift, self._low_bits, buffers)
        self.hist.view(self.n_neurons, self.n_bins)[j0:j1].scatter_add_(1, column, packed)
        return True

    def _update_block_exact(self, xb: Tensor, j0: int) -> None:
        """Slow path in fp64 with masks: non-finite values are counted and skipped; far tails summed exactly."""
        j1 = j0 + xb.shape[1]
        x64 = xb.double()
        finite = torch.isfinite(x64)
        d64 = torch.where(finite, x64 * self.inv_unit[j0:j1].double() + self._shift(j0, j1).double(), 0.0)
        powers = d64
        for k in range(4):
            self.power_sums[k, j0:j1] += powers.sum(dim=0)
            powers = powers * d64
        below, above = finite & (d64 <= -_FP16_MAX), finite & (d64 >= _FP16_MAX)
        for row, mask in ((0, below), (2, above)):
            self.tails[row, j0:j1] += mask.sum(dim=0)
            self.tails[row + 1, j0:j1] += torch.where(mask, d64, 0.0).sum(dim=0)
        binned = finite & ~below & ~above
        self._add_to_histogram(torch.where(binned, d64, 0.0).float(), binned, j0, j1)
        self.count[j0:j1] += finite.sum(dim=0)
        self.nonfinite[j0:j1] += (~finite).sum(dim=0)
        self.negative[j0:j1] += (finite & (x64 < 0)).sum(dim=0)
        self.min_value[j0:j1] = torch.minimum(self.min_value[j0:j1], torch.where(finite, xb, math.inf).amin(dim=0))
        self.max_value[j0:j1] = torch.maximum(self.max_value[j0:j1], torch.where(finite, xb, -math.inf).amax(dim=0))

    def _add_to_histogram(self, d: Tensor, mask: Tensor | None, j0: int, j1: int) -> None:
        """One ``scatter_add_`` along each neuron's row of bins, adding ``1 << low_bits | low code bits``."""
        column, packed = _raw_bins(d, self._code_shift, self._low_bits)
        if mask is not None:
            packed = torch.where(mask.t(), packed, 0)
        self.hist.view(self.n_neurons, self.n_bins)[j0:j1].scatter_add_(1, column, packed)

    # -------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, Tensor]:
        """Per-neuron ``wd, wd_neg, wd_pos, mean, std, skew, kurtosis, neg_frac, count, nonfinite, min, max``.

        NaN WD, mean, std, skew and kurtosis for neurons with fewer than ``min_count`` finite values; a constant
        neuron has its mean, std 0 and NaN WD, skew and kurtosis.
        """
        n = self.n_neurons
        count = self.count.double()
        inv = self.inv_unit.double()
        mu_d, m2, m3, m4 = _central_moments(self.power_sums, count)
        enough = self.count >= self.min_count
        spread = (self.max_value > self.min_value) & (m2 > 0) & enough
        nan = torch.full((n,), math.nan, dtype=torch.float64, device=count.device)
        safe_m2 = torch.where(spread, m2, 1.0)
        out = {
            "mean": torch.where(enough, (mu_d - self._shift().double()) / inv, nan),
            "std": torch.where(spread, safe_m2.sqrt() / inv, torch.where(enough, 0.0, nan)),
            "skew": torch.where(spread, m3 / safe_m2**1.5, nan),
            "kurtosis": torch.where(spread, m4 / safe_m2**2 - 3.0, nan),
        }
        if bool(self.count.max() >= 1 << self._count_bits):
            raise NegmonitorError(
                f"a neuron saw {int(self.count.max())} values, more than the {1 << self._count_bits} the "
                f"{self.n_bins}-bin histogram can hold — use fewer probe tokens per measurement or more bins"
            )
        wd = _histogram_wd(self.hist.view(n, -1), self._low_bits, self.tails, mu_d, safe_m2.sqrt(), self._code_shift)
        for key, value in zip(("wd", "wd_neg", "wd_pos"), wd):
            out[key] = torch.where(spread, value, nan)
        out["neg_frac"] = torch.where(self.count > 0, self.negative.double() / count.clamp(min=1), nan)
        out["count"] = self.count.clone()
        out["nonfinite"] = self.nonfinite.clone()
        out["min"] = torch.where(self.count > 0, self.min_value.double(), nan)
        out["max"] = torch.where(self.count > 0, self.max_value.double(), nan)
        return {key: out[key] for key in _OUTPUT_ORDER}

    def state_bytes(self) -> int:
        """Bytes held by the state tensors (independent of the number of tokens seen)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._defaults)

    # ---------------------------------------------------------------------------------------------- merge
    def reset(self) -> None:
        """Clear all state, the grid included (the next update picks a new grid)."""
        super().reset()
        self.hist = torch.zeros(self.n_neurons * self.n_bins, dtype=torch.long, device=self.hist.device)
        self._grid_set = False

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another accumulator's state (same grid required; an empty one is ignored)."""
        state = incoming_state.metric_state if isinstance(incoming_state, Metric) else incoming_state
        incoming_ready = bool(torch.isfinite(state["center"][:1]).all())
        if incoming_ready and self._grid_ready():
            if not (torch.equal(state["center"], self.center) and torch.equal(state["inv_unit"], self.inv_unit)):
                raise NegmonitorError(
                    "cannot merge accumulators with different histogram grids — "
                    "give them the same grid first (copy_grid(other) before updating)"
                )
        for name in self._defaults:
            setattr(self, name, _reduce_pair(self._reductions[name], getattr(self, name), state[name]))
        self._grid_set = False  # re-read from the merged state
        self._computed = None  # drop torchmetrics' cached result
        if isinstance(incoming_state, Metric):
            self._update_count += incoming_state._update_count

    @staticmethod
    def planned_bytes(n_neurons: int, n_bins: int, n_rows: int, block_elements: int | None = None) -> int:
        """Upper bound of the bytes one accumulator holds (state) plus its largest transient, for updates of
        ``n_rows`` rows (the memory budget plans with it; ``block_elements=None``: the largest default block).

        Transients: the fp32 copy of a batch and the per-neuron chunk sums; the block temporaries of the update
        (fp32 d, e, e², fp16 codes, two int64 columns, an fp32 copy: 34 bytes per element); the grid's first-batch
        statistics (at most 1,024 rows); and ``compute()``'s chunks of 128 neurons (~20 fp64 values per bin).
        """
        n = int(n_neurons)
        state = n * (int(n_bins) * 8 + 104)
        block = min(max(0, int(n_rows)) * n, block_elements or _GPU_BLOCK_ELEMENTS)
        update = int(n_rows) * n * 4 + n * 8 * 12 + block * 34
        grid = min(1024, max(0, int(n_rows))) * n * 40
        compute = min(n, 128) * int(n_bins) * 8 * 20 + n * 8 * 16
        return state + max(update, grid, compute)


_OUTPUT_ORDER = ("wd", "wd_neg", "wd_pos", "mean", "std", "skew", "kurtosis", "neg_frac", "count", "nonfinite",
                 "min", "max")


def _reduce_pair(reduce_fn: Any, local: Tensor, incoming: Tensor) -> Tensor:
    """Combine one state with another's the way DDP sync would (sum, min, max or the grid reduction)."""
    incoming = incoming.to(local.device)
    if reduce_fn is _nan_aware_max:
        return _nan_aware_max(torch.stack([local, incoming]))
    if getattr(reduce_fn, "__name__", "") == "dim_zero_min":
        return torch.minimum(local, incoming)
    if getattr(reduce_fn, "__name__", "") == "dim_zero_max":
        return torch.maximum(local, incoming)
    return local + incoming


def _grid_from_batch(x: Tensor, max_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """Grid centre (median) and unit (MAD·1.4826, else std, else |centre|/1024, else 1) from finite values.

    Uses at most ``max_rows`` evenly spaced rows: the grid needs a robust location and scale, not exact ones
    (the histogram is relative to it), and medians of a whole large batch cost more than the batch's update.
    """
    if x.shape[0] > max_rows:
        x = x[:: -(-x.shape[0] // max_rows)]
    # Rows come in token order and the median sorts the first and second half of them apart (then merges): even
    # and odd rows go to different halves, so both halves sample the same stretch of text (order-free statistics).
    x = torch.cat([x[0::2], x[1::2]])
    x64 = x.double()
    finite = torch.isfinite(x64)
    if bool(finite.all()):  # sorted neuron-major rows: ~5x numpy.median along the batch axis
        center32 = median_along_first_axis(x)
        center = center32.double()
        mad = median_along_first_axis((x - center32).abs_()).double() * 1.4826
    else:
        masked = torch.where(finite, x64, math.nan)
        center = torch.nan_to_num(masked.nanmedian(dim=0).values, nan=0.0)
        mad = (masked - center).abs().nanmedian(dim=0).values * 1.4826
    n = finite.sum(dim=0).clamp(min=1)
    mean = torch.where(finite, x64, 0.0).sum(dim=0) / n
    std = (torch.where(finite, x64 - mean, 0.0).square().sum(dim=0) / n).sqrt()
    unit = torch.nan_to_num(mad, nan=0.0)
    unit = torch.where(unit > 0, unit, std)
    unit = torch.where(unit > 0, unit, center.abs() / 1024.0)
    unit = torch.where(unit > 0, unit, 1.0)
    tiny = center.abs() * 2.0**-40 + 1e-30  # keep (x - c) / u inside fp32 for any sane later value
    return center.float(), torch.maximum(unit, tiny).float()


def _expand_power_sums(t: int, m: Tensor, se: Tensor, c2: Tensor, c3: Tensor, c4: Tensor) -> Tensor:
    """``[4, n]`` fp64 sums of ``d^1..d^4`` over ``t`` rows from the block mean ``m`` and the sums of ``e^1..e^4``.

    The update sums powers of ``e = d − m`` (centred on the block mean, so the fp32 powers stay well conditioned);
    the binomial expansion back to powers of ``d``, which sum across blocks and ranks, is done here in fp64.
    """
    p1 = se + t * m
    p2 = c2 + 2 * m * se + t * m**2
    p3 = c3 + 3 * m * c2 + 3 * m**2 * se + t * m**3
    p4 = c4 + 4 * m * c3 + 6 * m**2 * c2 + 4 * m**3 * se + t * m**4
    return torch.stack([p1, p2, p3, p4])


def _central_moments(power_sums: Tensor, count: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean and 2nd-4th central moments (fp64) from raw power sums about the grid centre."""
    n = count.clamp(min=1)
    r1, r2, r3, r4 = (power_sums[k] / n for k in range(4))
    mu = r1
    m2 = (r2 - mu**2).clamp(min=0.0)
    m3 = r3 - 3 * mu * r2 + 2 * mu**3
    m4 = r4 - 4 * mu * r3 + 6 * mu**2 * r2 - 3 * mu**4
    return mu, m2, m3, m4


def _raw_bins(
    d: Tensor, shift: int, low_bits: int, buffers: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Raw histogram column (``[0, n_bins)``) and packed increment of each ``d`` ``[tokens, nb]``, neuron-major.

    Both come back ``[nb, tokens]`` (contiguous): ``scatter_add_`` along each neuron's row of bins needs no
    per-neuron offset and runs faster than into a flat index. The float16 code of ``d`` read as an unsigned
    16-bit integer, shifted right by ``shift``, is the column: ``[0, n_bins/2)`` holds ``d ≥ 0`` in ascending
    order, ``[n_bins/2, n_bins)`` holds ``d < 0`` (and −0) with ``|d|`` ascending. The dropped bits are the position
    inside the bin. :func:`_raw_bin_geometry` and :func:`_filled_bins_in_order` put the bins in value order at
    compute time. ``buffers`` (float16 of ``d``'s shape, then int64 and int64 of the transposed shape), when
    given, receive the work in place, so the hot loop allocates nothing.
    """
    if buffers is None:
        half = d.half()
        code = torch.empty(d.shape[::-1], dtype=torch.int64, device=d.device)
        packed = torch.empty_like(code)
    else:
        half, code, packed = buffers
        half.copy_(d)
    if d.device.type == "cpu":
        code.copy_(half.view(torch.uint16).t())  # the transposing copy also widens to int64
    else:  # uint16 is a "barebones" dtype whose op coverage varies by backend: widen int16, then mask
        code.copy_(half.view(torch.int16).t()).bitwise_and_(0xFFFF)
    torch.bitwise_and(code, (1 << shift) - 1, out=packed)
    return code.bitwise_right_shift_(shift), packed.bitwise_or_(1 << low_bits)


@functools.lru_cache(maxsize=8)
def _raw_bin_geometry(shift: int, n_bins: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per raw bin column: the value of its code with zero low bits and the step per low bit (cached: read-only,
    the same for every chunk of every compute).

    Codes within a bin share an exponent, so ``value = base + (low bits) · step`` exactly (``step < 0`` for the
    negative bins, whose magnitude grows with the low bits). Bins of the inf/NaN codes never fill (those values go
    to the tails); they get base ±65504 and step 0.
    """
    unsigned = torch.arange(n_bins, device=device) << shift
    code = torch.where(unsigned >= 1 << 15, unsigned - (1 << 16), unsigned).to(torch.int16)
    base, nxt = code.view(torch.float16).double(), (code + 1).view(torch.float16).double()
    usable = torch.isfinite(base) & torch.isfinite(nxt)
    edge = torch.where(code < 0, -_FP16_MAX, _FP16_MAX).double()
    return torch.where(usable, base, edge), torch.where(usable, nxt - base, 0.0)


def _filled_bins_in_order(
    packed: Tensor, low_bits: int, shift: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The non-empty bins of ``packed`` ``[rows, n_bins]`` as a flat list in value order within each row.

    Returns ``(row, position, centroid, count, filled_per_row)``: ``position`` is the bin's rank by value among
    its row's non-empty bins. Raw columns from ``n_bins/2`` on hold negative values in decreasing order: they go
    first, reversed; the columns below ``n_bins/2`` (ascending values) follow them.
    """
    rows_n, n_bins = packed.shape
    base, step = _raw_bin_geometry(shift, n_bins, packed.device)
    flat = packed.reshape(-1)
    where = _flat_nonzero(flat)  # row-major: rows ascending, raw columns ascending within a row
    values = flat[where]
    log2_bins = n_bins.bit_length() - 1  # n_bins is a power of two
    row, col = where >> log2_bins, where & (n_bins - 1)
    count = (values >> low_bits).double()
    lows = (values & ((1 << low_bits) - 1)).double()
    centroid = base.index_select(0, col) + lows / count * step.index_select(0, col)
    filled = torch.bincount(row, minlength=rows_n)
    negative = col >= n_bins // 2
    n_negative = torch.bincount(row[negative], minlength=rows_n).index_select(0, row)
    rank = torch.arange(row.numel(), device=packed.device) - (filled.cumsum(0) - filled).index_select(0, row)
    # Within a row the positive bins come first in ``where``: a negative bin's rank among negatives is
    # rank - (positives in its row) = rank - filled + n_negative.
    position = torch.where(negative, filled.index_select(0, row) - 1 - rank, n_negative + rank)
    return row, position, centroid, count, filled


def _flat_nonzero(flat: Tensor) -> Tensor:
    """Indices of the non-zero entries of a 1-D tensor (numpy's on CPU: ~2.5x ``torch.nonzero`` there)."""
    if flat.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(flat.numpy() != 0))
    return flat.nonzero().squeeze(1)


def _histogram_wd(
    packed: Tensor, low_bits: int, tails: Tensor, mu_d: Tensor, sd_d: Tensor, shift: int, chunk: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact W1 to N(0, 1) of the bin centroids and the two tail centroids, standardised; chunked over neurons.

    Only non-empty bins become points (empty ones add nothing to the integral); each row is padded to the
    common width by repeating its last point with zero mass (zero-length segments, no rounding noise).
    """
    n = packed.shape[0]
    outs = [torch.full((n,), math.nan, dtype=torch.float64, device=packed.device) for _ in range(3)]

    def work(starts: Sequence[int]) -> None:
        for j0 in starts:
            _histogram_wd_rows(packed, low_bits, tails, mu_d, sd_d, shift, j0, min(n, j0 + chunk), outs)

    starts = list(range(0, n, chunk))
    run_split(work, starts, worker_count(packed.device, len(starts)))
    return outs[0], outs[1], outs[2]


def _histogram_wd_rows(
    packed: Tensor, low_bits: int, tails: Tensor, mu_d: Tensor, sd_d: Tensor, shift: int, j0: int, j1: int,
    outs: list[Tensor],
) -> None:
    """:func:`_histogram_wd` for neurons ``j0:j1``, written into ``outs`` (wd, wd_neg, wd_pos)."""
    row, position, centroid, count, filled = _filled_bins_in_order(packed[j0:j1], low_bits, shift)
    below_n, below_s, above_n, above_s = tails[:, j0:j1]
    has_below, has_above = (below_n > 0).long(), (above_n > 0).long()
    n_points = filled + has_below + has_above
    if int(n_points.max()) == 0:
        return
    width = max(2, int(n_points.max()))
    rows = j1 - j0
    points = torch.zeros(rows, width, dtype=torch.float64, device=packed.device)
    weights = torch.zeros_like(points)
    flat = row * width + position + has_below[row]
    points.view(-1)[flat] = centroid
    weights.view(-1)[flat] = count
    everyone = torch.arange(rows, device=packed.device)
    points[everyone, 0] = torch.where(has_below > 0, below_s / below_n.clamp(min=1), points[everyone, 0])
    weights[everyone, 0] += below_n
    last = (n_points - 1).clamp(min=0)
    above = above_s / above_n.clamp(min=1)
    points[everyone, last] = torch.where(has_above > 0, above, points[everyone, last])
    weights[everyone, last] += torch.where(has_above > 0, above_n, 0.0)
    inside = torch.arange(width, device=packed.device) < n_points[:, None]
    points = torch.where(inside, points, points.gather(1, last[:, None]))
    z = (points - mu_d[j0:j1, None]) / sd_d[j0:j1, None]
    cdf = (weights.cumsum(dim=1) / weights.sum(dim=1, keepdim=True).clamp(min=1))[:, :-1]
    for out, part in zip(outs, w1_points_to_gaussian(z, cdf)):
        out[j0:j1] = part
