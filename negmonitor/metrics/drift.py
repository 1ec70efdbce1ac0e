"""Per-neuron weight drift between two snapshots of a layer's input weights ``[n_neurons, d_in]``.

Two views of how far each neuron's weight row moved: its direction (cosine dissimilarity ``1 − cos``) and its
size (L2 norm of the change); each also divided by the layer mean over neurons, so layers of different scale
compare. Snapshots may be in any float dtype (the monitor keeps bf16 ones in host memory and compares a layer on the
model's device against its live weights, rounded to the snapshot's dtype block by block). The maths is fp32 (fp64
when either snapshot is fp64), a block of rows at a time, so the transient memory stays small at any width. fp32 is enough because ``1 − cos`` is taken as ``‖p̂ − ĉ‖² / 2``, which has no cancellation: it stays
within 1e-3 relative of the fp64 value from ``1 − cos = 0.1`` down to 1e-9 (tested), far finer than a bf16
snapshot resolves (~1e-4 absolute), and about
15x faster than the fp64 version on CPU at Pythia-1.4B's width (0.36 s to 0.024 s a layer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from negmonitor.errors import NegmonitorError

__all__ = ["weight_drift"]

_BLOCK_ELEMENTS = 1 << 20  # work per block: 4-8 MiB per temporary (3x faster on CPU than 16 MiB), at any width


def weight_drift(prev: Tensor, cur: Tensor, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Per-neuron drift from ``prev`` to ``cur`` (both ``[n_neurons, d_in]``); fp64 ``[n_neurons]`` each.

    ``dtype`` rounds both to that dtype first, a block of rows at a time: the same numbers as rounding whole
    copies, without a rounded copy of the layer (the monitor compares live fp32 weights with a bf16 snapshot).

    Returns:
        ``cos_dissim`` (``1 − cos``, NaN for a zero row in either snapshot), ``l2`` (``‖cur − prev‖``), and
        ``cos_dissim_norm`` / ``l2_norm``: the same divided by their mean over neurons (NaNs ignored; NaN when
        that mean is 0 or undefined).

    Raises:
        NegmonitorError: if the shapes differ or are not 2-D.
    """
    if prev.dim() != 2 or prev.shape != cur.shape:
        raise NegmonitorError(
            f"weight snapshots must both be [n_neurons, d_in] of the same shape, got {tuple(prev.shape)} and "
            f"{tuple(cur.shape)}"
        )
    cur = cur.detach().to(prev.device)
    kinds = (dtype, dtype) if dtype is not None else (prev.dtype, cur.dtype)
    work = torch.float64 if torch.float64 in kinds else torch.float32
    rows = max(1, _BLOCK_ELEMENTS // max(1, prev.shape[1]))
    l2_blocks, cos_blocks = [], []
    for r0 in range(0, prev.shape[0], rows):
        p = _rounded(prev[r0 : r0 + rows].detach(), dtype).to(work)
        c = _rounded(cur[r0 : r0 + rows], dtype).to(work)
        l2_blocks.append(torch.linalg.vector_norm(c - p, dim=1).double())
        cos_blocks.append(_cosine_dissimilarity(p, c).double())
    l2 = torch.cat(l2_blocks) if l2_blocks else prev.new_zeros(0, dtype=torch.float64)
    cos_dissim = torch.cat(cos_blocks) if cos_blocks else prev.new_zeros(0, dtype=torch.float64)
    return {
        "cos_dissim": cos_dissim,
        "l2": l2,
        "cos_dissim_norm": _over_mean(cos_dissim),
        "l2_norm": _over_mean(l2),
    }


def _rounded(block: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``block`` rounded to ``dtype`` (itself when ``dtype`` is None or already its dtype)."""
    return block if dtype is None else block.to(dtype)


def _cosine_dissimilarity(p: Tensor, c: Tensor) -> Tensor:
    """``1 − cos(p, c)`` per row as ``‖p̂ − ĉ‖² / 2`` (no cancellation for tiny angles); NaN for zero rows."""
    norm_p = torch.linalg.vector_norm(p, dim=1, keepdim=True)
    norm_c = torch.linalg.vector_norm(c, dim=1, keepdim=True)
    ok = ((norm_p > 0) & (norm_c > 0)).squeeze(1)
    unit_p = p / torch.where(norm_p > 0, norm_p, 1.0)
    unit_p -= c / torch.where(norm_c > 0, norm_c, 1.0)
    dissim = 0.5 * torch.linalg.vector_norm(unit_p, dim=1).square()
    return torch.where(ok, dissim, math.nan)


def _over_mean(values: Tensor) -> Tensor:
    """``values / nanmean(values)``; all NaN when the mean is 0 or there is no finite value."""
    mean = values.nanmean()
    if not bool(torch.isfinite(mean)) or float(mean) == 0.0:
        return torch.full_like(values, math.nan)
    return values / mean
