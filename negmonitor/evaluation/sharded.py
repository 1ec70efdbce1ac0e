"""Minimal-pair scores with the sentences split across the processes of a DDP or FSDP run.

Each process scores every ``world_size``-th sentence and the scores are summed over the processes, so every process
ends with the single-process numbers (to float rounding) and none waits while another evaluates. Every process runs
the same number of forward passes (padding with throw-away sentences), as FSDP needs. Masked LMs
(pseudo-log-likelihood, a data-dependent number of passes) are not split: each process scores every sentence.
Perplexity takes its share the same way through :func:`~negmonitor.evaluation.lm_perplexity.perplexity`'s ``shard``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from negmonitor.distributed import Shard, agree_on_failure
from negmonitor.evaluation._common import is_masked_lm, model_device
from negmonitor.evaluation.minimal_pairs import evaluate_pairs, scorable_sentences, score_sentences


def sharded_sentence_scores(model: nn.Module, tokenizer, sentences: Sequence[str], shard: Shard,
                            batch_size: int = 32, score: str = "sum", prefix: str = "bos",
                            progress: bool = False) -> torch.Tensor:
    """:func:`~negmonitor.evaluation.minimal_pairs.score_sentences`, this process scoring its share; every process
    gets all scores (float64, CPU, input order)."""
    sentences = list(sentences)
    if not shard.active or not sentences:
        return score_sentences(model, tokenizer, sentences, batch_size=batch_size, score=score, prefix=prefix,
                               progress=progress)
    if is_masked_lm(model):  # every process scores every sentence; a failure on one still reaches all
        with agree_on_failure():
            return score_sentences(model, tokenizer, sentences, batch_size=batch_size, score=score, prefix=prefix)
    # The sentences with something to score, on every rank alike (a sentence too long is refused here, by every
    # rank, before any forward); each rank takes its share of those and pads to rank 0's count with a scored one,
    # so all run as many forwards (under FSDP each is a collective).
    scorable = scorable_sentences(model, tokenizer, sentences, prefix)
    mine = shard.take(scorable)
    padding = len(range(0, len(scorable), shard.world_size)) - len(mine)  # as many sentences as rank 0
    with agree_on_failure():  # a rank that fails here (allocating the sum's tensor too) tells the others first
        scores = score_sentences(model, tokenizer, [sentences[i] for i in mine] + [sentences[scorable[0]]] * padding,
                                 batch_size=batch_size, score=score, prefix=prefix)
        device = shard.reduction_device(model_device(model, None))
        full = torch.zeros(len(sentences), dtype=torch.float64, device=device)
        full[torch.tensor(mine, dtype=torch.long, device=device)] = scores[: len(mine)].to(device)
    return shard.sum_(full).cpu()


def sharded_evaluate_pairs(model: nn.Module, tokenizer, pairs_df: pd.DataFrame, shard: Shard,
                           batch_size: int = 32, score: str = "sum", prefix: str = "bos",
                           progress: bool = False) -> pd.DataFrame:
    """:func:`~negmonitor.evaluation.minimal_pairs.evaluate_pairs` with the sentences shared out across processes."""
    return evaluate_pairs(model, tokenizer, pairs_df, batch_size=batch_size, score=score, prefix=prefix,
                          scorer=lambda sentences: sharded_sentence_scores(model, tokenizer, sentences, shard,
                                                                           batch_size, score, prefix, progress))
