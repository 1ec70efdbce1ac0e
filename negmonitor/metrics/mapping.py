"""Mapping difficulty (MD), OI ratios and pair sign classes, vectorised over neurons.

For ``P`` disjoint token pairs ``(a, b)``:

- input distance ``= ‖x_a − x_b‖₂ / max over pairs`` (the MLP input vectors);
- output distance, per neuron ``= |y_a − y_b| / median over pairs of |y_a − y_b|`` (the pre-activations);
- OI ratio ``= output distance / input distance``, and MD is its mean over pairs.

A neuron with a high MD maps nearby inputs far apart. Pairs whose inputs coincide (zero input distance) are left
out of every statistic; a neuron whose median output difference is 0 gets NaN MD and OI. Medians are the usual
midpoint median (as ``numpy.median``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from negmonitor.errors import NegmonitorError
from negmonitor.metrics._median import column_block_medians
from negmonitor.metrics._threads import scratch, single_torch_thread
from negmonitor.metrics.ranking import top_k_indices

__all__ = ["NN", "PN", "PP", "sample_pairs", "mapping_difficulty", "sign_classes", "top_pairs", "pair_sign_shares"]

NN, PN, PP = 0, 1, 2
_DIFF_SLOT = 11  # scratch slot of a block of output differences


def sample_pairs(n_positions: int, n_pairs: int, seed: int = 0) -> Tensor:
    """``[P, 2]`` indices of ``P`` disjoint pairs among ``n_positions`` (all ``2P`` positions distinct), seeded.

    Raises:
        NegmonitorError: if ``n_pairs`` is negative or ``2 · n_pairs > n_positions``.
    """
    if n_pairs < 0:
        raise NegmonitorError(f"number of pairs must be at least 0, got {n_pairs}")
    if 2 * n_pairs > n_positions:
        raise NegmonitorError(
            f"{n_pairs} disjoint pairs need {2 * n_pairs} distinct tokens but only {n_positions} are available — "
            "give more probe text or ask for fewer pairs"
        )
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_positions, generator=gen)[: 2 * n_pairs].view(n_pairs, 2)


def _check_pair_shapes(x_a: Tensor, x_b: Tensor, y_a: Tensor, y_b: Tensor) -> None:
    if x_a.shape != x_b.shape or x_a.dim() != 2:
        raise NegmonitorError(f"pair inputs must both be [P, d], got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    if y_a.shape != y_b.shape or y_a.dim() != 2 or y_a.shape[0] != x_a.shape[0]:
        raise NegmonitorError(
            f"pair outputs must both be [P, n] with P = {x_a.shape[0]}, got {tuple(y_a.shape)} and {tuple(y_b.shape)}"
        )


def mapping_difficulty(
    x_a: Tensor, x_b: Tensor, y_a: Tensor, y_b: Tensor, *, with_oi: bool = True
) -> tuple[Tensor, Tensor | None]:
    """MD per neuron and the OI ratio of every pair.

    Args:
        x_a, x_b: ``[P, d]`` input vectors of the two tokens of each pair.
        y_a, y_b: ``[P, n]`` pre-activations of the same tokens.
        with_oi: also return the ``[P, n]`` OI ratios (``False``: MD alone, faster, no ``[P, n]`` output).

    Returns:
        ``(md, oi)``: fp32 ``[n]`` and ``[P, n]`` (``None`` without ``with_oi``). OI is NaN for pairs with zero
        input distance and for neurons with a zero median output difference; MD is the mean over the other
        pairs (NaN if none).

    Raises:
        NegmonitorError: for mismatched shapes.
    """
    _check_pair_shapes(x_a, x_b, y_a, y_b)
    n_pairs, n_neurons = y_a.shape
    x_a, x_b, y_a, y_b = (t.detach() for t in (x_a, x_b, y_a, y_b))  # workers do not share this thread's no_grad
    with single_torch_thread(y_a.device):  # see _md_and_oi
        dx = torch.linalg.vector_norm(x_a.float() - x_b.float(), dim=1)
        keep = dx > 0
        n_kept = int(keep.sum())
        if n_kept == 0:
            md = torch.full((n_neurons,), math.nan, device=y_a.device)
            return md, torch.full((n_pairs, n_neurons), math.nan, device=y_a.device) if with_oi else None
        kept_rows = None if n_kept == n_pairs else keep.nonzero().squeeze(1)
        kept_dx = dx if kept_rows is None else dx[kept_rows]
        return _md_and_oi(y_a, y_b, kept_dx.max() / kept_dx, kept_rows, with_oi)


def _md_and_oi(
    y_a: Tensor, y_b: Tensor, inv_d_in: Tensor, kept_rows: Tensor | None, with_oi: bool
) -> tuple[Tensor, Tensor | None]:
    """MD and (optionally) OI, over the pairs ``kept_rows`` (all if ``None``) with 1 / input distance ``inv_d_in``.

    Column blocks of ``|y_a − y_b|`` (fp32, kept rows only) are made where their medians are taken (per thread, in
    cache on CPU); each block's input-distance-weighted sum, and its OI ratios, are taken while it is there, so
    nothing ``[P, n]``-sized is allocated on CPU but the OI output. The caller runs this with torch on one intra-op
    thread: the blocks are already split across the threads, and a parallel op just before would leave OpenMP's
    workers spinning on the cores the sorts need.
    """
    n_pairs, n_neurons = y_a.shape
    n_kept, device = len(inv_d_in), y_a.device
    weighted_sums = torch.empty(n_neurons, dtype=torch.float32, device=device)
    if not with_oi:
        oi = None
    elif kept_rows is None:
        oi = torch.empty((n_pairs, n_neurons), dtype=torch.float32, device=device)
    else:  # left-out pairs stay NaN
        oi = torch.full((n_pairs, n_neurons), math.nan, dtype=torch.float32, device=device)

    def block(start: int, stop: int) -> Tensor:
        shape = (n_kept, stop - start)
        # On CPU a reused per-thread buffer; elsewhere a fresh one (one block: the whole matrix, freed after).
        diff = scratch(_DIFF_SLOT, shape, torch.float32, device) if device.type == "cpu" else torch.empty(
            shape, dtype=torch.float32, device=device)
        a, b = y_a[:, start:stop], y_b[:, start:stop]
        if kept_rows is not None:
            a, b = a.index_select(0, kept_rows), b.index_select(0, kept_rows)
        if a.dtype == b.dtype == torch.float32:
            torch.sub(a, b, out=diff)
        else:
            diff.copy_(a).sub_(b)  # in fp32 whatever the capture dtype
        torch.mv(diff.abs_().t(), inv_d_in, out=weighted_sums[start:stop])
        return diff

    def then(start: int, stop: int, diff: Tensor, medians: Tensor) -> None:
        inv_scale = torch.where(medians > 0, 1.0 / medians, math.nan)
        weighted_sums[start:stop].mul_(inv_scale).div_(n_kept)
        if oi is None:
            return
        if kept_rows is None:
            torch.mul(diff, inv_d_in[:, None], out=oi[:, start:stop]).mul_(inv_scale)
        else:
            oi[kept_rows, start:stop] = diff.mul_(inv_d_in[:, None]).mul_(inv_scale)

    column_block_medians(n_kept, n_neurons, block, torch.float32, device, then)
    return weighted_sums, oi


def sign_classes(y_a: Tensor, y_b: Tensor) -> Tensor:
    """Sign class of each pair, elementwise: 0 = NN (both < 0), 1 = PN (one each), 2 = PP (both ≥ 0)."""
    return (y_a >= 0).long() + (y_b >= 0).long()


def top_pairs(oi: Tensor, k: int) -> Tensor:
    """``[k, n]`` pair indices per neuron sorted by OI ratio, highest first (NaN pairs last).

    Raises:
        NegmonitorError: if ``k`` is negative or larger than the number of pairs.
    """
    if not 0 <= k <= oi.shape[0]:
        raise NegmonitorError(f"top_pairs needs 0 <= k <= {oi.shape[0]} (the number of pairs), got {k}")
    ranked = torch.nan_to_num(oi.detach().double(), nan=-math.inf)
    return torch.sort(ranked, dim=0, descending=True, stable=True).indices[:k]


_rank_pairs = top_pairs  # pair_sign_shares' argument shadows the name


def pair_sign_shares(
    oi: Tensor,
    y_a: Tensor,
    y_b: Tensor,
    md: Tensor,
    top_neuron_frac: float = 0.05,
    top_pairs: int = 100,
) -> dict[str, float]:
    """NN/PN/PP shares among each top-MD neuron's highest-OI pairs.

    Takes the top ``top_neuron_frac`` neurons by MD (at least one; NaN MD never chosen), each neuron's
    ``top_pairs`` pairs by OI ratio (fewer if there are fewer pairs; NaN-OI pairs are not counted), and returns
    ``{"nn", "pn", "pp"}`` shares of those (neuron, pair) items, plus ``n_neurons`` (neurons taken),
    ``n_pairs`` (pairs taken per neuron) and ``n_counted`` (items counted). Shares are NaN when nothing qualifies.
    """
    neurons = top_k_indices(md, top_neuron_frac)
    k = min(int(top_pairs), oi.shape[0])
    if neurons.numel() == 0 or k <= 0:
        return {"nn": math.nan, "pn": math.nan, "pp": math.nan, "n_neurons": int(neurons.numel()), "n_pairs": 0,
                "n_counted": 0}
    neurons = neurons.to(oi.device)
    oi_sel = oi[:, neurons]
    best = _rank_pairs(oi_sel, k)  # [k, m]
    classes = sign_classes(y_a[:, neurons], y_b[:, neurons]).gather(0, best)
    valid = torch.isfinite(oi_sel.gather(0, best))
    counts = torch.bincount(classes[valid], minlength=3).double()
    total = float(counts.sum())
    shares = (counts / total).tolist() if total > 0 else [math.nan] * 3
    return {"nn": shares[NN], "pn": shares[PN], "pp": shares[PP], "n_neurons": int(neurons.numel()),
            "n_pairs": k, "n_counted": int(total)}
