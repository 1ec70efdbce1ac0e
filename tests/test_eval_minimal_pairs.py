"""Tests for negmonitor.evaluation.minimal_pairs: sentence scores, batching, pair accuracy, accuracy tables."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import SHARED_DATA
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.minimal_pairs import (
    accuracy_levels,
    accuracy_table,
    evaluate_pairs,
    scorable_sentences,
    score_sentences,
    standard_error,
)
from tiny_models import tiny_bert, tiny_bert_tokenizer, tiny_causal_lm, tiny_tokenizer

DATA = SHARED_DATA
FALLBACK = ["The author laughs.", "The authors laugh.", "Who should Derek hug after shocking Richard?",
            "No authors have ever been popular.", "the movie that the guard likes is good", "a", "",
            "It may grow to a length of 60 cm (24 in) and a mass of 6 kilograms (13 lb)."]




def sentences(n: int = 14) -> list[str]:
    """Real BLiMP sentences of varied length when the data is present, else a built-in list."""
    path = DATA / "blimp" / "adjunct_island.jsonl"
    if not path.exists():
        return FALLBACK
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[: n // 2]]
    return [s for row in rows for s in (row["sentence_good"], row["sentence_bad"])] + FALLBACK[-3:]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def manual_score(model, tokenizer, sentence: str) -> float:
    """Sum of log p(token_i | BOS, tokens_<i) from one unpadded forward pass."""
    ids = [tokenizer.bos_token_id] + tokenizer(sentence, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()


@pytest.mark.parametrize("family", ["neox", "llama", "gpt2", "opt"])
def test_batched_equals_one_by_one(family, tokenizer):
    model = tiny_causal_lm(family, init_range=0.3)
    texts = sentences()
    batched = score_sentences(model, tokenizer, texts, batch_size=8)
    single = torch.stack([score_sentences(model, tokenizer, [t], batch_size=1)[0] for t in texts])
    assert batched.dtype == torch.float64 and batched.shape == (len(texts),)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert batched.std() > 1.0  # scores really differ between sentences


def test_score_is_sum_of_token_logprobs_after_bos(tokenizer):
    model = tiny_causal_lm("neox", init_range=0.3)
    texts = ["The author laughs.", "Who should Derek hug after shocking Richard?"]
    scores = score_sentences(model, tokenizer, texts, batch_size=2)
    for text, score in zip(texts, scores.tolist(), strict=False):
        assert score == pytest.approx(manual_score(model, tokenizer, text), abs=1e-4)
    assert score_sentences(model, tokenizer, [""])[0].item() == 0.0


def test_padding_token_and_padding_side_do_not_matter():
    model = tiny_causal_lm("gpt2", init_range=0.3)
    texts = sentences(10)
    with_pad = score_sentences(model, tiny_tokenizer(), texts, batch_size=4)
    no_pad = tiny_tokenizer(pad=False)
    no_pad.padding_side = "left"
    torch.testing.assert_close(score_sentences(model, no_pad, texts, batch_size=4), with_pad, atol=1e-4, rtol=0)
    assert no_pad.pad_token is None  # the tokenizer is left alone


def test_without_bos_or_eos_the_first_token_is_not_scored(tokenizer):
    model = tiny_causal_lm("neox", init_range=0.3)
    bare = tiny_tokenizer()
    bare.bos_token = None
    bare.eos_token = None
    text = "The author laughs."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with pytest.warns(UserWarning, match="first token"):
        score = score_sentences(model, bare, [text])[0].item()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    assert score == pytest.approx(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-4)


def test_masked_lm_pseudo_log_likelihood():
    model, tok = tiny_bert(), tiny_bert_tokenizer()
    texts = ["the author laughs", "who should the guard see", "the cats swim and run", "a"]
    batched = score_sentences(model, tok, texts, batch_size=5)
    single = torch.stack([score_sentences(model, tok, [t], batch_size=1)[0] for t in texts])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    ids = tok(texts[0])["input_ids"]  # [CLS] the author laughs [SEP]
    expected = 0.0
    for pos in range(1, len(ids) - 1):
        masked = list(ids)
        masked[pos] = tok.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([masked])).logits[0, pos]
        expected += torch.log_softmax(logits, -1)[ids[pos]].item()
    assert batched[0].item() == pytest.approx(expected, abs=1e-4)


def test_model_without_lm_head_is_refused():
    with pytest.raises(NegmonitorError, match="no language-model head"):
        score_sentences(tiny_bert(head="base"), tiny_bert_tokenizer(), ["the cat"])


def test_too_long_sentence_is_refused(tokenizer):
    model = tiny_causal_lm("neox", max_positions=8)
    with pytest.raises(NegmonitorError, match="longer than the model's 8 positions"):
        score_sentences(model, tokenizer, ["the author that the guard likes laughs and swims"])


def test_scorable_sentences_are_those_score_sentences_scores(tokenizer):
    """What the DDP/FSDP split shares out: the sentences with two tokens or more (the others score 0), with the
    same refusal of a too-long sentence as score_sentences, before any forward."""
    model = tiny_causal_lm("neox")
    texts = ["the cat", "", "a", "the author laughs"]
    scores = score_sentences(model, tokenizer, texts, prefix="none")
    kept = scorable_sentences(model, tokenizer, texts, prefix="none")
    assert 1 not in kept and 0 in kept and 3 in kept
    assert all(scores[i] == 0 for i in range(len(texts)) if i not in kept) and all(scores[i] < 0 for i in kept)
    assert scorable_sentences(model, tokenizer, texts) == [0, 2, 3]  # a BOS before each: only "" is left out
    short = tiny_causal_lm("neox", max_positions=8)
    with pytest.raises(NegmonitorError, match="longer than the model's 8 positions"):
        scorable_sentences(short, tokenizer, ["the cat", "the author that the guard likes laughs and swims"])


def test_training_flag_restored_and_no_grad(tokenizer):
    model = tiny_causal_lm("llama").train()
    model.model.layers[0].mlp.eval()  # a part frozen in eval mode keeps its own flag
    scores = score_sentences(model, tokenizer, ["The author laughs."], progress=True)
    assert model.training and not scores.requires_grad
    assert model.model.layers[0].training and not model.model.layers[0].mlp.training


def test_evaluate_pairs(tokenizer):
    model = tiny_causal_lm("neox", init_range=0.3)
    pairs = pd.DataFrame({"uid": ["x", "x", "y"], "sentence_good": ["The author laughs.", "a b", "The author laughs."],
                          "sentence_bad": ["The author laugh.", "b a", "The authors laughs."]})
    scored = evaluate_pairs(model, tokenizer, pairs, batch_size=2)
    assert list(scored.columns) == ["uid", "sentence_good", "sentence_bad", "logp_good", "logp_bad", "correct"]
    assert scored["logp_good"].iloc[0] == scored["logp_good"].iloc[2]  # shared sentence scored once
    expected = score_sentences(model, tokenizer, list(pairs["sentence_bad"]))
    np.testing.assert_allclose(scored["logp_bad"], expected.numpy(), atol=1e-4)
    assert (scored["correct"] == (scored["logp_good"] > scored["logp_bad"])).all()
    assert "logp_good" not in pairs.columns  # input untouched
    with pytest.raises(NegmonitorError, match="sentence_bad"):
        evaluate_pairs(model, tokenizer, pairs.drop(columns="sentence_bad"))


def test_accuracy_table_and_standard_error():
    df = pd.DataFrame({"uid": ["a"] * 4 + ["b"] * 6, "term": ["t"] * 10,
                       "correct": [True, True, True, False] + [True] * 3 + [False] * 3})
    table = accuracy_table(df, by="uid")
    assert list(table.columns) == ["uid", "accuracy", "n", "se"]
    assert table["accuracy"].tolist() == [0.75, 0.5] and table["n"].tolist() == [4, 6]
    assert table["se"].tolist() == pytest.approx([math.sqrt(0.75 * 0.25 / 4), math.sqrt(0.25 / 6)])
    overall = accuracy_table(df)
    assert overall["accuracy"].item() == 0.6 and overall["n"].item() == 10
    assert overall["se"].item() == pytest.approx(math.sqrt(0.24 / 10))
    assert len(accuracy_table(df, by=["term", "uid"])) == 2
    assert np.isnan(standard_error(np.array([0.5]), np.array([0])))[0]
    with pytest.raises(NegmonitorError, match="no such column"):
        accuracy_table(df, by="field")
    with pytest.raises(NegmonitorError, match="evaluate_pairs"):
        accuracy_table(df.drop(columns="correct"))


def test_accuracy_levels_long_table():
    df = pd.DataFrame({"c": ["p", "p", "q"], "d": ["x", "y", "x"], "correct": [True, False, True]})
    table = accuracy_levels(df, {"c": ["c"], "cd": ["c", "d"], "overall": []})
    assert list(table.columns) == ["level", "group", "accuracy", "n", "se"]
    assert table["group"].tolist() == ["p", "q", "p/x", "p/y", "q/x", "all"]
    assert table.loc[table["level"] == "overall", "accuracy"].item() == pytest.approx(2 / 3)


def test_no_warnings_for_normal_tokenizer(tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_sentences(tiny_causal_lm("opt"), tokenizer, ["The author laughs."])
