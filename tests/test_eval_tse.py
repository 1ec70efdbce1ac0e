"""Tests for negmonitor.evaluation.tse: restricted unpickling, NPI triples, JSONL, sampling, accuracy levels."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.minimal_pairs import evaluate_pairs
from negmonitor.evaluation.tse import COLUMNS, load_tse, safe_load_pickle, to_sentence_case, tse_accuracy
from tiny_models import tiny_causal_lm, tiny_tokenizer

TSE = SHARED_DATA / "tse"
needs_tse = pytest.mark.skipif(not TSE.is_dir(), reason="../shared/data/tse is not present")




class _RunsShell:
    """Pickles to a call of os.system: loading it with a plain unpickler would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return path


@needs_tse
def test_real_pickles_pairs_and_triples():
    df = load_tse(TSE, constructions=["simple_agrmt", "simple_npi_anim"])
    assert list(df.columns) == list(COLUMNS)
    assert (df["suite"] == "tse").all()
    sizes = df.groupby("construction").size().to_dict()
    assert sizes == {"simple_agrmt": 140, "simple_npi_anim": 240}  # 120 NPI triples -> 240 pairs
    npi = df[df["construction"] == "simple_npi_anim"]
    assert npi["variant"].value_counts().to_dict() == {1: 120, 2: 120}
    first = npi[npi["item"] == 0].sort_values(["condition", "variant"]).iloc[:2]
    assert first["sentence_good"].nunique() == 1 and first["sentence_bad"].nunique() == 2
    assert df.groupby("construction")["pair_id"].apply(lambda s: s.tolist() == list(range(len(s)))).all()
    assert set(df.loc[df["construction"] == "simple_agrmt", "condition"]) == {"sing_MS_MV", "plur_MS_MV"}
    # released sentences: lower case, no final punctuation
    assert df["sentence_good"].str.match(r"^[a-z]").all() and not df["sentence_good"].str.endswith(".").any()


@needs_tse
def test_all_constructions_load_and_sample():
    df = load_tse(TSE, sample_per_construction=30, seed=1)
    assert df["construction"].nunique() == 22
    assert df.groupby("construction").size().eq(30).all()
    pd.testing.assert_frame_equal(df, load_tse(TSE, sample_per_construction=30, seed=1))
    alone = load_tse(TSE, constructions=["vp_coord"], sample_per_construction=30, seed=1)
    assert alone["pair_id"].tolist() == df.loc[df["construction"] == "vp_coord", "pair_id"].tolist()


@needs_tse
def test_accuracy_per_construction_and_condition():
    model, tok = tiny_causal_lm("neox", init_range=0.3), tiny_tokenizer()
    pairs = load_tse(TSE, constructions=["simple_agrmt", "simple_reflexives"], sample_per_construction=20)
    table = tse_accuracy(evaluate_pairs(model, tok, pairs, batch_size=32))
    assert table.groupby("level").size().to_dict() == {"construction": 2, "condition": 4, "overall": 1}
    assert "simple_agrmt/sing_MS_MV" in set(table["group"])
    assert table.loc[table["level"] == "overall", "n"].item() == 40
    assert table["accuracy"].between(0, 1).all() and table["se"].notna().all()


def test_sentence_case():
    assert to_sentence_case("the author laughs") == "The author laughs."
    assert to_sentence_case("who laughs?") == "Who laughs?"


def test_sentence_case_option(tmp_path):
    write_pickle(tmp_path / "agr.pickle", {"sing": [("the author laughs", "the author laugh")]})
    row = load_tse(tmp_path, sentence_case=True).iloc[0]
    assert (row["sentence_good"], row["sentence_bad"]) == ("The author laughs.", "The author laugh.")


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"sing": [_RunsShell(f"touch {marker}")]}, protocol=2)
    folder = tmp_path / "tse"
    folder.mkdir()
    evil = folder / "evil.pickle"
    evil.write_bytes(payload)
    with pytest.raises(NegmonitorError, match=r"evil\.pickle.*refused global (posix|os|nt)\.system") as err:
        load_tse(folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()
    with pytest.raises(NegmonitorError, match="evil.pickle"):
        safe_load_pickle(evil)
    assert not marker.exists()
    pickle.loads(payload)  # control: a plain unpickler really would have run it
    assert marker.exists()


def test_other_globals_are_refused_too(tmp_path):
    path = write_pickle(tmp_path / "c.pickle", {"cond": [("a", "b")], "x": pd.Timestamp(0)})
    with pytest.raises(NegmonitorError, match="refused global"):
        load_tse(path)


def test_corrupt_or_malformed_pickles(tmp_path):
    (tmp_path / "junk.pickle").write_bytes(b"this is not a pickle")
    with pytest.raises(NegmonitorError, match="junk.pickle"):
        load_tse(tmp_path / "junk.pickle")
    write_pickle(tmp_path / "list.pickle", [("a", "b")])
    with pytest.raises(NegmonitorError, match="expected a dict"):
        load_tse(tmp_path / "list.pickle")
    write_pickle(tmp_path / "one.pickle", {"cond": [("only one",)]})
    with pytest.raises(NegmonitorError, match=r"not a \(good, bad\[, bad2\]\) tuple"):
        load_tse(tmp_path / "one.pickle")


def test_bytes_are_decoded(tmp_path):
    (tmp_path / "agr.pickle").write_bytes(pickle.dumps({b"sing": [(b"the author laughs", b"the author laugh")]},
                                                       protocol=3))
    row = load_tse(tmp_path).iloc[0]
    assert (row["condition"], row["sentence_good"]) == ("sing", "the author laughs")
    # a Python 2 pickle: {'sing': [('\xc3\xa9a', 'b')]} as SHORT_BINSTRING opcodes (UTF-8 bytes)
    (tmp_path / "agr.pickle").write_bytes(b"\x80\x02}q\x00U\x04singq\x01]q\x02U\x03\xc3\xa9aq\x03U\x01bq\x04"
                                          b"\x86q\x05as.")
    assert load_tse(tmp_path).iloc[0]["sentence_good"] == "\u00e9a"


def test_jsonl_source(tmp_path):
    rows = [{"sentence_good": "a b", "sentence_bad": "b a", "condition": "c1"},
            {"sentence_good": "x", "sentence_bad": "y"}]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_pickle(tmp_path / "agr.pickle", {"sing": [("the author laughs", "the author laugh")]})
    df = load_tse(tmp_path)
    assert df.groupby("construction").size().to_dict() == {"agr": 1, "mine": 2}
    assert df.loc[df["construction"] == "mine", "condition"].tolist() == ["c1", "all"]
    (tmp_path / "mine.jsonl").write_text('{"sentence_good": "a", "sentence_bad": "b"}\n[1, 2\n', encoding="utf-8")
    with pytest.raises(NegmonitorError, match=r"mine\.jsonl, line 2"):
        load_tse(tmp_path, constructions=["mine"])


def test_source_errors(tmp_path):
    with pytest.raises(NegmonitorError, match=r"no \.pickle or \.jsonl files"):
        load_tse(tmp_path)
    with pytest.raises(NegmonitorError, match="no such file or folder"):
        load_tse(tmp_path / "nope")
    with pytest.raises(NegmonitorError, match="--tse DIR"):
        load_tse(None)
    write_pickle(tmp_path / "agr.pickle", {"sing": [("a", "b")]})
    with pytest.raises(NegmonitorError, match="unknown TSE construction 'agrr'.*did you mean agr"):
        load_tse(tmp_path, constructions="agrr")
