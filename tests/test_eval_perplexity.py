"""Tests for negmonitor.evaluation.lm_perplexity: sliding windows, brute-force agreement, loaders, errors."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, out_of_memory_above
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.lm_perplexity import (
    PerplexityResult,
    load_perplexity_text,
    perplexity,
    sliding_windows,
    token_stream,
)
from tiny_models import TINY_MAX_POSITIONS, tiny_bert, tiny_causal_lm, tiny_tokenizer

DATA = SHARED_DATA
WIKITEXT_VALID = DATA / "wikitext-2" / "valid.txt"
SHORT_TEXT = ("Homarus gammarus, known as the European lobster or common lobster, is a species of lobster from the "
              "eastern Atlantic Ocean. It may grow to a length of 60 cm and a mass of 6 kilograms.")




@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("neox", init_range=0.3)


def brute_force_nll(model, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Score every token on its own: find the window that scores it (HF's rule), run that context, sum -log p.

    With ``stride == window`` (disjoint chunks) a chunk's first token has no context in its chunk: not scored.
    """
    n, total, count = len(ids), 0.0, 0
    for t in range(1, n):
        k = 0
        while min(k * stride + window, n) <= t:  # the first window whose end is past t scores token t
            k += 1
        begin = k * stride
        if begin == t:
            continue
        context = torch.tensor([ids[begin:t]])
        with torch.no_grad():
            logits = model(input_ids=context).logits[0, -1].float()
        total -= torch.log_softmax(logits, -1)[ids[t]].item()
        count += 1
    return total, count


@pytest.mark.parametrize("n,window,stride", [(10, 4, 2), (11, 4, 4), (7, 16, 3), (30, 8, 1), (2, 2, 1), (50, 9, 7)])
def test_sliding_windows_score_each_token_once(n, window, stride):
    spans = sliding_windows(n, window, stride, drop_tail=False)
    scored = [t for begin, end, first in spans for t in range(first, end)]
    if stride < window:
        assert scored == list(range(1, n))
    else:  # disjoint chunks: each chunk's first token has no context
        assert scored == [t for t in range(n) if t % window != 0]
    assert all(end - begin <= window and begin < first for begin, end, first in spans)


@pytest.mark.parametrize("window,stride", [(12, 5), (8, 8), (10, 1), (64, 32)])
def test_matches_brute_force(model, tokenizer, window, stride):
    ids = token_stream(tokenizer, SHORT_TEXT).tolist()[:30]
    expected_total, expected_count = brute_force_nll(model, ids, window, stride)
    result = perplexity(model, tokenizer, ids, window=window, stride=stride, batch_size=3, drop_tail=False)
    assert result.n_tokens == expected_count == len(ids) - 1 - (len(ids) - 1) // window * (stride == window)
    assert result.nll == pytest.approx(expected_total / expected_count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected_total / expected_count), rel=1e-5)


def test_one_window_equals_model_loss(model, tokenizer):
    ids = token_stream(tokenizer, SHORT_TEXT)[:60]
    result = perplexity(model, tokenizer, ids, window=64)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    assert result.nll == pytest.approx(loss, rel=1e-5)
    assert result.n_tokens == 59


def test_batch_size_and_input_form_do_not_matter(model, tokenizer):
    parts = [SHORT_TEXT[:80], SHORT_TEXT[80:]]
    one = perplexity(model, tokenizer, parts, window=16, stride=8, batch_size=1)
    many = perplexity(model, tokenizer, "\n\n".join(parts), window=16, stride=8, batch_size=7)
    ids = perplexity(model, tokenizer, token_stream(tokenizer, parts), window=16, stride=8, batch_size=4)
    assert one.n_tokens == many.n_tokens == ids.n_tokens
    assert many.nll == pytest.approx(one.nll, rel=1e-6) and ids.nll == pytest.approx(one.nll, rel=1e-6)
    assert isinstance(one, PerplexityResult) and set(one.as_dict()) == {"ppl", "nll", "n_tokens"}


def test_default_window_never_exceeds_max_positions(tokenizer):
    model = tiny_causal_lm("gpt2")
    lengths = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        ids = torch.arange(TINY_MAX_POSITIONS * 2 + 17) % 500
        result = perplexity(model, tokenizer, ids, batch_size=2)
    finally:
        handle.remove()
    assert max(lengths) == TINY_MAX_POSITIONS
    assert result.n_tokens == 2 * (TINY_MAX_POSITIONS - 1)  # disjoint chunks, the 17-token tail dropped
    with pytest.raises(NegmonitorError, match="exceeds the model's 256 positions"):
        perplexity(model, tokenizer, ids, window=TINY_MAX_POSITIONS + 1)


def test_disjoint_chunks_drop_the_tail_unless_it_is_the_only_chunk():
    assert sliding_windows(20, 8, 8) == [(0, 8, 1), (8, 16, 9)]
    assert sliding_windows(20, 8, 8, drop_tail=False)[-1] == (16, 20, 17)
    assert sliding_windows(5, 8, 8) == [(0, 5, 1)]
    assert sliding_windows(20, 8, 4)[-1][1] == 20  # sliding windows score every token


def test_paper_perplexity_definition(tokenizer, shared_data):
    """The authors' perplexity, written here from their definition: the text as one stream, disjoint 2,048-token
    chunks (the tail dropped), each chunk's mean loss weighted by its length, exp of the mean."""
    model = tiny_causal_lm("neox", max_positions=4_096, init_range=0.3)
    text = load_perplexity_text(shared_data / "wikitext-2" / "valid.txt")[:30_000]
    ids = tokenizer(text, return_tensors="pt").input_ids
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 2_048 + 1, 2_048):
        chunk = ids[:, start:start + 2_048]
        with torch.no_grad():
            total += model(chunk, labels=chunk).loss.item() * chunk.numel()
        count += chunk.numel()
    assert count >= 2 * 2_048
    result = perplexity(model, tokenizer, text, batch_size=2)
    assert result.n_tokens == count // 2_048 * 2_047
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [({"window": 8, "stride": 9}, "stride"),
                                          ({"window": 8, "stride": 0}, "stride"),
                                          ({"window": 1}, "window"), ({"batch_size": 0}, "batch_size")])
def test_bad_settings_raise(model, tokenizer, kwargs, match):
    with pytest.raises(NegmonitorError, match=match):
        perplexity(model, tokenizer, SHORT_TEXT, **kwargs)


def test_too_little_text_raises(model, tokenizer):
    with pytest.raises(NegmonitorError, match="at least 2"):
        perplexity(model, tokenizer, [5], window=8)


def test_masked_lm_is_refused(tokenizer):
    with pytest.raises(NegmonitorError, match="causal LM"):
        perplexity(tiny_bert(), tokenizer, SHORT_TEXT)


def test_training_flag_is_restored(tokenizer):
    """Each module's own flag: a part the user froze in eval mode inside training stays so (not model.train())."""
    model = tiny_causal_lm("llama").train()
    model.model.layers[0].eval()
    perplexity(model, tokenizer, SHORT_TEXT, window=16, progress=True)
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training and not model.model.layers[0].self_attn.training


@pytest.mark.skipif(not WIKITEXT_VALID.exists(), reason="../shared/data/wikitext-2/valid.txt is not present")
def test_wikitext_valid(model, tokenizer):
    text = load_perplexity_text(WIKITEXT_VALID)
    ids = token_stream(tokenizer, text[:10_000])[:2000]
    result = perplexity(model, tokenizer, ids, window=256, stride=128, batch_size=8)
    assert result.n_tokens == ids.numel() - 1
    assert math.isfinite(result.ppl) and 1 < result.ppl < 100 * tokenizer.vocab_size
    assert result.ppl == pytest.approx(math.exp(result.nll))


def test_load_text_from_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "skip.json").write_text("{}", encoding="utf-8")
    assert load_perplexity_text(tmp_path / "a.txt") == "first"
    assert load_perplexity_text(tmp_path) == "first\n\nsecond"


def test_load_text_errors(tmp_path):
    with pytest.raises(NegmonitorError, match="no text files"):
        load_perplexity_text(tmp_path)
    with pytest.raises(NegmonitorError, match="--text"):
        load_perplexity_text(tmp_path / "missing.txt")


def test_hub_default_fails_clearly_offline(hub_offline):
    with pytest.raises(NegmonitorError, match=r"'wikitext' \(wikitext-2-raw-v1\).*--text FILE"):
        load_perplexity_text(None)


def test_hub_path_is_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": [" = Title = \n", " Body line . \n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_perplexity_text() == " = Title = \n\n\n Body line . \n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "validation")]


def test_the_loss_taken_a_slice_of_positions_at_a_time_matches_brute_force(model, tokenizer, monkeypatch):
    """The loss runs over LOSS_ROWS positions at a time (its fp32 copy and softmax stay small beside the logits):
    slices of 3 positions, with unscored positions inside and across them, give the brute-force NLL."""
    module = importlib.import_module("negmonitor.evaluation.lm_perplexity")

    monkeypatch.setattr(module, "LOSS_ROWS", 3)
    ids = token_stream(tokenizer, SHORT_TEXT).tolist()[:30]
    for window, stride in ((12, 5), (8, 8)):
        expected_total, expected_count = brute_force_nll(model, ids, window, stride)
        result = perplexity(model, tokenizer, ids, window=window, stride=stride, batch_size=3, drop_tail=False)
        assert result.n_tokens == expected_count
        assert result.nll == pytest.approx(expected_total / expected_count, rel=1e-5)


def test_a_memory_budget_lowers_the_batch_size_and_keeps_the_perplexity(model, tokenizer, monkeypatch):
    """A budget for two windows per forward: batch size 8 -> 2, logged once, the same perplexity; no budget: 8."""
    from negmonitor.budget import lm_window_bytes
    module = importlib.import_module("negmonitor.evaluation.lm_perplexity")

    ids = token_stream(tokenizer, SHORT_TEXT * 3).tolist()
    rows: list[int] = []
    score = module._score_batch
    monkeypatch.setattr(module, "_score_batch", lambda m, i, batch, *a: rows.append(len(batch)) or score(m, i, batch, *a))
    free = perplexity(model, tokenizer, ids, window=8, batch_size=8)
    assert max(rows) == 8
    rows.clear()
    budget = 2 * lm_window_bytes(model, 8) + 1
    with pytest.warns(UserWarning, match="perplexity batch size 8 -> 2"):
        bounded = perplexity(model, tokenizer, ids, window=8, batch_size=8, memory_budget=budget)
    assert max(rows) == 2 and len(rows) > 4
    assert bounded.n_tokens == free.n_tokens
    assert bounded.nll == pytest.approx(free.nll, rel=1e-6)


def test_out_of_memory_halves_the_batch_keeps_the_perplexity_and_later_evaluations_start_there(model, tokenizer,
                                                                                                 monkeypatch):
    """Forwards of more than 2 windows run out of memory: the first evaluation retries at 4, then 2 (warned), gives
    the unbatched perplexity, and its BatchLimit makes the next evaluation start at 2 (no error, no warning).
    Out of memory even at batch size 1 is one line saying what to change."""
    import warnings

    from negmonitor.budget import BatchLimit
    module = importlib.import_module("negmonitor.evaluation.lm_perplexity")

    ids = token_stream(tokenizer, SHORT_TEXT * 3).tolist()
    expected = perplexity(model, tokenizer, ids, window=8, batch_size=1)
    rows: list[int] = []
    score, batch_of = module._score_batch, lambda m, i, batch, *a: len(batch)
    monkeypatch.setattr(module, "_score_batch", out_of_memory_above(2, score, batch_of, rows))
    kept = BatchLimit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = perplexity(model, tokenizer, ids, window=8, batch_size=8, batch_limit=kept)
    assert [str(w.message) for w in caught] == [
        f"negmonitor: out of memory during a perplexity evaluation; retrying with batch size {b} (later evaluations "
        "start there)" for b in (4, 2)]
    assert rows[:3] == [8, 4, 2] and max(rows[2:]) == 2 and kept.batch_size == 2
    assert (first.n_tokens, first.nll) == (expected.n_tokens, pytest.approx(expected.nll, rel=1e-6))
    rows.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = perplexity(model, tokenizer, ids, window=8, batch_size=8, batch_limit=kept)
    assert max(rows) == 2 and second.nll == pytest.approx(expected.nll, rel=1e-6)

    monkeypatch.setattr(module, "_score_batch", out_of_memory_above(0, score, batch_of, rows))
    with pytest.warns(UserWarning, match="retrying with batch size 1$"):
        with pytest.raises(NegmonitorError, match="out of memory during a perplexity evaluation even at batch size 1 "
                                                  r"\(CUDA out of memory \(simulated\)\) — pass a shorter window "
                                                  r"\(ppl_window\)") as err:
            perplexity(model, tokenizer, ids, window=8, batch_size=2)
    assert "\n" not in str(err.value)


def test_a_budget_too_small_for_one_window_is_refused_in_one_line(model, tokenizer):
    from negmonitor.budget import lm_window_bytes

    need = lm_window_bytes(model, 8)
    with pytest.raises(NegmonitorError, match=r"the smallest budget that works here is .*memory_budget='\d+MiB'") as err:
        perplexity(model, tokenizer, SHORT_TEXT, window=8, memory_budget=need - 1)
    assert "\n" not in str(err.value)


def test_the_window_plan_reads_the_config_not_the_heads_weight_and_the_forward_keeps_no_cache(model, tokenizer):
    """Under FSDP (use_orig_params) a rank's head weight is its flat shard: the plan must not read it, or ranks
    would choose different batch sizes and pad with different numbers of collective forwards. The forward asks
    for no KV cache (the plan does not count one)."""
    import copy

    from negmonitor.budget import lm_window_bytes

    sharded = copy.deepcopy(model)
    planned = lm_window_bytes(sharded, 32)
    sharded.get_output_embeddings().weight = torch.nn.Parameter(torch.empty(0))  # as an FSDP rank may hold it
    assert lm_window_bytes(sharded, 32) == planned > 32 * sharded.config.vocab_size * 4
    seen: list[dict] = []
    forward = model.forward
    model.forward = lambda *a, **kw: seen.append(kw) or forward(*a, **kw)
    try:
        perplexity(model, tokenizer, SHORT_TEXT, window=8, batch_size=2)
    finally:
        del model.forward
    assert seen and all(kw.get("use_cache") is False for kw in seen)
