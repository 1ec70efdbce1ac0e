"""Perplexity and minimal-pair scores with the work split across the processes of a DDP or FSDP run.

Each process scores every ``world_size``-th perplexity window (or sentence) and the sums are reduced, so every
process ends with the single-process numbers (to float rounding) and none waits while another evaluates. Every
process runs the same number of forward passes (padding with throw-away batches), as FSDP needs. Masked LMs
(pseudo-log-likelihood, a data-dependent number of passes) are not split: each process scores every sentence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from negmonitor.distributed import Shard, agree_on_failure
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation._common import eval_mode, is_masked_lm, model_device, pad_token_id
from negmonitor.evaluation.minimal_pairs import evaluate_pairs, score_sentences
from negmonitor.evaluation.perplexity import (
    PerplexityResult,
    _resolve_window,
    _score_batch,
    _score_spans,
    perplexity,
    sliding_windows,
    token_stream,
)


def sharded_perplexity(model: nn.Module, tokenizer, ids: torch.Tensor, shard: Shard, window: int | None = None,
                       stride: int | None = None, batch_size: int = 4, drop_tail: bool = True) -> PerplexityResult:
    """:func:`~negmonitor.evaluation.perplexity.perplexity` of a token stream, this process scoring its share of
    the windows; the summed NLL and token count are reduced over the processes."""
    if not shard.active:
        return perplexity(model, tokenizer, ids, window=window, stride=stride, batch_size=batch_size,
                          drop_tail=drop_tail)
    if is_masked_lm(model):
        raise NegmonitorError(f"perplexity needs a causal LM, got {type(model).__name__} — use a decoder model")
    ids = token_stream(tokenizer, ids)
    if ids.numel() < 2:
        raise NegmonitorError(f"the text has {ids.numel()} token(s); perplexity needs at least 2 — pass more text")
    window, stride = _resolve_window(model, tokenizer, window, stride)
    spans = sliding_windows(ids.numel(), window, stride, drop_tail)
    device, pad_id = model_device(model, None), pad_token_id(tokenizer)
    with agree_on_failure():  # a rank that fails here tells the others before the sum below
        total, count = _score_spans(model, ids, shard.take(spans), batch_size, device, pad_id, False)
        with eval_mode(model), torch.no_grad():
            for _ in range(shard.extra_batches(len(spans), batch_size)):
                _score_batch(model, ids, spans[:1], device, pad_id)
    total, count = shard.sum(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=int(count))


def sharded_sentence_scores(model: nn.Module, tokenizer, sentences: Sequence[str], shard: Shard,
                            batch_size: int = 32, score: str = "sum", prefix: str = "bos") -> torch.Tensor:
    """:func:`~negmonitor.evaluation.minimal_pairs.score_sentences`, this process scoring its share; every process
    gets all scores (float64, CPU, input order)."""
    sentences = list(sentences)
    if not shard.active or is_masked_lm(model) or not sentences:
        return score_sentences(model, tokenizer, sentences, batch_size=batch_size, score=score, prefix=prefix)
    mine = shard.take(range(len(sentences)))
    padding = len(range(0, len(sentences), shard.world_size)) - len(mine)  # as many sentences as rank 0
    with agree_on_failure():  # a rank that fails here tells the others before the sum below
        scores = score_sentences(model, tokenizer, [sentences[i] for i in mine] + sentences[:1] * padding,
                                 batch_size=batch_size, score=score, prefix=prefix)
    device = model_device(model, None)
    full = torch.zeros(len(sentences), dtype=torch.float64, device=device)
    full[torch.tensor(mine, dtype=torch.long, device=device)] = scores[: len(mine)].to(device)
    return shard.sum(full).cpu()


def sharded_evaluate_pairs(model: nn.Module, tokenizer, pairs_df: pd.DataFrame, shard: Shard,
                           batch_size: int = 32, score: str = "sum", prefix: str = "bos") -> pd.DataFrame:
    """:func:`~negmonitor.evaluation.minimal_pairs.evaluate_pairs` with the sentences shared out across processes."""
    if not shard.active:
        return evaluate_pairs(model, tokenizer, pairs_df, batch_size=batch_size, score=score, prefix=prefix)
    return evaluate_pairs(model, tokenizer, pairs_df, batch_size=batch_size, score=score, prefix=prefix,
                          scorer=lambda sentences: sharded_sentence_scores(model, tokenizer, sentences, shard,
                                                                           batch_size, score, prefix))
