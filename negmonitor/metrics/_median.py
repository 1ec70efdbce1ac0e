"""Exact midpoint medians along the first axis of a CPU or GPU tensor, fast on CPU.

Used by MD (the median output difference over pairs) and by the streaming WD's grid (the median and MAD of the
first batch). numpy's AVX-512 sort of contiguous rows is ~10x faster than ``torch.sort`` on CPU and ~5x faster
than ``numpy.median`` along a strided axis, so the values are copied neuron-major and sorted row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from negmonitor.metrics._threads import run_split, scratch, worker_count

__all__ = ["median_along_first_axis"]

_SORT_ROWS = 256  # rows per sort task
_TILE = 16  # columns per tile of the two-step transpose


def median_along_first_axis(values: Tensor) -> Tensor:
    """Midpoint median along axis 0 of ``[m, n]`` (as ``numpy.median``; no NaN handling), ``[n]`` in its dtype.

    On CPU a neuron-major copy (a reused per-thread buffer) is sorted in place with numpy, its rows split across
    torch's CPU threads (numpy releases the GIL while sorting).
    """
    m = values.shape[0]
    if values.device.type == "cpu":
        rows = _transposed_copy(values)
        array = rows.numpy()  # our own copy: sorting it in place is safe
        starts = list(range(0, rows.shape[0], _SORT_ROWS))

        def work(part: Sequence[int]) -> None:
            for start in part:
                array[start : start + _SORT_ROWS].sort(axis=1)

        run_split(work, starts, worker_count(rows.device, len(starts)))
    else:
        rows = torch.sort(values.t(), dim=1).values
    return 0.5 * (rows[:, (m - 1) // 2] + rows[:, m // 2])


def _transposed_copy(values: Tensor) -> Tensor:
    """``values.t()`` as a contiguous scratch copy, transposed in two cache-friendly steps.

    Torch's direct 2-D transpose copy strides through memory on one thread; moving contiguous runs of ``_TILE``
    columns first and then transposing each ``[m, _TILE]`` tile uses the threads and the cache (~1.5x).
    """
    m, n = values.shape
    rows = scratch(0, (n, m), values.dtype, values.device)
    if n % _TILE or not values.is_contiguous():
        return rows.copy_(values.t())
    tiles = scratch(1, (n // _TILE, m, _TILE), values.dtype, values.device)
    tiles.copy_(values.unflatten(1, (n // _TILE, _TILE)).permute(1, 0, 2))
    rows.view(n // _TILE, _TILE, m).copy_(tiles.transpose(1, 2))
    return rows
