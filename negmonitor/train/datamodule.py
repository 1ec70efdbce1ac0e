"""LightningDataModule for ``negmonitor train``: text → tokenizer → fixed-length token blocks.

:class:`TextDataModule` reads documents from the built-in grammar corpus, a local text file or folder (one
document per non-empty line), or a ``datasets`` hub id; splits whole documents into train and validation sets;
trains (or loads) a tokenizer on the training documents; tokenises once, joins documents with the EOS token and
cuts the stream into ``seq_len`` blocks whose labels are the inputs (the model shifts them). It also keeps
held-out text for the monitors (:meth:`TextDataModule.probe_texts`) and, for the built-in corpus, a held-out
minimal-pair set (:meth:`TextDataModule.minimal_pairs`).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from negmonitor.errors import NegmonitorError
from negmonitor.train.grammar import GrammarCorpus
from negmonitor.train.tokenizer import load_or_train_tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")


class BlockDataset(Dataset):
    """Rows of a ``[n_blocks, seq_len]`` token tensor as ``{"input_ids", "labels"}`` dicts."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict:
        row = self.blocks[index]
        return {"input_ids": row, "labels": row}


class TextDataModule(L.LightningDataModule):
    """Tokenised, fixed-length blocks of text for causal LM pretraining.

    Args:
        source: ``"builtin"`` (the grammar corpus), a local text file or folder, or a ``datasets`` hub id
            (``"ID"`` or ``"ID:CONFIG:SPLIT"``).
        n_sentences: sentences of built-in text (training side; validation is taken from them).
        dataset_config: ``datasets`` config name (hub sources).
        split: ``datasets`` split (hub sources).
        text_column: column holding the text (hub sources).
        tokenizer: ``"train"`` (train one on the training documents) or a hub id / local tokenizer folder.
        tokenizer_vocab_size: target vocabulary size of a trained tokenizer (distinct from the model's
            ``vocab_size`` hparam, which Lightning merges with this module's hparams).
        tokenizer_kind: ``"bpe"`` (byte-level) or ``"wordlevel"`` for a trained tokenizer.
        seq_len: tokens per block.
        batch_size: blocks per batch.
        val_fraction: fraction of documents held out for validation (and, for non-builtin sources, probing).
        num_workers: dataloader workers.
        seed: seed of the corpus, the split and the shuffling.
        cache_dir: tokenizer cache folder (default ``~/.cache/negmonitor/tokenizers``).
        max_documents: keep at most this many documents (hub and local sources).

    Raises:
        NegmonitorError: a missing path, an unloadable dataset, an empty corpus or bad sizes.

    Example::

        >>> dm = TextDataModule(n_sentences=2000, seq_len=32, batch_size=4)
        >>> dm.setup("fit")
        >>> dm.train_dataloader().batch_size
        4
    """

    def __init__(
        self,
        source: str = "builtin",
        n_sentences: int = 200_000,
        dataset_config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        tokenizer: str = "train",
        tokenizer_vocab_size: int = 4096,
        tokenizer_kind: str = "bpe",
        seq_len: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.02,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        max_documents: int | None = None,
    ):
        super().__init__()
        _validate(seq_len, batch_size, val_fraction, n_sentences)
        self.save_hyperparameters()
        self.source, self.seq_len, self.batch_size = source, int(seq_len), int(batch_size)
        self._docs: tuple[list[str], list[str]] | None = None
        self._tokenizer: Any = None
        self._blocks: dict[str, torch.Tensor] = {}

    # --- documents ------------------------------------------------------------------------------------------
    @property
    def is_builtin(self) -> bool:
        """Whether the source is the built-in grammar corpus."""
        return self.source == "builtin"

    def documents(self) -> tuple[list[str], list[str]]:
        """``(train_docs, val_docs)``, loaded once."""
        if self._docs is None:
            self._docs = self._split(self._load_documents())
        return self._docs

    def _load_documents(self) -> list[str]:
        h = self.hparams
        if self.is_builtin:
            docs = GrammarCorpus(h.seed).paragraphs(h.n_sentences)
        elif _looks_local(self.source):
            docs = read_text_documents(self.source)
        else:
            docs = load_hub_documents(*parse_hub_source(self.source, h.dataset_config, h.split), h.text_column)
        docs = docs[: h.max_documents] if h.max_documents else docs
        if len(docs) < 2:
            raise NegmonitorError(f"source {self.source!r} has {len(docs)} non-empty document(s) — need at least 2")
        return docs

    def _split(self, docs: list[str]) -> tuple[list[str], list[str]]:
        order = list(range(len(docs)))
        random.Random(self.hparams.seed).shuffle(order)
        n_val = min(len(docs) - 1, max(1, math.ceil(self.hparams.val_fraction * len(docs))))
        val = sorted(order[:n_val])
        train = sorted(order[n_val:])
        return [docs[i] for i in train], [docs[i] for i in val]

    # --- tokenizer ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer (trained or loaded on first use)."""
        if self._tokenizer is None:
            h = self.hparams
            texts = self.documents()[0] if h.tokenizer == "train" else None
            self._tokenizer = load_or_train_tokenizer(h.tokenizer, texts, cache_dir=h.cache_dir,
                                                      vocab_size=h.tokenizer_vocab_size, kind=h.tokenizer_kind)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model needs (``len(tokenizer)``)."""
        return len(self.tokenizer)

    # --- Lightning hooks ------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download / generate the text and train or load the tokenizer (cached; safe to call twice)."""
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenise and chunk both splits once; later calls do nothing."""
        if self._blocks:
            return
        train_docs, val_docs = self.documents()
        self._blocks = {"train": self._chunk(train_docs), "val": self._chunk(val_docs)}
        if len(self._blocks["train"]) == 0:
            raise NegmonitorError(f"the training text has fewer than seq_len={self.seq_len} tokens — use more text "
                                  f"or a smaller seq_len")

    def _chunk(self, docs: list[str]) -> torch.Tensor:
        stream = tokenize_stream(self.tokenizer, docs)
        n_blocks = len(stream) // self.seq_len
        return torch.from_numpy(stream[: n_blocks * self.seq_len].reshape(n_blocks, self.seq_len))

    def _blocks_for(self, split: str) -> torch.Tensor:
        self.setup()
        return self._blocks[split]

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training blocks; the last partial batch is dropped."""
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(BlockDataset(self._blocks_for("train")), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, generator=generator, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        """Validation blocks in order."""
        return DataLoader(BlockDataset(self._blocks_for("val")), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers)

    # --- held-out material for the monitors -----------------------------------------------------------------
    def probe_texts(self, n: int = 256) -> list[str]:
        """Up to ``n`` held-out texts: grammar paragraphs from the held-out hash bucket, else validation docs."""
        if self.is_builtin:
            return GrammarCorpus(self.hparams.seed).heldout_texts(n)
        return self.documents()[1][: int(n)]

    def minimal_pairs(self, n_per_construction: int = 100, seed: int = 12345) -> pd.DataFrame | None:
        """Held-out grammar minimal pairs for the built-in corpus; ``None`` for other sources."""
        if not self.is_builtin:
            return None
        return GrammarCorpus(self.hparams.seed).minimal_pairs(n_per_construction, seed=seed)


def tokenize_stream(tokenizer: Any, docs: list[str], batch: int = 10_000) -> np.ndarray:
    """Token ids of ``docs`` (with the tokenizer's own special tokens), each followed by EOS, as one int64 array."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise NegmonitorError("the tokenizer has no EOS token to separate documents — use one that has")
    pieces: list[np.ndarray] = []
    for start in range(0, len(docs), batch):
        for ids in tokenizer(docs[start:start + batch], add_special_tokens=True)["input_ids"]:
            if not ids or ids[-1] != eos:
                ids = [*ids, eos]
            pieces.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def parse_hub_source(source: str, config: str | None, split: str) -> tuple[str, str | None, str]:
    """``"ID[:CONFIG[:SPLIT]]"`` (the probe-set syntax) → ``(id, config, split)``; explicit arguments fill gaps."""
    name, *rest = source.split(":")
    if rest and rest[0]:
        config = rest[0]
    if len(rest) > 1 and rest[1]:
        split = rest[1]
    return name, config, split


def _looks_local(source: str) -> bool:
    """A path that exists, or one written like a path (so a typo is reported as a missing file)."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES)


def read_text_documents(source: str | os.PathLike) -> list[str]:
    """Non-empty lines of a text file, or of every text file under a folder (sorted by path)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise NegmonitorError(f"no such file or folder: {str(source)!r} — check the path")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()
                                                  and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise NegmonitorError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {str(source)!r}")
    docs: list[str] = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as handle:
            docs += [line.strip() for line in handle if line.strip()]
    return docs


def load_hub_documents(name: str, config: str | None, split: str, text_column: str) -> list[str]:
    """Non-empty texts of ``text_column`` from ``datasets.load_dataset(name, config, split=split)``."""
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # noqa: BLE001 - network, missing ids, bad configs: one clear line for the user
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NegmonitorError(
            f"cannot load dataset {name!r} (config={config!r}, split={split!r}): {first_line} — check the id and "
            f"your network, or pass a local text file or folder as the source"
        ) from err
    if text_column not in dataset.column_names:
        raise NegmonitorError(f"dataset {name!r} has no column {text_column!r} — choose text_column from "
                              f"{dataset.column_names}")
    return [t.strip() for t in dataset[text_column] if isinstance(t, str) and t.strip()]


def _validate(seq_len: int, batch_size: int, val_fraction: float, n_sentences: int) -> None:
    if int(seq_len) < 2:
        raise NegmonitorError(f"seq_len must be at least 2, got {seq_len!r}")
    if int(batch_size) < 1:
        raise NegmonitorError(f"batch_size must be positive, got {batch_size!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise NegmonitorError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    if int(n_sentences) < 2:
        raise NegmonitorError(f"n_sentences must be at least 2, got {n_sentences!r}")
