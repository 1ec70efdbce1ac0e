"""Evaluation: perplexity, minimal-pair suites (BLiMP, TSE), lm-eval tasks, and surprisal by part of speech.

Every function takes an in-memory model and tokenizer, so it measures the model exactly as it is, hooks and
ablations included, and leaves its training flag as it found it. Loaders return tidy DataFrames; scorers add
columns; accuracy tables carry ``n`` and a binomial standard error.

Example::

    >>> from negmonitor.evaluation import load_blimp, evaluate_pairs, blimp_accuracy
    >>> scored = evaluate_pairs(model, tokenizer, load_blimp("../shared/data/blimp", sample_per_uid=100))
    >>> blimp_accuracy(scored).query("level == 'overall'")

``lm_eval_bridge`` imports lm-eval (slow) only when :func:`run_lm_eval` is called; ``pos_surprisal`` imports
spaCy only when a pipeline is loaded.
"""

from negmonitor.evaluation.blimp import BLIMP_UIDS, blimp_accuracy, load_blimp
from negmonitor.evaluation.lm_eval_bridge import results_table, run_lm_eval
from negmonitor.evaluation.minimal_pairs import (
    accuracy_levels,
    accuracy_table,
    evaluate_pairs,
    score_sentences,
    standard_error,
)
from negmonitor.evaluation.lm_perplexity import PerplexityResult, load_perplexity_text, perplexity, sliding_windows
from negmonitor.evaluation.pos_surprisal import (
    TokenSurprisal,
    align_to_words,
    compare_pos_surprisal,
    label_tokens,
    load_spacy,
    pos_excess_surprisal,
    pos_model_token_table,
    pos_token_table,
    token_surprisals,
    window_surprisals,
)
from negmonitor.evaluation.tse import load_tse, safe_load_pickle, tse_accuracy

__all__ = [
    "BLIMP_UIDS",
    "PerplexityResult",
    "TokenSurprisal",
    "accuracy_levels",
    "accuracy_table",
    "align_to_words",
    "blimp_accuracy",
    "compare_pos_surprisal",
    "label_tokens",
    "evaluate_pairs",
    "load_blimp",
    "load_perplexity_text",
    "load_spacy",
    "load_tse",
    "perplexity",
    "pos_excess_surprisal",
    "pos_model_token_table",
    "pos_token_table",
    "results_table",
    "run_lm_eval",
    "safe_load_pickle",
    "score_sentences",
    "sliding_windows",
    "standard_error",
    "token_surprisals",
    "tse_accuracy",
    "window_surprisals",
]
