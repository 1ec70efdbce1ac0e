"""Tests for trained/cached and pretrained tokenizers."""

from __future__ import annotations

import pytest

from negmonitor.errors import NegmonitorError
from negmonitor.train import tokenizer as tokmod
from negmonitor.train.grammar import GrammarCorpus
from negmonitor.train.tokenizer import BOS, EOS, PAD, UNK, load_or_train_tokenizer


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return GrammarCorpus(seed=0).paragraphs(3_000)


@pytest.fixture
def counting(monkeypatch):
    """Count calls of the (real) training function."""
    calls = []
    real = tokmod._train_tokenizer

    def wrapped(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokmod, "_train_tokenizer", wrapped)
    return calls


def test_trained_bpe_has_specials_bos_and_offsets(texts, tmp_path):
    tok = load_or_train_tokenizer("train", texts, cache_dir=tmp_path, vocab_size=1024)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (BOS, EOS, PAD, UNK)
    assert tok.is_fast and len(tok) <= 1024
    enc = tok("The author laughs.", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["offset_mapping"][0] == (0, 0)
    words = ["The author laughs."[a:b] for a, b in enc["offset_mapping"][1:]]
    assert "".join(words) == "Theauthorlaughs."
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "The author laughs."
    assert tok("x", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id


def test_cache_hit_does_not_retrain(texts, tmp_path, counting):
    first = load_or_train_tokenizer("train", texts, cache_dir=tmp_path, vocab_size=1024)
    (folder,) = [p for p in tmp_path.iterdir()]
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    second = load_or_train_tokenizer("train", texts, cache_dir=tmp_path, vocab_size=1024)
    assert len(counting) == 1
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime
    assert first.get_vocab() == second.get_vocab()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    load_or_train_tokenizer("train", texts[:-1], cache_dir=tmp_path, vocab_size=1024)
    load_or_train_tokenizer("train", texts, cache_dir=tmp_path, vocab_size=512)
    assert len(counting) == 3 and len(list(tmp_path.iterdir())) == 3


def test_wordlevel_tokenizer(texts, tmp_path):
    tok = load_or_train_tokenizer("train", texts, cache_dir=tmp_path, kind="wordlevel")
    enc = tok("The author laughs.", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == [BOS, "The", "author", "laughs", "."]
    assert enc["offset_mapping"][2] == (4, 10)
    assert tok.convert_ids_to_tokens(tok("zyzzyva")["input_ids"])[1] == UNK


def test_local_folder_spec_loads_with_auto_tokenizer(texts, tmp_path):
    trained = load_or_train_tokenizer("train", texts, cache_dir=tmp_path, vocab_size=1024)
    (folder,) = list(tmp_path.iterdir())
    loaded = load_or_train_tokenizer(str(folder))
    assert loaded("The dogs laugh.")["input_ids"] == trained("The dogs laugh.")["input_ids"]


def test_errors_are_clear(texts, tmp_path):
    with pytest.raises(NegmonitorError, match="needs corpus texts"):
        load_or_train_tokenizer("train", None, cache_dir=tmp_path)
    with pytest.raises(NegmonitorError, match="unknown tokenizer kind"):
        load_or_train_tokenizer("train", texts, cache_dir=tmp_path, kind="unigram")
    with pytest.raises(NegmonitorError, match="cannot load tokenizer"):
        load_or_train_tokenizer("no-such-org/no-such-tokenizer-xyz")
