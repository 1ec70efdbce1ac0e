"""Pre- and post-activation values of a run's top neurons, for the histograms of Fig. 1c / 6b.

The records hold no raw activations, so the values are recomputed: when a model is at hand (``--model``, a local
model named in a probe/ablate folder, the checkpoint of the shown step in a replay's local series, or a live run's
own ``final_model/`` or step checkpoint beside its records), it is loaded with :func:`negmonitor.models.load_model`,
only the chosen neurons are hooked at the MLP sites, and a small probe pass runs over the probe text;
post-activations apply the site's own nonlinearity. Without a model a run is left out, with the reason: the
handful of stored top-pair values is no picture of a neuron's distribution. Without a model, the histograms a
measurement keeps in the records (``histograms/``: 64 bins per top-WD neuron over its values at the probe's sampled
positions) are drawn instead, post-activations through the family's nonlinearity.
"""

from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from negmonitor.report.base import ReportContext, last_snapshot, snapshot_at
from negmonitor.report.sources import RunData

FAMILY_ACTIVATIONS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "gpt_neox": ("GELU", torch.nn.functional.gelu),
    "bert": ("GELU", torch.nn.functional.gelu),
    "gpt2": ("GELU (tanh)", lambda x: torch.nn.functional.gelu(x, approximate="tanh")),
    "llama": ("SiLU", torch.nn.functional.silu),
    "opt": ("ReLU", torch.relu),
}
MARKER = re.compile(r"\[\[(.*)\]\]\s*$", re.S)


@dataclass
class NeuronValues:
    """Pre- and post-activation samples of one neuron and its top pairs at ``step``."""

    layer: int
    neuron: int
    wd: float
    pre: np.ndarray
    post: np.ndarray
    pairs: pd.DataFrame = field(default_factory=pd.DataFrame)
    act: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.gelu
    hist: tuple[np.ndarray, np.ndarray] | None = None  # (counts, edges) from the records, instead of values


@dataclass
class RunActivations:
    """The chosen neurons of one run and where their values came from."""

    run: RunData
    step: int
    neurons: list[NeuronValues]
    how: str


def run_activations(ctx: ReportContext, run: RunData) -> RunActivations | None:
    """Values for ``run``'s top neurons (cached per run); None when it has no per-neuron data."""
    cache = ctx.cache.setdefault("activations", {})
    if run.label not in cache:
        cache[run.label] = _compute(ctx, run)
    return cache[run.label]


def choose_neurons(run: RunData, k: int) -> tuple[int, list[tuple[int, int]], pd.DataFrame, pd.DataFrame] | None:
    """``(step, [(layer, neuron)], pairs at step, neurons at step)``: the top-WD neurons among those with stored
    top pairs (the top-MD neurons), else the top-WD neurons; None without data."""
    pair_step, pairs = last_snapshot(run.pairs)
    neuron_step, snap = last_snapshot(run.neurons)
    if pair_step is not None and "y_a" in pairs.columns:
        step = pair_step
        snap = snapshot_at(run, step)
        candidates = pairs.groupby(["layer", "neuron"])["md"].first().reset_index()
        if "wd" in snap.columns and len(snap):
            candidates = candidates.merge(snap[["layer", "neuron", "wd"]], on=["layer", "neuron"], how="left")
            candidates = candidates.sort_values(["wd", "md"], ascending=False)
        else:
            candidates = candidates.sort_values("md", ascending=False)
    elif neuron_step is not None and "wd" in snap.columns:
        step, candidates = neuron_step, snap.sort_values("wd", ascending=False)
    else:
        return None
    chosen = [(int(r.layer), int(r.neuron)) for r in candidates.head(k).itertuples(index=False)]
    return step, chosen, pairs if pair_step == step else pairs.iloc[0:0], snap


def _compute(ctx: ReportContext, run: RunData) -> RunActivations | None:
    picked = choose_neurons(run, ctx.options.top_neurons)
    if picked is None or not picked[1]:
        return None
    step, chosen, pairs, snap = picked
    wd = {(int(r.layer), int(r.neuron)): float(r.wd) for r in snap.itertuples(index=False)} if "wd" in snap else {}
    model_path = ctx.model_for(run, step)
    recomputed = _recompute(ctx, run, model_path, chosen) if model_path is not None else None
    if recomputed is None and not run.histograms.empty:
        return _from_records(run, ctx.options.top_neurons)
    if recomputed is None:
        why = ("no model for step {step}" if model_path is None else f"no probe text for the model at {model_path}")
        ctx.cache.setdefault("activation_skips", {})[run.label] = (
            why.format(step=step) + " — pass --model (the run's final_model/ or a .ckpt of that step) and, for a "
            "probe given as strings, --probe-text")
        return None
    pre, activations, how = recomputed
    fallback = torch.nn.functional.gelu
    values = []
    for key in chosen:
        x = torch.as_tensor(pre.get(key, np.zeros(0)), dtype=torch.float32)
        act = activations.get(key[0], fallback)
        with torch.no_grad():
            post = act(x).numpy() if x.numel() else np.zeros(0)
        neuron_pairs = pairs[(pairs.layer == key[0]) & (pairs.neuron == key[1])].sort_values("rank") \
            if len(pairs) else pairs
        values.append(NeuronValues(key[0], key[1], wd.get(key, float("nan")), x.numpy(), post, neuron_pairs, act))
    return RunActivations(run, step, values, how)


def _from_records(run: RunData, k: int) -> RunActivations | None:
    """The top-WD neurons' histograms kept in the records at their last step (no model needed)."""
    hist = run.histograms
    step = int(hist.step.max())
    at = hist[hist.step == step]
    snap = snapshot_at(run, step)
    wd = {(int(r.layer), int(r.neuron)): float(r.wd) for r in snap.itertuples(index=False)} if "wd" in snap else {}
    keys = sorted({(int(l), int(n)) for l, n in zip(at.layer, at.neuron)}, key=lambda key: -wd.get(key, -np.inf))
    name, act = FAMILY_ACTIVATIONS.get(str(run.meta.get("family")), (None, torch.nn.functional.gelu))
    pairs = run.pairs[run.pairs.step == step] if not run.pairs.empty and "step" in run.pairs else run.pairs.iloc[0:0]
    values = []
    for layer, neuron in keys[:k]:
        rows = at[(at.layer == layer) & (at.neuron == neuron)].sort_values("bin")
        edges = np.append(rows.left.to_numpy(float), rows.right.to_numpy(float)[-1:])
        neuron_pairs = pairs[(pairs.layer == layer) & (pairs.neuron == neuron)].sort_values("rank") \
            if len(pairs) else pairs
        values.append(NeuronValues(layer, neuron, wd.get((layer, neuron), float("nan")), np.zeros(0), np.zeros(0),
                                   neuron_pairs, act, hist=(rows["count"].to_numpy(float), edges)))
    if not values:
        return None
    family = str(run.meta.get("family") or "unknown")
    post = f"{name} ({family})" if name else f"GELU (assumed: no nonlinearity known for model family {family!r})"
    how = (f"from the records: {len(rows)}-bin histograms of each top-WD neuron's pre-activations at the probe's "
           f"sampled positions at step {step} (no model given), post-activation = {post} of the bin centres")
    return RunActivations(run, step, values, how)


def _recompute(ctx: ReportContext, run: RunData, model_path: str,
               chosen: list[tuple[int, int]]) -> tuple[dict, dict, str] | None:
    """Hook the chosen neurons during a probe pass with the model; return values, activation modules, a caption
    (None when there is no text to run)."""
    from negmonitor.adapters import find_sites
    from negmonitor.evaluation._common import no_cache_inputs
    from negmonitor.probeset import ProbeSet

    source, described = probe_source(ctx, run)
    if source is None:
        return None
    model, tokenizer = load_cached(ctx, model_path)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    probe_set = ProbeSet.build(source, tokenizer, n_tokens=ctx.options.hist_tokens, window=256, n_pairs=0,
                               max_positions=max_positions)
    sites = {s.layer: s for s in find_sites(model, sorted({layer for layer, _ in chosen}))}
    columns = {layer: [n for l2, n in chosen if l2 == layer] for layer in sites}
    store: dict[int, list[torch.Tensor]] = {layer: [] for layer in sites}
    mask_now: list[torch.Tensor] = []

    def hook_for(layer: int):
        index = torch.tensor(columns[layer])

        def hook(module, args, output):
            flat = output.detach()[..., index.to(output.device)].reshape(-1, len(index)).float().cpu()
            store[layer].append(flat[mask_now[0]])
        return hook

    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack, torch.no_grad():
        for layer, site in sites.items():
            stack.callback(site.projection.register_forward_hook(hook_for(layer)).remove)
        for start in range(0, probe_set.n_windows, 8):
            ids = probe_set.input_ids[start:start + 8]
            mask = probe_set.attention_mask[start:start + 8]
            mask_now[:] = [mask.reshape(-1).bool()]
            model(**no_cache_inputs(model, ids.to(device), mask.to(device)))
    values = {}
    for layer, chunks in store.items():
        stacked = torch.cat(chunks).numpy()
        for column, neuron in enumerate(columns[layer]):
            values[(layer, neuron)] = stacked[:, column]
    activations = {layer: site.activation for layer, site in sites.items()}
    site = next(iter(sites.values()))
    how = (f"recomputed: pre-activations of the model at {model_path} ({site.family}) over {probe_set.n_tokens} "
           f"tokens of {described}; post-activation = the model's own nonlinearity "
           f"({type(site.activation).__name__})")
    return values, activations, how


def load_cached(ctx: ReportContext, path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)``, kept until another model is needed: one model in memory at a time (a report over
    several Pythia-12B checkpoints would otherwise hold 24 GB per checkpoint), keyed by the resolved folder (``m``
    and ``m/`` are one model)."""
    from negmonitor.models import load_model

    local = Path(path).expanduser()
    key = str(local.resolve()) if local.exists() else str(path)
    models = ctx.cache.setdefault("models", {})
    if key not in models:
        if models:
            models.clear()  # the previous model goes before the next one loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        models[key] = load_model(path, device=ctx.options.device, dtype=ctx.options.dtype,
                                 tokenizer=ctx.options.tokenizer)
    return models[key]


GRAMMAR = "grammar"  # --probe-text grammar: the built-in grammar corpus's held-out text


def probe_source(ctx: ReportContext, run: RunData) -> tuple[Any, str]:
    """The probe text for ``run``: ``--probe-text`` (``grammar``: the built-in grammar corpus's held-out text, as
    ``ablate --probe-text grammar``), the run's own probe file, else its stored pair contexts."""
    if ctx.options.probe_text == GRAMMAR and not Path(GRAMMAR).exists():
        from negmonitor.train.grammar import GrammarCorpus

        seed = int((run.meta.get("ablation_meta") or {}).get("grammar_seed") or 0)
        return GrammarCorpus(seed).heldout_texts(), f"the built-in grammar corpus's held-out text (seed {seed})"
    if ctx.options.probe_text:
        return str(ctx.options.probe_text), f"the probe text {ctx.options.probe_text}"
    own = run.meta.get("probe_source")
    if own and Path(str(own)).expanduser().exists():
        return str(own), f"the run's probe text {own}"
    contexts = stored_contexts(run)
    if contexts:
        return contexts, f"the {len(contexts)} contexts stored with the run's top pairs (no probe text given)"
    return None, "no probe text"


def stored_contexts(run: RunData) -> list[str]:
    """Distinct texts of the contexts stored with the top pairs, markers removed."""
    if run.pairs.empty or "context_a" not in run.pairs.columns:
        return []
    texts = pd.concat([run.pairs.context_a, run.pairs.context_b]).dropna().astype(str)
    return sorted({strip_marker(t) for t in texts if t.strip()})


def strip_marker(context: str) -> str:
    """``"the cat[[ sees]]"`` → ``"the cat sees"``."""
    return MARKER.sub(lambda m: m.group(1), context)
