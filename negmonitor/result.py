"""The outcome of a probe pass, as tidy pandas DataFrames, saved and loaded as parquet.

- ``neurons``: one row per neuron (``layer, neuron, wd, wd_neg, wd_pos, md, mean, std, skew, kurtosis, neg_frac,
  count, nonfinite, flagged``).
- ``layers``: one row per layer (max/mean/p99 WD, negative-side share, MD summary, NN/PN/PP shares, Jaccard of the
  top-5% WD and MD sets, non-finite token count).
- ``pairs``: the MD token pairs (positions, token ids, normalised input distance per layer).
- ``top_pairs``: for the top-MD neurons of each layer, their highest-OI pairs with sign class, tokens and context.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from negmonitor.adapters import MLPSite
from negmonitor.atomic import write_json_atomic, write_parquet_atomic
from negmonitor.errors import NegmonitorError
from negmonitor.metrics import mapping
from negmonitor.metrics.ranking import jaccard, top_k_indices
from negmonitor.summary import LayerSummary

SIGN_NAMES = ("NN", "PN", "PP")
NEURON_COLUMNS = ["layer", "neuron", "wd", "wd_neg", "wd_pos", "md", "mean", "std", "skew", "kurtosis",
                  "neg_frac", "count", "nonfinite", "flagged"]
TABLES = ("neurons", "layers", "pairs", "top_pairs")


class ProbeResult:
    """Per-neuron, per-layer and per-pair tables from one probe pass (see the module docstring).

    A result of a probe pass builds each table only when it is first read (logged, saved): under DDP the other
    ranks read just :meth:`values` (the ablation's selections), which comes from the per-layer tensors without a
    table. Token text and context are decoded once, for the pair tables.
    """

    def __init__(self, neurons: pd.DataFrame | None = None, layers: pd.DataFrame | None = None,
                 pairs: pd.DataFrame | None = None, top_pairs: pd.DataFrame | None = None, meta: dict | None = None,
                 tables: "_TableBuilder | None" = None) -> None:
        for name, frame in zip(TABLES, (neurons, layers, pairs, top_pairs)):  # the others are built when read
            if frame is not None or tables is None:
                self.__dict__[name] = frame if frame is not None else pd.DataFrame()
        self.meta = meta if meta is not None else {}
        self._tables = tables

    @functools.cached_property
    def neurons(self) -> pd.DataFrame:
        """One row per neuron: WD and its split, MD, moments, counts (``NEURON_COLUMNS``)."""
        return self._tables.neuron_frame()

    @functools.cached_property
    def layers(self) -> pd.DataFrame:
        """One row per layer: WD summary and negative-side share, MD summary, pair-sign shares, Jaccard."""
        return self._tables.layer_frame(self.neurons)

    @functools.cached_property
    def pairs(self) -> pd.DataFrame:
        """The MD pairs: positions, token ids and text, per-layer normalised input distance."""
        return self._tables.pair_frame()

    @functools.cached_property
    def top_pairs(self) -> pd.DataFrame:
        """Highest-OI pairs of the top-MD neurons of each layer, with sign class, tokens and context."""
        return self._tables.top_pair_frame()

    def built(self, table: str) -> bool:
        """Whether ``table`` (one of ``TABLES``) exists yet: given, loaded or already read."""
        return table in self.__dict__

    def save(self, directory: str | os.PathLike) -> Path:
        """Write every table as parquet (atomically, one file each) plus ``meta.json``; return the folder.

        Every table is built before anything is written, and ``meta.json`` is the completion mark: removed first,
        written last, so a folder whose writing was cut short (a full disk, a kill) is refused by :meth:`load`
        rather than read as a mix of this result's tables and an older one's."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tables = {name: getattr(self, name) for name in TABLES}
        (out / "meta.json").unlink(missing_ok=True)
        for name, table in tables.items():
            write_parquet_atomic(table, out / f"{name}.parquet")
        write_json_atomic(self.meta, out / "meta.json")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ProbeResult":
        """Read a folder written by :meth:`save`."""
        folder = Path(directory)
        if not (folder / "neurons.parquet").exists():
            raise NegmonitorError(f"{folder} holds no probe result (no neurons.parquet) — point at a probe --out folder")
        if not (folder / "meta.json").exists():
            raise NegmonitorError(f"{folder} holds an incomplete probe result (no meta.json: its writing was cut "
                                  "short) — run the probe again into it")
        tables = {n: pd.read_parquet(folder / f"{n}.parquet") if (folder / f"{n}.parquet").exists() else pd.DataFrame()
                  for n in TABLES}
        import json

        return cls(meta=json.loads((folder / "meta.json").read_text()), **tables)

    def values(self, metric: str = "wd") -> dict[int, torch.Tensor]:
        """Per-layer float64 tensors of one per-neuron metric (for selection and cohorts), indexed by neuron."""
        columns = self.neurons.columns if self.built("neurons") else NEURON_COLUMNS
        if metric not in columns:
            raise NegmonitorError(f"unknown metric {metric!r} — use one of {', '.join(NEURON_COLUMNS[2:11])}")
        if not self.built("neurons"):  # straight from the per-layer tensors, no table
            return {int(s.layer): torch.from_numpy(_neuron_column(s, metric).astype(np.float64))
                    for s in sorted(self._tables.summaries, key=lambda s: s.layer)}
        return {int(layer): torch.tensor(group.sort_values("neuron")[metric].to_numpy(dtype=np.float64))
                for layer, group in self.neurons.groupby("layer")}

    @classmethod
    def from_summaries(cls, summaries: Sequence[LayerSummary], sites: Sequence[MLPSite], probe_set, tokenizer,
                       settings) -> "ProbeResult":
        """The result of a probe pass: its tables are built from the layer summaries when first read."""
        meta = {"probe_source": probe_set.source, "probe_tokens": probe_set.n_tokens,
                "probe_windows": probe_set.n_windows, "window": probe_set.window, "n_pairs": probe_set.n_pairs,
                "seed": probe_set.seed, "family": sites[0].family if sites else None}
        return cls(meta=meta, tables=_TableBuilder(list(summaries), probe_set, tokenizer, settings))


def _neuron_column(summary: LayerSummary, key: str) -> np.ndarray:
    """One column of a layer's per-neuron table, from its summary's tensors."""
    st = summary.stats
    n = int(st["wd"].numel())
    if key == "layer":
        return np.full(n, summary.layer, dtype=np.int64)
    if key == "neuron":
        return np.arange(n, dtype=np.int64)
    if key == "md":
        return _np(summary.md) if summary.md is not None else np.full(n, np.nan)
    if key in ("count", "nonfinite"):
        return _np(st[key]).astype(np.int64)
    if key == "flagged":
        return ~np.isfinite(_np(st["wd"]))
    return _np(st[key])


def _neuron_frame(summary: LayerSummary) -> pd.DataFrame:
    return pd.DataFrame({key: _neuron_column(summary, key) for key in NEURON_COLUMNS})


def _layer_row(summary: LayerSummary, frame: pd.DataFrame, settings) -> dict:
    wd = frame["wd"].to_numpy()
    finite = np.isfinite(wd)
    wd_ok = wd[finite]
    top = _top_k(wd, settings.top_frac_for_jaccard)  # one ranking for the top share and the Jaccard index
    md = frame["md"].to_numpy()
    shares = summary.shares
    return {
        "layer": summary.layer,
        "n_neurons": len(frame),
        "n_tokens": int(frame["count"].max()) if len(frame) else 0,
        "nonfinite_tokens": summary.nonfinite_tokens,
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
        "jaccard_wd_md": (jaccard(top, _top_k(md, settings.top_frac_for_jaccard))
                          if finite.any() and np.isfinite(md).any() else np.nan),
    }


def _top_k(values: np.ndarray, frac: float) -> np.ndarray:
    """:func:`~negmonitor.metrics.ranking.top_k_indices` of a host array (NaN never chosen)."""
    return top_k_indices(torch.tensor(values), frac).numpy()  # a copy: pandas hands out read-only arrays


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else float("nan")


class _TableBuilder:
    """Builds the pair tables from arrays: token text of each distinct id and the context of each pair position
    are decoded once (``batch_decode``), then gathered by index."""

    def __init__(self, summaries: list[LayerSummary], probe_set, tokenizer, settings) -> None:
        self.summaries, self.probe_set, self.tokenizer, self.settings = summaries, probe_set, tokenizer, settings
        self._contexts: np.ndarray | None = None
        self._texts: dict[int, str] = {}  # token id -> text, shared by every layer's table and the pair table

    def neuron_frame(self) -> pd.DataFrame:
        """One row per neuron of every layer."""
        frames = [_neuron_frame(s) for s in self.summaries]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=NEURON_COLUMNS)

    def layer_frame(self, neurons: pd.DataFrame) -> pd.DataFrame:
        """One row per layer, from its rows of ``neurons``."""
        return pd.DataFrame([_layer_row(s, neurons[neurons.layer == s.layer], self.settings)
                             for s in self.summaries])

    def _token_text(self, ids: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(ids, return_inverse=True)
        new = [int(i) for i in unique if int(i) not in self._texts]
        self._texts.update(zip(new, _batch_decode(self.tokenizer, [[i] for i in new])))
        return np.asarray([self._texts[int(i)] for i in unique], dtype=object)[inverse.reshape(-1)]

    def _pair_contexts(self) -> np.ndarray:
        """``[P, 2]`` context strings of every pair position (up to 8 tokens before it, the token in [[ ]])."""
        if self._contexts is None:
            ps = self.probe_set
            flat = ps.pair_positions.reshape(-1).numpy()
            ids, mask = ps.input_ids.numpy(), ps.attention_mask.numpy().astype(bool)
            windows, offsets = np.divmod(flat, ps.window)
            befores = [ids[w, max(0, t - 8):t][mask[w, max(0, t - 8):t]].tolist() for w, t in zip(windows, offsets)]
            before_text = _batch_decode(self.tokenizer, befores)
            token_text = self._token_text(ids[windows, offsets])
            self._contexts = np.asarray([f"{b}[[{t}]]" for b, t in zip(before_text, token_text)],
                                        dtype=object).reshape(-1, 2)
        return self._contexts

    def top_pair_frame(self) -> pd.DataFrame:
        """Highest-OI pairs of the top-MD neurons, with sign class, token ids, text and context."""
        frames = [self._layer_top_pairs(s) for s in self.summaries if s.best_pairs is not None]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def _layer_top_pairs(self, summary: LayerSummary) -> pd.DataFrame:
        neurons = summary.top_md.numpy()
        k, m = summary.best_pairs.shape  # chosen on the device (summarise_recorder): [k, m], best first

        def by_neuron(values: torch.Tensor) -> np.ndarray:  # [k, m] -> each neuron's k pairs in a row
            return values.t().reshape(-1).numpy()

        col = np.repeat(np.arange(m), k)
        pair = by_neuron(summary.best_pairs)
        y_a, y_b = by_neuron(summary.best_y_a), by_neuron(summary.best_y_b)
        signs = mapping.sign_classes(torch.from_numpy(y_a), torch.from_numpy(y_b)).numpy()
        positions = self.probe_set.pair_positions.numpy()
        ids = self.probe_set.input_ids.reshape(-1).numpy()
        pos_a, pos_b = positions[pair, 0], positions[pair, 1]
        frame = pd.DataFrame({
            "layer": np.full(m * k, summary.layer, dtype=np.int64), "neuron": neurons[col].astype(np.int64),
            "rank": np.tile(np.arange(k, dtype=np.int64), m), "pair": pair.astype(np.int64),
            "md": summary.md.double().numpy()[neurons[col]], "oi": by_neuron(summary.best_oi).astype(np.float64),
            "y_a": y_a.astype(np.float64), "y_b": y_b.astype(np.float64),
            "sign": np.asarray(SIGN_NAMES, dtype=object)[signs], "pos_a": pos_a.astype(np.int64),
            "pos_b": pos_b.astype(np.int64), "token_a_id": ids[pos_a].astype(np.int64),
            "token_b_id": ids[pos_b].astype(np.int64)})
        if self.tokenizer is not None:
            text = self._token_text(np.concatenate([frame.token_a_id.to_numpy(), frame.token_b_id.to_numpy()]))
            contexts = self._pair_contexts()
            frame["token_a"], frame["token_b"] = text[: m * k], text[m * k:]
            frame["context_a"], frame["context_b"] = contexts[pair, 0], contexts[pair, 1]
        return frame

    def pair_frame(self) -> pd.DataFrame:
        """The MD pairs: positions, token ids and, per monitored layer, the normalised input distance."""
        flat = self.probe_set.pair_positions
        if flat.numel() == 0:
            return pd.DataFrame(columns=["pair", "pos_a", "pos_b"])
        ids = self.probe_set.input_ids.reshape(-1)
        frame = pd.DataFrame({"pair": np.arange(len(flat)), "pos_a": flat[:, 0].numpy(), "pos_b": flat[:, 1].numpy(),
                              "token_a_id": ids[flat[:, 0]].numpy(), "token_b_id": ids[flat[:, 1]].numpy()})
        for summary in self.summaries:  # each layer sees different input vectors
            dist = summary.input_dist
            frame[f"input_dist_layer_{summary.layer:02d}"] = (
                dist.double().numpy() if dist is not None else np.full(len(flat), np.nan))
        if self.tokenizer is not None:
            text = self._token_text(np.concatenate([frame.token_a_id.to_numpy(), frame.token_b_id.to_numpy()]))
            frame["token_a"], frame["token_b"] = text[: len(flat)], text[len(flat):]
        return frame


def _batch_decode(tokenizer, sequences: list[list[int]]) -> list[str]:
    if not sequences:
        return []
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode(sequences))
    return [tokenizer.decode(seq) for seq in sequences]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()
