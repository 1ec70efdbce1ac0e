"""Memory budget of one measurement: parse it, cost each monitored layer, and group the layers so a group fits.

A measurement holds, per monitored layer, a streaming accumulator (its int64 histogram is ~all of it: 32 KiB per
neuron at 4,096 bins) and the MD pair rows, plus transients while a batch is taken in or the layer is summarised.
At paper scale that is far more than a training run leaves free (Pythia-1.4B: ~6 GiB of histograms for its 24
layers), so :func:`plan_measurement` splits the layers into consecutive groups whose state and largest transient
fit ``memory_budget``; each group is one pass over the probe set that stops after the group's last layer. The
figures are upper bounds (the accumulator's own :meth:`planned_bytes`, the rest counted here), not measurements:
``benchmarks/scale.py`` checks the measured peak against the budget.

Default budget: 2 GiB. A training run that fills an 80 GB GPU typically leaves a few GiB of slack (allocator
fragmentation, the CUDA context); 2 GiB is ~2.5% of an A100/H100, and the smallest round size that holds one layer
of every model in the paper at the default 2,048-token window with fp32 capture (planned: Pythia-1.4B 0.9 GiB,
Llama-3.1-8B / Mistral-7B 1.3 GiB, Pythia-12B 1.6 GiB; with bf16 capture 0.7-1.3 GiB). 1 GiB, the earlier default,
refused Pythia-6.9B/12B, Llama and Mistral. Layer groups cost little time, since each pass starts from the hidden
states the previous one cached (:mod:`negmonitor.residual`).
"""

from __future__ import annotations

import gc
import logging
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from negmonitor.errors import NegmonitorError, first_line
from negmonitor.metrics.streaming import GRID_ROWS, NeuronStatsAccumulator
from negmonitor.summary import MD_COLUMNS

__all__ = ["DEFAULT_MEMORY_BUDGET", "parse_bytes", "format_bytes", "Plan", "plan_measurement", "lm_window_bytes",
           "evaluation_batch_size", "rows_within_budget", "BatchLimit", "retry_on_out_of_memory"]

DEFAULT_MEMORY_BUDGET = 2 << 30
MAX_UPDATE_ELEMENTS = 1 << 22  # rows x neurons of a padded batch copied for an update at once (an unpadded one that
# the fused CPU update takes goes in whole: a view, and that update's transients do not grow with the rows)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_LOGGED: set[str] = set()
T = TypeVar("T")
log = logging.getLogger("negmonitor")


def parse_bytes(value: int | float | str | None, name: str = "memory_budget") -> int | None:
    """``2147483648``, ``"2GiB"``, ``"512MiB"``, ``"1.5GB"`` → bytes (None or ``"none"``: no budget).

    Raises:
        NegmonitorError: for anything else, or a budget that is not positive.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    if isinstance(value, bool):
        raise NegmonitorError(f"{name} must be bytes or a size like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise NegmonitorError(f"{name} must be bytes or a size like '2GiB' or '512MiB', got {value!r}")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit]) if math.isfinite(number * _UNITS[unit]) else 0
    if size <= 0:
        raise NegmonitorError(f"{name} must be positive, got {value!r} — e.g. '1GiB'")
    return size


def format_bytes(size: int) -> str:
    """Bytes as the largest binary unit with one decimal, e.g. ``1.5GiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{size}B"


@dataclass(frozen=True)
class LayerShape:
    """What the budget needs to know of one monitored site."""

    layer: int
    n_neurons: int
    d_in: int


@dataclass
class Plan:
    """How one measurement runs: layer groups (indices into the site list), batch size and rows per update."""

    groups: list[list[int]]
    batch_size: int
    rows_per_update: int
    budget: int | None
    need: list[int]  # planned bytes per group
    resume: bool = False  # each pass after the first starts from the hidden states cached at its first block

    def describe(self, shapes: Sequence[LayerShape]) -> str:
        """One line for the log."""
        spans = [f"{shapes[g[0]].layer}-{shapes[g[-1]].layer}" if len(g) > 1 else f"{shapes[g[0]].layer}"
                 for g in self.groups]
        budget = format_bytes(self.budget) if self.budget else "none"
        start = ("each later pass starting from the hidden states cached at its first layer"
                 if self.resume else "each from the embeddings")
        return (f"negmonitor: memory budget {budget}: {len(self.groups)} pass(es) over the probe set for layer "
                f"groups [{', '.join(spans)}]" + (f" ({start})" if len(self.groups) > 1 else "")
                + f", probe batch size {self.batch_size}, planned peak {format_bytes(max(self.need, default=0))}")


def _acc_bytes(n_neurons: int, n_bins: int, rows: int) -> int:
    return int(NeuronStatsAccumulator.planned_bytes(n_neurons, n_bins, rows))


def _layer_costs(shape: LayerShape, n_bins: int, n_slots: int, rows: int, cap_bytes: int,
                 batch_rows: int | None = None) -> tuple[int, int]:
    """(held for the whole pass, largest transient) of one layer, in bytes."""
    n, d = shape.n_neurons, shape.d_in
    state = _acc_bytes(n, n_bins, 0)  # state and the row-independent transients (compute), held to be safe
    update = _acc_bytes(n, n_bins, rows) - state
    pairs = n_slots * (d + n) * cap_bytes + n_slots * 4
    held = state + pairs + 64
    hook = update + rows * n * (cap_bytes + 1)  # + the chunk's copy and its finite mask
    grid_rows = min(GRID_ROWS, batch_rows or rows)  # the grid reads up to GRID_ROWS rows of the first window at once
    hook = max(hook, _acc_bytes(n, n_bins, grid_rows) - state + grid_rows * n * cap_bytes)
    p = max(1, n_slots // 2)
    columns = min(n, MD_COLUMNS)  # MD runs over blocks of columns: |dy|, sorted values and indices, fp32 copies
    md = p * columns * 4 * 8 + n_slots * d * 4 + n * 64
    return held, max(hook, md)  # under DDP the state is reduced in place: no rank holds another's


def _forward_bytes(shapes: Sequence[LayerShape], batch_rows: int, cap_bytes: int, attention: int) -> int:
    """The probe forward's own activations at one time (no autograd): a few hidden states, one MLP's
    intermediates and, for eager attention, the score matrices (``attention`` bytes per batch row)."""
    n = max(s.n_neurons for s in shapes)
    d = max(s.d_in for s in shapes)
    return batch_rows * ((2 * n + 4 * d) * cap_bytes + attention)


def plan_measurement(
    shapes: Sequence[LayerShape],
    *,
    budget: int | None,
    batch_size: int,
    window: int,
    n_bins: int,
    n_slots: int,
    cap_bytes: int,
    attention_bytes_per_row: int = 0,
    residual_bytes: int = 0,
) -> Plan:
    """Group the layers (consecutive, in site order) and pick the batch size so that every group fits ``budget``.

    Without a budget all layers form one group at the given batch size. With one, the batch size (halvings of
    ``batch_size``) that needs the fewest passes is taken, the largest among equals: each pass runs the model up
    to its group's last layer, while a smaller batch costs little.

    ``residual_bytes``: the hidden states entering one block for every probe window of this process (0: passes
    cannot start part-way, see :mod:`negmonitor.residual`). When more than one group is needed and the budget holds
    that cache beside the largest group, each pass after the first starts from it (``Plan.resume``): a pass hands
    its windows' cached states to the next one batch by batch, so one copy is held at a time.

    Raises:
        NegmonitorError: when one layer does not fit even at batch size 1: names the smallest budget that works.
    """
    if not shapes:
        return Plan([], batch_size, 1, budget, [])
    plain = _plan(shapes, budget, batch_size, window, n_bins, n_slots, cap_bytes, attention_bytes_per_row)
    if budget is None or len(plain.groups) == 1 or residual_bytes <= 0 or residual_bytes >= budget:
        return plain
    try:
        resumed = _plan(shapes, budget - residual_bytes, batch_size, window, n_bins, n_slots, cap_bytes,
                        attention_bytes_per_row)
    except NegmonitorError:
        return plain  # the cache leaves too little for one layer: every pass starts from the embeddings
    resumed.budget, resumed.resume = budget, True
    resumed.need = [need + residual_bytes for need in resumed.need]
    return resumed


def _plan(shapes: Sequence[LayerShape], budget: int | None, batch_size: int, window: int, n_bins: int,
          n_slots: int, cap_bytes: int, attention_bytes_per_row: int) -> Plan:
    max_n = max(s.n_neurons for s in shapes)
    sizes = []
    bs = max(1, int(batch_size))
    while True:
        sizes.append(bs)
        if bs == 1:
            break
        bs //= 2
    best: Plan | None = None
    smallest = 0  # what one layer needs at the last size tried (batch size 1): the least any plan can need
    for bs in sizes:
        rows = max(1, min(bs * window, MAX_UPDATE_ELEMENTS // max_n))
        costs = [_layer_costs(s, n_bins, n_slots, rows, cap_bytes, bs * window) for s in shapes]
        forward = _forward_bytes(shapes, bs * window, cap_bytes, attention_bytes_per_row)
        if budget is None:
            need = sum(h for h, _ in costs) + max(t for _, t in costs) + forward
            return Plan([list(range(len(shapes)))], bs, rows, None, [need])
        smallest = max(h + t for h, t in costs) + forward
        if smallest <= budget:
            plan = _greedy(costs, forward, budget, bs, rows)
            if best is None or len(plan.groups) < len(best.groups):
                best = plan
    if best is not None:
        return best
    raise NegmonitorError(
        f"memory_budget {format_bytes(budget)} cannot hold the measurement of even one layer — the smallest budget "
        f"that works here is {format_bytes(smallest)} (memory_budget='{math.ceil(smallest / (1 << 20))}MiB', "
        f"--memory-budget {math.ceil(smallest / (1 << 20))}MiB), or a shorter probe window")


def _greedy(costs: list[tuple[int, int]], forward: int, budget: int, batch_size: int, rows: int) -> Plan:
    groups: list[list[int]] = []
    needs: list[int] = []
    current: list[int] = []
    held = transient = 0
    for i, (h, t) in enumerate(costs):
        if current and held + h + max(transient, t) + forward > budget:
            groups.append(current)
            needs.append(held + transient + forward)
            current, held, transient = [], 0, 0
        current.append(i)
        held, transient = held + h, max(transient, t)
    groups.append(current)
    needs.append(held + transient + forward)
    return Plan(groups, batch_size, rows, budget, needs)


def log_plan_once(plan: Plan, shapes: Sequence[LayerShape], requested_batch_size: int) -> None:
    """Log the grouping once per process and plan (a callback measures many times with the same plan)."""
    line = plan.describe(shapes)
    if not _first_time(line):
        return
    if len(plan.groups) > 1 or plan.batch_size < requested_batch_size:
        warnings.warn(line, stacklevel=3)
    else:
        log.info(line)


LOSS_ROWS = 512  # positions per slice of the perplexity loss: its fp32 log-softmax is LOSS_ROWS x vocabulary


def lm_window_bytes(model, window: int, rows: int = 1) -> int:
    """Planned extra memory of one ``window``-token row through a causal LM's evaluation forward (no autograd, no
    KV cache): its logits (in the dtype the head produces them: the autocast dtype when autocast is on now, else
    the head's weight dtype — bf16 logits of Qwen3-8B's 152k vocabulary are 0.6 GiB a window, fp32 would be 1.2),
    the hidden activations of one block, the eager attention's score matrices, and the loss over
    :data:`LOSS_ROWS` positions at a time (their fp32 copy and log-softmax). ``rows`` windows in one batch: the
    loss's slice is there once, however many rows (short minimal-pair sentences fill a batch many times over)."""
    config = getattr(model, "config", None)

    def setting(*names: str) -> int:  # the model's config, else its text model's (composite configs)
        for source in (config, getattr(config, "text_config", None)):
            value = next((getattr(source, k) for k in names if getattr(source, k, None)), None)
            if value:
                return int(value)
        return 0

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # From the config or the head's declared width, never its weight: under FSDP that is this rank's flat shard.
    vocab = setting("vocab_size") or int(getattr(head, "out_features", 0) or 0)
    d = setting("hidden_size")
    n = setting("intermediate_size", "n_inner", "ffn_dim") or 4 * d
    logits = _output_bytes(model, head)
    return (rows * window * (vocab * logits + (2 * n + 4 * d) * 4 + eager_attention_bytes(model, window))
            + min(rows * window, LOSS_ROWS) * vocab * 8)


def _output_bytes(model, head) -> int:
    """Bytes per element of the head's output: the autocast dtype's under autocast, else its weight's (fp32 when
    unknown)."""
    weight = getattr(head, "weight", None)
    if weight is None and hasattr(model, "parameters"):
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None:
        return 4
    device = weight.device.type
    own = weight.element_size() if weight.is_floating_point() else 4  # a quantized head computes in fp32 or more
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        return min(own, torch.get_autocast_dtype(device).itemsize)
    return own


def rows_within_budget(model, window: int, cap: int, budget: int) -> int:
    """The most rows of ``window`` tokens, from 1 to ``cap``, whose evaluation forward fits ``budget`` (1 when
    even one does not: scored one at a time)."""
    low, high = 1, max(1, int(cap))
    while low < high:
        middle = (low + high + 1) // 2
        if lm_window_bytes(model, window, middle) <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def eager_attention_bytes(model, window: int) -> int:
    """Bytes per batch row of eager attention's ``H x T x T`` fp32 scores and their softmax (0 for SDPA, flash)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") != "eager":
        return 0
    return int(getattr(config, "num_attention_heads", 0) or 0) * window * 4 * 2


def evaluation_batch_size(model, window: int, batch_size: int, budget: int | None, what: str = "perplexity",
                          refuse: bool = True) -> int:
    """The largest of ``batch_size, batch_size/2, ..., 1`` windows whose evaluation forward fits ``budget`` (logged
    once when lowered); ``batch_size`` without a budget. A budget too small for one window is refused, or with
    ``refuse=False`` (a budget its user did not set, as the report's surprisal) windows go one at a time, warned.

    Raises:
        NegmonitorError: a budget too small for one window, naming the smallest that works (``refuse``).
    """
    if budget is None:
        return batch_size
    per_window = lm_window_bytes(model, window)
    if per_window > budget and not refuse:
        warnings.warn(f"negmonitor: one {window}-token {what} window plans {format_bytes(per_window)}, more than the "
                      f"memory budget {format_bytes(budget)}: windows are scored one at a time", stacklevel=3)
        return 1
    if per_window > budget:
        raise NegmonitorError(f"memory_budget {format_bytes(budget)} cannot hold one {window}-token perplexity "
                              f"window — the smallest budget that works here is {format_bytes(per_window)} "
                              f"(memory_budget='{math.ceil(per_window / (1 << 20))}MiB'); or pass a shorter ppl_window")
    size = batch_size
    while size > 1 and lm_window_bytes(model, window, size) > budget:
        size //= 2
    if size < batch_size:
        line = (f"negmonitor: memory budget {format_bytes(budget)}: {what} batch size {batch_size} -> {size} "
                f"({window}-token windows, planned {format_bytes(lm_window_bytes(model, window, size))})")
        if _first_time(line):
            warnings.warn(line, stacklevel=3)
    return size


@dataclass
class BatchLimit:
    """The batch size an out-of-memory retry came down to, kept by a run for its next calls (probe passes, perplexity
    evaluations, minimal-pair scoring): they start there instead of running out of memory, emptying the allocator's
    cache and retrying every time (the results do not depend on the batch size). ``None`` until a retry lowers it."""

    batch_size: int | None = None

    def cap(self, batch_size: int) -> int:
        """``batch_size``, or the lowered size if a retry brought it lower."""
        return batch_size if self.batch_size is None else min(batch_size, self.batch_size)


def retry_on_out_of_memory(run: Callable[[int], T], batch_size: int, limit: BatchLimit | None, device: torch.device,
                           during: str, fix: str, later: str = "measurements") -> T:
    """``run(batch_size)``, and after an out-of-memory error ``run`` again at half the batch size (warned, and kept in
    ``limit`` for the run's ``later`` calls), starting from ``limit``'s size if a retry lowered it before.

    Under DDP ``run`` closes its local phases with :func:`~negmonitor.distributed.agree_on_failure`, so every rank
    raises an ``OutOfMemoryError`` together and retries in step. Between tries the failed call's reference cycles
    are collected and, on CUDA, the allocator's cache is given back, for unfragmented room.

    Raises:
        NegmonitorError: out of memory at batch size 1, naming ``fix``.
    """
    batch_size = batch_size if limit is None else limit.cap(batch_size)
    while True:
        try:
            return run(batch_size)
        except torch.OutOfMemoryError as error:
            cause = first_line(error)  # only its text: the traceback's frames hold the failed call's tensors
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if batch_size <= 1:
            raise NegmonitorError(f"out of memory during {during} even at batch size 1 ({cause}) — {fix}")
        batch_size //= 2
        kept = ""
        if limit is not None:
            limit.batch_size = batch_size
            kept = f" (later {later} start there)"
        warnings.warn(f"negmonitor: out of memory during {during}; retrying with batch size {batch_size}{kept}",
                      stacklevel=3)


def _first_time(line: str) -> bool:
    """True the first time this process logs ``line`` (a callback measures many times with the same plan)."""
    if line in _LOGGED:
        return False
    _LOGGED.add(line)
    return True
