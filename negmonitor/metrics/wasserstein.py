"""Exact 1-Wasserstein distance of each neuron's standardised pre-activations to N(0, 1).

For one dimension, ``W1(P, N(0,1)) = ∫ |F(z) − Φ(z)| dz``. The empirical CDF ``F`` of a sample is a step
function, so the integral over each segment between consecutive sorted values is closed-form, using the
antiderivative of ``Φ``: ``∫Φ(z) dz = zΦ(z) + φ(z)``. Summing the segments gives the exact distance (no sampling of
the normal, no quadrature). The negative-side part ``wd_neg`` is the transport of the mass at negative
*pre-activations*: in the quantile form ``W1 = ∫₀¹ |F⁻¹(u) − Φ⁻¹(u)| du``, the ``u`` below the neuron's negative
fraction, i.e. the area between the CDFs below that height. ``wd = wd_neg + wd_pos``; an all-negative neuron has
``wd_neg = wd``, a neuron symmetric about 0 half of it. (Splitting at ``z = 0`` would split at the neuron's mean.)

:func:`w1_rows_to_gaussian` is the shared core: it takes rows of sorted point masses laid end to end (rows of a
sorted sample through :func:`w1_points_to_gaussian`, or each neuron's filled histogram bins, which is what
:mod:`negmonitor.metrics.streaming` calls at compute time).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from negmonitor.errors import NegmonitorError

__all__ = ["wasserstein_to_gaussian", "wasserstein_to_gaussian_split", "w1_points_to_gaussian", "w1_rows_to_gaussian"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_PICK_ON_CPU = True  # False runs the dense (non-CPU) path on CPU too, for the tests
_RUNNING_SUMS_ON_CPU = True  # False sums rows of different lengths as off CPU (no float cumsum), for the tests
# Elements per working chunk of the reference (4 MiB per fp64 temporary: cache-friendly, no page-fault churn).
_CHUNK_ELEMENTS = 1 << 19


def _phi_antiderivative(z: Tensor) -> Tensor:
    """``G(z) = zΦ(z) + φ(z)``, so that ``∫_a^b Φ = G(b) − G(a)``; ``G(−∞) = 0``."""
    return _phi_and_antiderivative(z)[1]


def _phi_and_antiderivative(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(Φ(z), G(z))`` with ``G(z) = zΦ(z) + φ(z)``.

    ``Φ = (1 + erf(z/√2)) / 2``: its absolute error stays ~1e-16 in the tails (all these integrals need), and erf
    is ~1.4x faster than ``ndtr`` and 2x faster than ``erfc``.
    """
    cdf = torch.special.erf(z * _INV_SQRT_2).mul_(0.5).add_(0.5)
    return cdf, (z * z).mul_(-0.5).exp_().mul_(_INV_SQRT_2PI).addcmul_(z, cdf)


def w1_points_to_gaussian(
    z: Tensor, cdf: Tensor, q: Tensor | None = None, level: Tensor | float = 0.5
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact ``∫|F − Φ|`` for a distribution made of point masses, split at the quantile ``level``.

    Args:
        z: ``[rows, k]`` point positions, ascending along the last axis (fp64 recommended).
        cdf: ``[rows, k − 1]`` (or broadcastable) value of ``F`` just after each point but the last (after the last
            it is 1); points with no mass repeat the previous value.
        q: optional precomputed ``Φ⁻¹(cdf)``, e.g. shared by all rows of a plain sample.
        level: ``u0``, a number or ``[rows, 1]``: the part of the transport of the mass below it (the quantile
            form ``W1 = ∫₀¹ |F⁻¹(u) − Φ⁻¹(u)| du`` taken over ``u < u0``). With ``u0`` the fraction of values
            below a threshold, that is the part carried by those values: the negative fraction splits at
            pre-activation 0, so an all-negative neuron has all of its distance below.

    Returns:
        ``(wd, wd_below, wd_above)``, each ``[rows]``, with ``wd = wd_below + wd_above``.
    """
    rows, k = z.shape
    last = torch.ones(rows, 1, dtype=z.dtype, device=z.device)
    after = torch.cat([cdf.expand(rows, k - 1), last], dim=1).reshape(-1)
    if q is not None:
        q = torch.cat([q.expand(rows, k - 1), last], dim=1).reshape(-1)
    level = torch.as_tensor(level, dtype=z.dtype, device=z.device).reshape(-1).expand(rows)
    lengths = torch.full((rows,), k, dtype=torch.long, device=z.device)
    return w1_rows_to_gaussian(z.reshape(-1), after, lengths, level, q, width=k)


def w1_rows_to_gaussian(
    z: Tensor, after: Tensor, lengths: Tensor, level: Tensor, q: Tensor | None = None, row: Tensor | None = None,
    width: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`w1_points_to_gaussian` for rows of different lengths laid end to end (no padding).

    Args:
        z: ``[P]`` point positions: each row's points consecutive and ascending, every row at least one point.
        after: ``[P]`` value of ``F`` just after each point (1 at a row's last point).
        lengths: ``[rows]`` points per row (summing to ``P``).
        level: ``[rows]`` quantile ``u0`` at which each row is split.
        q: optional ``[P]`` ``Φ⁻¹(after)``.
        row: optional ``[P]`` row of each point (``repeat_interleave`` of ``lengths``), if the caller has it.
        width: every row's number of points, when the caller knows they all have the same: the per-row sums
            are then sums over a ``[rows, width]`` view.

    Returns:
        ``(wd, wd_below, wd_above)``, each ``[rows]``.

    Each segment ``[a, b]`` from a point to the next of its row, where ``F = c``, gives ``∫_a^b |c − Φ|`` and,
    for the part below ``u0`` (``∫ |min(F, u0) − min(Φ, u0)|``), with ``q0 = Φ⁻¹(u0)``: the same integral over
    ``[min(a, q0), min(b, q0)]`` with ``c' = min(c, u0)``, plus ``(u0 − c)⁺ · (max(b, q0) − max(a, q0))`` right
    of ``q0``. ``Φ`` and ``G`` are evaluated once per point (``G`` is increasing, so ``G(min(z, q0)) =
    min(G(z), G(q0))``); the few segments where ``Φ`` crosses ``c`` share one ``Φ⁻¹(c)`` and ``G`` of it between
    the two parts (a crossing left of ``q0`` needs ``c < u0``). Per-row sums take no floating-point ``cumsum``
    off CPU (:func:`_row_sums`).
    """
    n_points, rows = z.shape[0], lengths.shape[0]
    if row is None:
        row = torch.repeat_interleave(torch.arange(rows, device=z.device), lengths, output_size=n_points)
    last = lengths.cumsum(0) - 1
    first = last - (lengths - 1)
    phi, g = _phi_and_antiderivative(z)
    u0 = level.to(z.dtype).clamp(0.0, 1.0)
    q0 = torch.special.ndtri(u0).clamp(-1e6, 1e6)  # beyond any standardised value (|z| < sqrt(n))
    g_q0 = _phi_antiderivative(q0)
    # Segment i runs from point i to point i + 1; those from a row's last point are zeroed at the end.
    q0_at, u0_at = q0.index_select(0, row), u0.index_select(0, row)
    zc, g_c = torch.minimum(z, q0_at), torch.minimum(g, g_q0.index_select(0, row))
    full = torch.addcmul(_ahead(g), after, _ahead(z), value=-1.0).abs_()
    below = torch.addcmul(_ahead(g_c), torch.minimum(after, u0_at), _ahead(zc), value=-1.0).abs_()
    right = (u0_at - after).clamp_(min=0.0).mul_(_ahead(torch.maximum(z, q0_at)))
    del q0_at
    cross = (phi[:-1] < after[:-1]) & (after[:-1] < phi[1:])
    pick = _PICK_ON_CPU and z.device.type == "cpu"
    at = cross.nonzero().squeeze(1) if pick else None  # CPU: only the crossing segments (free to find there)

    def ends(t: Tensor) -> tuple[Tensor, Tensor]:  # a per-point array at both ends of those segments
        return (t[:-1], t[1:]) if at is None else (t.index_select(0, at), t.index_select(0, at + 1))

    (a, b), (ga, gb), (ac, bc), (gca, gcb), (c, _) = ends(z), ends(g), ends(zc), ends(g_c), ends(after)
    qq = torch.special.ndtri(c) if q is None else ends(q)[0]
    qq = torch.minimum(torch.maximum(qq, a), b)  # guard against rounding at the ends
    g_q = _phi_antiderivative(qq)
    crossed = c * (2.0 * qq - a - b) + ga + gb - 2.0 * g_q
    # Below u0 the same crossing (q <= q0) on the clipped segment, when it is left of q0 and c < u0.
    crossed_low = c * (2.0 * qq - ac - bc) + gca + gcb - 2.0 * g_q
    inner = (c < ends(u0_at)[0]) & (ac < bc)
    if at is None:
        full[:-1] = torch.where(cross, crossed, full[:-1])
        below[:-1] = torch.where(cross & inner, crossed_low, below[:-1])
    else:
        full.index_copy_(0, at, crossed)
        below.index_copy_(0, at, torch.where(inner, crossed_low, below.index_select(0, at)))
    below += right
    full.index_fill_(0, last, 0.0)
    below.index_fill_(0, last, 0.0)
    # Tails: (−∞, z_1] where F = 0 gives ∫Φ = G(z_1); [z_k, ∞) where F = 1 gives ∫(1 − Φ) = G(−z_k). Below u0:
    # ∫ min(Φ, u0) = G(min(z_1, q0)) + u0 · (z_1 − q0)⁺ on the left; on the right, when z_k < q0,
    # ∫_{z_k}^{q0} (u0 − Φ) = G(−z_k) − G(−q0) − (1 − u0)(q0 − z_k) (so u0 = 1 leaves exactly wd's tail).
    z1, zk = z.index_select(0, first), z.index_select(0, last)
    g_right = _phi_antiderivative(-zk)
    wd = g.index_select(0, first) + g_right + _row_sums(full, first, last, row, width)
    part = g_c.index_select(0, first) + u0 * (z1 - q0).clamp(min=0.0)
    part += torch.where(zk < q0, g_right - _phi_antiderivative(-q0) - (1.0 - u0) * (q0 - zk), 0.0)
    part += _row_sums(below, first, last, row, width)
    return wd, part, wd - part


def _row_sums(t: Tensor, first: Tensor, last: Tensor, row: Tensor, width: int | None) -> Tensor:
    """Sum of ``t`` over each row's points ``first..last`` (``row``: each point's row).

    Rows of one ``width``: a sum over a ``[rows, width]`` view. Rows of different lengths: on CPU a running sum's
    differences (faster there than ``segment_reduce`` or ``index_add_``; the terms are small and positive, so
    nothing cancels badly); elsewhere ``index_add_`` by row, since a floating-point ``cumsum`` on CUDA raises under
    ``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``) and ``index_add_`` has a
    deterministic kernel there.
    """
    if width is not None:
        return t.view(-1, width).sum(dim=1)
    if _RUNNING_SUMS_ON_CPU and t.device.type == "cpu":
        running = t.cumsum(0)
        return running.index_select(0, last) - running.index_select(0, first) + t.index_select(0, first)
    return torch.zeros(first.shape[0], dtype=t.dtype, device=t.device).index_add_(0, row, t)


def _ahead(t: Tensor) -> Tensor:
    """``t[i + 1] − t[i]`` for each ``i`` (0 for the last)."""
    out = torch.empty_like(t)
    torch.sub(t[1:], t[:-1], out=out[:-1])
    out[-1:] = 0.0
    return out


def _sorted_rows(x: Tensor) -> Tensor:
    """``x.t()`` sorted along each row, as fp64 (numpy's vectorised sort on CPU is ~10x faster than torch's)."""
    rows = x.detach().t()
    if rows.dtype not in (torch.float32, torch.float64):
        rows = rows.to(torch.float32)  # exact for fp16 / bf16
    if rows.device.type == "cpu":
        return torch.from_numpy(np.sort(rows.numpy(), axis=1)).to(torch.float64)
    return torch.sort(rows.to(torch.float64), dim=1).values


def _standardise_sorted(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Standardise each sorted row (population std); return ``(z, ok)`` where ``ok`` marks usable rows.

    A row is usable when it is finite and not constant (``max > min``, an exact test, so no rounding-level std).
    """
    ok = torch.isfinite(rows).all(dim=1) & (rows[:, -1] > rows[:, 0])
    safe = torch.where(ok[:, None], rows, 0.0)
    mean = safe.mean(dim=1, keepdim=True)
    std = safe.std(dim=1, correction=0, keepdim=True)
    std = torch.where(ok[:, None], std, 1.0)
    return (safe - mean) / std, ok


def wasserstein_to_gaussian_split(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact per-neuron W1 to N(0, 1) of standardised values, split where the pre-activation is 0.

    Args:
        x: ``[tokens, neurons]`` pre-activations, any float dtype (computed in fp64).

    Returns:
        ``(wd, wd_neg, wd_pos)``, each fp64 ``[neurons]``: ``wd_neg`` integrates ``x < 0`` (standardised
        ``z < −mean/std``), ``wd_pos`` the rest. NaN for neurons that are constant, have fewer than
        two tokens, or contain a non-finite value (no warnings).
    """
    if x.dim() != 2:
        raise NegmonitorError(f"expected a [tokens, neurons] tensor, got shape {tuple(x.shape)}")
    n_tokens, n_neurons = x.shape
    outs = [torch.full((n_neurons,), math.nan, dtype=torch.float64, device=x.device) for _ in range(3)]
    if n_tokens < 2 or n_neurons == 0:
        return outs[0], outs[1], outs[2]
    cdf = torch.arange(1, n_tokens, dtype=torch.float64, device=x.device) / n_tokens
    q = torch.special.ndtri(cdf)
    step = max(1, _CHUNK_ELEMENTS // n_tokens)
    for start in range(0, n_neurons, step):
        block = x[:, start : start + step]
        z, ok = _standardise_sorted(_sorted_rows(block))
        negative = (block < 0).sum(dim=0, dtype=torch.float64)[:, None] / n_tokens
        parts = w1_points_to_gaussian(z, cdf, q, level=negative)
        for out, part in zip(outs, parts):
            out[start : start + step] = torch.where(ok, part, math.nan)
    return outs[0], outs[1], outs[2]


def wasserstein_to_gaussian(x: Tensor) -> Tensor:
    """Exact per-neuron W1 distance of standardised ``x`` ``[tokens, neurons]`` to N(0, 1); fp64 ``[neurons]``."""
    return wasserstein_to_gaussian_split(x)[0]
