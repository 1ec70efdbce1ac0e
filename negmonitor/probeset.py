"""Probe text: the fixed token windows every measurement runs over.

A :class:`ProbeSet` is built once (from a ``datasets`` hub id, a local text file or folder, or a list of strings)
and reused at every measurement, so curves over training compare like with like. It holds padding masks so padded
positions never enter a statistic, and fixes the token positions of the MD pairs (seeded).

The windows are the paper's: the texts (a hub split's rows, a folder's files, a list's strings) are joined with
``"\n\n"`` into one text, tokenized as one stream (no EOS or other special token between rows), and cut into
consecutive windows of ``window`` tokens (2,048, clipped to the model's positions), in text order. The incomplete
last window is dropped, as the authors' code does, unless the text is shorter than one window (then it is the one,
padded, window). ``n_tokens=None`` keeps every window (the whole split, the paper's setting); a budget keeps the
first ``ceil(n_tokens / window)`` windows (as the authors' ``num_batches`` cap does).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from negmonitor.errors import NegmonitorError
from negmonitor.protocol import SEPARATOR, WINDOW

DEFAULT_PROBE_DATASET = "wikitext:wikitext-2-raw-v1:test"
DEFAULT_WINDOW = WINDOW
TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")


@dataclass
class ProbeSet:
    """Fixed token windows ``[n_windows, window]`` with their attention mask and MD pair positions.

    ``pair_positions`` holds flat indices into ``input_ids.view(-1)``: ``P`` pairs of distinct, unpadded positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pair_positions: torch.Tensor
    source: str = "strings"
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        """Number of token windows."""
        return int(self.input_ids.shape[0])

    @property
    def window(self) -> int:
        """Tokens per window."""
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.attention_mask.sum())

    @property
    def n_pairs(self) -> int:
        """Number of MD pairs."""
        return int(self.pair_positions.shape[0])

    def window_indices(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Windows this process measures when ``world_size`` processes share the probe (round robin)."""
        return list(range(rank, self.n_windows, world_size))

    def context(self, flat_position: int, tokenizer: object, width: int = 8) -> str:
        """Decoded text of up to ``width`` tokens before ``flat_position`` and the token itself in brackets."""
        w, t = divmod(int(flat_position), self.window)
        ids = self.input_ids[w]
        before = [int(i) for i, m in zip(ids[max(0, t - width):t], self.attention_mask[w][max(0, t - width):t]) if m]
        return f"{tokenizer.decode(before)}[[{tokenizer.decode([int(ids[t])])}]]"

    @classmethod
    def build(
        cls,
        source: "str | os.PathLike | Sequence[str] | ProbeSet | None",
        tokenizer: object,
        n_tokens: int | None = None,
        window: int = DEFAULT_WINDOW,
        n_pairs: int = 1_000,
        seed: int = 0,
        max_positions: int | None = None,
    ) -> "ProbeSet":
        """Build a probe set from a hub dataset id (``ID[:CONFIG[:SPLIT]]``), a text file or folder, or strings.

        ``n_tokens=None`` keeps the whole text; ``window`` is clipped to ``max_positions`` (the model's maximum
        positions) when given. See the module docstring for how the windows are cut.

        Raises:
            NegmonitorError: the text is empty, or too short for the pairs asked for, or a setting is invalid.
        """
        if isinstance(source, ProbeSet):
            return source
        if (n_tokens is not None and n_tokens <= 0) or window <= 1 or n_pairs < 0:
            raise NegmonitorError(
                f"probe settings out of range (n_tokens={n_tokens}, window={window}, n_pairs={n_pairs}) — the tokens "
                "must be positive, the window at least 2 tokens (a pair needs two positions), the pairs 0 or more"
            )
        if max_positions:
            window = min(window, int(max_positions))
        texts, name = load_probe_texts(source)
        ids = _tokenize(texts, tokenizer)
        if len(ids) == 0:
            raise NegmonitorError(f"probe text from {name} is empty — give a file or dataset with text in it")
        if len(ids) < 2 * n_pairs:
            raise NegmonitorError(
                f"probe text from {name} has {len(ids)} tokens, fewer than the {2 * n_pairs} needed for "
                f"{n_pairs} MD pairs — give more text or lower n_pairs"
            )
        input_ids, mask = _windows(ids, n_tokens, window, _pad_id(tokenizer))
        pairs = _pair_positions(mask, n_pairs, seed)
        meta = {"n_tokens_requested": n_tokens, "n_tokens_available": len(ids), "window": window,
                "windows": "consecutive, joined rows, tail dropped"}
        return cls(input_ids, mask, pairs, source=name, seed=seed, meta=meta)


def load_probe_texts(source: "str | os.PathLike | Sequence[str] | None") -> tuple[list[str], str]:
    """Return the texts of a probe source and a short name for it."""
    if source is None:
        source = DEFAULT_PROBE_DATASET
    if isinstance(source, (list, tuple)):
        return [str(s) for s in source], f"{len(source)} strings"
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")], str(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise NegmonitorError(f"probe folder {path} holds no .txt files — put text files in it")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files], str(path)
    text = str(source)
    if text.startswith((".", "/", "~")) or text.endswith(TEXT_SUFFIXES):
        raise NegmonitorError(f"probe text file {text} does not exist — check the path")
    return load_dataset_texts(text), text


def load_dataset_texts(spec: str, text_column: str = "text") -> list[str]:
    """The rows of a ``datasets`` hub id written as ``ID[:CONFIG[:SPLIT]]`` (split defaults to test), empty rows
    included (the authors join every row with ``"\\n\\n"``)."""
    parts = spec.split(":")
    dataset_id = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "test"
    try:
        import datasets

        data = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise NegmonitorError(
            f"could not load dataset {spec!r} ({first}) — check the id, or pass a local text file instead"
        ) from exc
    if text_column not in data.column_names:
        raise NegmonitorError(f"dataset {spec!r} has no {text_column!r} column (it has {data.column_names})")
    texts = list(data[text_column])
    return texts if any(t and t.strip() for t in texts) else []


def _tokenize(texts: list[str], tokenizer: object) -> list[int]:
    """One token stream: the texts joined with ``"\\n\\n"``, no special tokens (long text: no length warning)."""
    if not any(t and t.strip() for t in texts):
        return []
    return list(tokenizer(SEPARATOR.join(texts), add_special_tokens=False, verbose=False)["input_ids"])


def _pad_id(tokenizer: object) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _windows(ids: list[int], n_tokens: int | None, window: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive windows of ``ids`` (tail dropped unless it is the only one); the first ``ceil(n_tokens / window)``."""
    flat = torch.tensor(ids, dtype=torch.long)
    n_full = len(ids) // window
    if n_tokens is not None:
        n_full = min(n_full, math.ceil(n_tokens / window))
    if n_full:
        return flat[: n_full * window].view(n_full, window).clone(), torch.ones((n_full, window), dtype=torch.long)
    input_ids = torch.full((1, window), pad_id, dtype=torch.long)
    mask = torch.zeros((1, window), dtype=torch.long)
    input_ids[0, : len(ids)] = flat
    mask[0, : len(ids)] = 1
    return input_ids, mask


def _pair_positions(mask: torch.Tensor, n_pairs: int, seed: int) -> torch.Tensor:
    from negmonitor.metrics.mapping import sample_pairs

    valid = mask.view(-1).nonzero().squeeze(1)
    if n_pairs == 0:
        return torch.empty((0, 2), dtype=torch.long)
    if 2 * n_pairs > len(valid):
        raise NegmonitorError(
            f"the probe keeps {len(valid)} tokens, fewer than the {2 * n_pairs} needed for {n_pairs} MD pairs — "
            "raise the token budget or lower n_pairs"
        )
    return valid[sample_pairs(len(valid), n_pairs, seed)]
