"""Minimal-pair scoring: sentence log-probabilities, pair accuracy, and accuracy tables with standard errors.

A sentence's score is the summed (``score="sum"``, default) or mean (``score="mean"``, per scored token)
log-probability (nats) of its tokens.

- Decoder (causal) LMs, ``prefix="bos"`` (default): the sentence is tokenized without special tokens and one
  prefix token is put in front of it, the tokenizer's BOS token, else its EOS token (GPT-2 style models have only
  ``<|endoftext|>``), so that the first word is scored too; the prefix itself is not scored. Tokenizers that add
  BOS on their own (Llama) get exactly one BOS this way. With neither BOS nor EOS the first token cannot be scored
  and is left out (a warning says so). lm-eval's BLiMP task scores the same way.
- ``prefix="none"`` (the authors' code): the tokenizer's own special tokens only (``add_special_tokens=True``):
  none for Pythia, GPT-2 and Qwen, so the first token goes unscored; one BOS for Llama.
- Masked LMs (``*ForMaskedLM``): the pseudo-log-likelihood of Salazar et al. (2020), the sum over the
  sentence's non-special tokens of ``log p(token | sentence with that token masked)``.

Sentences are sorted by token length (longest first) and batched with right padding and an attention mask;
padded positions are never scored, so batched and one-at-a-time scores agree to float precision. A pair is
``correct`` when ``logp_good > logp_bad`` (a tie counts as wrong). Sentences shared between pairs are scored once.

Example::

    >>> scored = evaluate_pairs(model, tokenizer, load_blimp("../shared/data/blimp", sample_per_uid=50))
    >>> accuracy_table(scored, by="uid")
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn

from negmonitor.budget import LOSS_ROWS
from negmonitor.distributed import FailureHold, forward_is_collective
from negmonitor.errors import NegmonitorError
from negmonitor.protocol import PREFIXES, SCORES, check_choice
from negmonitor.evaluation._common import (
    check_batch_size,
    check_lm,
    chunks,
    eval_mode,
    is_masked_lm,
    max_positions,
    model_device,
    no_cache_inputs,
    pad_token_id,
    prefix_token_id,
    progress_bar,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PAIR_COLUMNS = ("sentence_good", "sentence_bad")


def score_sentences(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str],
                    batch_size: int = 32, device: str | torch.device | None = None,
                    progress: bool = False, score: str = "sum", prefix: str = "bos") -> torch.Tensor:
    """Summed (or mean) log-probability (nats) of each sentence, as a float64 CPU tensor in input order.

    Causal LMs score every token after a BOS (else EOS) prefix (``prefix="bos"``) or after the tokenizer's own
    special tokens (``"none"``); masked LMs get the (summed) pseudo-log-likelihood.
    """
    check_batch_size(batch_size)
    check_choice(score, SCORES, "score")
    check_choice(prefix, PREFIXES, "prefix")
    check_lm(model)
    sentences = list(sentences)
    if not all(isinstance(s, str) for s in sentences):
        raise NegmonitorError("score_sentences expects a list of strings — pass sentences, not token ids")
    if not sentences:
        return torch.zeros(0, dtype=torch.float64)
    device = model_device(model, device)
    if is_masked_lm(model):
        return _pseudo_log_likelihoods(model, tokenizer, sentences, batch_size, device, progress)
    sequences = _encode(tokenizer, sentences, prefix)
    _check_lengths(model, tokenizer, sequences)
    scores = torch.zeros(len(sentences), dtype=torch.float64)
    for index, logp, valid in causal_token_logprobs(model, sequences, batch_size, device, pad_token_id(tokenizer),
                                                    progress):
        total = (logp.double() * valid).sum(dim=1)
        scores[index] = total if score == "sum" else total / valid.sum(dim=1).clamp(min=1)
    return scores


def _encode(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], prefix: str) -> list[list[int]]:
    """Token ids of each sentence as a causal LM scores it (see :func:`score_sentences`'s ``prefix``)."""
    if prefix == "bos":
        return encode_with_prefix(tokenizer, sentences)
    return [list(ids) for ids in tokenizer(list(sentences), add_special_tokens=True, verbose=False)["input_ids"]]


def scorable_sentences(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str],
                       prefix: str = "bos") -> list[int]:
    """Indices of the sentences a causal LM scores with :func:`score_sentences` (2 tokens or more once encoded;
    the others score 0), after refusing, as it does, any longer than the model's positions. Sharding only these
    gives every process as many forwards as the others (FSDP needs it) and the same refusals before any forward."""
    check_choice(prefix, PREFIXES, "prefix")
    sequences = _encode(tokenizer, sentences, prefix)
    _check_lengths(model, tokenizer, sequences)
    return [i for i, seq in enumerate(sequences) if len(seq) >= 2]


def encode_with_prefix(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, behind one BOS (else EOS) prefix token if there is one."""
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    prefix = prefix_token_id(tokenizer)
    if prefix is None:
        warnings.warn("the tokenizer has neither a BOS nor an EOS token: the first token of each sentence is not "
                      "scored", stacklevel=3)
        return [list(ids) for ids in encoded]
    return [[prefix, *ids] for ids in encoded]


def _check_lengths(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sequences: Sequence[Sequence[int]]) -> None:
    """Refuse sequences longer than the model's maximum positions."""
    limit = max_positions(model, tokenizer)
    if limit is None:
        return
    too_long = [i for i, seq in enumerate(sequences) if len(seq) > limit]
    if too_long:
        raise NegmonitorError(f"{len(too_long)} sentence(s) (first: #{too_long[0]}) are longer than the model's "
                              f"{limit} positions — shorten or split them")


def causal_token_logprobs(model: nn.Module, sequences: Sequence[Sequence[int]], batch_size: int,
                          device: torch.device, pad_id: int, progress: bool = False
                          ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-token log-probabilities of token sequences under a causal LM, batched by length.

    Yields ``(index, logp, valid)`` per batch: ``index`` [B] positions in ``sequences``; ``logp`` [B, L-1] float32
    CPU, where ``logp[b, t]`` is ``log p(seq[t+1] | seq[:t+1])``; ``valid`` [B, L-1] bool, false on padding.
    Sequences shorter than 2 tokens have nothing to score and are skipped.
    """
    order = sorted((i for i, seq in enumerate(sequences) if len(seq) >= 2), key=lambda i: -len(sequences[i]))
    batches = list(chunks(order, batch_size))
    held = FailureHold(active=forward_is_collective(model))  # under FSDP: raised after the last forward
    with eval_mode(model):
        for batch in progress_bar(batches, progress, total=len(batches), desc="scoring", leave=False):
            input_ids, attention = _right_pad([sequences[i] for i in batch], pad_id)
            picked = _next_token_logprobs(model, input_ids, attention, device, held)
            if picked is not None:
                yield torch.tensor(batch), picked, attention[:, 1:].bool()
    held.raise_held()


@torch.no_grad()
def _next_token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor,
                         device: torch.device, held: FailureHold | None = None) -> torch.Tensor | None:
    """``[B, L-1]`` log-probabilities (float32, CPU) of each next token of a padded batch. With ``held``, a failure
    after the forward is held there (``None`` returned), and once it holds one the forward runs unscored."""
    logits = model(**no_cache_inputs(model, input_ids.to(device), attention.to(device))).logits
    if held is not None and held.failed:
        return None
    with held if held is not None else contextlib.nullcontext():
        return picked_logprobs(logits, input_ids)[:, :-1].cpu()
    return None  # held


def picked_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` float32 ``log p(input_ids[:, t + 1])`` from ``logits[:, t]`` (the last column is meaningless).

    Taken :data:`~negmonitor.budget.LOSS_ROWS` positions at a time, as the target logit minus the log-sum-exp in
    fp32: beside the model's own logits only a slice's fp32 copy exists (a whole-batch fp32 log-softmax over a
    128k vocabulary is twice the size of bf16 logits, and the fp32 copy it starts from is as large again).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # a view of the forward's contiguous logits
    targets = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).reshape(-1).to(flat.device)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], LOSS_ROWS):
        piece = flat[start : start + LOSS_ROWS].float()
        wanted = targets[start : start + LOSS_ROWS].unsqueeze(1)
        out[start : start + LOSS_ROWS] = piece.gather(1, wanted).squeeze(1) - piece.logsumexp(dim=1)
    return out.view(input_ids.shape)


def _right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences into ``[B, L]`` ids (padded on the right with ``pad_id``) and the attention mask."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    return input_ids, attention


def _pseudo_log_likelihoods(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sentences: list[str], batch_size: int,
                            device: torch.device, progress: bool) -> torch.Tensor:
    """Masked-LM pseudo-log-likelihood: one forward pass per (sentence, masked token), batched."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise NegmonitorError(f"{type(model).__name__} is a masked LM but the tokenizer has no mask token — "
                              "pass the model's own tokenizer")
    enc = tokenizer(sentences, add_special_tokens=True, return_special_tokens_mask=True, verbose=False)
    sequences, special = enc["input_ids"], enc["special_tokens_mask"]
    _check_lengths(model, tokenizer, sequences)
    jobs = [(i, p) for i, flags in enumerate(special) for p, flag in enumerate(flags) if not flag]
    jobs.sort(key=lambda job: -len(sequences[job[0]]))
    scores = torch.zeros(len(sentences), dtype=torch.float64)
    pad_id = pad_token_id(tokenizer)
    batches = list(chunks(jobs, batch_size))
    held = FailureHold(active=forward_is_collective(model))  # under FSDP: raised after the last forward
    with eval_mode(model), torch.no_grad():
        for batch in progress_bar(batches, progress, total=len(batches), desc="scoring (PLL)", leave=False):
            input_ids, attention = _right_pad([sequences[i] for i, _ in batch], pad_id)
            rows, positions = torch.arange(len(batch)), torch.tensor([p for _, p in batch])
            targets = input_ids[rows, positions].clone()
            input_ids[rows, positions] = mask_id
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            if held.failed:
                continue
            with held:
                logp = torch.log_softmax(logits[rows, positions].float(), dim=-1)
                picked = logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).squeeze(-1).double().cpu()
                scores.index_add_(0, torch.tensor([i for i, _ in batch]), picked)
    held.raise_held()
    return scores


def evaluate_pairs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs_df: pd.DataFrame, batch_size: int = 32,
                   device: str | torch.device | None = None, progress: bool = False, score: str = "sum",
                   prefix: str = "bos", scorer: Callable[[list[str]], torch.Tensor] | None = None) -> pd.DataFrame:
    """Score each pair: a copy of ``pairs_df`` with ``logp_good``, ``logp_bad`` and ``correct`` (good > bad).

    ``score`` and ``prefix`` as in :func:`score_sentences` (the paper's code: BLiMP ``sum``, TSE ``mean``, both
    ``prefix="none"``). ``scorer``, if given, scores the list of distinct sentences instead of
    :func:`score_sentences` (the DDP split uses it).
    """
    missing = [c for c in PAIR_COLUMNS if c not in pairs_df.columns]
    if missing:
        raise NegmonitorError(f"the pairs table lacks column(s) {', '.join(missing)} — load it with load_blimp or "
                              "load_tse, or name the columns sentence_good and sentence_bad")
    unique = list(dict.fromkeys(pd.concat([pairs_df["sentence_good"], pairs_df["sentence_bad"]]).astype(str)))
    if scorer is not None:
        scores = scorer(unique)
    else:
        scores = score_sentences(model, tokenizer, unique, batch_size=batch_size, device=device, progress=progress,
                                 score=score, prefix=prefix)
    lookup = dict(zip(unique, scores.tolist(), strict=True))
    out = pairs_df.copy()
    out["logp_good"] = out["sentence_good"].astype(str).map(lookup).astype("float64")
    out["logp_bad"] = out["sentence_bad"].astype(str).map(lookup).astype("float64")
    out["correct"] = out["logp_good"] > out["logp_bad"]
    return out


def accuracy_table(df: pd.DataFrame, by: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Accuracy of the ``correct`` column per group: columns ``*by, accuracy, n, se`` (``se = sqrt(p(1-p)/n)``).

    ``by=None`` (or ``[]``) gives one overall row.
    """
    if "correct" not in df.columns:
        raise NegmonitorError("the table has no 'correct' column — score it with evaluate_pairs first")
    keys = [by] if isinstance(by, str) else list(by or [])
    missing = [k for k in keys if k not in df.columns]
    if missing:
        raise NegmonitorError(f"cannot group by {', '.join(missing)}: no such column — use one of "
                              f"{', '.join(map(str, df.columns))}")
    correct = df["correct"].astype(float)
    if keys:
        grouped = correct.groupby([df[k] for k in keys], sort=True, observed=True)
        table = pd.DataFrame({"accuracy": grouped.mean(), "n": grouped.size()}).reset_index()
    else:
        table = pd.DataFrame({"accuracy": [correct.mean() if len(df) else math.nan], "n": [len(df)]})
    table["n"] = table["n"].astype("int64")
    table["se"] = standard_error(table["accuracy"].to_numpy(), table["n"].to_numpy())
    return table


def standard_error(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Binomial standard error ``sqrt(p (1 - p) / n)`` (NaN where ``n == 0``)."""
    p, n = np.asarray(p, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.sqrt(p * (1.0 - p) / n), np.nan)


def accuracy_levels(df: pd.DataFrame, levels: dict[str, Sequence[str]]) -> pd.DataFrame:
    """Accuracy at several levels in one long table: ``level, group, accuracy, n, se``.

    ``levels`` maps a level name to the columns to group by (``[]`` = overall); ``group`` joins the group's
    values with ``"/"`` (``"all"`` for the overall row).
    """
    frames = []
    for level, keys in levels.items():
        table = accuracy_table(df, by=list(keys))
        group = table[list(keys)].astype(str).agg("/".join, axis=1) if keys else pd.Series(["all"] * len(table))
        frames.append(pd.DataFrame({"level": level, "group": group.to_numpy(), "accuracy": table["accuracy"],
                                    "n": table["n"], "se": table["se"]}))
    return pd.concat(frames, ignore_index=True)
