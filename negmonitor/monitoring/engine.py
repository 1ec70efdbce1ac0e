"""One measurement of a model at a training step, shared by the live callbacks and the checkpoint replay.

:func:`take_measurement` runs the probe pass (layer groups under the memory budget), follows the fixed cohort, measures weight drift
against the previous snapshot and returns a :class:`Measurement`: per-layer scalar rows (the TensorBoard curves),
a per-neuron snapshot (the parquet records) and a few samples for histograms and images. Under
``torch.distributed`` every rank measures its share of the probe windows and the sums are reduced, so the result
equals the single-process one; every rank must call it (it contains collectives).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable, ContextManager, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from negmonitor.adapters import MLPSite, find_sites
from negmonitor.budget import BatchLimit
from negmonitor.capture import unwrap_compiled
from negmonitor.distributed import agree_on_failure, gathers_weight, join_weight_read
from negmonitor.metrics.drift import weight_drift
from negmonitor.metrics.ranking import jaccard, top_k_indices
from negmonitor.probing import ProbeSettings, measure
from negmonitor.probeset import ProbeSet
from negmonitor.records import scalar_rows
from negmonitor.result import ProbeResult


@dataclass
class MonitorSettings:
    """What a measurement computes.

    Args:
        layers: layer indices to monitor (None: all).
        cohort_frac: share of neurons per layer in the top-WD cohort (the paper: a few %).
        cohort_step: fix the cohort at the first measurement at or after this step (None: the first measurement
            after ``warmup_steps``).
        warmup_steps: steps before which no cohort is fixed.
        weight_drift: measure the weight drift between successive measurements.
        drift_dtype: dtype of the previous-weights snapshot, kept in host memory (compared on the model's device one
            layer at a time). bf16 (default) halves an
            fp32 copy; both snapshots are rounded alike, so an unchanged row drifts by exactly 0. bf16's rounding
            (relative 2⁻⁸ per weight, independent per weight) adds ≈3e-6 to a cosine dissimilarity D plus noise of
            order sqrt(D·1e-5/d_in): per neuron within ~3% for D ≥ 5e-3 (rows moving ≥10% between measurements,
            as they do hundreds of steps apart), the layer-normalised value likewise. Use ``torch.float32`` for
            measurements a few warm-up steps apart (D ~ 1e-6 and less).
        image_neurons: how many top-WD neurons per layer get a pre-activation histogram image.
        probe: probe-pass settings (batch size, pair-sign defaults).
    """

    layers: Sequence[int] | None = None
    cohort_frac: float = 0.05
    cohort_step: int | None = None
    warmup_steps: int = 0
    weight_drift: bool = True
    drift_dtype: torch.dtype = torch.bfloat16
    image_neurons: int = 4
    probe: ProbeSettings = field(default_factory=ProbeSettings)


@dataclass
class MonitorState:
    """What must survive between measurements (and a restart): the cohort and the previous weight snapshot.

    :meth:`to_dict` holds the small part only (cohort, steps): the snapshot (``prev_weights``, layer -> rows of the
    monitored projection at ``prev_step``) is as large as the monitored weights and is saved beside the records
    (:mod:`negmonitor.monitoring.drift_snapshot`), never in a checkpoint.
    """

    cohort: dict[int, list[int]] | None = None
    cohort_step: int | None = None
    prev_weights: dict[int, torch.Tensor] | None = None
    prev_step: int | None = None

    def to_dict(self) -> dict:
        """Plain-dict form for ``state_dict``: no tensors (the weight snapshot is saved on its own)."""
        return {"cohort": self.cohort, "cohort_step": self.cohort_step, "prev_step": self.prev_step}

    @classmethod
    def from_dict(cls, data: dict) -> "MonitorState":
        """Inverse of :meth:`to_dict`; missing keys take their defaults (an older checkpoint's snapshot is kept)."""
        cohort = data.get("cohort")
        return cls(cohort={int(k): list(v) for k, v in cohort.items()} if cohort else None,
                   cohort_step=data.get("cohort_step"), prev_weights=data.get("prev_weights"),
                   prev_step=data.get("prev_step"))


@dataclass
class Measurement:
    """Everything one measurement produced."""

    step: int
    result: ProbeResult
    scalars: pd.DataFrame
    neurons: pd.DataFrame
    samples: dict[int, tuple[list[int], np.ndarray]] = field(default_factory=dict)

    @property
    def histograms(self) -> pd.DataFrame:
        """The samples as compact records: a ``HISTOGRAM_BINS``-bin histogram per top-WD neuron over its sampled
        values' [min, max] (``layer, neuron, bin, left, right, count``), so a report draws the neuron's real
        distribution without the model."""
        return sample_histograms(self.samples)

    def scalar(self, metric: str, layer: int) -> float:
        """One scalar value (NaN when absent)."""
        rows = self.scalars[(self.scalars.metric == metric) & (self.scalars.layer == layer)]
        return float(rows.value.iloc[0]) if len(rows) else float("nan")


def take_measurement(
    model: nn.Module,
    probe_set: ProbeSet,
    step: int,
    settings: MonitorSettings,
    state: MonitorState,
    tokenizer: object | None = None,
    rank: int = 0,
    world_size: int = 1,
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
    batch_limit: BatchLimit | None = None,
) -> Measurement:
    """Measure ``model`` at ``step``, update ``state`` (cohort, weight snapshot) and return the measurement.

    ``forward_context`` wraps the probe forward (e.g. the trainer's autocast); statistics are fp32 either way.
    ``batch_limit``: the run's probe batch size after an out-of-memory retry (see :class:`BatchLimit`).
    Every rank runs the probe pass (its statistics are reduced across ranks; under DDP every phase that precedes a
    collective is closed by :func:`~negmonitor.distributed.agree_on_failure`, so a failure on one rank makes every
    rank raise and skip instead of leaving the others waiting) and gets the :class:`ProbeResult`, whose tables are
    built only when read: the other ranks read just its per-layer values (the ablation's selections). Only rank 0
    follows the cohort, measures drift and builds the tables: the others get empty scalars and neurons. Under FSDP
    the other ranks join rank 0's weight gathers.
    """
    eager = unwrap_compiled(model)
    sites = find_sites(eager, settings.layers)
    probe_settings = replace(settings.probe, sample_neurons=settings.image_neurons)
    summaries = measure(eager, probe_set, sites, probe_settings, rank=rank, world_size=world_size,
                        forward_context=forward_context, batch_limit=batch_limit)
    with agree_on_failure(world_size > 1):  # no collective follows, but every rank should skip the same steps
        result = ProbeResult.from_summaries(summaries, sites, probe_set, tokenizer, probe_settings)
    samples = {s.layer: s.samples for s in summaries if s.samples is not None}
    del summaries
    gathered = settings.weight_drift and any(gathers_weight(site.projection) for site in sites)
    if rank != 0:
        with agree_on_failure(world_size > 1):  # learn whether rank 0's part below failed (and tell it of ours)
            if gathered:
                _join_weight_reads(sites)
        return Measurement(step, result, scalar_rows([]), pd.DataFrame())  # with the columns rank 0's scalars have
    # Rank 0 alone follows the cohort, measures drift and builds the tables; a failure here reaches every rank
    # before what follows the measurement (an ablation's collectives), so all skip it together. Under FSDP the
    # drift's weight reads are collectives: rank 0 joins every one of them even after a failure, so the guard's
    # all-reduce comes after the same gathers on every rank.
    with agree_on_failure(world_size > 1):
        try:
            _maybe_fix_cohort(result, step, settings, state)
        except Exception:
            if gathered:
                _join_weight_reads(sites)
            raise
        since = state.prev_step  # the drift's base (replaced by this step below)
        drift = _drift(sites, state, step, settings.drift_dtype) if settings.weight_drift else {}
        neurons = _neuron_snapshot(result, state, drift)
        scalars = _layer_scalars(result, neurons, state, drift, settings, since)
    return Measurement(step, result, scalars, neurons, samples)


HISTOGRAM_BINS = 64


def sample_histograms(samples: dict[int, tuple[list[int], np.ndarray]], bins: int = HISTOGRAM_BINS) -> pd.DataFrame:
    """``layer, neuron, bin, left, right, count`` rows: each sampled neuron's values in ``bins`` equal bins."""
    parts: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # one (layer, neuron, counts, edges) per sampled neuron
    for layer, (neurons, values) in samples.items():
        for neuron, column in zip(neurons, np.asarray(values, dtype=float).T):
            column = column[np.isfinite(column)]
            if column.size:
                parts.append((int(layer), int(neuron), *np.histogram(column, bins=bins)))
    columns = ["layer", "neuron", "bin", "left", "right", "count"]
    if not parts:
        return pd.DataFrame(columns=columns)
    edges = np.stack([p[3] for p in parts])
    return pd.DataFrame({"layer": np.repeat([p[0] for p in parts], bins), "neuron": np.repeat([p[1] for p in parts], bins),
                         "bin": np.tile(np.arange(bins), len(parts)), "left": edges[:, :-1].reshape(-1),
                         "right": edges[:, 1:].reshape(-1), "count": np.concatenate([p[2] for p in parts])},
                        columns=columns)


def _maybe_fix_cohort(result: ProbeResult, step: int, settings: MonitorSettings, state: MonitorState) -> None:
    if state.cohort is not None:
        return
    first_step = settings.cohort_step if settings.cohort_step is not None else settings.warmup_steps
    if step < first_step:
        return
    state.cohort = {layer: top_k_indices(values, settings.cohort_frac).tolist()
                    for layer, values in result.values("wd").items()}
    state.cohort_step = int(step)


def _join_weight_reads(sites: Sequence[MLPSite]) -> None:
    """Under FSDP the drift's weight reads are collectives: a rank that does not measure drift joins each of them, in
    the same order as rank 0's :func:`_drift`, without copying the weights; it joins every one even after a failure
    (raised after the last), as the other ranks go on to the next."""
    failure: Exception | None = None
    for site in sites:
        try:
            join_weight_read(site.projection)
        except Exception as exc:  # noqa: BLE001 - raised after the loop
            failure = failure or exc
    if failure is not None:
        raise failure


def _drift(sites: Sequence[MLPSite], state: MonitorState, step: int,
           dtype: torch.dtype = torch.bfloat16) -> dict[int, dict[str, torch.Tensor]]:
    """Per-neuron weight drift since the previous measurement; the snapshot is replaced by the current weights.

    The snapshot lives in host memory, in ``dtype``: the model's device belongs to training. One layer at a time,
    its previous rows go to the model's device, are compared with the live weights (rounded to ``dtype`` block by
    block, so the values are those of two rounded snapshots), the current rows are copied to the host and the
    previous ones freed: beyond the model, the device holds about one layer's rows and the host one snapshot plus
    a layer. A snapshot given in another dtype (e.g. by the replay) is compared at ``dtype`` too. A failure part-way
    drops the snapshot (drift restarts at the next measurement) rather than leave one of mixed steps.
    """
    previous = dict(state.prev_weights or {})
    state.prev_weights, state.prev_step = None, None  # the state's reference goes: each layer is freed once compared
    current, drift = {}, {}
    failure: Exception | None = None
    for site in sites:
        # The live weight (a gathered copy under FSDP: every site is read, in order, even after a failure, as the
        # other ranks join each read; after one, without the copy).
        if failure is not None:
            try:
                join_weight_read(site.projection)
            except Exception:  # noqa: BLE001 - the first failure is the one raised
                pass
            continue
        rows = None
        try:
            rows = site.weight_rows().detach()
            before = previous.pop(site.layer, None)
            if before is not None and before.shape == rows.shape:
                drift[site.layer] = _layer_drift(before, rows, dtype)
            del before
            current[site.layer] = host_copy(rows, dtype)
        except Exception as exc:  # noqa: BLE001 - raised after the loop
            failure = exc
        del rows
    if failure is not None:
        raise failure
    state.prev_weights, state.prev_step = current, int(step)
    return drift


def _layer_drift(before: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Drift of one layer on the weights' device (its previous rows moved there in ``dtype``, then freed); on CPU."""
    on_device = before.to(rows.device, dtype)  # converted on the host (a blocking copy): the device gets ``dtype``
    values = weight_drift(on_device, rows, dtype=dtype)
    return {key: value.cpu() for key, value in values.items()}


_COPY_BLOCK_ELEMENTS = 1 << 22  # rows rounded on the device per copy to the host: 16 MiB of fp32 at any width


def host_copy(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` as a new host tensor in ``dtype`` (never the live weight), rounded on the weights' device a block of
    rows at a time: the device allocates one block, and only ``dtype``'s bytes cross to the host. The copy keeps
    the rows' layout (GPT-2's ``Conv1D`` rows are a transposed view), so the drift's fp32 sums run in the order
    they always did and the values stay bit for bit those of a copy on the device."""
    out = torch.empty_like(rows, dtype=dtype, device="cpu")
    block = max(1, _COPY_BLOCK_ELEMENTS // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], block):
        out[r0 : r0 + block].copy_(rows[r0 : r0 + block].to(dtype))
    return out


def _neuron_snapshot(result: ProbeResult, state: MonitorState, drift: dict) -> pd.DataFrame:
    frame = result.neurons.copy()
    cohort = state.cohort or {}
    frame["in_cohort"] = _in_cohort(frame.layer.to_numpy(), frame.neuron.to_numpy(), cohort)
    for key in ("cos_dissim", "cos_dissim_norm", "l2", "l2_norm"):
        frame[f"drift_{key}"] = np.nan
    for layer, values in drift.items():
        rows = frame.index[frame.layer == layer]
        for key in ("cos_dissim", "cos_dissim_norm", "l2", "l2_norm"):
            frame.loc[rows, f"drift_{key}"] = values[key].double().numpy()
    return frame


def _in_cohort(layers: np.ndarray, neurons: np.ndarray, cohort: dict[int, list[int]]) -> np.ndarray:
    """Whether each (layer, neuron) row is in the cohort: one ``isin`` over combined keys, no per-row Python."""
    if not cohort or layers.size == 0:
        return np.zeros(layers.size, dtype=bool)
    width = int(max(neurons.max(), max((max(v, default=0) for v in cohort.values()), default=0))) + 1
    members = np.concatenate([np.asarray(v, dtype=np.int64) + int(layer) * width for layer, v in cohort.items()])
    return np.isin(layers.astype(np.int64) * width + neurons.astype(np.int64), members)


LAYER_COLUMNS = {"wd/max": "wd_max", "wd/mean": "wd_mean", "wd/p99": "wd_p99", "wd/neg_share": "wd_neg_share",
                 "wd/neg_share_top": "wd_neg_share_top", "md/mean": "md_mean", "md/max": "md_max",
                 "pairs/nn_share": "nn_share", "pairs/pn_share": "pn_share", "pairs/pp_share": "pp_share",
                 "jaccard/wd_md_top": "jaccard_wd_md", "health/nonfinite_tokens": "nonfinite_tokens",
                 "health/nan_neurons": "nan_neurons"}


def _layer_scalars(result: ProbeResult, neurons: pd.DataFrame, state: MonitorState, drift: dict,
                   settings: MonitorSettings, drift_since: int | None = None) -> pd.DataFrame:
    rows: list[tuple[int, int, str, float]] = []
    for record in result.layers.to_dict("records"):
        layer = int(record["layer"])
        rows += [(layer, -1, metric, float(record[column])) for metric, column in LAYER_COLUMNS.items()]
        rows += _cohort_rows(layer, neurons[neurons.layer == layer], state, settings)
    rows += _whole_model_rows(rows)
    if drift and drift_since is not None:  # the step the drift is measured from: a replay's intervals run from 1
        rows.append((-1, -1, "drift/since_step", float(drift_since)))  # step (step0→1) to 78,000 (→143000)
    return scalar_rows(rows)


def _cohort_rows(layer: int, frame: pd.DataFrame, state: MonitorState, settings: MonitorSettings) -> list:
    wd = frame.sort_values("neuron").wd.to_numpy()
    current = top_k_indices(torch.tensor(wd), settings.cohort_frac).numpy() if np.isfinite(wd).any() else np.array([], dtype=np.int64)
    rows = [(layer, -1, "wd/current_top_mean", _mean(wd[current]))]
    if not state.cohort or layer not in state.cohort:
        return rows
    members = frame.in_cohort.to_numpy()
    rows += [(layer, -1, "wd/cohort_mean", _mean(frame.wd.to_numpy()[members])),
             (layer, -1, "wd/rest_mean", _mean(frame.wd.to_numpy()[~members])),
             (layer, -1, "wd/cohort_neg_share", _share(frame.wd_neg.to_numpy()[members], frame.wd.to_numpy()[members])),
             (layer, -1, "cohort/overlap_with_current_top", jaccard(torch.tensor(state.cohort[layer]),
                                                                   torch.tensor(current)))]
    drift = frame.drift_cos_dissim_norm.to_numpy()
    if np.isfinite(drift).any():
        cohort, rest = _mean(drift[members]), _mean(drift[~members])
        rows += [(layer, -1, "drift/cohort", cohort), (layer, -1, "drift/rest", rest),
                 (layer, -1, "drift/cohort_vs_rest", cohort / rest if rest and np.isfinite(rest) else float("nan"))]
    return rows


def _whole_model_rows(rows: list) -> list:
    """Model-wide means (``layer = -1``) of the headline curves."""
    out = []
    for metric in ("wd/cohort_mean", "wd/rest_mean", "wd/max", "wd/neg_share", "wd/cohort_neg_share", "wd/neg_share_top",
                   "pairs/nn_share", "drift/cohort_vs_rest"):
        values = [v for _, _, m, v in rows if m == metric and np.isfinite(v)]
        if values:
            out.append((-1, -1, metric, float(np.mean(values))))
    return out


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _share(part: np.ndarray, whole: np.ndarray) -> float:
    ok = np.isfinite(part) & np.isfinite(whole)
    total = whole[ok].sum()
    return float(part[ok].sum() / total) if total > 0 else float("nan")
