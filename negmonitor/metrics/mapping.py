"""Mapping difficulty (MD), OI ratios and pair sign classes, vectorised over neurons.

For ``P`` disjoint token pairs ``(a, b)``:

- input distance ``= ‖x_a − x_b‖₂ / max over pairs`` (the MLP input vectors);
- output distance, per neuron ``= |y_a − y_b| / median over pairs of |y_a − y_b|`` (the pre-activations);
- OI ratio ``= output distance / input distance``, and MD is its mean over pairs.

A neuron with a high MD maps nearby inputs far apart. Pairs whose inputs coincide (zero input distance) are left
out of every statistic; a neuron whose median output difference is 0 gets NaN MD and OI. Medians are the usual
midpoint median (as ``numpy.median``).

Everything is computed in torch on the tensors' device, block by block over neurons, with nothing read back to
the host (the number of kept pairs stays a tensor); on CPU the medians' selections are numpy's (see ``_median``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from negmonitor.errors import NegmonitorError
from negmonitor.metrics._median import row_medians_
from negmonitor.metrics.ranking import top_k_indices

__all__ = ["NN", "PN", "PP", "sample_pairs", "mapping_difficulty", "planned_bytes", "sign_classes", "top_pairs",
           "pair_sign_shares"]

NN, PN, PP = 0, 1, 2
_BLOCK_ELEMENTS = 1 << 19  # pairs x neurons per block: 2 MiB of fp32 differences
_HOST_READS_ON_CPU = True  # False reads nothing back on CPU either (as off CPU), for the tests


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
    x_a: Tensor, x_b: Tensor, y_a: Tensor, y_b: Tensor, *, with_oi: bool = True, block_elements: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """MD per neuron and the OI ratio of every pair, in torch on the inputs' device (no read-back).

    Args:
        x_a, x_b: ``[P, d]`` input vectors of the two tokens of each pair.
        y_a, y_b: ``[P, n]`` pre-activations of the same tokens.
        with_oi: also return the ``[P, n]`` OI ratios (``False``: MD alone, faster, no ``[P, n]`` output).
        block_elements: pairs x neurons per block of work (default 2^19): the transient memory is about
            ``12 · block_elements`` bytes plus ``8 · P · d`` for the input distances (see :func:`planned_bytes`).

    Returns:
        ``(md, oi)``: fp32 ``[n]`` and ``[P, n]`` (``None`` without ``with_oi``). OI is NaN for pairs with zero
        input distance and for neurons with a zero median output difference; MD is the mean over the other
        pairs (NaN if none).

    Raises:
        NegmonitorError: for mismatched shapes.
    """
    _check_pair_shapes(x_a, x_b, y_a, y_b)
    n_pairs, n_neurons = y_a.shape
    device = y_a.device
    x_a, x_b, y_a, y_b = (t.detach() for t in (x_a, x_b, y_a, y_b))
    dx = torch.linalg.vector_norm(x_a.float() - x_b.float(), dim=1)
    keep = dx > 0
    n_kept = keep.sum()
    inv_d_in = dx.max() / dx  # 1 / (normalised input distance); inf for left-out pairs
    weight = torch.where(keep, inv_d_in, 0.0)  # for the sums over kept pairs
    inv_oi = torch.where(keep, inv_d_in, math.nan)  # left-out pairs get NaN OI
    weighted = torch.empty(n_neurons, dtype=torch.float32, device=device)  # Σ over kept pairs of |Δy| / d_in
    medians = torch.empty(n_neurons, dtype=torch.float32, device=device)
    oi = torch.empty((n_pairs, n_neurons), dtype=torch.float32, device=device) if with_oi else None
    width = min(n_neurons, max(1, (block_elements or _BLOCK_ELEMENTS) // max(1, n_pairs)))
    on_cpu = _HOST_READS_ON_CPU and device.type == "cpu"
    all_kept = on_cpu and bool(keep.all())  # free to know on CPU; elsewhere always masked
    count = int(n_kept) if on_cpu else n_kept  # an int spares the CPU medians a check per block
    # This call's two block buffers, reused by every block (fresh CPU buffers per block cost page faults).
    diff_buffer = torch.empty(n_pairs * width, dtype=torch.float32, device=device)
    rows_buffer = torch.empty(n_pairs * width, dtype=torch.float32, device=device)
    for start in range(0, n_neurons, width):
        stop = min(n_neurons, start + width)
        a, b = y_a[:, start:stop], y_b[:, start:stop]
        diff = diff_buffer[: n_pairs * (stop - start)].view(n_pairs, stop - start)
        if a.dtype == b.dtype == torch.float32:
            torch.sub(a, b, out=diff)
        else:
            diff.copy_(a).sub_(b)  # in fp32 whatever the capture dtype
        diff.abs_()  # [P, w]
        torch.mv(diff.t(), weight, out=weighted[start:stop])
        if oi is not None:
            torch.mul(diff, inv_oi[:, None], out=oi[:, start:stop])
        rows = rows_buffer[: n_pairs * (stop - start)].view(stop - start, n_pairs)
        rows.t().copy_(diff)  # neuron-major rows for the median (as written, not rows.copy_(diff.t()): torch's
        # special transposing copy runs on one thread, 3x slower at 1,000 x 524 on an Intel Xeon)
        if not all_kept:
            rows.masked_fill_(~keep, math.inf)  # left-out pairs sort last
        medians[start:stop] = row_medians_(rows, count, nonnegative=True)  # |Δy| (abs_ clears NaN's sign), +inf
    inv_scale = torch.where(medians > 0, 1.0 / medians, math.nan)
    md = weighted * inv_scale / n_kept
    if oi is not None:
        oi *= inv_scale
    return md, oi


def planned_bytes(n_pairs: int, d_in: int, n_neurons: int, with_oi: bool = True,
                  block_elements: int | None = None) -> int:
    """Upper bound of the bytes :func:`mapping_difficulty` allocates: its outputs, the fp32 input differences
    ``[P, d]`` and the two ``[P, w]`` block buffers (plus the sort's output off CPU)."""
    width = min(n_neurons, max(1, (block_elements or _BLOCK_ELEMENTS) // max(1, n_pairs)))
    inputs = 3 * 4 * n_pairs * d_in + 8 * 4 * n_pairs
    block = 4 * 4 * width * n_pairs + 16 * 4 * width
    outputs = 4 * n_neurons + (4 * n_pairs * n_neurons if with_oi else 0)
    return inputs + block + outputs


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


def _class_counts(classes: Tensor, valid: Tensor) -> Tensor:
    """``[3]`` int64: how many ``valid`` items are in each sign class.

    An integer ``scatter_add_``: exact, the fastest way on CPU (2x a weighted ``bincount``), and deterministic on
    CUDA under ``torch.use_deterministic_algorithms(True)``, where a ``bincount`` with ``weights`` raises.
    """
    counts = torch.zeros(3, dtype=torch.long, device=classes.device)
    return counts.scatter_add_(0, classes.reshape(-1), valid.reshape(-1).long())


def pair_sign_shares(
    oi: Tensor,
    y_a: Tensor,
    y_b: Tensor,
    md: Tensor,
    top_neuron_frac: float = 0.05,
    top_pairs: int = 100,
    ranked: Tensor | None = None,
) -> dict[str, float]:
    """NN/PN/PP shares among each top-MD neuron's highest-OI pairs.

    Takes the top ``top_neuron_frac`` neurons by MD (at least one; NaN MD never chosen), each neuron's
    ``top_pairs`` pairs by OI ratio (fewer if there are fewer pairs; NaN-OI pairs are not counted), and returns
    ``{"nn", "pn", "pp"}`` shares of those (neuron, pair) items, plus ``n_neurons`` (neurons taken),
    ``n_pairs`` (pairs taken per neuron) and ``n_counted`` (items counted). Shares are NaN when nothing qualifies.
    ``ranked``: :func:`top_pairs` of ``oi`` already taken (at least ``top_pairs`` rows), so it is not sorted again.
    """
    neurons = top_k_indices(md, top_neuron_frac)
    k = min(int(top_pairs), oi.shape[0])
    if neurons.numel() == 0 or k <= 0:
        return {"nn": math.nan, "pn": math.nan, "pp": math.nan, "n_neurons": int(neurons.numel()), "n_pairs": 0,
                "n_counted": 0}
    neurons = neurons.to(oi.device)
    oi_sel = oi[:, neurons]
    best = _rank_pairs(oi_sel, k) if ranked is None else ranked[:k, neurons]  # [k, m]
    classes = sign_classes(y_a[:, neurons], y_b[:, neurons]).gather(0, best)
    valid = torch.isfinite(oi_sel.gather(0, best))
    counts = _class_counts(classes, valid).tolist()  # the only read-back: three numbers
    total = sum(counts)
    shares = [c / total for c in counts] if total > 0 else [math.nan] * 3
    return {"nn": shares[NN], "pn": shares[PN], "pp": shares[PP], "n_neurons": int(neurons.numel()),
            "n_pairs": k, "n_counted": int(total)}
