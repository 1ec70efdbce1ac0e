"""Memory of the per-token log-probability path (minimal pairs, POS surprisal) at paper scale: no KV cache, the fp32
log-probabilities taken a slice at a time, and surprisal windows batched to the memory budget with an out-of-memory
retry, as perplexity is."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
import torch

from conftest import out_of_memory_above
from negmonitor.budget import LOSS_ROWS, BatchLimit, lm_window_bytes
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.minimal_pairs import picked_logprobs, score_sentences
from negmonitor.evaluation.pos_surprisal import window_surprisals
from tiny_models import tiny_causal_lm, tiny_tokenizer

TEXT = ("The author that the guard likes laughs. No authors have ever been popular. Homarus gammarus is a species "
        "of lobster from the eastern Atlantic Ocean. ") * 6


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("neox", init_range=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picked_logprobs_equal_a_whole_log_softmax_over_several_slices(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 400, 50) * 4).to(dtype)  # 1,200 positions: three slices of LOSS_ROWS
    ids = torch.randint(0, 50, (3, 400))
    assert logits.shape[0] * logits.shape[1] > 2 * LOSS_ROWS
    expected = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    got = picked_logprobs(logits, ids)
    assert got.dtype == torch.float32 and got.shape == ids.shape
    torch.testing.assert_close(got[:, :-1], expected, rtol=0, atol=2e-5)


def test_scoring_forwards_ask_for_no_kv_cache(model, tokenizer):
    """Nothing reads the cache; at 2,048 tokens it is every layer's keys and values (24 GB for Pythia-12B)."""
    seen: list[dict] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    try:
        score_sentences(model, tokenizer, ["The author laughs.", "No authors have ever been popular."])
        window_surprisals(model, tokenizer, TEXT, window=16)
    finally:
        handle.remove()
    assert len(seen) >= 2 and all(kwargs.get("use_cache") is False for kwargs in seen)


def _surprisals(result):
    return np.concatenate([s.surprisal for s in result[1]])


def test_surprisal_windows_fit_the_budget_and_give_the_unbounded_result(model, tokenizer):
    expected = window_surprisals(model, tokenizer, TEXT, window=16, batch_size=1, memory_budget=None)
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="surprisal batch size 8 -> 2"):
            bounded = window_surprisals(model, tokenizer, TEXT, window=16, batch_size=8,
                                        memory_budget=2 * lm_window_bytes(model, 16))
        assert max(rows) == 2 and len(rows) > 2
        rows.clear()
        free = window_surprisals(model, tokenizer, TEXT, window=16, batch_size=8, memory_budget=None)
        assert max(rows) == 8
        rows.clear()
        # A budget below one window (a 128k vocabulary at 2,048 tokens plans more than the default 2 GiB): the
        # windows are scored one at a time, warned, not refused (the report's user set no budget).
        with pytest.warns(UserWarning, match="one 16-token surprisal window plans .* scored one at a time"):
            alone = window_surprisals(model, tokenizer, TEXT, window=16, batch_size=8,
                                      memory_budget=lm_window_bytes(model, 16) - 1)
        assert max(rows) == 1
    finally:
        handle.remove()
    assert expected[0] == bounded[0]
    for result in (bounded, free, alone):
        np.testing.assert_allclose(_surprisals(result), _surprisals(expected), rtol=1e-5, equal_nan=True)


def test_out_of_memory_halves_the_surprisal_batch_and_later_calls_start_there(model, tokenizer, monkeypatch):
    module = importlib.import_module("negmonitor.evaluation.minimal_pairs")
    expected = window_surprisals(model, tokenizer, TEXT, window=16, batch_size=1, memory_budget=None)
    score, rows, batch_of = module._next_token_logprobs, [], lambda m, input_ids, *a: input_ids.shape[0]

    monkeypatch.setattr(module, "_next_token_logprobs", out_of_memory_above(2, score, batch_of, rows))
    kept = BatchLimit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = window_surprisals(model, tokenizer, TEXT, window=16, batch_size=8, batch_limit=kept)
    assert [str(w.message) for w in caught] == [
        f"negmonitor: out of memory during a surprisal evaluation; retrying with batch size {b} (later evaluations "
        "start there)" for b in (4, 2)]
    assert rows[:3] == [8, 4, 2] and max(rows[2:]) == 2 and kept.batch_size == 2
    np.testing.assert_allclose(_surprisals(first), _surprisals(expected), rtol=1e-5, equal_nan=True)
    rows.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        window_surprisals(model, tokenizer, TEXT, window=16, batch_size=8, batch_limit=kept)
    assert max(rows) == 2

    monkeypatch.setattr(module, "_next_token_logprobs", out_of_memory_above(0, score, batch_of, rows))
    with pytest.warns(UserWarning, match="retrying with batch size 1$"):
        with pytest.raises(NegmonitorError, match="out of memory during a surprisal evaluation even at batch size 1 "
                                                  r"\(CUDA out of memory \(simulated\)\) — pass a shorter window"):
            window_surprisals(model, tokenizer, TEXT, window=16, batch_size=2)
