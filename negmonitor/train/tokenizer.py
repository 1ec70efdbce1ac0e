"""Tokenizers for ``negmonitor train``: load a pretrained one, or train one on the corpus and cache it.

:func:`load_or_train_tokenizer` takes either a hub id / local folder (loaded with
:meth:`transformers.AutoTokenizer.from_pretrained`) or ``"train"``: a byte-level BPE (or word-level) tokenizer is
trained on the given texts with the ``tokenizers`` library. Trained tokenizers are cached on disk under a key that
hashes the texts and the settings, and are written to a temporary folder that is renamed into place, so a crash or
a concurrent process never leaves a half-written cache entry.

Trained tokenizers have the special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` and ``<|unk|>``; encoding with
``add_special_tokens=True`` prepends ``<|bos|>``. Offsets (``return_offsets_mapping=True``) are supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from negmonitor.errors import NegmonitorError

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]
TOKENIZER_KINDS = ("bpe", "wordlevel")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$NEGMONITOR_CACHE_DIR/tokenizers``, else ``~/.cache/negmonitor/tokenizers``."""
    root = os.environ.get("NEGMONITOR_CACHE_DIR") or Path.home() / ".cache" / "negmonitor"
    return Path(root) / "tokenizers"


def load_or_train_tokenizer(
    spec: str = "train",
    corpus_texts: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = 4096,
    kind: str = "bpe",
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Return a fast tokenizer: ``spec="train"`` trains (or reuses a cached) one on ``corpus_texts``.

    Args:
        spec: ``"train"``, a local tokenizer folder, or a hub id.
        corpus_texts: texts to train on (required for ``"train"``).
        cache_dir: where trained tokenizers are cached (default :func:`default_cache_dir`).
        vocab_size: target vocabulary size, special tokens included (BPE stops earlier if merges run out).
        kind: ``"bpe"`` (byte-level BPE, no unknown tokens) or ``"wordlevel"`` (whitespace/punctuation words).
        min_frequency: minimum count of a merge (BPE) or word (word level).

    Raises:
        NegmonitorError: bad settings, no texts to train on, or a tokenizer that cannot be loaded.
    """
    if spec != "train":
        return load_pretrained_tokenizer(spec)
    if kind not in TOKENIZER_KINDS:
        raise NegmonitorError(f"unknown tokenizer kind {kind!r} — use one of {list(TOKENIZER_KINDS)}")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise NegmonitorError(f"tokenizer vocab_size={vocab_size} is too small — use at least a few hundred")
    if not corpus_texts:
        raise NegmonitorError("tokenizer='train' needs corpus texts to train on — pass corpus_texts")
    settings = dict(kind=kind, vocab_size=int(vocab_size), min_frequency=int(min_frequency), version=CACHE_VERSION)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / cache_key(corpus_texts, settings)
    if not (target / "tokenizer.json").is_file():
        _save_atomically(_train_tokenizer(corpus_texts, **settings), target, settings)
    return _load_fast(target)


def cache_key(texts: Iterable[str], settings: dict) -> str:
    """Hex digest of the settings and the texts (in order)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return f"{settings['kind']}-{settings['vocab_size']}-{digest.hexdigest()[:24]}"


def load_pretrained_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local folder or hub id, with a pad token (the EOS token if it has none)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, use_fast=True)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear user-facing line
        where = "folder" if Path(spec).exists() else "hub id"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NegmonitorError(
            f"cannot load tokenizer from {where} {spec!r} ({first_line}) — check the id or path and your network, "
            f"or use tokenizer='train'"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise NegmonitorError(f"tokenizer {spec!r} has no fast version — use a fast tokenizer or tokenizer='train'")
    return _ensure_specials(tokenizer)


def _ensure_specials(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Give a loaded tokenizer an EOS (documents are joined with it) and a pad token."""
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": tokenizer.sep_token or EOS})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _train_tokenizer(texts: Sequence[str], kind: str, vocab_size: int, min_frequency: int, version: int = 1):
    """Train a ``tokenizers.Tokenizer`` on ``texts`` (BOS prepended by the post-processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B",
                                        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    steps = [processors.ByteLevel(trim_offsets=True), bos] if kind == "bpe" else [bos]
    tok.post_processor = processors.Sequence(steps)
    return tok


def _wrap(tok) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def _save_atomically(tok, target: Path, settings: dict) -> None:
    """Save the tokenizer into a temporary folder beside ``target`` and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _wrap(tok).save_pretrained(tmp)
        (tmp / "negmonitor_tokenizer.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():  # someone else's complete copy is fine; else retry
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_fast(folder: Path) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    return tokenizer
