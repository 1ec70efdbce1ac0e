"""Streaming per-neuron statistics: moments, negative fraction and the Wasserstein distance to N(0, 1).

:class:`NeuronStatsAccumulator` sees each batch of pre-activations ``[tokens, neurons]`` once and keeps only
fixed-size, summable state, so a probe pass never stores activations and DDP's sum-reduction gives the
single-process answer. Everything runs in torch on the batch's device; :meth:`~NeuronStatsAccumulator.update`
never reads a value back to the host off CPU (no ``.item()``, ``bool(tensor)`` or data-dependent shapes), so on a
GPU it only queues kernels and never stalls the training stream. (On CPU, where a read is free, one flag per block
lets all-finite blocks skip the masking passes; the state is the same bit for bit.)

How WD streams (one pass):
    ``W1 = ∫|F − Φ|`` needs the CDF of the *standardised* values, but the mean and std are only known at the end.
    So the histogram lives in raw units on a grid fixed by the first batch: per neuron a centre ``c`` (median) and
    a unit ``u`` (robust spread), and ``d = (x − c) / u``. The bins are *log-spaced* in ``|d|`` on each side of
    the centre: the float16 code of ``d`` (sign and magnitude) shifted right keeps the sign, the exponent and the
    top mantissa bits, so a bin is a fixed fraction (1/64 at the default 4096 bins) of its distance from ``c``,
    from ``2^-24 u`` to ``65504 u``. Being relative, the grid keeps its resolution near the bulk when later
    batches are wider, narrower or shifted.
    Each bin keeps its count and the sum of the dropped low code bits, i.e. the bin's centroid (at float16
    precision, a 1e-5 effect on WD). Collapsing a bin's mass to its centroid leaves ``∫F`` over the bin unchanged,
    so the only error comes from bins inside which ``F − Φ`` changes sign. At compute time each neuron's bins
    are put in value order, their centroids standardised with the exact moments, and
    :func:`~negmonitor.metrics.wasserstein.w1_rows_to_gaussian` integrates the point masses exactly (on CPU only
    the bins the neuron filled, laid end to end: a neuron fills a fraction of its bins).

Special values without a branch: every value lands in some bin, so nothing is tested per batch. Non-finite values
are turned into NaN before coding, so they fill the float16 NaN bins; finite values beyond ``|d| ≥ 65520`` (the
float16 overflow) fill the ±inf bins (the exact tails: their sums beyond ±65520 are kept in fp64). At compute time
those bins give the non-finite count, the tail counts and, with the rest, each neuron's count; they are left out
of the W1 points but for the two tail centroids. Moments use ``d`` with non-finite values set to 0 (adding 0 to
every raw power sum).

Memory: the state is one int64 per bin plus a few vectors per neuron (31.3 MiB per 1,000 neurons at 4096 bins).
The update works on blocks of about ``block_elements`` values (a chunk of rows, a slice of at least 64 neurons)
and :meth:`NeuronStatsAccumulator.planned_bytes` bounds what one accumulator holds at once. Off CPU the update is
~20 elementwise torch passes over each block and the histogram's ``scatter_add_``. On CPU, batches of 2^21 values or
more (real widths, fp32) go through one fused pass per block instead, the whole batch at once
(:mod:`~negmonitor.metrics._fused_cpu`, numba, the same state; at Pythia-1.4B width 1.9-2.0x faster in 16k-row batches,
``benchmarks/scale.py`` and ``wd_speed.py`` print by how much), which is then bound by the histogram's
read-modify-write (~2-3 ns per value on one core); its transients do not grow with the rows. Smaller batches (tiny
models at their default settings) keep torch's passes, so numba is never imported for them. Compute's cost is the ~50
elementwise fp64 passes over each filled bin.

Measured against the exact sort-based value (max absolute error over Gaussian, heavy-tailed, multimodal, skewed,
near-constant and first-batch-misleading neurons): 4096 bins (default) 0.0004 at 16k tokens, 0.0017 at 1M tokens;
2048 bins 0.0017 and 0.0039. The error floor is a near-Gaussian neuron (F − Φ changes sign in many bins), and
it grows towards about a quarter of the mean bin width (in σ) as the token count grows, hence the default.
(Counts alone, bins at their midpoints, would halve the state with int32 bins but give 0.0027 at 16k tokens on a
two-valued neuron: the centroid is what makes point masses such as bf16-quantised values exact.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from negmonitor.errors import NegmonitorError
from negmonitor.metrics import _fused_cpu
from negmonitor.metrics._median import column_medians
from negmonitor.metrics.wasserstein import w1_rows_to_gaussian

__all__ = ["NeuronStatsAccumulator", "SUPPORTED_N_BINS"]

# float16 codes: 16 bits; shifting right by r leaves 2^(16-r) bins (both signs), 2^(10-r) per octave.
SUPPORTED_N_BINS = (512, 1024, 2048, 4096, 8192)
_TAIL = 65520.0  # |d| at or beyond this overflows float16: the exact tails
_MAX_CHUNK_ROWS = 1 << 24  # rows per update chunk: negatives are counted in fp32, exact up to 2^24
_MIN_BLOCK_WIDTH = 64  # neurons per block of a long batch's update (narrower: per-op overhead, poor vector loops)
_CPU_BLOCK_ELEMENTS = 1 << 19  # 16 MiB of update temporaries: per-op overhead amortised (2^17: update 25% slower)
_DEVICE_BLOCK_ELEMENTS = 1 << 21  # elsewhere: 64 MiB of update temporaries (~200 MiB in compute)
_UPDATE_BYTES_PER_ELEMENT = 32  # scratch: d, another fp32, the masked block in fp32, float16, 2 x int64 (30)
_COMPUTE_BYTES_PER_POINT = 192  # ~24 fp64 / int64 arrays per point at the peak of the W1 integration
_WINDOW_BYTES_PER_BIN = 10  # compute's scan on CPU: two bool masks and (at most) an int64 index per bin
_VECTOR_BYTES_PER_NEURON = 256  # per-neuron vectors of an update or compute chunk
_COMPACT_ON_CPU = True  # False runs compute's fixed-shape (non-CPU) path on CPU too, for the tests
_PLAIN_BLOCKS_ON_CPU = True  # False runs every update block through the masking (non-CPU) path, for the tests
_FUSED_ON_CPU = True  # False gives plain CPU blocks torch's passes instead of the fused kernel, for the tests
_FUSED_MIN_VALUES = 1 << 21  # smaller chunks keep torch's passes: no numba import or compile for tiny models


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
        block_elements: values per block of work (rows x neurons) in :meth:`update` and :meth:`compute`: bounds
            their temporaries on every device (see :meth:`planned_bytes`). Default 2^19 on CPU, 2^21 elsewhere.
        sync_grid: broadcast rank 0's grid at the first update under ``torch.distributed``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Raises:
        NegmonitorError: for a bad ``n_neurons``, ``n_bins``, ``min_count`` or ``block_elements``, or a batch of
            the wrong width.

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
    tail_excess: Tensor
    power_sums: Tensor
    negative: Tensor
    min_value: Tensor
    max_value: Tensor
    rows: Tensor

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
        if block_elements is not None and block_elements < 1:
            raise NegmonitorError(f"block_elements must be at least 1, got {block_elements}")
        self.n_neurons, self.n_bins, self.min_count = int(n_neurons), int(n_bins), int(min_count)
        self.block_elements = None if block_elements is None else int(block_elements)
        self.sync_grid = bool(sync_grid)
        self._code_shift = 16 - int(math.log2(n_bins))
        self._count_bits = (63 - self._code_shift) // 2  # packed bin: count << low_bits | sum of low code bits
        self._low_bits = 63 - self._count_bits
        self._grid_set = False  # Python-side flags: reading them never touches the device
        self._has_data = False
        n = self.n_neurons
        self.add_state("center", torch.full((n,), math.nan), dist_reduce_fx=_nan_aware_max)
        self.add_state("inv_unit", torch.full((n,), math.nan), dist_reduce_fx=_nan_aware_max)
        # torchmetrics keeps a copy of every state's default (for reset) and moves it with the metric: for the
        # histogram, ~all of the state, that would double the memory. Its default is one element; reset() rebuilds.
        self.add_state("hist", torch.zeros(1, dtype=torch.long), dist_reduce_fx="sum")
        self.hist = torch.zeros(n * n_bins, dtype=torch.long)
        # Exact tails: sums of (d + 65520) below -65520 and of (d - 65520) above 65520 (counts are in the hist).
        self.add_state("tail_excess", torch.zeros(2, n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("power_sums", torch.zeros(4, n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("negative", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("min_value", torch.full((n,), math.inf), dist_reduce_fx="min")
        self.add_state("max_value", torch.full((n,), -math.inf), dist_reduce_fx="max")
        self.add_state("rows", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    # ------------------------------------------------------------------------------------------ planning
    @staticmethod
    def planned_bytes(n_neurons: int, n_bins: int = 4096, n_rows: int = 2048, block_elements: int | None = None
                      ) -> int:
        """Upper bound of the bytes one accumulator holds at once: its state plus the largest transient of
        :meth:`update` with batches of ``n_rows`` rows (fp32 or narrower; a longer batch that the fused CPU pass
        takes whole adds nothing that grows with its rows) and of :meth:`compute`.

        ``block_elements`` as given to the constructor (``None``: the larger, non-CPU default, an upper bound
        for both). The batch itself is the caller's and not counted.
        """
        block = _DEVICE_BLOCK_ELEMENTS if block_elements is None else int(block_elements)
        state = n_neurons * (n_bins * 8 + 2 * 8 + 4 * 8 + 8 + 4 * 4) + 8
        rows = _chunk_rows(int(n_rows), block)
        width = min(n_neurons, max(1, block // rows))
        update = _UPDATE_BYTES_PER_ELEMENT * rows * width + _VECTOR_BYTES_PER_NEURON * n_neurons
        grid_rows = max(1, min(int(n_rows), GRID_ROWS))
        grid = 24 * grid_rows * min(n_neurons, max(1, block // grid_rows)) + _VECTOR_BYTES_PER_NEURON * n_neurons
        window = _window_rows(n_neurons, n_bins, block, compact=True)
        compute = (_COMPUTE_BYTES_PER_POINT * _group_points(n_bins, block) + _WINDOW_BYTES_PER_BIN * window * n_bins
                   + 12 * 8 * n_neurons + _VECTOR_BYTES_PER_NEURON * n_neurons + 16 * n_bins)
        return state + max(update, grid, compute)

    def state_bytes(self) -> int:
        """Bytes held by the state tensors (independent of the number of tokens seen)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in self._defaults)

    def _block(self, device: torch.device) -> int:
        if self.block_elements is not None:
            return self.block_elements
        return _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS

    # ----------------------------------------------------------------------------------------------- grid
    @property
    def grid_ready(self) -> bool:
        """Whether the histogram grid is fixed (by the first update, :meth:`init_grid` or :meth:`set_grid`)."""
        return self._grid_set

    @property
    def grid(self) -> tuple[Tensor, Tensor]:
        """``(center, unit)`` per neuron, raw units (NaN until the first update or :meth:`set_grid`)."""
        return self.center.clone(), (1.0 / self.inv_unit.double()).float()

    def copy_grid(self, other: "NeuronStatsAccumulator") -> None:
        """Use exactly ``other``'s grid, so the two states can be merged. Call before updating."""
        if other.n_neurons != self.n_neurons or other.n_bins != self.n_bins:
            raise NegmonitorError("copy_grid needs an accumulator with the same n_neurons and n_bins")
        if not other._grid_set:
            raise NegmonitorError("the other accumulator has no grid yet — update it (or set_grid) first")
        self._check_no_data()
        self.center = other.center.clone()
        self.inv_unit = other.inv_unit.clone()
        self._grid_set = True

    def set_grid(self, center: Tensor, unit: Tensor) -> None:
        """Fix the histogram grid: per-neuron centre and (positive) unit, raw units. Call before updating.

        Checks the values (one read-back); :meth:`init_grid` and the first :meth:`update` do not need to.
        """
        center = torch.as_tensor(center, dtype=torch.float32, device=self.center.device).expand(self.n_neurons)
        unit = torch.as_tensor(unit, dtype=torch.float32, device=self.center.device).expand(self.n_neurons)
        if not bool(torch.isfinite(center).all() & torch.isfinite(unit).all() & (unit > 0).all()
                    & torch.isfinite(1.0 / unit).all()):
            raise NegmonitorError("grid centre must be finite and unit finite and positive for every neuron "
                                  "(and at least 3e-39, whose reciprocal fp32 holds)")
        self._check_no_data()
        self._set_grid(center, unit)

    def _set_grid(self, center: Tensor, unit: Tensor) -> None:
        self.center = center.clone()
        self.inv_unit = (1.0 / unit).clone()
        self._grid_set = True

    def take_grid(self, center: Tensor, unit: Tensor) -> None:
        """Fix the grid :func:`grid_from_rows` computed (no checks, no read-back): the probe under DDP takes every
        layer's grid in one calibration forward. Call before updating."""
        self._check_no_data()
        self._set_grid(center, unit)

    def init_grid(self, x: Tensor) -> None:
        """Set the grid from a calibration batch ``[tokens, neurons]`` (median and robust spread per neuron)."""
        self._check_no_data()
        center, unit = _grid_from_batch(self._as_rows(x), self._block(self.center.device))
        self._set_grid(*self._broadcast_grid(center, unit))

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
        if self._has_data:
            raise NegmonitorError("cannot change the histogram grid after update() — call reset() first")

    # --------------------------------------------------------------------------------------------- update
    def _as_rows(self, x: Tensor) -> Tensor:
        """``x`` as ``[tokens, neurons]`` on the state's device, in its own float dtype (blocks widen to fp32)."""
        x = x.detach()
        if x.dim() < 1 or x.shape[-1] != self.n_neurons:
            raise NegmonitorError(
                f"expected pre-activations [tokens, {self.n_neurons}], got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise NegmonitorError(f"expected floating-point pre-activations, got {x.dtype}")
        return x.reshape(-1, self.n_neurons).to(device=self.center.device)

    def update(self, x: Tensor) -> None:
        """Add a batch ``[tokens, neurons]`` (any float dtype; leading axes are flattened). No host sync."""
        rows = self._as_rows(x)
        if rows.shape[0] == 0:
            return
        if not self._grid_set:
            self.init_grid(rows)
        self._has_data = True
        block = self._block(rows.device)
        step = _chunk_rows(rows.shape[0], block)
        # One set of scratch buffers for the whole call, shared by its chunks (a chunk's blocks hold at most
        # ``block`` values): fresh buffers per chunk cost page faults on CPU.
        scratch = _Scratch(min(block, step * rows.shape[1]), rows.device)
        # The fused pass takes the whole batch at once: its transients do not grow with the rows, and it is faster
        # the longer its chunks (at Pythia-1.4B width 1.2-1.5x torch's passes in 512-row chunks, 1.9-2.0x in 16k-row
        # batches, benchmarks/scale.py). torch's passes take what it refuses, in their own chunks.
        fused = self.fuses(rows)
        outer = _MAX_CHUNK_ROWS if fused else step
        for f0 in range(0, rows.shape[0], outer):
            chunk = rows[f0 : f0 + outer]
            left = self._fused_pass(chunk, block) if fused else [(chunk, [(0, self.n_neurons)])]
            for part_rows, columns in left:
                for r0 in range(0, part_rows.shape[0], step):
                    part = part_rows[r0 : r0 + step]
                    width = max(1, block // part.shape[0])
                    self._torch_pass(part, [b for j0, j1 in columns for b in _blocks(j1, width, j0)], scratch,
                                     may_be_plain=not fused)
            self.rows += chunk.shape[0]

    def fuses(self, x: Tensor) -> bool:
        """Whether :meth:`update` gives ``x`` to the fused CPU pass (then the longer its batches, the faster)."""
        return (_PLAIN_BLOCKS_ON_CPU and _FUSED_ON_CPU and x.device.type == "cpu" and x.dtype == torch.float32
                and x.is_contiguous() and x.numel() >= _FUSED_MIN_VALUES and _fused_cpu.available(x.device))

    def forward(self, x: Tensor) -> None:  # type: ignore[override]
        """Same as :meth:`update` (a per-batch WD would need its own grid; call :meth:`compute` at the end)."""
        self.update(x)

    def _fused_pass(self, chunk: Tensor, block: int) -> list[tuple[Tensor, list[tuple[int, int]]]]:
        """The chunk's plain blocks into the state in one fused pass each; returns what is left for torch's passes:
        ``(rows, neuron ranges)``, whose state it left untouched.

        A block refused over the whole chunk (a NaN or a far outlier somewhere in it) is tried again in runs of
        ``block // width`` rows (as many values as one of torch's blocks), so that only the runs holding such a
        value go through torch's masking path, not the whole batch.
        """
        n, width = self.n_neurons, _fused_cpu.block_width(self.n_neurons)
        refused = self._fused_blocks(chunk, _blocks(n, width))
        run = max(1, block // width)
        if not refused:
            return []
        if chunk.shape[0] <= run:
            return [(chunk, refused)]
        left = []
        for r0 in range(0, chunk.shape[0], run):
            part = chunk[r0 : r0 + run]
            still = self._fused_blocks(part, refused)
            if still:
                left.append((part, still))
        return left

    def _fused_blocks(self, rows: Tensor, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """One fused pass over each of ``blocks`` (neuron ranges) of ``rows``; returns the ranges it refused."""
        n, cpu = self.n_neurons, rows.device
        raw = torch.zeros(n, 4, dtype=torch.float64, device=cpu)
        negative = torch.zeros(n, device=cpu)  # fp32: exact up to 2^24 rows a chunk
        lo, hi = torch.full((n,), math.inf, device=cpu), torch.full((n,), -math.inf, device=cpu)
        shift = -(self.center * self.inv_unit)
        done = _fused_cpu.fused_update(rows, blocks, shift.double(), self.inv_unit.double(), self.hist.view(n, -1),
                                       raw, negative, lo, hi, _TAIL / 2, self._code_shift, self._low_bits)
        refused = [block for block, plain in zip(blocks, done) if not plain]
        for j0, j1 in refused:  # their extremes are the torch path's to fold
            lo[j0:j1], hi[j0:j1] = math.inf, -math.inf
        self.power_sums += raw.t()
        self.negative += negative.long()
        self.min_value = torch.minimum(self.min_value, lo)
        self.max_value = torch.maximum(self.max_value, hi)
        return refused

    def _torch_pass(self, chunk: Tensor, blocks: list[tuple[int, int]], scratch: "_Scratch",
                    may_be_plain: bool) -> None:
        """The ``blocks`` (neuron ranges, each ``t · width`` values at most ``scratch``'s size) of a chunk of rows
        in torch's elementwise passes. ``may_be_plain``: on CPU, check each block for the plain path (not for
        blocks the fused pass refused).

        The blocks' per-element work writes into the update call's scratch buffers, reused by every block (fresh
        CPU buffers per block cost page faults that doubled the update's time); the per-neuron results land in
        chunk-wide vectors folded into the state once, so small per-neuron ops are not repeated for every block.
        """
        t, n = chunk.shape
        device = chunk.device
        # mean, e^1..e^4 sums, tail excesses, negatives; neurons of no block add nothing
        sums = torch.zeros(8, n, dtype=torch.float32, device=device)
        lo, hi = torch.full((n,), math.inf, device=device), torch.full((n,), -math.inf, device=device)
        hist = self.hist.view(n, self.n_bins)
        shift = -(self.center * self.inv_unit)
        plain_check = may_be_plain and _PLAIN_BLOCKS_ON_CPU and device.type == "cpu"  # reading a flag back is free
        for j0, j1 in blocks:
            xb, nb = chunk[:, j0:j1], j1 - j0
            d, other, masked = scratch.views(t, nb)
            src = _plain_source(xb, masked, shift[j0:j1], self.inv_unit[j0:j1], lo[j0:j1], hi[j0:j1]) \
                if plain_check else None
            plain = src is not None
            if not plain:
                # The block in fp32 (everything runs in fp32: bf16 ops are slower), non-finite values +inf: the
                # min, the negative count and d (whose infinities become NaN below) need no other masking.
                if xb.dtype == torch.float32:
                    torch.nan_to_num(xb, nan=math.inf, posinf=math.inf, neginf=math.inf, out=masked)
                else:
                    masked.copy_(xb).nan_to_num_(nan=math.inf, posinf=math.inf, neginf=math.inf)
                src = masked
            torch.addcmul(shift[j0:j1], src, self.inv_unit[j0:j1], out=d)  # (x - c) / u
            # Negatives as a float sum of a float comparison (a bool column sum is ~10x slower).
            torch.sum(torch.lt(src, 0, out=other), dim=0, out=sums[7, j0:j1])
            if not plain:
                torch.amin(masked, dim=0, out=lo[j0:j1])
                torch.amax(masked.nan_to_num_(posinf=-math.inf, neginf=-math.inf), dim=0, out=hi[j0:j1])
                # Histogram: non-finite values as NaN (their own bins), finite tails overflow to the ±inf bins.
                d.nan_to_num_(nan=math.nan, posinf=math.nan, neginf=math.nan)
            column, packed = _raw_bins(d, self._code_shift, self._low_bits, scratch.codes(nb, t))
            hist[j0:j1].scatter_add_(1, column, packed)
            if not plain:
                d.nan_to_num_(nan=0.0)  # non-finite values add 0 to every raw power sum
                torch.clamp(d, max=-_TAIL, out=other).add_(_TAIL)
                torch.sum(other, dim=0, out=sums[5, j0:j1])
                torch.clamp(d, min=_TAIL, out=other).sub_(_TAIL)
                torch.sum(other, dim=0, out=sums[6, j0:j1])
            _add_moment_sums(d, other, sums[:5, j0:j1])
        wide = sums.double()
        self.power_sums += _expand_power_sums(t, wide[0], wide[1:5])
        self.tail_excess += wide[5:7]
        self.negative += sums[7].long()
        self.min_value = torch.minimum(self.min_value, lo)
        self.max_value = torch.maximum(self.max_value, hi)

    # -------------------------------------------------------------------------------------------- compute
    def compute(self) -> dict[str, Tensor]:
        """Per-neuron ``wd, wd_neg, wd_pos, mean, std, skew, kurtosis, neg_frac, count, nonfinite, min, max``.

        ``wd_neg`` / ``wd_pos`` split W1 at pre-activation 0: the transport of the neuron's negative values and of
        the rest (see :func:`~negmonitor.metrics.wasserstein.w1_points_to_gaussian`), so an all-negative neuron has
        ``wd_neg = wd``. NaN WD, mean, std, skew and kurtosis for neurons with fewer
        than ``min_count`` finite values; a constant neuron has its mean, std 0 and NaN WD, skew and kurtosis.
        Reads one number back (the row count, to refuse a histogram that may have overflowed); on CPU it also lists
        the filled bins (free there).
        """
        if int(self.rows) >= 1 << self._count_bits:
            raise NegmonitorError(
                f"{int(self.rows)} values per neuron are more than the {1 << self._count_bits} the "
                f"{self.n_bins}-bin histogram can hold — use fewer probe tokens per measurement or more bins"
            )
        n, device, low = self.n_neurons, self.hist.device, self._low_bits
        hist = self.hist.view(n, self.n_bins)
        cols = _special_columns(self._code_shift, self.n_bins, device)
        nonfinite = (hist[:, cols.pos_inf + 1 : cols.half] >> low).sum(dim=1)
        nonfinite += (hist[:, cols.neg_inf + 1 :] >> low).sum(dim=1)
        count = self.rows - nonfinite  # every value lands in a bin
        countf = count.double()
        inv = self.inv_unit.double()
        shift = (-(self.center * self.inv_unit)).double()  # d at x = 0, as the update's fp32 shift
        mu_d, m2, m3, m4 = _central_moments(self.power_sums, countf)
        enough = count >= self.min_count
        lo, hi = self.min_value, self.max_value
        spread = (hi > lo) & (m2 > 0) & enough
        safe_m2 = torch.where(spread, m2, 1.0)
        sd_d = safe_m2.sqrt()
        below_n, above_n = hist[:, cols.neg_inf] >> low, hist[:, cols.pos_inf] >> low
        tails = (below_n, (self.tail_excess[0] - _TAIL * below_n) / below_n.clamp(min=1),
                 above_n, (self.tail_excess[1] + _TAIL * above_n) / above_n.clamp(min=1))  # counts, mean d
        negative = self.negative.double() / countf.clamp(min=1)  # mass below pre-activation 0
        wd = torch.empty(3, n, dtype=torch.float64, device=device)
        compact = _COMPACT_ON_CPU and device.type == "cpu"
        block = self._block(device)
        window = _window_rows(n, self.n_bins, block, compact)
        width = None if compact else cols.width  # off CPU every bin is a point: rows of one width
        for j0 in range(0, n, window):
            packed = hist[j0 : j0 + window]
            flat, lengths = _filled_points(packed, cols, count[j0 : j0 + window] == 0) if compact else (None, None)
            for r0, r1, p0, p1 in _groups(packed.shape[0], cols.width, lengths, _group_points(self.n_bins, block)):
                j, k = j0 + r0, j0 + r1
                z, after, lens, row = _histogram_points(
                    packed[r0:r1], None if flat is None else flat[p0:p1] - r0 * cols.width,
                    None if lengths is None else lengths[r0:r1], low, self._code_shift, count[j:k],
                    [t[j:k] for t in tails], mu_d[j:k], sd_d[j:k])
                wd[:, j:k] = torch.stack(w1_rows_to_gaussian(z, after, lens, negative[j:k], row=row, width=width))
        seen = count > 0
        mean = torch.where(hi == lo, lo.double(), (mu_d - shift) / inv)  # a constant neuron's mean is exact
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        out = {"wd": wd[0], "wd_neg": wd[1], "wd_pos": wd[2], "mean": torch.where(enough, mean, nan),
               "std": torch.where(spread, sd_d / inv, torch.where(enough, 0.0, nan)),
               "skew": m3 / safe_m2**1.5, "kurtosis": m4 / safe_m2**2 - 3.0}
        for key in ("wd", "wd_neg", "wd_pos", "skew", "kurtosis"):
            out[key] = torch.where(spread, out[key], nan)
        out.update(neg_frac=torch.where(seen, negative, nan), count=count, nonfinite=nonfinite,
                   min=torch.where(seen, lo.double(), nan), max=torch.where(seen, hi.double(), nan))
        return {key: out[key] for key in _OUTPUT_ORDER}

    # ---------------------------------------------------------------------------------------------- merge
    def reset(self) -> None:
        """Clear all state, the grid included (the next update picks a new grid)."""
        super().reset()
        self.hist = torch.zeros(self.n_neurons * self.n_bins, dtype=torch.long, device=self.hist.device)
        self._grid_set = False
        self._has_data = False

    def states_to_reduce(self) -> list[tuple[Tensor, str]]:
        """``(state, "sum" | "min" | "max")`` for an in-place reduction across ranks
        (:func:`~negmonitor.distributed.reduce_in_place`); the grid is left out: the ranks share it before updating."""
        return [(self.hist, "sum"), (self.tail_excess, "sum"), (self.power_sums, "sum"), (self.negative, "sum"),
                (self.min_value, "min"), (self.max_value, "max"), (self.rows, "sum")]

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another accumulator's state (same grid required; an empty one is ignored)."""
        state = incoming_state.metric_state if isinstance(incoming_state, Metric) else incoming_state
        incoming_ready = bool(torch.isfinite(state["center"][:1]).all())
        if incoming_ready and self._grid_set:
            if not (torch.equal(state["center"], self.center) and torch.equal(state["inv_unit"], self.inv_unit)):
                raise NegmonitorError(
                    "cannot merge accumulators with different histogram grids — "
                    "give them the same grid first (copy_grid(other) before updating)"
                )
        for name in self._defaults:
            setattr(self, name, _reduce_pair(self._reductions[name], getattr(self, name), state[name]))
        self._grid_set = self._grid_set or incoming_ready
        self._has_data = self._has_data or bool(state["rows"] > 0)
        self._computed = None  # drop torchmetrics' cached result
        if isinstance(incoming_state, Metric):
            self._update_count += incoming_state._update_count


class _Scratch:
    """Buffers for one update call's blocks (freed with it): fp32 ``d``, a second fp32, the block in fp32 with its
    non-finite values masked, the float16 codes and two int64 code arrays."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.d = torch.empty(size, dtype=torch.float32, device=device)
        self.other = torch.empty(size, dtype=torch.float32, device=device)
        self.masked = torch.empty(size, dtype=torch.float32, device=device)
        self.half = torch.empty(size, dtype=torch.float16, device=device)
        self.column = torch.empty(size, dtype=torch.int64, device=device)
        self.packed = torch.empty(size, dtype=torch.int64, device=device)

    def views(self, t: int, nb: int) -> tuple[Tensor, Tensor, Tensor]:
        k = t * nb
        return self.d[:k].view(t, nb), self.other[:k].view(t, nb), self.masked[:k].view(t, nb)

    def codes(self, nb: int, t: int) -> tuple[Tensor, Tensor, Tensor]:
        k = t * nb
        return self.half[:k].view(t, nb), self.column[:k].view(nb, t), self.packed[:k].view(nb, t)


_OUTPUT_ORDER = ("wd", "wd_neg", "wd_pos", "mean", "std", "skew", "kurtosis", "neg_frac", "count", "nonfinite",
                 "min", "max")
GRID_ROWS = 1024  # rows the grid is taken from (a probe pass: of its first window)


def _plain_source(xb: Tensor, masked: Tensor, shift: Tensor, inv_unit: Tensor, lo: Tensor,
                  hi: Tensor) -> Tensor | None:
    """On CPU, the block in fp32 (``xb`` itself, or its copy in ``masked``) when every value is finite and inside
    the float16 range of ``d`` (nearly always), with its column min and max written to ``lo``/``hi``: such a
    block needs no masking passes and has no tails, and gives the same state. ``None`` when it needs the masking
    path (which rewrites ``lo``/``hi``).

    The masking path's four ``nan_to_num`` passes are slow on CPU (scalar loops: a quarter of the update at
    Pythia-1.4B width); one min/max pass tells whether they are needed (NaN reaches both, and ``d`` is
    monotone in ``x``)."""
    src = xb if xb.dtype == torch.float32 else masked.copy_(xb)
    torch.amin(src, dim=0, out=lo)  # (aminmax along dim 0 is 30x slower on CPU, torch 2.13)
    torch.amax(src, dim=0, out=hi)
    ends = torch.addcmul(shift, torch.stack((lo, hi)), inv_unit)
    return src if bool(ends.abs().amax() < _TAIL / 2) else None  # NaN or inf, or d near the float16 overflow


def _add_moment_sums(d: Tensor, other: Tensor, out: Tensor) -> None:
    """Write the block mean of ``d`` and the sums of its powers 1-4 about that mean into ``out`` ``[5, nb]``
    (well conditioned in fp32; expanded to raw sums in fp64 by the caller). Overwrites ``d`` and ``other``."""
    torch.mean(d, dim=0, out=out[0])
    e = d.sub_(out[0])
    torch.sum(e, dim=0, out=out[1])
    torch.sum(torch.mul(e, e, out=other), dim=0, out=out[2])
    torch.sum(e.mul_(other), dim=0, out=out[3])
    torch.sum(other.square_(), dim=0, out=out[4])


def _blocks(stop: int, width: int, start: int = 0) -> list[tuple[int, int]]:
    """``(j0, j1)`` neuron ranges of at most ``width`` covering ``start:stop``."""
    return [(j0, min(stop, j0 + width)) for j0 in range(start, stop, width)]


def _chunk_rows(rows: int, block_elements: int) -> int:
    """Rows per chunk of an update: at most a block's, and beyond 2,048 no more than leave a block
    ``_MIN_BLOCK_WIDTH`` neurons wide (a 16k-token batch in one chunk made 8-wide blocks, 2x slower per value)."""
    return max(1, min(rows, block_elements, max(2048, block_elements // _MIN_BLOCK_WIDTH), _MAX_CHUNK_ROWS))


def _group_points(n_bins: int, block_elements: int) -> int:
    """Points (filled bins) per group of neurons in :meth:`NeuronStatsAccumulator.compute`: about half a block's
    worth (their fp64 temporaries take ~3x an update block's), at least one neuron's every bin."""
    return max(block_elements // 2, n_bins + 2)


def _window_rows(n_neurons: int, n_bins: int, block_elements: int, compact: bool) -> int:
    """Neurons whose histogram rows :meth:`NeuronStatsAccumulator.compute` scans at once: with ``compact``, about
    three blocks' worth of bins (masks and indices of ``_WINDOW_BYTES_PER_BIN``: ~a third of a group's
    temporaries); else one group of every bin of each."""
    if compact:
        rows = 3 * block_elements // n_bins
    else:
        rows = _group_points(n_bins, block_elements) // (n_bins + 2)
    return max(1, min(n_neurons, rows))


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


def grid_from_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """The grid (centre, unit per neuron) that :meth:`NeuronStatsAccumulator.init_grid` fixes from a calibration
    batch ``[tokens, neurons]`` on the same device, computed without an accumulator (two floats a neuron)."""
    x = x.detach().reshape(-1, x.shape[-1])
    return _grid_from_batch(x, _CPU_BLOCK_ELEMENTS if x.device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS)


def _grid_from_batch(x: Tensor, block_elements: int) -> tuple[Tensor, Tensor]:
    """Grid centre (median) and unit (MAD·1.4826, else std, else |centre|/1024, else 1) from finite values.

    Uses at most 1,024 evenly spaced rows: the grid needs a robust location and scale, not exact ones (the
    histogram is relative to it). Non-finite values are left out (NaN sorts last; the median is taken over each
    column's finite count), with no read-back. Works on blocks of about ``block_elements`` values.
    """
    if x.shape[0] > GRID_ROWS:
        x = x[:: -(-x.shape[0] // GRID_ROWS)]
    n = x.shape[1]
    center, unit = torch.empty(n, device=x.device), torch.empty(n, device=x.device)
    width = max(1, block_elements // x.shape[0])
    for j0 in range(0, n, width):
        center[j0 : j0 + width], unit[j0 : j0 + width] = _grid_of_block(x[:, j0 : j0 + width], block_elements)
    return center, unit


def _grid_of_block(x: Tensor, block_elements: int) -> tuple[Tensor, Tensor]:
    """:func:`_grid_from_batch` for a block of columns."""
    x = x.float()
    finite = torch.isfinite(x)
    n = finite.sum(dim=0)
    x = torch.where(finite, x, math.nan)
    center = column_medians(x, n, block_elements)
    mad = column_medians((x - center).abs_(), n, block_elements).double() * 1.4826
    center64 = torch.nan_to_num(center.double(), nan=0.0)
    x = torch.where(finite, x, 0.0)
    count = n.clamp(min=1)
    mean = x.sum(dim=0, dtype=torch.float64) / count
    x.sub_(mean.float()).mul_(finite)  # deviations of the finite values (fp32 is plenty for a grid unit)
    del finite
    std = (x.square_().sum(dim=0, dtype=torch.float64) / count).sqrt()
    unit = torch.nan_to_num(mad, nan=0.0)
    unit = torch.where(unit > 0, unit, std)
    unit = torch.where(unit > 0, unit, center64.abs() / 1024.0)
    unit = torch.where(unit > 0, unit, 1.0)
    tiny = center64.abs() * 2.0**-40 + 1e-30  # keep (x - c) / u inside fp32 for any sane later value
    return center64.float(), torch.maximum(unit, tiny).float()


def _expand_power_sums(t: int, m: Tensor, sums: Tensor) -> Tensor:
    """``[4, n]`` fp64 sums of ``d^1..d^4`` over ``t`` rows from the block mean ``m`` and the sums of ``e^1..e^4``.

    The update sums powers of ``e = d − m`` (centred on the block mean, so the fp32 powers stay well conditioned);
    the binomial expansion back to powers of ``d``, which sum across blocks and ranks, is done here in fp64.
    """
    se, c2, c3, c4 = sums.unbind(0)
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
    inside the bin. :func:`_raw_bin_geometry` puts the bins in value order at compute time. ``buffers`` (float16
    of ``d``'s shape, then int64 and int64 of the transposed shape), when given, receive the work in place.
    """
    if buffers is None:
        buffers = (torch.empty(d.shape, dtype=torch.float16, device=d.device),
                   torch.empty(d.shape[::-1], dtype=torch.int64, device=d.device),
                   torch.empty(d.shape[::-1], dtype=torch.int64, device=d.device))
    half, code, packed = buffers
    half.copy_(d)
    # int16, widened and masked: uint16 is a "barebones" dtype whose op coverage varies by backend.
    code.copy_(half.view(torch.int16).t()).bitwise_and_(0xFFFF)
    torch.bitwise_and(code, (1 << shift) - 1, out=packed).bitwise_or_(1 << low_bits)
    return code.bitwise_right_shift_(shift), packed


@functools.lru_cache(maxsize=8)
def _raw_bin_geometry(shift: int, n_bins: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per raw bin column: the value of its code with zero low bits and the step per low bit (cached: read-only).

    Codes within a bin share an exponent, so ``value = base + (low bits) · step`` exactly (``step < 0`` for the
    negative bins, whose magnitude grows with the low bits). Bins of the inf/NaN codes get base ±65504, step 0.
    """
    unsigned = torch.arange(n_bins, device=device) << shift
    code = torch.where(unsigned >= 1 << 15, unsigned - (1 << 16), unsigned).to(torch.int16)
    base, nxt = code.view(torch.float16).double(), (code + 1).view(torch.float16).double()
    usable = torch.isfinite(base) & torch.isfinite(nxt)
    edge = torch.where(code < 0, -65504.0, 65504.0).double()
    return torch.where(usable, base, edge), torch.where(usable, nxt - base, 0.0)


class _SpecialColumns:
    """Raw columns of the ±inf codes (the tails) and of the NaN codes (non-finite values), and the columns from the
    −inf bin to the +inf bin in value order (the negative half reversed, then the positive half) with their
    geometry: every histogram point but the non-finite ones."""

    def __init__(self, shift: int, n_bins: int, device: torch.device) -> None:
        self.pos_inf, self.neg_inf = 0x7C00 >> shift, 0xFC00 >> shift
        half = n_bins // 2
        nan = [*range(self.pos_inf + 1, half), *range(self.neg_inf + 1, n_bins)]
        self.nan = torch.tensor(nan, dtype=torch.long, device=device)
        order = [*range(self.neg_inf, half - 1, -1), *range(self.pos_inf + 1)]
        self.order = torch.tensor(order, dtype=torch.long, device=device)
        self.width = len(order)
        self.half = half
        self.zero = self.neg_inf - half + 1  # where the +0 bin (raw column 0) is in that order
        base, step = _raw_bin_geometry(shift, n_bins, device)
        self.base, self.step = base.index_select(0, self.order), step.index_select(0, self.order)


@functools.lru_cache(maxsize=8)
def _special_columns(shift: int, n_bins: int, device: torch.device) -> _SpecialColumns:
    return _SpecialColumns(shift, n_bins, device)


def _filled_points(packed: Tensor, cols: _SpecialColumns, empty: Tensor) -> tuple[Tensor, Tensor]:
    """The filled bins of histogram rows ``packed`` (CPU): flat indices into the rows' ``cols.order`` columns
    ``[rows, cols.width]``, ascending (so each row's in value order), and how many each row has. A row with
    nothing but non-finite values (``empty``) gets its +0 bin (massless), so every row has a point.

    numpy writes the negative half's test straight into its reversed place (a view with a negative stride, which
    torch has not) and lists the filled bins: one pass over the rows, no reordered copy.
    """
    values, rows = packed.numpy(), packed.shape[0]
    filled = np.empty((rows, cols.width), dtype=bool)
    np.not_equal(values[:, cols.half : cols.neg_inf + 1], 0, out=filled[:, : cols.zero][:, ::-1])
    np.not_equal(values[:, : cols.pos_inf + 1], 0, out=filled[:, cols.zero :])
    filled[empty.numpy(), cols.zero] = True
    flat = np.flatnonzero(filled)
    ends = np.searchsorted(flat, np.arange(1, rows + 1) * cols.width)
    return torch.from_numpy(flat), torch.from_numpy(np.diff(ends, prepend=0))


def _groups(rows: int, width: int, lengths: Tensor | None, points: int) -> Any:
    """``(r0, r1, p0, p1)``: runs of consecutive rows ``r0:r1`` with their points ``p0:p1``, in as few runs of
    about equal size as hold at most ``points`` points (plus one row's) each, at least one row each.
    ``lengths`` ``None``: every row has ``width`` points, which are not listed."""
    if lengths is None:
        step = max(1, points // width)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step), 0, 0
        return
    ends = np.cumsum(lengths.numpy())
    parts = -(-int(ends[-1]) // points)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="right")
    r0 = p0 = 0
    for r1 in [*cuts.tolist(), rows]:
        if r1 > r0:
            p1 = int(ends[r1 - 1])
            yield r0, r1, p0, p1
            r0, p0 = r1, p1


def _histogram_points(
    packed: Tensor, flat: Tensor | None, lengths: Tensor | None, low_bits: int, shift: int, count: Tensor,
    tails: list[Tensor], mu_d: Tensor, sd_d: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardised point masses of histogram rows ``packed``, laid end to end in value order, for
    :func:`~negmonitor.metrics.wasserstein.w1_rows_to_gaussian`: ``(z, after, lengths, row)``.

    A point per filled bin (``flat``/``lengths`` from :func:`_filled_points`) or, with ``None``, per bin from
    the −inf bin to the +inf bin (fixed shape: an empty bin is a massless point inside its own range, which keeps
    the order and adds nothing). A bin's point is its centroid, ``base + mean low bits · step``, but for the two
    tails, at their exact means (``tails``: below count, mean ``d``, above count, mean ``d``). ``after`` is the
    CDF just after each point (exactly 1 at a row's last), from the running integer count.
    """
    rows, n_bins = packed.shape
    cols = _special_columns(shift, n_bins, packed.device)
    width = cols.width
    if flat is None:
        values = packed.index_select(1, cols.order).reshape(-1)
        lengths = torch.full((rows,), width, dtype=torch.long, device=packed.device)
    n_points = values.shape[0] if flat is None else flat.shape[0]
    row = torch.repeat_interleave(torch.arange(rows, device=packed.device), lengths, output_size=n_points)
    if flat is None:
        col = torch.arange(width, device=packed.device).repeat(rows)
    else:
        col = flat.sub(row, alpha=width)
        values = packed.reshape(-1).index_select(0, cols.order.index_select(0, col).add_(row, alpha=n_bins))
    last = lengths.cumsum(0) - 1
    first = last - (lengths - 1)
    mass = values >> low_bits
    running = mass.cumsum(0)
    d = values.bitwise_and_((1 << low_bits) - 1).double().div_(mass.clamp(min=1))
    d = torch.addcmul(cols.base.index_select(0, col), d, cols.step.index_select(0, col))
    below_n, below, above_n, above = tails
    for end, value, n, tail_col in ((first, below, below_n, 0), (last, above, above_n, width - 1)):
        at = d.index_select(0, end)
        d.index_copy_(0, end, torch.where((col.index_select(0, end) == tail_col) & (n > 0), value, at))
    z = torch.addcmul((-mu_d / sd_d).index_select(0, row), d, sd_d.reciprocal().index_select(0, row))
    before = running.index_select(0, first) - mass.index_select(0, first)  # mass of the rows before
    after = running.sub_(before.index_select(0, row)).double().div_(count.clamp(min=1).double().index_select(0, row))
    return z, after, lengths, row
