"""Shared helpers for the evaluation modules: devices, eval mode, batching, JSONL, seeded samples, hub loading."""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from negmonitor.errors import NegmonitorError

_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def model_device(model: nn.Module, device: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``device`` if given, else the device of the model's first parameter."""
    if device is not None:
        return torch.device(device)
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def no_cache_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Keyword inputs of one forward that asks for no KV cache where the model has one: nothing reads it, and it
    would hold every layer's keys and values until the forward's outputs are dropped."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if hasattr(getattr(model, "config", None), "use_cache"):
        inputs["use_cache"] = False
    return inputs


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (no dropout); give every submodule its own train/eval flag back afterwards, even
    on error (``model.train(was_training)`` would undo a user's ``.eval()`` on a frozen part inside a training run)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def max_positions(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The longest input the model accepts (from its config, else the tokenizer), or ``None`` if unknown."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in _POSITION_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 1_000_000:
        return value
    return None


def prefix_token_id(tokenizer: Any) -> int | None:
    """The token put before a sentence so that its first word is scored: BOS if the tokenizer has one, else EOS."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def pad_token_id(tokenizer: Any) -> int:
    """An id to fill padded positions with (masked out, so any valid id works): pad, else EOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def is_masked_lm(model: nn.Module) -> bool:
    """True for masked (encoder) language models such as ``BertForMaskedLM``."""
    return type(model).__name__.endswith("ForMaskedLM")


def check_lm(model: nn.Module) -> None:
    """Raise a clear error for a model without a language-model head (e.g. a bare ``BertModel``)."""
    get_head = getattr(model, "get_output_embeddings", None)
    if get_head is None or get_head() is None:
        raise NegmonitorError(f"{type(model).__name__} has no language-model head — load it with its LM head "
                              "(AutoModelForCausalLM or AutoModelForMaskedLM)")


def progress_bar(iterable: Iterable, progress: bool, total: int | None = None, desc: str | None = None,
                 leave: bool = True) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar when ``progress`` is true (``leave=False``: cleared when done, for a bar
    inside another one's loop)."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def check_batch_size(batch_size: int) -> int:
    """Validate a batch size (a positive int)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise NegmonitorError(f"batch_size must be a positive integer, got {batch_size!r} — pass e.g. batch_size=32")
    return batch_size


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict]:
    """Read a JSONL file (blank lines skipped); a bad line raises an error naming the file and line number."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise NegmonitorError(f"{path}, line {lineno}: invalid JSON ({err.msg}) — fix or delete that line") \
                    from None
            if not isinstance(row, dict):
                raise NegmonitorError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__} "
                                      "— write one object per line")
            missing = [key for key in required if key not in row]
            if missing:
                raise NegmonitorError(f"{path}, line {lineno}: missing field(s) {', '.join(missing)} — "
                                      f"each line needs {', '.join(required)}")
            rows.append(row)
    return rows


def group_rng(seed: int, group: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and the group's name, so one group's sample never depends on the others."""
    return np.random.default_rng([int(seed), zlib.crc32(str(group).encode("utf-8"))])


def sample_per_group(df: pd.DataFrame, column: str, n: int | None, seed: int) -> pd.DataFrame:
    """At most ``n`` rows per value of ``column``, drawn without replacement, seeded per group; order kept."""
    if n is None:
        return df.reset_index(drop=True)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise NegmonitorError(f"the sample size must be a positive integer, got {n!r} — pass e.g. 100")
    keep = []
    for name, index in df.groupby(column, sort=False).indices.items():
        if len(index) > n:
            index = np.sort(group_rng(seed, name).choice(index, size=n, replace=False))
        keep.append(index)
    rows = np.sort(np.concatenate(keep)) if keep else np.array([], dtype=int)
    return df.iloc[rows].reset_index(drop=True)


def select_names(requested: str | Iterable[str] | None, available: Sequence[str], kind: str, flag: str) -> list[str]:
    """Check a subset of names against ``available``; unknown names raise an error with close matches."""
    if requested is None:
        return list(available)
    names = [requested] if isinstance(requested, str) else list(requested)
    known = set(available)
    unknown = [name for name in names if name not in known]
    if unknown:
        import difflib

        hints = difflib.get_close_matches(unknown[0], available, n=3)
        hint = f"did you mean {', '.join(hints)}?" if hints else f"{len(available)} are available"
        raise NegmonitorError(f"unknown {kind} {', '.join(map(repr, unknown))} — {hint} (check {flag})")
    return list(dict.fromkeys(names))


def load_hub_dataset(path: str, name: str | None, split: str, fix: str) -> Any:
    """``datasets.load_dataset(path, name, split=split)``; any failure becomes a one-line error ending in ``fix``."""
    try:
        import datasets
    except ImportError:
        raise NegmonitorError(f"the `datasets` package is needed to load {path!r} from the hub — {fix}") from None
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as err:  # noqa: BLE001 - offline, missing, gated: all get the same advice
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise NegmonitorError(f"could not load {path!r}"
                              f"{f' ({name})' if name else ''} from the Hugging Face hub: {reason} — {fix}") from err
