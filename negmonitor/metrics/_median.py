"""Exact midpoint medians (as ``numpy.median``) of the columns of a matrix, on its device, in bounded blocks.

Used by MD (the median output difference over pairs) and by the streaming WD's grid (the median and MAD of the
first batch). Each column's median is taken over its ``count`` smallest values: the caller puts the values to
leave out (non-finite values, left-out pairs) where they sort last (NaN or +inf), so nothing is read back.

On CUDA and other devices: ``torch.sort`` of a block of columns and a gather at the two middle ranks. On CPU
``torch.sort`` is slow (~50 ms for 2,048 rows of 1,000 values, torch 2.13), so numpy reorders the rows in place (a
CPU tensor and its ndarray share memory: no copy). Rows of 256 or more with one shared count are partitioned at the
lower middle rank (numpy's SIMD selection) and the upper middle value is the least of the values above it; shorter
rows are sorted whole, which is faster there. Rows known to be non-negative (MD's |Δy|) are ordered as their int32
bits, which numpy selects on faster than on float32. On the AMD EPYC of the last benchmarks, 524 rows of 1,000 values
(one MD block): 1.3 ms partitioned, 2.8 ms sorted as two halves (the way before), 2.9 ms sorted whole. A second
thread sorting half the rows did not pay: torch's OpenMP threads keep the other core busy between ops.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["column_medians", "row_medians_", "median_along_first_axis"]

_PARTITION_MIN_LENGTH = 256  # shorter rows are sorted whole (faster there than a partition)
_BLOCK_ELEMENTS = 1 << 20  # values per block of columns (a transposed copy of a block is the transient)
_NUMPY_ON_CPU = True  # False sorts CPU rows with torch as off CPU, for the tests


def median_along_first_axis(values: Tensor) -> Tensor:
    """Midpoint median along axis 0 of ``[m, n]`` (as ``numpy.median`` for finite values), ``[n]`` in its dtype."""
    return column_medians(values, values.shape[0])


def column_medians(values: Tensor, count: Tensor | int, block_elements: int | None = None) -> Tensor:
    """Midpoint median of the ``count`` smallest values of each column of ``values`` ``[m, n]``.

    ``count`` is an int or a ``[n]`` tensor on ``values``' device; values past it must sort last (NaN or +inf).
    Works on blocks of about ``block_elements`` values (one transposed copy of a block at a time).
    """
    m, n = values.shape
    out = torch.empty(n, dtype=values.dtype, device=values.device)
    width = max(1, (block_elements or _BLOCK_ELEMENTS) // max(1, m))
    for start in range(0, n, width):
        stop = min(n, start + width)
        rows = values[:, start:stop].t().contiguous()
        k = count if isinstance(count, int) else count[start:stop]
        out[start:stop] = row_medians_(rows, k)
    return out


def row_medians_(rows: Tensor, count: Tensor | int, nonnegative: bool = False) -> Tensor:
    """Midpoint median of the ``count`` smallest values of each row of ``rows`` ``[b, m]``, reordering ``rows`` in
    place (so pass a tensor of your own; contiguous on CPU). ``count``: an int or a ``[b]`` tensor.

    ``nonnegative``: every value has its sign bit clear (``abs_()`` output, +inf, +NaN). On CPU fp32 rows are then
    ordered as their int32 bit patterns, which sort as the values do (NaN last): numpy selects on int32 about 1.5x
    faster than on float32 (Intel Xeon, AVX-512: 2,048 rows of 1,000, 2.7 vs 4.2 ms)."""
    if _NUMPY_ON_CPU and rows.device.type == "cpu":
        k = count if isinstance(count, int) else count.numpy()
        values = rows.numpy()
        if nonnegative and values.dtype == np.float32:
            return torch.from_numpy(_row_medians(values.view(np.int32), k, np.float32))
        return torch.from_numpy(_row_medians(values, k))
    return _torch_row_medians(rows, count)


def _torch_row_medians(rows: Tensor, count: Tensor | int) -> Tensor:
    """:func:`row_medians_` off CPU: one ``torch.sort`` and a gather at the two middle ranks (no read-back)."""
    b, m = rows.shape
    rows = torch.sort(rows, dim=1).values
    k = torch.as_tensor(count, device=rows.device).expand(b).clamp(min=1)
    low = rows.gather(1, ((k - 1) // 2)[:, None].clamp(max=m - 1))
    high = rows.gather(1, (k // 2)[:, None].clamp(max=m - 1))
    return ((low + high) * 0.5).squeeze(1)


def _row_medians(rows: np.ndarray, count: int | np.ndarray, values_dtype: type | None = None) -> np.ndarray:
    """:func:`row_medians_` on CPU: numpy reorders ``rows`` in place (NaN and +inf go last, as numpy sorts).
    ``values_dtype``: what ``rows`` hold when they are ordered as another dtype's view (int32 bits of fp32)."""
    b, m = rows.shape

    def midpoint(low: np.ndarray, high: np.ndarray) -> np.ndarray:
        if values_dtype is not None:
            low, high = low.view(values_dtype), high.view(values_dtype)
        return (low + high) * 0.5

    if not isinstance(count, int):
        if count.size and (count == count.flat[0]).all():
            count = int(count.flat[0])
        else:
            rows.sort(axis=1)
            k = np.clip(np.asarray(count, dtype=np.int64), 1, m)
            low = np.take_along_axis(rows, ((k - 1) // 2)[:, None], axis=1)[:, 0]
            high = np.take_along_axis(rows, (k // 2).clip(max=m - 1)[:, None], axis=1)[:, 0]
            return midpoint(low, high)
    k = min(max(count, 1), m)
    lower, upper = (k - 1) // 2, min(k // 2, m - 1)
    if m < _PARTITION_MIN_LENGTH:
        rows.sort(axis=1)
        return midpoint(rows[:, lower], rows[:, upper])
    rows.partition(lower, axis=1)  # rows[:, lower] in place, nothing smaller after it
    low = rows[:, lower]
    # The next order statistic is the least value after it; fmin passes over NaN (sorted last), as a sort would
    # (as int32 bits, NaN is the largest: a plain minimum).
    high = low if upper == lower else np.fmin.reduce(rows[:, lower + 1 :], axis=1)
    return midpoint(low, high)
