"""Perplexity of a causal language model over disjoint chunks (the paper's) or sliding windows.

The text is tokenized into one stream (several texts are joined with ``"\n\n"``, as the authors and the Hugging
Face perplexity guide do; no special tokens are added). By default the stream is cut into disjoint chunks of
``min(2048, the model's positions)`` tokens, each scored on its own (its first token has no context and is not
scored, nor counted), and the incomplete last chunk is dropped — the authors' ``utils/perplexity.py``. A text
shorter than one chunk is scored as one chunk.

``stride < window`` gives Hugging Face's sliding-window method instead: windows of ``window`` tokens start every
``stride`` tokens and each scores only the tokens that the previous window did not score, so every token except the
first is scored exactly once, with between ``window - stride`` and ``window - 1`` tokens of context (``stride=1``:
every token gets a full window). The window never exceeds 2,048 unless asked for, nor the model's positions.
``n_tokens`` counts exactly the tokens scored.

The returned ``nll`` is the mean negative log-likelihood per scored token (nats) and ``ppl = exp(nll)``.

Example::

    >>> text = load_perplexity_text("../shared/data/wikitext-2/valid.txt")
    >>> result = perplexity(model, tokenizer, text, window=512, stride=256)
    >>> result.ppl, result.n_tokens
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from negmonitor.budget import LOSS_ROWS, BatchLimit, evaluation_batch_size, retry_on_out_of_memory
from negmonitor.distributed import FailureHold, Shard, agree_on_failure, forward_is_collective
from negmonitor.errors import NegmonitorError
from negmonitor.protocol import SEPARATOR, default_window
from negmonitor.evaluation._common import (
    check_batch_size,
    check_lm,
    chunks,
    eval_mode,
    is_masked_lm,
    load_hub_dataset,
    max_positions,
    model_device,
    no_cache_inputs,
    pad_token_id,
    progress_bar,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_DATASET = "wikitext"
DEFAULT_CONFIG = "wikitext-2-raw-v1"
_TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity ``ppl = exp(nll)``, mean negative log-likelihood ``nll`` (nats/token), scored tokens ``n_tokens``."""

    ppl: float
    nll: float
    n_tokens: int

    def as_dict(self) -> dict[str, float | int]:
        """The three numbers as a plain dict."""
        return {"ppl": self.ppl, "nll": self.nll, "n_tokens": self.n_tokens}


def sliding_windows(n_tokens: int, window: int, stride: int, drop_tail: bool = True) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_scored)`` over ``n_tokens`` tokens (Hugging Face's sliding-window method).

    Window ``k`` covers tokens ``[k * stride, min(k * stride + window, n_tokens))`` and scores the tokens from the
    previous window's end (at least ``begin + 1``, since a token needs context) to its own end. With disjoint
    chunks (``stride == window``) and ``drop_tail``, an incomplete last chunk is left out unless it is the only one.
    """
    if drop_tail and stride == window and n_tokens >= window:
        n_tokens -= n_tokens % window
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts_or_token_ids: str | Sequence[str] | Sequence[int] | torch.Tensor,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = False,
    drop_tail: bool = True,
    shard: Shard | None = None,
    memory_budget: int | None = None,
    batch_limit: BatchLimit | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on a text, a list of texts (joined) or a 1-D sequence of token ids.

    Args:
        window: tokens per window; default ``min(2048, the model's maximum positions)``; at most the model's.
        stride: step between window starts; default ``window`` (disjoint chunks). Must be in ``[1, window]``.
        drop_tail: with disjoint chunks, leave out an incomplete last chunk (the authors' way).
        batch_size: windows per forward pass (the result does not depend on it).
        device: where to run; default the model's device.
        progress: show a tqdm bar over batches.
        shard: under DDP/FSDP, this process's place: it scores every ``world_size``-th window (padding with
            throw-away batches to rank 0's count) and the summed NLL and token count are reduced over the
            processes, so every process gets the single-process result.
        memory_budget: extra bytes one forward may allocate on the model's device (its logits, activations and
            loss): ``batch_size`` halves until a batch fits (:func:`~negmonitor.budget.evaluation_batch_size`);
            None: no bound.
        batch_limit: the run's perplexity batch size after an out-of-memory retry, kept for its later evaluations
            (on out-of-memory, on any process under a ``shard``, the batch size halves and the evaluation restarts,
            every process in step, with or without a ``batch_limit``).

    Raises:
        NegmonitorError: for a masked LM, fewer than two tokens, a window/stride out of range, or out of memory
            even at batch size 1.
    """
    check_lm(model)
    if is_masked_lm(model):
        raise NegmonitorError(f"perplexity needs a causal LM, got {type(model).__name__} — use a decoder model")
    check_batch_size(batch_size)
    ids = token_stream(tokenizer, texts_or_token_ids)
    if ids.numel() < 2:
        raise NegmonitorError(f"the text has {ids.numel()} token(s); perplexity needs at least 2 — pass more text")
    window, stride = resolve_window(model, tokenizer, window, stride)
    batch_size = evaluation_batch_size(model, window, batch_size, memory_budget)
    spans = sliding_windows(ids.numel(), window, stride, drop_tail)
    device, pad_id = model_device(model, device), pad_token_id(tokenizer)
    total_nll, n_scored = retry_on_out_of_memory(
        lambda size: _score_shard(model, ids, spans, size, device, pad_id, progress, shard), batch_size, batch_limit,
        device, "a perplexity evaluation", "pass a shorter window (ppl_window)", later="evaluations")
    nll = total_nll / n_scored
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_scored)


def _score_shard(model: nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]], batch_size: int,
                 device: torch.device, pad_id: int, progress: bool, shard: Shard | None) -> tuple[float, int]:
    """Summed NLL and scored-token count over every window: this process's share under an active ``shard``,
    reduced over the processes (each failure reaches every process first, so all raise together)."""
    if shard is None or not shard.active:
        return _score_spans(model, ids, spans, batch_size, device, pad_id, progress, FailureHold(active=False))
    # Under FSDP each forward is a collective: a failure scoring a batch is held until this rank has run as many
    # forwards as rank 0 (its own, then throw-away ones), and raised before the guard's all-reduce.
    held = FailureHold(active=forward_is_collective(model))
    with agree_on_failure():  # a rank that fails here tells the others before the sum below
        total_nll, n_scored = _score_spans(model, ids, shard.take(spans), batch_size, device, pad_id, progress, held)
        with eval_mode(model), torch.no_grad():
            for _ in range(shard.extra_batches(len(spans), batch_size)):
                _logits(model, *_batch_tensors(ids, spans[:1], pad_id)[:2], device)
        held.raise_held()
        # allocated inside the guard: an out-of-memory error here reaches every process (none retries alone)
        sums = torch.tensor([total_nll, n_scored], dtype=torch.float64, device=shard.reduction_device(device))
    total_nll, n_scored = shard.sum_(sums).tolist()
    return total_nll, int(n_scored)


def token_stream(tokenizer: PreTrainedTokenizerBase,
                 texts_or_token_ids: str | Sequence[str] | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """The input as one 1-D LongTensor of token ids (texts joined with ``"\\n\\n"``, no special tokens added)."""
    data = texts_or_token_ids
    if isinstance(data, torch.Tensor):
        if data.dim() == 2 and data.shape[0] == 1:
            data = data[0]
        if data.dim() != 1:
            raise NegmonitorError(f"token ids must be 1-D, got shape {tuple(data.shape)} — pass one token stream")
        return data.long().cpu()
    if isinstance(data, str):
        text = data
    else:
        items = list(data)
        if items and all(isinstance(x, numbers.Integral) for x in items):
            return torch.tensor([int(x) for x in items], dtype=torch.long)
        if not all(isinstance(x, str) for x in items):
            raise NegmonitorError("expected a text, a list of texts or a list of token ids — pass one of those")
        text = SEPARATOR.join(items)
    encoded = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(encoded, dtype=torch.long)


def resolve_window(model: nn.Module, tokenizer: PreTrainedTokenizerBase, window: int | None,
                   stride: int | None) -> tuple[int, int]:
    """Default and check the window length and stride against the model's maximum positions."""
    limit = max_positions(model, tokenizer)
    if window is None:
        window = default_window(limit)
    if not isinstance(window, int) or window < 2:
        raise NegmonitorError(f"window must be an integer >= 2, got {window!r} — pass e.g. window=512")
    if limit is not None and window > limit:
        raise NegmonitorError(f"window {window} exceeds the model's {limit} positions — pass window={limit} or less")
    stride = window if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise NegmonitorError(f"stride must be an integer in [1, window={window}], got {stride!r} — "
                              f"pass e.g. stride={window} (disjoint chunks)")
    return window, stride


def _score_spans(model: nn.Module, ids: torch.Tensor, spans: list[tuple[int, int, int]], batch_size: int,
                 device: torch.device, pad_id: int, progress: bool, held: FailureHold) -> tuple[float, int]:
    """Summed NLL (float64) and count of the scored tokens over all windows; a failure scoring a batch's logits
    stays in ``held`` when it is active (the caller raises it after its last forward), else it is raised."""
    total, count = 0.0, 0
    batches = list(chunks(spans, batch_size))
    with eval_mode(model), torch.no_grad():
        for batch in progress_bar(batches, progress, total=len(batches), desc="perplexity", leave=False):
            nll, n = _score_batch(model, ids, batch, device, pad_id, held)
            total, count = total + nll, count + n
    return total, count


def _score_batch(model: nn.Module, ids: torch.Tensor, batch: Sequence[tuple[int, int, int]], device: torch.device,
                 pad_id: int, held: FailureHold | None = None) -> tuple[float, int]:
    """One forward pass over a batch of windows, right-padded; returns summed NLL of scored tokens and their count.
    With ``held``, a failure scoring the logits is held there, and once it holds one the forward runs unscored."""
    input_ids, attention, labels = _batch_tensors(ids, batch, pad_id)
    logits = _logits(model, input_ids, attention, device)
    if held is None:
        return _summed_nll(logits, labels)
    if not held.failed:
        with held:
            return _summed_nll(logits, labels)
    return 0.0, 0


def _batch_tensors(ids: torch.Tensor, batch: Sequence[tuple[int, int, int]],
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of windows right-padded: ids, attention mask and labels (-100 where not scored), ``[B, L]`` each."""
    length = max(end - begin for begin, end, _ in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for row, (begin, end, first) in enumerate(batch):
        input_ids[row, : end - begin] = ids[begin:end]
        attention[row, : end - begin] = 1
        labels[row, first - begin: end - begin] = ids[first:end]
    return input_ids, attention, labels


def _logits(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(**no_cache_inputs(model, input_ids.to(device), attention.to(device))).logits


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of a batch's scored tokens (labels not -100) and their count."""
    targets = labels[:, 1:]  # position i predicts token i + 1
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):  # the loss over LOSS_ROWS positions at a time: its float32 copy and
        for start in range(0, targets.shape[1], LOSS_ROWS):  # softmax stay small beside the logits
            wanted = targets[row, start : start + LOSS_ROWS]
            scored = wanted != -100  # only the scored positions go through the (float32) softmax
            if scored.any():  # on the host: no read-back
                chunk = logits[row, start : start + wanted.numel()][scored.to(logits.device)].float()
                total += torch.nn.functional.cross_entropy(chunk, wanted[scored].to(logits.device),
                                                           reduction="sum").double()
    return float(total), int((targets != -100).sum())


def load_perplexity_text(source: str | os.PathLike | None = None, name: str | None = None,
                         split: str = "validation") -> str:
    """The evaluation text: a local text file, a folder of text files, or a ``datasets`` hub id.

    ``source=None`` loads WikiText-2 (raw) validation from the hub (``"wikitext"``, ``"wikitext-2-raw-v1"``).
    Hub rows are joined with ``"\\n\\n"`` (the Hugging Face perplexity guide's convention); a folder's ``*.txt``
    files are read in name order and joined the same way.

    Raises:
        NegmonitorError: missing file, empty folder, or a hub dataset that cannot be loaded (e.g. offline).
    """
    if source is None:
        source = DEFAULT_DATASET
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        return _read_text_dir(path)
    if _looks_like_path(str(source)):
        raise NegmonitorError(f"no such file or folder: {source} — pass an existing text file with --text FILE")
    return _load_hub_text(str(source), name, split)


def _looks_like_path(source: str) -> bool:
    """True if ``source`` is meant as a local path rather than a hub id."""
    return source.startswith(("/", ".", "~")) or source.endswith(_TEXT_SUFFIXES)


def _read_text_dir(path: Path) -> str:
    """All text files of a folder, in name order, joined with blank lines."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _TEXT_SUFFIXES)
    if not files:
        raise NegmonitorError(f"no text files ({', '.join(_TEXT_SUFFIXES)}) in {path} — pass a text file with --text")
    return SEPARATOR.join(p.read_text(encoding="utf-8") for p in files)


def _load_hub_text(dataset: str, name: str | None, split: str) -> str:
    """A hub dataset's text column joined with ``"\\n\\n"``."""
    if name is None and dataset in (DEFAULT_DATASET, "Salesforce/wikitext"):
        name = DEFAULT_CONFIG
    data = load_hub_dataset(dataset, name, split, fix="pass a local text file with --text FILE")
    column = "text" if "text" in data.column_names else next(
        (c for c, f in data.features.items() if getattr(f, "dtype", None) in ("string", "large_string")), None)
    if column is None:
        raise NegmonitorError(f"{dataset!r} has no text column — pass a local text file with --text FILE")
    return SEPARATOR.join(data[column])
