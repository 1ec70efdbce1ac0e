"""Tests for negmonitor.evaluation.blimp: loading, subsets, seeded samples, errors, accuracy levels."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import SHARED_DATA
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation.blimp import BLIMP_UIDS, COLUMNS, blimp_accuracy, load_blimp
from negmonitor.evaluation.minimal_pairs import evaluate_pairs
from tiny_models import tiny_causal_lm, tiny_tokenizer

BLIMP = SHARED_DATA / "blimp"
needs_blimp = pytest.mark.skipif(not BLIMP.is_dir(), reason="../shared/data/blimp is not present")




def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def record(uid: str, i: int) -> dict:
    return {"sentence_good": f"Good {i}.", "sentence_bad": f"Bad {i}.", "field": "syntax/semantics",
            "linguistics_term": "binding", "UID": uid, "pairID": str(i)}


@needs_blimp
def test_load_all_67000_pairs():
    df = load_blimp(BLIMP)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == 67_000 and df["uid"].nunique() == 67
    assert sorted(df["uid"].unique()) == sorted(BLIMP_UIDS)
    assert (df["suite"] == "blimp").all() and df["pair_id"].dtype == "int64"
    assert set(df["field"]) == {"syntax", "semantics", "morphology", "syntax_semantics"}
    assert df.groupby("uid").size().eq(1000).all()
    assert df["sentence_good"].str[0].str.isupper().mean() > 0.95  # released capitalised


@needs_blimp
def test_subset_and_seeded_sample():
    uids = ["anaphor_gender_agreement", "wh_island"]
    df = load_blimp(BLIMP, uids=uids, sample_per_uid=25, seed=3)
    assert df.groupby("uid").size().to_dict() == {u: 25 for u in uids}
    again = load_blimp(BLIMP, uids=uids, sample_per_uid=25, seed=3)
    pd.testing.assert_frame_equal(df, again)
    other = load_blimp(BLIMP, uids=uids, sample_per_uid=25, seed=4)
    assert set(other["pair_id"]) != set(df["pair_id"])
    alone = load_blimp(BLIMP, uids=uids[:1], sample_per_uid=25, seed=3)  # same pairs whatever else is loaded
    assert alone["pair_id"].tolist() == df.loc[df["uid"] == uids[0], "pair_id"].tolist()
    assert load_blimp(BLIMP, uids="wh_island", sample_per_uid=5000)["pair_id"].tolist() == list(range(1000))


@needs_blimp
def test_unknown_uid_suggests_a_name():
    with pytest.raises(NegmonitorError, match="did you mean wh_island"):
        load_blimp(BLIMP, uids=["wh_islands"])


@needs_blimp
def test_accuracy_levels_on_real_pairs():
    model, tok = tiny_causal_lm("neox", init_range=0.3), tiny_tokenizer()
    scored = evaluate_pairs(model, tok, load_blimp(BLIMP, sample_per_uid=3, seed=0), batch_size=64)
    table = blimp_accuracy(scored)
    counts = table.groupby("level").size().to_dict()
    assert counts == {"uid": 67, "linguistics_term": 13, "field": 4, "overall": 1}
    for level in ("uid", "linguistics_term", "field", "overall"):
        assert table.loc[table["level"] == level, "n"].sum() == 201
    overall = table[table["level"] == "overall"].iloc[0]
    assert overall["accuracy"] == pytest.approx(scored["correct"].mean())
    assert overall["se"] == pytest.approx((overall["accuracy"] * (1 - overall["accuracy"]) / 201) ** 0.5)


def test_folder_and_file_sources(tmp_path):
    write_jsonl(tmp_path / "u1.jsonl", [record("u1", i) for i in range(4)])
    write_jsonl(tmp_path / "u2.jsonl", [record("u2", i) for i in range(3)])
    df = load_blimp(tmp_path)
    assert df.groupby("uid").size().to_dict() == {"u1": 4, "u2": 3}
    assert (df["field"] == "syntax_semantics").all()
    assert len(load_blimp(tmp_path / "u2.jsonl")) == 3
    assert len(load_blimp(tmp_path, uids=["u1"], sample_per_uid=2)) == 2


def test_folder_without_jsonl(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here", encoding="utf-8")
    with pytest.raises(NegmonitorError, match=r"no \.jsonl files in .* --blimp DIR") as err:
        load_blimp(tmp_path)
    assert "\n" not in str(err.value)


def test_invalid_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "u1.jsonl", [record("u1", 0), record("u1", 1)])
    path.write_text(path.read_text(encoding="utf-8") + "\n{not json\n", encoding="utf-8")
    with pytest.raises(NegmonitorError, match=r"u1\.jsonl, line 4: invalid JSON"):
        load_blimp(tmp_path)
    write_jsonl(path, [record("u1", 0), {"sentence_good": "x"}])
    with pytest.raises(NegmonitorError, match=r"line 2: missing field\(s\) sentence_bad"):
        load_blimp(tmp_path)


def test_bad_sample_size_and_missing_path(tmp_path):
    write_jsonl(tmp_path / "u1.jsonl", [record("u1", 0)])
    with pytest.raises(NegmonitorError, match="positive integer"):
        load_blimp(tmp_path, sample_per_uid=0)
    with pytest.raises(NegmonitorError, match="no such file or folder"):
        load_blimp(tmp_path / "missing")


def test_hub_offline_error_names_the_flag(hub_offline):
    with pytest.raises(NegmonitorError, match=r"nyu-mll/blimp.*--blimp DIR"):
        load_blimp(None, uids=["wh_island"])


def test_hub_path_loads_one_config_per_uid(monkeypatch):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([record(name, i) for i in range(2)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    df = load_blimp(uids=["wh_island", "passive_1"])
    assert calls == [("nyu-mll/blimp", "wh_island", "train"), ("nyu-mll/blimp", "passive_1", "train")]
    assert df.groupby("uid").size().to_dict() == {"passive_1": 2, "wh_island": 2}
