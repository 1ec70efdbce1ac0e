"""The streaming update of plain blocks fused into one pass over their values, on CPU (numba).

On CPU torch's update makes ~20 elementwise passes over each block and is bound by memory bandwidth. This kernel
reads each value twice (a check, then the work) and does the rest from registers and a cached tile: ``d = (x −
c) / u``, its float16 code, the histogram increment, the sums of ``d``'s powers 1-4 (in fp64, where torch sums in
fp32 about the block mean), the negative count and the column min and max. What bounds it is the histogram's
read-modify-write, ~2-3 ns a value on one core whether torch or this kernel does it. At Pythia-1.4B width on the
2-core Intel Xeon VM of the benchmarks the update is 1.3-2.1x faster than torch's passes (``benchmarks/scale.py``
and ``benchmarks/wd_speed.py`` print the ratio in each run).

It takes only *plain* blocks, whose values are finite and whose ``d`` stays inside half the float16 range: it
checks each block first and leaves one that is not untouched, for torch's masking path; blocks off CPU take torch's
passes too, and so does everything where numba is not installed. The kernel releases the GIL; :func:`fused_update`
runs the blocks on at most ``torch.get_num_threads()`` threads of its own, joined before it returns (no pool
outlives the call, no global setting changes).

The state it leaves is torch's: the same histogram bit for bit (``d`` rounded once from the exact ``x · inv +
shift``, as the fused multiply-add of torch's ``addcmul``; float16 rounded to nearest even, as torch does), the same
negative counts and extremes, and power sums equal to fp32 rounding (closer to exact here). Written by hand, because
numba has no float16 on CPU: the float32-to-float16 rounding, in integer operations.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BLOCK_NEURONS", "available", "fused_update"]

BLOCK_NEURONS = 256  # the narrowest block worth a kernel call (and a thread) of its own

_WIDTH = 256  # neurons per tile: a tile's column of codes is 128 cache lines, read once per neuron's scatter
_ROWS = 128  # rows per tile (2 x 128 KiB of tiles, in L2)
_MIN_VALUES_PER_THREAD = 1 << 18  # below this a second thread costs more to start than it saves


@functools.lru_cache(maxsize=1)
def _kernel() -> Callable | None:
    """The compiled kernel, or ``None`` where numba is not installed (compiled at first use, cached on disk)."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def update(x, j0, j1, shift, inv, hist, raw, negative, lo, hi, limit, code_shift, low_bits):  # pragma: no cover
        rows = x.shape[0]
        # The check first: column min and max, and whether a value is non-finite or d reaches ``limit``.
        lo[j0:j1] = x[0, j0:j1]
        hi[j0:j1] = x[0, j0:j1]
        nonfinite = 0.0
        for r in range(rows):
            x_row, lo_row, hi_row = x[r, j0:j1], lo[j0:j1], hi[j0:j1]
            for k in range(j1 - j0):
                v = x_row[k]
                lo_row[k] = min(lo_row[k], v)
                hi_row[k] = max(hi_row[k], v)
                nonfinite += v - v  # NaN for NaN and ±inf, else 0
        if nonfinite != 0.0:
            return False
        for j in range(j0, j1):
            if abs(np.float64(lo[j]) * inv[j] + shift[j]) >= limit or abs(np.float64(hi[j]) * inv[j] + shift[j]) >= limit:
                return False
        one = np.int64(1) << low_bits
        low_mask = (1 << code_shift) - 1
        d_tile = np.empty((_ROWS, _WIDTH), np.float32)
        bits_tile = d_tile.view(np.int32)
        code_tile = np.empty((_ROWS, _WIDTH), np.int32)
        s1, s2, s3, s4 = np.empty(_WIDTH), np.empty(_WIDTH), np.empty(_WIDTH), np.empty(_WIDTH)
        below = np.empty(_WIDTH)
        for b0 in range(j0, j1, _WIDTH):
            w = min(j1, b0 + _WIDTH) - b0
            s1[:] = 0.0
            s2[:] = 0.0
            s3[:] = 0.0
            s4[:] = 0.0
            below[:] = 0.0
            inv_b, shift_b = inv[b0 : b0 + w], shift[b0 : b0 + w]
            for r0 in range(0, rows, _ROWS):
                tile_rows = min(rows, r0 + _ROWS) - r0
                for r in range(tile_rows):  # row-major: d, the power sums and the negative count
                    x_row, d_row = x[r0 + r, b0 : b0 + w], d_tile[r, :w]
                    for k in range(w):
                        v = x_row[k]
                        dv = np.float32(np.float64(v) * inv_b[k] + shift_b[k])  # one rounding, as addcmul's FMA
                        d_row[k] = dv
                        e = np.float64(dv)
                        e2 = e * e
                        s1[k] += e
                        s2[k] += e2
                        s3[k] += e2 * e
                        s4[k] += e2 * e2
                        below[k] += 1.0 if v < 0 else 0.0
                    bits_row, code_row = bits_tile[r, :w], code_tile[r, :w]
                    for k in range(w):  # float16 bits of d, to nearest even (|d| < 32760: no overflow)
                        b = bits_row[k]
                        a = b & 0x7FFFFFFF
                        normal = (a - (112 << 23) + 0xFFF + ((a >> 13) & 1)) >> 13
                        s = min(126 - (a >> 23), 31)  # a subnormal float16: the significand shifted right by s
                        m = (a & 0x7FFFFF) | 0x800000
                        q = m >> s
                        rest = m & ((1 << s) - 1)
                        half = 1 << (s - 1)
                        tiny = q + ((rest > half) | ((rest == half) & ((q & 1) == 1)))
                        code_row[k] = ((b >> 16) & 0x8000) | (normal if a >= (113 << 23) else tiny)
                for k in range(w):  # neuron by neuron: one histogram row at a time stays cached
                    h = hist[b0 + k]
                    for r in range(tile_rows):
                        c = code_tile[r, k]
                        h[c >> code_shift] += one + (c & low_mask)
            for k in range(w):
                raw[b0 + k, 0] += s1[k]
                raw[b0 + k, 1] += s2[k]
                raw[b0 + k, 2] += s3[k]
                raw[b0 + k, 3] += s4[k]
                negative[b0 + k] = below[k]
        return True

    return update


def available(device: torch.device) -> bool:
    """Whether the fused update can run for a state on ``device`` (CPU, with numba installed)."""
    return device.type == "cpu" and _kernel() is not None


def fused_update(x: Tensor, blocks: Sequence[tuple[int, int]], shift: Tensor, inv_unit: Tensor, hist: Tensor,
                 raw: Tensor, negative: Tensor, lo: Tensor, hi: Tensor, limit: float, code_shift: int,
                 low_bits: int) -> list[bool]:
    """Add the plain blocks among ``blocks`` (``(j0, j1)`` neuron ranges, not overlapping) of the fp32 chunk ``x``
    ``[t, n]`` (C-contiguous) to the state, and say which blocks were plain.

    A block is plain when its values are finite and its ``d`` stays below ``limit`` in magnitude; its column min and
    max are written into ``lo``/``hi`` ``[n]`` (fp32) either way. A plain block goes into the histogram ``hist``
    ``[n, n_bins]`` (int64) and the fp64 power sums ``raw`` ``[n, 4]``, and its negative counts are written into
    ``negative`` ``[n]`` (fp32); a block that is not is left for the torch path, untouched. ``shift``,
    ``inv_unit``: fp64 ``[n]`` holding the fp32 grid's values. Call only where :func:`available` says so.
    """
    kernel = _kernel()
    arrays = (shift.numpy(), inv_unit.numpy(), hist.numpy(), raw.numpy(), negative.numpy(), lo.numpy(),
              hi.numpy(), float(limit), code_shift, low_bits)
    values = x.numpy()

    def run(block: tuple[int, int]) -> bool:
        return bool(kernel(values, block[0], block[1], *arrays))

    threads = min(len(blocks), torch.get_num_threads(), max(1, x.numel() // _MIN_VALUES_PER_THREAD))
    if threads <= 1:
        return [run(block) for block in blocks]
    with ThreadPoolExecutor(threads, thread_name_prefix="negmonitor-update") as pool:
        return list(pool.map(run, blocks))  # re-raises a block's error here
