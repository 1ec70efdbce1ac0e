"""The outcome of a probe pass, as tidy pandas DataFrames, saved and loaded as parquet.

- ``neurons``: one row per neuron (``layer, neuron, wd, wd_neg, wd_pos, md, mean, std, skew, kurtosis, neg_frac,
  count, nonfinite, flagged``).
- ``layers``: one row per layer (max/mean/p99 WD, negative-side share, MD summary, NN/PN/PP shares, Jaccard of the
  top-5% WD and MD sets, non-finite token count).
- ``pairs``: the MD token pairs (positions, token ids, normalised input distance per layer).
- ``top_pairs``: for the top-MD neurons of each layer, their highest-OI pairs with sign class, tokens and context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from negmonitor.adapters import MLPSite
from negmonitor.atomic import write_json_atomic, write_parquet_atomic
from negmonitor.errors import NegmonitorError
from negmonitor.metrics.mapping import mapping_difficulty, pair_sign_shares, sign_classes, top_pairs
from negmonitor.metrics.ranking import jaccard, top_k_indices

SIGN_NAMES = ("NN", "PN", "PP")
NEURON_COLUMNS = ["layer", "neuron", "wd", "wd_neg", "wd_pos", "md", "mean", "std", "skew", "kurtosis",
                  "neg_frac", "count", "nonfinite", "flagged"]
TABLES = ("neurons", "layers", "pairs", "top_pairs")


@dataclass
class ProbeResult:
    """Per-neuron, per-layer and per-pair tables from one probe pass (see the module docstring)."""

    neurons: pd.DataFrame
    layers: pd.DataFrame
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    top_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    meta: dict = field(default_factory=dict)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write every table as parquet (atomically, one file each) plus ``meta.json``; return the folder."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            write_parquet_atomic(getattr(self, name), out / f"{name}.parquet")
        write_json_atomic(self.meta, out / "meta.json")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ProbeResult":
        """Read a folder written by :meth:`save`."""
        folder = Path(directory)
        if not (folder / "neurons.parquet").exists():
            raise NegmonitorError(f"{folder} holds no probe result (no neurons.parquet) — point at a probe --out folder")
        tables = {n: pd.read_parquet(folder / f"{n}.parquet") if (folder / f"{n}.parquet").exists() else pd.DataFrame()
                  for n in TABLES}
        import json

        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").exists() else {}
        return cls(meta=meta, **tables)

    def values(self, metric: str = "wd") -> dict[int, torch.Tensor]:
        """Per-layer tensors of one per-neuron metric (for selection and cohorts)."""
        if metric not in self.neurons.columns:
            raise NegmonitorError(f"unknown metric {metric!r} — use one of {', '.join(NEURON_COLUMNS[2:11])}")
        return {int(layer): torch.tensor(group.sort_values("neuron")[metric].to_numpy(dtype=np.float64))
                for layer, group in self.neurons.groupby("layer")}

    @classmethod
    def from_recorders(cls, recorders: Sequence, sites: Sequence[MLPSite], probe_set, tokenizer, settings) -> "ProbeResult":
        """Summarise filled (and, under DDP, already reduced) recorders into tables."""
        stats = [r.stats.compute() for r in recorders]
        pairs = [r.pairs.compute() for r in recorders]
        nonfinite = [int(r.nonfinite_tokens) for r in recorders]
        return summarise(stats, pairs, nonfinite, sites, probe_set, tokenizer, settings)


def summarise(stats: list[dict], pairs: list[dict], nonfinite: list[int], sites: Sequence[MLPSite], probe_set,
              tokenizer, settings) -> ProbeResult:
    """Build the four tables from per-layer statistic dicts and pair buffers."""
    neuron_frames, layer_rows, top_frames = [], [], []
    for site, st, pb, bad in zip(sites, stats, pairs, nonfinite):
        md, oi, y_a, y_b = _mapping(pb)
        frame = _neuron_frame(site.layer, st, md)
        neuron_frames.append(frame)
        shares = _shares(oi, y_a, y_b, md, settings)
        layer_rows.append(_layer_row(site.layer, frame, shares, bad, settings))
        if oi is not None:
            top_frames.append(_top_pair_frame(site.layer, md, oi, y_a, y_b, probe_set, tokenizer, settings))
    neurons = pd.concat(neuron_frames, ignore_index=True) if neuron_frames else pd.DataFrame(columns=NEURON_COLUMNS)
    top = pd.concat(top_frames, ignore_index=True) if top_frames else pd.DataFrame()
    meta = {"probe_source": probe_set.source, "probe_tokens": probe_set.n_tokens, "probe_windows": probe_set.n_windows,
            "window": probe_set.window, "n_pairs": probe_set.n_pairs, "seed": probe_set.seed,
            "family": sites[0].family if sites else None}
    pair_frame = _pair_frame(pairs, [site.layer for site in sites], probe_set, tokenizer)
    return ProbeResult(neurons, pd.DataFrame(layer_rows), pair_frame, top, meta)


def _mapping(pb: dict) -> tuple:
    x, y = pb["x"].float().cpu(), pb["y"].float().cpu()
    if x.shape[0] < 4:
        return None, None, None, None
    x_a, x_b, y_a, y_b = x[0::2], x[1::2], y[0::2], y[1::2]
    md, oi = mapping_difficulty(x_a, x_b, y_a, y_b)
    return md, oi, y_a, y_b


def _neuron_frame(layer: int, st: dict, md: torch.Tensor | None) -> pd.DataFrame:
    n = int(st["wd"].numel())
    columns = {"layer": np.full(n, layer, dtype=np.int64), "neuron": np.arange(n, dtype=np.int64)}
    for key in ("wd", "wd_neg", "wd_pos"):
        columns[key] = _np(st[key])
    columns["md"] = _np(md) if md is not None else np.full(n, np.nan)
    for key in ("mean", "std", "skew", "kurtosis", "neg_frac"):
        columns[key] = _np(st[key])
    columns["count"] = _np(st["count"]).astype(np.int64)
    columns["nonfinite"] = _np(st["nonfinite"]).astype(np.int64)
    columns["flagged"] = ~np.isfinite(columns["wd"])
    return pd.DataFrame(columns)


def _shares(oi, y_a, y_b, md, settings) -> dict:
    if oi is None or not torch.isfinite(md).any():
        return {"nn": np.nan, "pn": np.nan, "pp": np.nan}
    k = min(settings.top_pairs, oi.shape[0])
    return pair_sign_shares(oi, y_a, y_b, md, top_neuron_frac=settings.top_neuron_frac, top_pairs=k)


def _layer_row(layer: int, frame: pd.DataFrame, shares: dict, nonfinite_tokens: int, settings) -> dict:
    wd = frame["wd"].to_numpy()
    finite = np.isfinite(wd)
    wd_ok = wd[finite]
    top = top_k_indices(torch.tensor(wd), settings.top_frac_for_jaccard).numpy() if finite.any() else np.array([], dtype=np.int64)
    md = frame["md"].to_numpy()
    row = {
        "layer": layer,
        "n_neurons": len(frame),
        "n_tokens": int(frame["count"].max()) if len(frame) else 0,
        "nonfinite_tokens": nonfinite_tokens,
        "nan_neurons": int((~finite).sum()),
        "wd_max": float(wd_ok.max()) if wd_ok.size else np.nan,
        "wd_mean": float(wd_ok.mean()) if wd_ok.size else np.nan,
        "wd_p99": float(np.quantile(wd_ok, 0.99)) if wd_ok.size else np.nan,
        "wd_neg_share": _ratio(frame["wd_neg"].to_numpy()[finite].sum(), wd_ok.sum()),
        "wd_neg_share_top": _ratio(frame["wd_neg"].to_numpy()[top].sum(), wd[top].sum()) if top.size else np.nan,
        "md_mean": float(np.nanmean(md)) if np.isfinite(md).any() else np.nan,
        "md_max": float(np.nanmax(md)) if np.isfinite(md).any() else np.nan,
        "nn_share": float(shares["nn"]),
        "pn_share": float(shares["pn"]),
        "pp_share": float(shares["pp"]),
        "jaccard_wd_md": _jaccard_top(wd, md, settings.top_frac_for_jaccard),
    }
    return row


def _jaccard_top(a: np.ndarray, b: np.ndarray, frac: float) -> float:
    if not (np.isfinite(a).any() and np.isfinite(b).any()):
        return float("nan")
    return float(jaccard(top_k_indices(torch.tensor(a), frac), top_k_indices(torch.tensor(b), frac)))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


def _top_pair_frame(layer, md, oi, y_a, y_b, probe_set, tokenizer, settings) -> pd.DataFrame:
    """Highest-OI pairs of the top-MD neurons, with sign class, token ids, text and context."""
    neurons = top_k_indices(md, settings.top_neuron_frac)
    k = min(settings.pairs_per_neuron_table, oi.shape[0])
    best = top_pairs(oi[:, neurons], k)  # [k, len(neurons)]
    signs = sign_classes(y_a, y_b)
    flat = probe_set.pair_positions
    ids = probe_set.input_ids.view(-1)
    rows = []
    for col, neuron in enumerate(neurons.tolist()):
        for rank, pair in enumerate(best[:, col].tolist()):
            pos_a, pos_b = int(flat[pair, 0]), int(flat[pair, 1])
            row = {"layer": layer, "neuron": neuron, "rank": rank, "pair": pair, "md": float(md[neuron]),
                   "oi": float(oi[pair, neuron]), "y_a": float(y_a[pair, neuron]), "y_b": float(y_b[pair, neuron]),
                   "sign": SIGN_NAMES[int(signs[pair, neuron])], "pos_a": pos_a, "pos_b": pos_b,
                   "token_a_id": int(ids[pos_a]), "token_b_id": int(ids[pos_b])}
            if tokenizer is not None:
                row.update(token_a=tokenizer.decode([row["token_a_id"]]), token_b=tokenizer.decode([row["token_b_id"]]),
                           context_a=probe_set.context(pos_a, tokenizer), context_b=probe_set.context(pos_b, tokenizer))
            rows.append(row)
    return pd.DataFrame(rows)


def _pair_frame(pairs: list[dict], layers: list[int], probe_set, tokenizer) -> pd.DataFrame:
    """The MD pairs: positions, token ids and, per monitored layer, the normalised input distance."""
    flat = probe_set.pair_positions
    if flat.numel() == 0:
        return pd.DataFrame(columns=["pair", "pos_a", "pos_b"])
    ids = probe_set.input_ids.view(-1)
    frame = pd.DataFrame({"pair": np.arange(len(flat)), "pos_a": flat[:, 0].numpy(), "pos_b": flat[:, 1].numpy(),
                          "token_a_id": ids[flat[:, 0]].numpy(), "token_b_id": ids[flat[:, 1]].numpy()})
    for layer, buffers in zip(layers, pairs):  # each layer sees different input vectors
        x = buffers["x"].float().cpu()
        dist = (x[0::2] - x[1::2]).norm(dim=1)
        frame[f"input_dist_layer_{layer:02d}"] = (dist / dist.max().clamp_min(1e-12)).numpy()
    if tokenizer is not None:
        frame["token_a"] = [tokenizer.decode([int(i)]) for i in frame["token_a_id"]]
        frame["token_b"] = [tokenizer.decode([int(i)]) for i in frame["token_b_id"]]
    return frame


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()
