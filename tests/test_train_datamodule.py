"""Tests for TextDataModule: builtin, local file and folder sources, idempotent setup, held-out material."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from negmonitor.errors import NegmonitorError
from negmonitor.train.datamodule import TextDataModule, parse_hub_source
from negmonitor.train.grammar import is_heldout


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> TextDataModule:
    dm = TextDataModule(n_sentences=3_000, seq_len=32, batch_size=8, seed=0,
                        cache_dir=str(tmp_path_factory.mktemp("tok")))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_builtin_blocks_and_loaders(builtin):
    blocks = builtin._blocks["train"]
    assert blocks.dtype == torch.int64 and blocks.shape[1] == 32 and len(blocks) > 100
    batch = next(iter(builtin.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32)
    assert torch.equal(batch["input_ids"], batch["labels"])
    assert (blocks == builtin.tokenizer.eos_token_id).any()
    assert (blocks == builtin.tokenizer.bos_token_id).any()
    assert builtin.vocab_size == len(builtin.tokenizer) and int(blocks.max()) < builtin.vocab_size
    assert len(next(iter(builtin.val_dataloader()))["input_ids"]) > 0


def test_setup_is_idempotent_and_split_is_disjoint(builtin):
    blocks, tokenizer = builtin._blocks["train"], builtin.tokenizer
    builtin.prepare_data()
    builtin.setup("fit")
    builtin.setup("validate")
    assert builtin._blocks["train"] is blocks and builtin.tokenizer is tokenizer
    train, val = builtin.documents()
    assert val and not set(train) & set(val)


def test_builtin_held_out_material(builtin):
    probes = builtin.probe_texts(20)
    assert len(probes) == 20
    sentences = [s.strip() + "." for p in probes for s in p.split(".") if s.strip()]
    assert all(is_heldout(s) for s in sentences)
    pairs = builtin.minimal_pairs(10)
    assert isinstance(pairs, pd.DataFrame) and len(pairs) == 100


def test_local_text_file_source(shared_data, tmp_path):
    lines = (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:400]
    path = tmp_path / "wiki.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = TextDataModule(source=str(path), seq_len=64, batch_size=4, tokenizer_vocab_size=800, val_fraction=0.1,
                        cache_dir=str(tmp_path / "tok"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    assert dm.minimal_pairs() is None
    probes = dm.probe_texts(5)
    assert probes and set(probes) <= set(dm.documents()[1])


def test_local_folder_source(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the cat sat on the mat .\n\nthe dog ran .\n" * 30)
    (folder / "sub" / "b.txt").write_text("a bird sang in the tree .\n" * 30)
    (folder / "skip.bin").write_bytes(b"\x00\x01")
    dm = TextDataModule(source=str(folder), seq_len=16, batch_size=2, tokenizer_vocab_size=300,
                        cache_dir=str(tmp_path / "tok"))
    assert len(dm.documents()[0]) + len(dm.documents()[1]) == 90
    dm.setup()
    assert len(dm.train_dataloader()) > 0


def test_bad_sources_and_settings_are_clear_errors(tmp_path):
    with pytest.raises(NegmonitorError, match="no such file"):
        TextDataModule(source=str(tmp_path / "missing.txt")).setup()
    with pytest.raises(NegmonitorError, match="cannot load dataset"):
        TextDataModule(source="no-such-org/no-such-dataset-xyz").setup()
    with pytest.raises(NegmonitorError, match="seq_len"):
        TextDataModule(seq_len=1)
    with pytest.raises(NegmonitorError, match="val_fraction"):
        TextDataModule(val_fraction=1.5)


def test_hub_source_syntax():
    assert parse_hub_source("wikitext:wikitext-2-raw-v1:test", None, "train") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_hub_source("org/data", "cfg", "validation") == ("org/data", "cfg", "validation")
