"""The streaming update of plain blocks fused into one pass over their values, on CPU (numba).

On CPU torch's update makes ~20 elementwise passes over each block and is bound by memory bandwidth. This kernel
reads each value twice (a check, then the work) and does the rest from registers and a cached tile: ``d = (x −
c) / u``, its float16 code, the histogram increment, the sums of ``d``'s powers 1-4 (in fp64, where torch sums in
fp32 about the block mean), the negative count and the column min and max. What bounds it is the histogram's
read-modify-write, ~2-3 ns a value on one core whether torch or this kernel does it. At Pythia-1.4B width on 2
cores the update is 1.9-2.0x faster than torch's passes in 16k-row batches (a probe's unpadded batch, handed whole)
and 1.2-1.5x in 512-row chunks (``benchmarks/scale.py`` and ``benchmarks/wd_speed.py`` print the ratio in each run).

It takes only *plain* blocks, whose values are finite and whose ``d`` stays inside half the float16 range: it
checks each block first and leaves one that is not untouched, for torch's masking path; blocks off CPU take torch's
passes too, and so does everything where numba is not installed. The kernel releases the GIL; :func:`fused_update`
runs the blocks on at most ``torch.get_num_threads()`` threads of its own, joined before it returns (no pool
outlives the call, no global setting changes).

The state it leaves is torch's: the same histogram bit for bit (``d`` rounded as torch's ``addcmul`` rounds it,
once with a fused multiply-add or twice without, but for a double rounding through fp64 that can move a value to
the next float16 code about once in 2^42; float16 rounded to nearest even, as torch does), the same
negative counts and extremes, and power sums equal to fp32 rounding (closer to exact here). Written by hand, because
numba has no float16 on CPU: the float32-to-float16 rounding, in integer operations.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BLOCK_NEURONS", "available", "block_width", "fused_update"]

BLOCK_NEURONS = 256  # the narrowest kernel call (see block_width)

_WIDTH = 256  # neurons per tile: a tile's column of codes is 128 cache lines, read once per neuron's scatter
_ROWS = 128  # rows per tile (2 x 128 KiB of tiles, in L2)
_MIN_VALUES_PER_THREAD = 1 << 18  # below this a second thread costs more to start than it saves


@functools.lru_cache(maxsize=1)
def _kernel() -> Callable | None:
    """The compiled kernel, or ``None`` where it cannot run: numba not installed, its JIT disabled, or compiling
    failing (warned once; torch's passes run). Compiled at first use, on the calling thread, and cached on disk
    where numba finds a writable cache folder (else compiled in memory, ~6 s once per process)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        import numba
    except Exception as error:  # noqa: BLE001 - installed but broken (llvmlite's library, a numpy mismatch)
        return _give_up("could not be imported", error)
    if numba.config.DISABLE_JIT:  # the kernel would run as Python: hours at real width
        return None
    for cache in (True, False):  # cache=True refuses at once where no cache folder is writable
        try:
            kernel = _compile(numba, cache)
            _warm_up(kernel)
            return kernel
        except Exception as error:  # noqa: BLE001 - any numba or LLVM failure leaves torch's passes
            failure = error
    return _give_up("could not be compiled", failure)


def _give_up(what: str, error: Exception) -> None:
    """Warn that torch's passes run instead (once: :func:`_kernel` caches the ``None``, even where warnings are
    errors, so that every update does not try again)."""
    reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
    try:
        warnings.warn(f"negmonitor: numba is installed but the fused CPU update {what} ({reason}); torch's "
                      "elementwise passes run instead (same statistics, slower)", RuntimeWarning, stacklevel=3)
    except Warning:  # -W error: still fall back, once
        pass
    return None


def _warm_up(kernel: Callable) -> None:
    """Compile ``kernel`` for the argument types :func:`fused_update` passes, on a tiny block."""
    n = 2
    kernel(np.zeros((1, n), np.float32), 0, n, np.zeros(n), np.ones(n), np.zeros((n, 16), np.int64),
           np.zeros((n, 4)), np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32), 16.0, 12,
           34, True)


def _compile(numba, cache: bool) -> Callable:  # noqa: ANN001 - the numba module
    @numba.njit(nogil=True, cache=cache, boundscheck=False)
    def update(x, j0, j1, shift, inv, hist, raw, negative, lo, hi, limit, code_shift, low_bits, fma):  # pragma: no cover
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
            d_lo, d_hi = np.float64(lo[j]) * inv[j] + shift[j], np.float64(hi[j]) * inv[j] + shift[j]
            if not (abs(d_lo) < limit and abs(d_hi) < limit):  # NaN (a NaN or infinite grid) is refused too
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
                        if fma:  # one rounding, as torch's addcmul where it is built with a fused multiply-add
                            dv = np.float32(np.float64(v) * inv_b[k] + shift_b[k])
                        else:  # two, as where it is not
                            dv = np.float32(v * np.float32(inv_b[k])) + np.float32(shift_b[k])
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
                        s = min(max(126 - (a >> 23), 1), 31)  # a subnormal float16: the significand >> s
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


@functools.lru_cache(maxsize=1)
def _torch_rounds_addcmul_once() -> bool:
    """Whether torch's CPU ``addcmul`` rounds ``shift + x · inv`` once (built with a fused multiply-add, as the
    x86-64 wheels are) or twice, so that the kernel's ``d`` is torch's bit for bit either way: (1 + 2^-12)² − 1 is
    2^-11 + 2^-24 rounded once and 2^-11 rounded twice, in the vector loop and in the scalar tail alike."""
    x = torch.full((67,), 1 + 2.0**-12)
    return bool((torch.addcmul(torch.full_like(x, -1.0), x, x) != 2.0**-11).all())


def block_width(n_neurons: int) -> int:
    """Neurons per kernel call: about four calls per thread, at least :data:`BLOCK_NEURONS`. Fewer, wider calls
    cost less to hand out (at Pythia-1.4B width on 2 threads 1,024- and 2,048-wide calls took 1.58-1.64 s a layer,
    256-wide ones 1.72-1.99 s), and four per thread keep every thread busy on a many-core machine."""
    return max(BLOCK_NEURONS, -(-n_neurons // (4 * torch.get_num_threads())))


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
              hi.numpy(), float(limit), int(code_shift), int(low_bits), _torch_rounds_addcmul_once())
    values = x.numpy()

    def run(block: tuple[int, int]) -> bool:
        return bool(kernel(values, block[0], block[1], *arrays))

    threads = min(len(blocks), torch.get_num_threads(), max(1, x.numel() // _MIN_VALUES_PER_THREAD))
    if threads <= 1:
        return [run(block) for block in blocks]
    with ThreadPoolExecutor(threads, thread_name_prefix="negmonitor-update") as pool:
        return list(pool.map(run, blocks))  # re-raises a block's error here
