"""Exact midpoint medians (as ``numpy.median``) of the columns of a matrix, on its device, in bounded blocks.

Used by MD (the median output difference over pairs) and by the streaming WD's grid (the median and MAD of the
first batch). Each column's median is taken over its ``count`` smallest values: the caller puts the values to
leave out (non-finite values, left-out pairs) where they sort last (NaN or +inf), so nothing is read back.

On CUDA and other devices: ``torch.sort`` of a block of columns and a gather at the two middle ranks. On CPU
``torch.sort`` is slow (~50 ms for 2,048 rows of 1,000 values, torch 2.13), so the rows are sorted by numpy in
place (a CPU tensor and its ndarray share memory: no copy). Rows of 256 or more with one shared count are sorted
as two halves and the two middle order statistics picked from them (:func:`_kth_of_two_sorted`): numpy's SIMD
sort is far faster per value on short rows (2,048 rows of 1,000: 11 ms whole, 2.4 ms as halves, on the AMD EPYC
the benchmarks last ran on; 2.7 ms whole on an earlier machine). A second thread sorting half the rows did not
pay there: torch's OpenMP threads keep the other core busy between ops.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["column_medians", "row_medians_", "median_along_first_axis"]

_HALVES_MIN_LENGTH = 256  # shorter rows are sorted whole
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


def row_medians_(rows: Tensor, count: Tensor | int) -> Tensor:
    """Midpoint median of the ``count`` smallest values of each row of ``rows`` ``[b, m]``, sorting ``rows`` in
    place (so pass a tensor of your own; contiguous on CPU). ``count``: an int or a ``[b]`` tensor."""
    if _NUMPY_ON_CPU and rows.device.type == "cpu":
        k = count if isinstance(count, int) else count.numpy()
        return torch.from_numpy(_row_medians(rows.numpy(), k))
    return _torch_row_medians(rows, count)


def _torch_row_medians(rows: Tensor, count: Tensor | int) -> Tensor:
    """:func:`row_medians_` off CPU: one ``torch.sort`` and a gather at the two middle ranks (no read-back)."""
    b, m = rows.shape
    rows = torch.sort(rows, dim=1).values
    k = torch.as_tensor(count, device=rows.device).expand(b).clamp(min=1)
    low = rows.gather(1, ((k - 1) // 2)[:, None].clamp(max=m - 1))
    high = rows.gather(1, (k // 2)[:, None].clamp(max=m - 1))
    return ((low + high) * 0.5).squeeze(1)


def _row_medians(rows: np.ndarray, count: int | np.ndarray) -> np.ndarray:
    """:func:`row_medians_` on CPU: numpy sorts ``rows`` in place (NaN and +inf sort last).

    Long rows with one shared count are sorted as two halves and the two middle order statistics are picked
    from the halves by :func:`_kth_of_two_sorted`; a row where the pick is not proven (halves from different
    distributions, so the split lies outside the window; NaN next to the middle) is sorted whole, so callers
    should not give rows whose first and second halves differ systematically.
    """
    b, m = rows.shape
    if not isinstance(count, int):
        if count.size and (count == count.flat[0]).all():
            count = int(count.flat[0])
        else:
            rows.sort(axis=1)
            k = np.clip(np.asarray(count, dtype=np.int64), 1, m)
            low = np.take_along_axis(rows, ((k - 1) // 2)[:, None], axis=1)[:, 0]
            high = np.take_along_axis(rows, (k // 2).clip(max=m - 1)[:, None], axis=1)[:, 0]
            return (low + high) * 0.5
    k = min(max(count, 1), m)
    if m < _HALVES_MIN_LENGTH:
        rows.sort(axis=1)
        return (rows[:, (k - 1) // 2] + rows[:, min(k // 2, m - 1)]) * 0.5
    first, second = rows[:, : m // 2], rows[:, m // 2 :]
    if m % 2 == 0 and rows.flags.c_contiguous:
        rows.reshape(2 * b, m // 2).sort(axis=1)  # both halves as rows of their own (a view): ~25% faster
    else:
        first.sort(axis=1)
        second.sort(axis=1)
    low, following, proven = _kth_of_two_sorted(first, second, (k - 1) // 2)
    medians = (low + (following if k % 2 == 0 else low)) * 0.5
    redo = np.flatnonzero(~proven)
    if redo.size:
        whole = rows[redo]
        whole.sort(axis=1)
        medians[redo] = (whole[:, (k - 1) // 2] + whole[:, min(k // 2, m - 1)]) * 0.5
    return medians


def _kth_of_two_sorted(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k``-th and ``k + 1``-th smallest (0-based) of each row's union of sorted rows ``a`` and ``b``, and
    where they are proven.

    The ``k + 1`` smallest are ``a[:i]`` and ``b[:k + 1 - i]`` for some ``i``, and the ``k``-th smallest is the
    least over ``i`` of ``max(a[i - 1], b[k - i])``. For random halves ``i`` lies within a few ``sqrt(m) / 4``
    of ``(k + 1)·h / m``, so only a window of ``i`` around it is scanned. The pick is proven when nothing left
    out is smaller: ``min(a[i], b[k + 1 - i]) >= max(a[i - 1], b[k - i])``; then those ``k + 1`` values are the
    smallest and that minimum is the next order statistic.
    """
    h, g = a.shape[1], b.shape[1]
    centre, reach = (k + 1) * h // (h + g), 8 + int(math.sqrt(h + g))
    lo, hi = max(1, k + 2 - g, centre - reach), min(h - 1, k, centre + reach)  # every index below in range
    if lo > hi:
        nothing = np.zeros(len(a), a.dtype)
        return nothing, nothing, np.zeros(len(a), bool)
    candidates = np.maximum(a[:, lo - 1 : hi], b[:, k - hi : k - lo + 1][:, ::-1])  # i = lo .. hi
    best = candidates.argmin(axis=1)
    rows = np.arange(len(a))
    value, i = candidates[rows, best], lo + best
    following = np.minimum(a[rows, i], b[rows, k + 1 - i])
    return value, following, following >= value
