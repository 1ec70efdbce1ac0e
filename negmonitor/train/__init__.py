"""``negmonitor train``: pretrain a small language model from scratch while the monitors watch it.

The pieces are :class:`~negmonitor.train.grammar.GrammarCorpus` (built-in, offline training text and held-out
minimal pairs), :func:`~negmonitor.train.tokenizer.load_or_train_tokenizer`,
:class:`~negmonitor.train.module.CausalLMModule` and :class:`~negmonitor.train.datamodule.TextDataModule`.
Names are imported lazily, so ``negmonitor.train.grammar`` can be used without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GrammarCorpus": "negmonitor.train.grammar",
    "load_or_train_tokenizer": "negmonitor.train.tokenizer",
    "CausalLMModule": "negmonitor.train.module",
    "TextDataModule": "negmonitor.train.datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'negmonitor.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
