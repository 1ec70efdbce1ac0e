"""Ranking helpers: the top or bottom fraction of neurons by a metric, and the overlap of two selections.

NaN values (neurons a metric could not be computed for) are never selected, so a selection means "the highest
(lowest) measured values", and at least one neuron is selected whenever one has a value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from negmonitor.errors import NegmonitorError

__all__ = ["top_k_indices", "bottom_k_indices", "jaccard", "count_for_fraction", "percentile_count", "COUNTS"]

COUNTS = ("floor", "percentile")  # how many neurons a fraction selects: negmonitor's rule, the authors' rule


def count_for_fraction(n: int, frac: float) -> int:
    """How many of ``n`` items a fraction selects: ``floor(frac · n)``, at least 1 (0 when ``n`` is 0)."""
    _check_fraction(frac)
    if n <= 0:
        return 0
    return max(1, min(n, int(math.floor(frac * n + 1e-9))))


def percentile_count(values: Tensor, frac: float, top: bool = True) -> int:
    """How many values the authors' rule selects (their ``utils/ablations.py``): those strictly above numpy's
    ``(1 − frac)`` percentile (linear interpolation) for the top, strictly below the ``frac`` percentile for the
    bottom; NaN ignored. For distinct values that is ``ceil((n − 1)·frac)``, one more than ``floor(frac·n)`` for
    most widths. At least one (tied values select none by the rule), and every value at ``frac = 1``."""
    import numpy as np

    _check_fraction(frac)
    flat = torch.as_tensor(values).detach().reshape(-1).double().cpu()
    kept = flat[~torch.isnan(flat)].numpy()
    if not kept.size:
        return 0
    if frac >= 1:
        return int(kept.size)
    if top:
        return max(1, int((kept > np.percentile(kept, 100 * (1 - frac))).sum()))
    return max(1, int((kept < np.percentile(kept, 100 * frac)).sum()))


def _check_fraction(frac: float) -> None:
    if not (isinstance(frac, (int, float)) and 0.0 < float(frac) <= 1.0):
        raise NegmonitorError(f"fraction must be in (0, 1], got {frac}")


def _ranked(values: Tensor, frac: float, descending: bool, k: int | None = None) -> Tensor:
    """One stable sort on the values' device with NaN last; reads back one number (how many are not NaN)."""
    values = torch.as_tensor(values).detach().reshape(-1)
    k = count_for_fraction(values.numel(), frac) if k is None else int(k)
    if values.is_floating_point():
        k = min(k, int((~torch.isnan(values)).sum()))
    key = -values if descending else values  # ascending sorts put NaN last
    return torch.sort(key, stable=True).indices[:k]


def top_k_indices(values: Tensor, frac: float, k: int | None = None) -> Tensor:
    """Indices of the largest ``frac`` of ``values`` (``floor(frac·n)``, at least 1; or ``k`` when given), largest
    first; NaNs skipped.

    Raises:
        NegmonitorError: if ``frac`` is not in (0, 1].
    """
    return _ranked(values, frac, descending=True, k=k)


def bottom_k_indices(values: Tensor, frac: float, k: int | None = None) -> Tensor:
    """Indices of the smallest ``frac`` of ``values`` (at least 1; or ``k``), smallest first; NaNs skipped."""
    return _ranked(values, frac, descending=False, k=k)


def jaccard(a: Tensor | Iterable[int], b: Tensor | Iterable[int]) -> float:
    """Jaccard index ``|A ∩ B| / |A ∪ B|`` of two index sets (in torch, on ``a``'s device); NaN when both are
    empty."""
    set_a = torch.unique(a.reshape(-1) if isinstance(a, Tensor) else torch.as_tensor(list(a), dtype=torch.long))
    set_b = torch.unique(b.reshape(-1) if isinstance(b, Tensor) else torch.as_tensor(list(b), dtype=torch.long))
    set_b = set_b.to(set_a.device)
    both = int(torch.isin(set_a, set_b).sum())
    union = set_a.numel() + set_b.numel() - both
    return both / union if union else math.nan
