"""Exact 1-Wasserstein distance of each neuron's standardised pre-activations to N(0, 1).

For one dimension, ``W1(P, N(0,1)) = ∫ |F(z) − Φ(z)| dz``. The empirical CDF ``F`` of a sample is a step
function, so the integral over each segment between consecutive sorted values is closed-form, using the
antiderivative of ``Φ``: ``∫Φ(z) dz = zΦ(z) + φ(z)``. Summing the segments gives the exact distance (no sampling of
the normal, no quadrature). The negative-side part ``wd_neg`` is the transport of the mass at negative
*pre-activations*: in the quantile form ``W1 = ∫₀¹ |F⁻¹(u) − Φ⁻¹(u)| du``, the ``u`` below the neuron's negative
fraction, i.e. the area between the CDFs below that height. ``wd = wd_neg + wd_pos``; an all-negative neuron has
``wd_neg = wd``, a neuron symmetric about 0 half of it. (Splitting at ``z = 0`` would split at the neuron's mean.)

:func:`w1_points_to_gaussian` is the shared core: it takes any sorted point masses (a sorted sample, or the
centroids of a histogram's bins) and is also what :mod:`negmonitor.metrics.streaming` calls at compute time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from negmonitor.errors import NegmonitorError

__all__ = ["wasserstein_to_gaussian", "wasserstein_to_gaussian_split", "w1_points_to_gaussian"]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_PICK_ON_CPU = True  # False runs the dense (non-CPU) path on CPU too, for the tests
# Elements per working chunk of the reference (4 MiB per fp64 temporary: cache-friendly, no page-fault churn).
_CHUNK_ELEMENTS = 1 << 19


def _phi_antiderivative(z: Tensor) -> Tensor:
    """``G(z) = zΦ(z) + φ(z)``, so that ``∫_a^b Φ = G(b) − G(a)``; ``G(−∞) = 0``."""
    return _phi_and_antiderivative(z)[1]


def _phi_and_antiderivative(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(Φ(z), G(z))`` with ``G(z) = zΦ(z) + φ(z)``."""
    cdf = 0.5 * torch.special.erfc(z * -_INV_SQRT_2)
    return cdf, z * cdf + torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _segment_integrals(
    a: Tensor, b: Tensor, phi_a: Tensor, phi_b: Tensor, g_a: Tensor, g_b: Tensor, c: Tensor, q: Tensor | None
) -> Tensor:
    """``∫_a^b |c − Φ(z)| dz`` for ``a ≤ b``, given ``Φ`` and ``G`` at both ends (``q``: optional ``Φ⁻¹(c)``).

    Where ``Φ`` stays on one side of ``c`` the integrand keeps its sign: ``|G(b) − G(a) − c(b − a)|``. Only the
    few segments where ``Φ`` crosses ``c`` (at ``q = Φ⁻¹(c)``) need ``c(2q − a − b) + G(a) + G(b) − 2G(q)``. On
    CPU the inverse normal is evaluated for those alone (picking them is free there); elsewhere for every segment,
    which needs no read-back of how many there are.
    """
    c = c.expand_as(a)
    out = (g_b - g_a - c * (b - a)).abs()
    cross = (phi_a < c) & (c < phi_b)
    pick = _PICK_ON_CPU and a.device.type == "cpu"
    if pick:
        where = cross.nonzero(as_tuple=True)
        a, b, c, g_a, g_b = a[where], b[where], c[where], g_a[where], g_b[where]
        q = None if q is None else q.expand_as(cross)[where]
    q = torch.special.ndtri(c) if q is None else q.expand_as(a)
    q = torch.minimum(torch.maximum(q, a), b)  # guard against rounding at the ends
    crossing = c * (2.0 * q - a - b) + g_a + g_b - 2.0 * _phi_antiderivative(q)
    if pick:
        out[where] = crossing
        return out
    return torch.where(cross, crossing, out)


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
    phi_z, g_z = _phi_and_antiderivative(z)
    segments = _segment_integrals(z[:, :-1], z[:, 1:], phi_z[:, :-1], phi_z[:, 1:], g_z[:, :-1], g_z[:, 1:], cdf, q)
    # Tails: (−∞, z_1] where F = 0 gives ∫Φ = G(z_1); [z_k, ∞) where F = 1 gives ∫(1 − Φ) = G(−z_k).
    left, right = g_z[:, 0], _phi_antiderivative(-z[:, -1])
    wd = left + right + segments.sum(dim=1)
    u0 = torch.as_tensor(level, dtype=z.dtype, device=z.device).expand(z.shape[0], 1)
    below = _part_below_level(z, phi_z, g_z, cdf, u0)
    return wd, below, wd - below


def _part_below_level(z: Tensor, phi_z: Tensor, g_z: Tensor, cdf: Tensor, u0: Tensor) -> Tensor:
    """``∫ |min(F, u0) − min(Φ, u0)| dz``: the area between the two CDFs below the height ``u0``.

    With ``q0 = Φ⁻¹(u0)``: on each segment ``[a, b]`` (``F = c``, so ``min(F, u0) = c' = min(c, u0)``) the part
    left of ``q0`` is the usual ``∫|c' − Φ|``, the part right of it ``(u0 − c') · length``. The left tail gives
    ``∫ min(Φ, u0) = G(min(z_1, q0)) + u0 · (z_1 − q0)⁺``, the right tail ``∫_{z_k}^{q0} (u0 − Φ)`` when
    ``z_k < q0``.
    """
    rows, k = z.shape
    u0 = u0.clamp(0.0, 1.0)
    q0 = torch.special.ndtri(u0).clamp(-1e6, 1e6)  # [rows, 1]; beyond any standardised value (|z| < sqrt(n))
    phi_q0, g_q0 = _phi_and_antiderivative(q0)
    capped = torch.minimum(cdf.expand(rows, k - 1), u0)
    left_of = z < q0
    zc = torch.minimum(z, q0)
    phi_c, g_c = torch.where(left_of, phi_z, phi_q0), torch.where(left_of, g_z, g_q0)
    inner = _segment_integrals(zc[:, :-1], zc[:, 1:], phi_c[:, :-1], phi_c[:, 1:], g_c[:, :-1], g_c[:, 1:], capped,
                               None)
    zr = torch.maximum(z, q0)
    outer = (u0 - capped) * (zr[:, 1:] - zr[:, :-1])
    left = g_c[:, 0] + u0[:, 0] * (z[:, 0] - q0[:, 0]).clamp(min=0.0)
    right = torch.where(left_of[:, -1], u0[:, 0] * (q0[:, 0] - z[:, -1]) - (g_q0[:, 0] - g_z[:, -1]), 0.0)
    return left + inner.sum(dim=1) + outer.sum(dim=1) + right


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
