"""Neuron selection: which neurons an ablation touches, chosen from a probe's per-neuron metric.

:func:`select_neurons` ranks neurons by a metric (``wd`` by default) and keeps the top or bottom fraction, per
layer or per group of consecutive layers, or draws a seeded random set with the same count per layer as the top
selection. Neurons whose metric is NaN (constant neurons) are never chosen as top or bottom.

A :class:`Selection` is a read-only mapping ``layer → LongTensor`` of neuron indices (so it can be passed straight
to :func:`negmonitor.interventions.ablate`) that also carries how it was made. :meth:`Selection.to_frame` gives
one row per chosen neuron (``layer, neuron, selection, how, metric, rank, value, ...``), saved beside every
ablation result so each number can be traced back to its neurons.

Example::

    >>> top = select_neurons(result, how="top", frac=0.01)
    >>> control = select_neurons(result, how="random", frac=0.01, seed=1)
    >>> [len(top[layer]) == len(control[layer]) for layer in top]
    [True, True, True, True, True, True]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from negmonitor.errors import NegmonitorError
from negmonitor.metrics.ranking import COUNTS, bottom_k_indices, percentile_count, top_k_indices
from negmonitor.validation import check_fraction

if TYPE_CHECKING:
    from negmonitor.result import ProbeResult

HOWS = ("top", "bottom", "random")
PERS = ("layer", "group")
FRAME_COLUMNS = ["layer", "neuron", "selection", "how", "metric", "rank", "value", "fraction", "per", "group_size",
                 "seed"]


@dataclass(eq=False)
class Selection(Mapping):
    """Chosen neurons, ``layer → LongTensor`` of indices in rank order, with how they were chosen.

    Args:
        indices: layer → neuron indices (best-ranked first for top/bottom, draw order for random).
        how: ``top``, ``bottom``, ``random`` (or ``custom`` for a hand-made selection).
        metric: the per-neuron metric ranked (``wd``, ``md``, ...).
        fraction: the fraction of neurons asked for.
        per: ``layer`` (ranked within each layer) or ``group`` (ranked within groups of layers).
        group_size: layers per group when ``per="group"`` (None: all chosen layers form one group).
        seed: the seed of a random selection.
        label: a name for tables (e.g. ``wasserstein``); defaults to ``how``.
        scores: layer → the metric value of each chosen neuron, in the same order as ``indices``.
    """

    indices: dict[int, torch.Tensor]
    how: str = "custom"
    metric: str | None = None
    fraction: float | None = None
    per: str = "layer"
    group_size: int | None = None
    seed: int | None = None
    label: str | None = None
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = {int(k): torch.as_tensor(v, dtype=torch.long).reshape(-1).cpu() for k, v in self.indices.items()}

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.indices[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.indices))

    def __len__(self) -> int:
        return len(self.indices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping) or sorted(self) != sorted(other):
            return False
        return all(torch.equal(self[k], torch.as_tensor(other[k], dtype=torch.long)) for k in self)

    __hash__ = None  # mutable, like a dict

    @property
    def name(self) -> str:
        """The label shown in tables (``label``, else ``how``)."""
        return self.label or self.how

    @property
    def counts(self) -> dict[int, int]:
        """Number of chosen neurons per layer."""
        return {layer: int(self.indices[layer].numel()) for layer in self}

    @property
    def n_neurons(self) -> int:
        """Total number of chosen neurons."""
        return sum(self.counts.values())

    def to_frame(self) -> pd.DataFrame:
        """One row per chosen neuron: ``layer, neuron, selection, how, metric, rank, value, fraction, per, ...``."""
        frames = [self._layer_frame(layer) for layer in self]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=_DTYPES.get(c, "object")) for c in FRAME_COLUMNS})
        return pd.concat(frames, ignore_index=True)[FRAME_COLUMNS]

    def _layer_frame(self, layer: int) -> pd.DataFrame:
        neurons = self.indices[layer].numpy()
        values = self.scores.get(layer)
        n = len(neurons)
        return pd.DataFrame({
            "layer": np.full(n, layer, dtype=np.int64),
            "neuron": neurons.astype(np.int64),
            "selection": self.name,
            "how": self.how,
            "metric": self.metric,
            "rank": np.arange(n, dtype=np.int64),
            "value": values.double().cpu().numpy() if values is not None else np.full(n, np.nan),
            "fraction": np.full(n, np.nan if self.fraction is None else self.fraction),
            "per": self.per,
            "group_size": pd.array([self.group_size] * n, dtype="Int64"),
            "seed": pd.array([self.seed] * n, dtype="Int64"),
        })

    @classmethod
    def from_frame(cls, df: pd.DataFrame, name: str | None = None) -> "Selection":
        """Rebuild a selection from :meth:`to_frame` rows (pick one with ``name`` if the frame holds several)."""
        missing = [c for c in ("layer", "neuron") if c not in df.columns]
        if missing:
            raise NegmonitorError(f"a selection table needs columns layer and neuron (missing {', '.join(missing)})"
                                  " — write it with Selection.to_frame()")
        df = _one_selection(df, name)
        df = df.sort_values(["layer", "rank"]) if "rank" in df.columns else df
        indices = {int(l): torch.tensor(g["neuron"].to_numpy(), dtype=torch.long) for l, g in df.groupby("layer")}
        scores = ({int(l): torch.tensor(g["value"].to_numpy(dtype=np.float64)) for l, g in df.groupby("layer")}
                  if "value" in df.columns else {})
        return cls(indices, scores=scores, **_frame_meta(df))


_DTYPES = {"layer": "int64", "neuron": "int64", "rank": "int64", "value": "float64", "fraction": "float64",
           "group_size": "Int64", "seed": "Int64"}


def _one_selection(df: pd.DataFrame, name: str | None) -> pd.DataFrame:
    """The rows of one named selection; a frame with several and no name is an error."""
    if "selection" not in df.columns:
        return df
    names = list(dict.fromkeys(df["selection"].astype(str)))
    if name is None and len(names) > 1:
        raise NegmonitorError(f"the table holds several selections ({', '.join(names)}) — pass name=...")
    if name is not None:
        if name not in names:
            raise NegmonitorError(f"no selection {name!r} in the table — it holds {', '.join(names) or 'none'}")
        df = df[df["selection"].astype(str) == name]
    return df


def _frame_meta(df: pd.DataFrame) -> dict:
    """How a selection was made, read from the first row of its frame."""
    if df.empty:
        return {}
    first = df.iloc[0]

    def get(column: str, cast=None):
        if column not in df.columns or pd.isna(first[column]):
            return None
        return cast(first[column]) if cast else first[column]

    how = get("how", str) or "custom"
    label = get("selection", str)
    return {"how": how, "metric": get("metric", str), "fraction": get("fraction", float), "per": get("per", str)
            or "layer", "group_size": get("group_size", int), "seed": get("seed", int),
            "label": label if label != how else None}


def select_neurons(
    result: "ProbeResult | Mapping[int, torch.Tensor]",
    how: str = "top",
    frac: float = 0.01,
    metric: str = "wd",
    per: str = "layer",
    group_size: int | None = None,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    label: str | None = None,
    count: str = "floor",
) -> Selection:
    """Choose the top, bottom or a random ``frac`` of neurons by ``metric``.

    Args:
        result: a :class:`~negmonitor.result.ProbeResult`, or a mapping layer → per-neuron values.
        how: ``top`` (highest values), ``bottom`` (lowest) or ``random`` (seeded; the same count per layer as
            ``top`` with the same arguments would choose).
        frac: fraction in (0, 1] of the neurons of each layer (``per="layer"``) or of each group.
        metric: the per-neuron column of ``result.neurons`` to rank (ignored for a mapping).
        per: ``layer`` or ``group`` (rank the neurons of ``group_size`` consecutive layers together).
        group_size: layers per group; None puts all chosen layers in one group.
        layers: restrict to these layers (default: every layer in ``result``).
        seed: seed of a random selection (each layer's draw depends only on the seed and the layer).
        label: a name for tables.
        count: how many a fraction selects per ranking unit: ``floor`` (``floor(frac·n)``, at least 1) or
            ``percentile`` (the authors' rule, :func:`~negmonitor.metrics.ranking.percentile_count`).

    Raises:
        NegmonitorError: bad ``how``/``per``/``group_size``, a fraction outside (0, 1], an unknown metric or layer.
    """
    check_fraction(frac, "fraction")
    _check_choice(how, HOWS, "selection")
    _check_choice(per, PERS, "per")
    _check_choice(count, COUNTS, "count")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise NegmonitorError(f"group_size must be a positive integer, got {group_size!r} — e.g. group_size=2")
    values = restrict_layers(_metric_values(result, metric), layers)
    ranked = _ranked(values, "bottom" if how == "bottom" else "top", frac, per, group_size, count)
    if how == "random":
        ranked = _random(values, {layer: len(idx) for layer, idx in ranked.items()}, seed)
    return Selection(ranked, how=how, metric=metric, fraction=float(frac), per=per,
                     group_size=group_size if per == "group" else None, seed=seed if how == "random" else None,
                     label=label, scores={layer: values[layer][idx] for layer, idx in ranked.items()})


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise NegmonitorError(f"unknown {what} {value!r} — use one of {', '.join(allowed)}")


def _metric_values(result: "ProbeResult | Mapping[int, torch.Tensor]", metric: str) -> dict[int, torch.Tensor]:
    """Per-layer float64 value tensors from a ProbeResult or a mapping."""
    raw = result if isinstance(result, Mapping) else result.values(metric)
    return {int(layer): torch.as_tensor(v, dtype=torch.float64).reshape(-1) for layer, v in sorted(raw.items())}


def restrict_layers(values: dict[int, torch.Tensor], layers: Sequence[int] | None) -> dict[int, torch.Tensor]:
    """The entries of ``values`` for ``layers`` (negative indices count from the last layer; None: all)."""
    if layers is None:
        return values
    available = sorted(values)
    n = (available[-1] + 1) if available else 0
    chosen = []
    for layer in ([layers] if isinstance(layers, int) else layers):
        index = int(layer) + n if int(layer) < 0 else int(layer)
        if index not in values:
            raise NegmonitorError(f"layer {layer} is not in the probe result — it has layers "
                                  f"{', '.join(map(str, available))}")
        chosen.append(index)
    return {layer: values[layer] for layer in sorted(set(chosen))}


def _groups(layers: list[int], per: str, group_size: int | None) -> list[list[int]]:
    """Ranking units: one layer each, or runs of ``group_size`` consecutive layers (None: all of them)."""
    if per == "layer":
        return [[layer] for layer in layers]
    size = group_size or max(len(layers), 1)
    return [layers[i:i + size] for i in range(0, len(layers), size)]


def _ranked(values: dict[int, torch.Tensor], how: str, frac: float, per: str,
            group_size: int | None, count: str = "floor") -> dict[int, torch.Tensor]:
    """Top or bottom ``frac`` of each ranking unit, split back into layers, best-ranked first."""
    pick = top_k_indices if how == "top" else bottom_k_indices
    chosen: dict[int, torch.Tensor] = {layer: torch.empty(0, dtype=torch.long) for layer in values}
    for group in _groups(sorted(values), per, group_size):
        flat = torch.cat([values[layer] for layer in group])
        owner = torch.cat([torch.full((len(values[layer]),), layer, dtype=torch.long) for layer in group])
        offset = torch.cat([torch.arange(len(values[layer])) for layer in group])
        k = percentile_count(flat, frac, top=how == "top") if count == "percentile" else None
        index = pick(flat, frac, k)
        for layer in group:
            chosen[layer] = offset[index[owner[index] == layer]]
    return chosen


def _random(values: dict[int, torch.Tensor], counts: dict[int, int], seed: int) -> dict[int, torch.Tensor]:
    """``counts[layer]`` neurons per layer drawn without replacement, seeded by ``(seed, layer)``."""
    out = {}
    for layer, n in counts.items():
        rng = np.random.default_rng([int(seed), int(layer)])
        out[layer] = torch.as_tensor(rng.choice(len(values[layer]), size=n, replace=False), dtype=torch.long)
    return out
