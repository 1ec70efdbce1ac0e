"""Summarise one filled recorder into small per-neuron tensors, on the model's device, then move them to the host.

Every statistic of a layer is computed here, where its state lives: the accumulator's WD, split and moments, MD
over the (DDP-reduced) pair rows, the OI ratios of the top-MD neurons only, their pair-sign shares, and the
pre-activations of the top-WD neurons at the pair positions (for images). What leaves is a few floats per neuron
plus the top-MD neurons' highest-OI pairs (``[k, top neurons]``): the recorder (histograms, pair buffers) can
then be dropped, so a measurement in layer groups holds one group's state at a time. :mod:`negmonitor.result`
builds tables from these summaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from negmonitor.metrics.mapping import mapping_difficulty, pair_sign_shares
from negmonitor.metrics.mapping import top_pairs as rank_pairs
from negmonitor.metrics.ranking import top_k_indices

__all__ = ["LayerSummary", "summarise_recorder", "MD_COLUMNS"]

MD_COLUMNS = 2048  # neurons per MD call


@dataclass
class LayerSummary:
    """What the tables and the callbacks need of one layer (host tensors)."""

    layer: int
    stats: dict[str, Tensor]  # [n] each: wd, wd_neg, wd_pos, mean, std, skew, kurtosis, neg_frac, count, nonfinite, ...
    nonfinite_tokens: int
    md: Tensor | None = None  # [n] fp32; None with fewer than 2 pairs
    top_md: Tensor | None = None  # top-MD neuron indices, largest MD first
    # Each top-MD neuron's highest-OI pairs, chosen on the device: [k, len(top_md)] each, best first
    best_pairs: Tensor | None = None  # pair indices
    best_oi: Tensor | None = None  # their OI ratios
    best_y_a: Tensor | None = None  # pre-activations of the first / second token of each pair
    best_y_b: Tensor | None = None
    input_dist: Tensor | None = None  # [P] input distance over its maximum
    shares: dict = field(default_factory=lambda: {"nn": math.nan, "pn": math.nan, "pp": math.nan})
    samples: tuple[list[int], np.ndarray] | None = None  # top-WD neurons and their [2P, k] pre-activations


def summarise_recorder(recorder, top_neuron_frac: float, top_pairs: int, sample_neurons: int = 0,
                       pairs_per_neuron: int = 10) -> LayerSummary:
    """Compute every statistic of ``recorder`` (under DDP, already reduced across ranks by
    :meth:`~negmonitor.capture.SiteRecorder.reduce_across_ranks`); ``pairs_per_neuron``: the highest-OI pairs kept
    per top-MD neuron for the top-pair table (only those ``[k, m]`` values leave the device)."""
    stats = recorder.stats.compute()
    buffers = recorder.pairs.buffers()  # not compute(): torchmetrics would return copies
    summary = LayerSummary(recorder.layer, {k: v.detach().cpu() for k, v in stats.items()},
                           int(recorder.nonfinite_tokens))
    x, y = buffers["x"], buffers["y"]
    if sample_neurons > 0 and y.shape[0] > 1:
        wd = stats["wd"]
        top = top_k_indices(wd, min(1.0, sample_neurons / max(1, wd.numel())))[:sample_neurons]
        summary.samples = (top.tolist(), y[:, top.to(y.device)].float().cpu().numpy())
    if x.shape[0] < 4:
        return summary
    x_a, x_b, y_a, y_b = x[0::2], x[1::2], y[0::2], y[1::2]
    # MD of a neuron depends on its own column only: columns in blocks bound MD's [P, block] transients.
    md = torch.cat([mapping_difficulty(x_a, x_b, y_a[:, c:c + MD_COLUMNS], y_b[:, c:c + MD_COLUMNS], with_oi=False)[0]
                    for c in range(0, y.shape[1], MD_COLUMNS)])
    dist = torch.linalg.vector_norm(x_a.float() - x_b.float(), dim=1)
    summary.input_dist = (dist / dist.max().clamp_min(1e-12)).cpu()
    summary.md = md.cpu()
    if torch.isfinite(md).any():
        top = top_k_indices(md, top_neuron_frac).to(y.device)
        # OI of a neuron depends on its own column only: the top neurons' OI equals the full matrix's columns.
        _, oi = mapping_difficulty(x_a, x_b, y_a[:, top], y_b[:, top])
        ya, yb = y_a[:, top].float(), y_b[:, top].float()
        k_shares, k_table = min(top_pairs, oi.shape[0]), min(pairs_per_neuron, oi.shape[0])
        ranked = rank_pairs(oi, max(k_shares, k_table))  # one sort, on the device, for the shares and the table
        summary.shares = pair_sign_shares(oi, ya, yb, md[top], top_neuron_frac=1.0, top_pairs=k_shares,
                                          ranked=ranked)
        best = ranked[:k_table]  # [k, m]
        summary.top_md, summary.best_pairs = top.cpu(), best.cpu()
        summary.best_oi, summary.best_y_a, summary.best_y_b = (t.gather(0, best).cpu() for t in (oi, ya, yb))
    return summary
