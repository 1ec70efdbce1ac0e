"""Tests for the built-in grammar corpus: determinism, agreement, licensing, held-out minimal pairs."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from negmonitor.errors import NegmonitorError
from negmonitor.train.grammar import CONSTRUCTIONS, GrammarCorpus, build_lexicon, is_heldout

LEX = build_lexicon()
VERB_NUMBER = {}
for _verb in LEX.intransitive + LEX.transitive_animate + LEX.transitive_inanimate:
    VERB_NUMBER[_verb.sing], VERB_NUMBER[_verb.plur] = "sing", "plur"
NOUN_NUMBER = {}
for _noun in LEX.animate + LEX.inanimate:
    NOUN_NUMBER[_noun.sing], NOUN_NUMBER[_noun.plur] = "sing", "plur"
NUMBER_WORDS = {"is": "sing", "are": "plur", "was": "sing", "were": "plur", "has": "sing", "have": "plur",
                "themselves": "plur", "himself": "sing", "herself": "sing", "itself": "sing", **VERB_NUMBER}


@pytest.fixture(scope="module")
def corpus() -> GrammarCorpus:
    return GrammarCorpus(seed=0)


@pytest.fixture(scope="module")
def train_sentences(corpus) -> list[str]:
    return corpus.sentences(30_000)


@pytest.fixture(scope="module")
def pairs(corpus):
    return corpus.minimal_pairs(60, seed=3)


def test_sentences_are_deterministic_and_seeded(corpus, train_sentences):
    assert GrammarCorpus(seed=0).sentences(50) == train_sentences[:50]
    assert GrammarCorpus(seed=1).sentences(50) != train_sentences[:50]
    assert all(s[0].isupper() and s.endswith(".") for s in train_sentences[:500])
    text = corpus.text(40)
    assert text == GrammarCorpus(seed=0).text(40)
    assert sum(len(re.findall(r"\.(?: |$)", line)) for line in text.splitlines()) == 40


def test_vocabulary_is_rich_with_zipf_frequencies(corpus, train_sentences):
    counts = Counter(w for s in train_sentences for w in s.rstrip(".").lower().split())
    assert 500 <= len(corpus.vocabulary()) <= 2000
    assert len(counts) > 500
    nouns = sorted((counts[n.sing] + counts[n.plur] for n in LEX.animate), reverse=True)
    assert nouns[0] > 10 * nouns[len(nouns) // 2]  # heavy head
    assert nouns[-1] > 0  # every noun is seen


def test_simple_training_sentences_agree(train_sentences):
    checked = 0
    for sentence in train_sentences:
        words = sentence.rstrip(".").lower().split()
        if len(words) == 3 and words[1] in NOUN_NUMBER and words[2] in VERB_NUMBER:
            assert NOUN_NUMBER[words[1]] == VERB_NUMBER[words[2]], sentence
            checked += 1
        if len(words) == 4 and words[1] in NOUN_NUMBER and words[3] in ("himself", "herself", "themselves"):
            assert (words[3] == "themselves") == (NOUN_NUMBER[words[1]] == "plur"), sentence
            checked += 1
    assert checked > 200


def test_npis_are_always_licensed(train_sentences):
    for sentence in train_sentences:
        words = sentence.rstrip(".").lower().split()
        for i, word in enumerate(words):
            if word in ("ever", "any"):
                assert {"no", "few", "not"} & set(words[:i]), sentence


def test_minimal_pairs_frame(pairs):
    assert list(pairs.columns) == ["suite", "construction", "condition", "pair_id", "sentence_good", "sentence_bad"]
    assert set(pairs.construction) == set(CONSTRUCTIONS)
    assert (pairs.groupby("construction").size() == 60).all()
    assert pairs.pair_id.is_unique and (pairs.suite == "grammar").all()
    assert pairs.sentence_good.is_unique


def test_pairs_differ_in_one_word_that_carries_agreement(pairs):
    for row in pairs.itertuples():
        good, bad = row.sentence_good.rstrip(".").split(), row.sentence_bad.rstrip(".").split()
        diff = [i for i, (g, b) in enumerate(zip(good, bad)) if g != b]
        assert len(good) == len(bad) and len(diff) == 1, row
        i = diff[0]
        if row.construction == "npi":
            assert good[0] in ("No", "Few") and bad[0] not in ("No", "Few")
            continue
        if row.construction == "np_coordination":
            assert NUMBER_WORDS[good[i]] == "plur" and NUMBER_WORDS[bad[i]] == "sing"
            continue
        subject = NOUN_NUMBER[good[1]]
        agree_with = subject
        if row.construction == "agreement_within_object_relative":
            agree_with = NOUN_NUMBER[good[4]]
        assert NUMBER_WORDS[good[i]] == agree_with != NUMBER_WORDS[bad[i]], row
        assert row.condition.startswith(subject)


def test_minimal_pairs_are_held_out_of_training_text(pairs, train_sentences):
    assert all(is_heldout(s) for s in pairs.sentence_good)
    assert not any(is_heldout(s) for s in train_sentences)
    training = set(train_sentences) | set(GrammarCorpus(seed=1).sentences(10_000))
    assert not training & set(pairs.sentence_good)
    text = GrammarCorpus(seed=0).text(5_000)
    assert not any(s in text for s in pairs.sentence_good)
    # without the partition, short templates would collide: many simple training sentences exist
    assert sum(len(s.split()) == 3 for s in train_sentences) > 100


def test_heldout_sentences_and_reproducible_pairs(corpus):
    held = corpus.heldout_sentences(100)
    assert all(is_heldout(s) for s in held)
    a = corpus.minimal_pairs(10, seed=5)
    assert a.equals(GrammarCorpus(seed=9).minimal_pairs(10, seed=5))
    assert not a.equals(corpus.minimal_pairs(10, seed=6))


def test_unknown_construction_is_a_clear_error(corpus):
    with pytest.raises(NegmonitorError, match="unknown construction"):
        corpus.minimal_pairs(4, constructions=["garden_path"])


def test_heldout_texts_are_the_first_paragraphs_of_the_heldout_sentences(corpus):
    """heldout_texts draws sentences lazily; it must give exactly the first n held-out paragraphs."""
    for n in (0, 1, 7, 64):
        assert corpus.heldout_texts(n) == corpus.paragraphs(max(1, 6 * n), heldout=True)[:n]
    assert GrammarCorpus(seed=3).heldout_texts(7) != corpus.heldout_texts(7)
