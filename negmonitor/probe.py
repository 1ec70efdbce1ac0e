"""One probe pass: run the probe windows through the model once and measure every monitored layer.

:func:`measure` returns the raw per-layer accumulators (so a distributed caller can reduce them first);
:func:`probe` is the one-call API that returns a :class:`~negmonitor.result.ProbeResult`.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from negmonitor.adapters import MLPSite, find_sites
from negmonitor.capture import BatchContext, SiteRecorder, check_hooks_fired, recording, unwrap_compiled
from negmonitor.distributed import Shard, agree_on_failure
from negmonitor.errors import NegmonitorError
from negmonitor.probeset import ProbeSet

if TYPE_CHECKING:
    from negmonitor.result import ProbeResult


@dataclass
class ProbeSettings:
    """How a probe pass runs and summarises (defaults follow the paper where it says)."""

    batch_size: int = 8
    top_neuron_frac: float = 0.05
    top_pairs: int = 100
    pairs_per_neuron_table: int = 10
    top_frac_for_jaccard: float = 0.05
    progress: bool = False
    n_bins: int | None = None


def probe(
    model: nn.Module,
    probe_set: ProbeSet,
    layers: Sequence[int] | int | None = None,
    tokenizer: object | None = None,
    settings: ProbeSettings | None = None,
    **overrides: object,
) -> "ProbeResult":
    """Measure WD, MD, moments and pair signs for every neuron of the chosen layers in one forward pass.

    Example::

        >>> result = negmonitor.probe(model, ProbeSet.build("text.txt", tokenizer), tokenizer=tokenizer)
        >>> result.layers[["layer", "wd_max", "wd_neg_share", "nn_share"]]
    """
    from negmonitor.result import ProbeResult

    settings = _settings(settings, overrides)
    sites = find_sites(unwrap_compiled(model), layers)
    recorders = measure(model, probe_set, sites, settings)
    return ProbeResult.from_recorders(recorders, sites, probe_set, tokenizer, settings)


def _settings(settings: ProbeSettings | None, overrides: dict) -> ProbeSettings:
    settings = settings or ProbeSettings()
    for key, value in overrides.items():
        if not hasattr(settings, key):
            raise NegmonitorError(f"unknown probe setting {key!r} — known: {', '.join(vars(settings))}")
        setattr(settings, key, value)
    return settings


def measure(
    model: nn.Module,
    probe_set: ProbeSet,
    sites: Sequence[MLPSite],
    settings: ProbeSettings,
    rank: int = 0,
    world_size: int = 1,
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> list[SiteRecorder]:
    """Run this process's share of the probe windows once and return the filled recorders.

    ``forward_context`` wraps each forward call (e.g. a Lightning precision plugin's autocast); the statistics
    accumulate in fp32 outside it. On CUDA out-of-memory the batch size halves and the pass restarts (statistics
    are never half-updated); under DDP every rank retries together.
    """
    batch_size = settings.batch_size
    while True:
        try:
            return _measure_once(model, probe_set, sites, settings, batch_size, rank, world_size, forward_context)
        except torch.OutOfMemoryError as exc:
            if batch_size <= 1:
                raise NegmonitorError(
                    "out of memory even at probe batch size 1 — lower the probe window or monitor fewer layers"
                ) from exc
            batch_size //= 2
            warnings.warn(f"negmonitor: out of memory during the probe pass; retrying with batch size {batch_size}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _measure_once(
    model: nn.Module,
    probe_set: ProbeSet,
    sites: Sequence[MLPSite],
    settings: ProbeSettings,
    batch_size: int,
    rank: int,
    world_size: int,
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> list[SiteRecorder]:
    eager = unwrap_compiled(model)
    device = _device_of(eager)
    kwargs = {} if settings.n_bins is None else {"n_bins": settings.n_bins}
    if world_size > 1:
        kwargs["sync_grid"] = False  # the grids are shared after the calibration phase, outside any hook
    recorders = [SiteRecorder(site, 2 * probe_set.n_pairs, **kwargs).to(device) for site in sites]
    pair_flat = probe_set.pair_positions.reshape(-1)
    windows = probe_set.window_indices(rank, world_size)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    batch = BatchContext()
    runner = getattr(eager, "base_model", eager)
    with _eval_no_grad(eager), recording(sites, recorders, batch):
        if world_size > 1:
            with agree_on_failure():  # every rank learns of a failure here before the grid broadcast
                with forward_context():
                    _calibrate(runner, probe_set, batch, batch_size, device)
            _share_rank0_grids(recorders)
        with agree_on_failure(world_size > 1):  # ... and here before the reductions that follow the pass
            for chunk in _progress(batches, settings.progress, "probe"):
                ids = probe_set.input_ids[chunk].to(device)
                mask = probe_set.attention_mask[chunk].to(device)
                _set_batch(batch, chunk, mask, pair_flat, probe_set.window, device)
                with forward_context():
                    runner(input_ids=ids, attention_mask=mask)
            if batches:
                check_hooks_fired(recorders)
    with _eval_no_grad(eager):  # as many forward passes as rank 0 (FSDP: each one is a collective); no hooks
        for _ in range(Shard(rank, world_size).extra_batches(probe_set.n_windows, batch_size)):
            with forward_context():
                runner(input_ids=probe_set.input_ids[:1].to(device),
                       attention_mask=probe_set.attention_mask[:1].to(device))
    return recorders


def _share_rank0_grids(recorders: Sequence[SiteRecorder]) -> None:
    """Every rank takes rank 0's histogram grid (centre and inverse unit, bit for bit), so the states sum."""
    for recorder in recorders:
        torch.distributed.broadcast(recorder.stats.center, src=0)
        torch.distributed.broadcast(recorder.stats.inv_unit, src=0)


def _calibrate(runner: nn.Module, probe_set: ProbeSet, batch: BatchContext, batch_size: int,
               device: torch.device) -> None:
    """Fix every histogram grid from the probe's first windows, as a single process would from its first batch.

    Under DDP each rank would otherwise take its grid from its own first batch; with a shared calibration batch the
    reduced statistics equal the single-process ones.
    """
    chunk = list(range(min(batch_size, probe_set.n_windows)))
    mask = probe_set.attention_mask[chunk].to(device)
    batch.valid_rows = mask.reshape(-1).nonzero().squeeze(1)
    batch.pair_rows = batch.pair_slots = torch.empty(0, dtype=torch.long, device=device)
    batch.calibrating = True
    try:
        runner(input_ids=probe_set.input_ids[chunk].to(device), attention_mask=mask)
    finally:
        batch.calibrating = False


def _set_batch(batch: BatchContext, chunk: list[int], mask: torch.Tensor, pair_flat: torch.Tensor, window: int,
               device: torch.device) -> None:
    """Tell the hooks which rows of the flattened batch are real tokens and which are MD pair positions."""
    batch.valid_rows = mask.reshape(-1).nonzero().squeeze(1)
    win = torch.as_tensor(chunk, dtype=torch.long)
    pair_window, pair_offset = pair_flat // window, pair_flat % window
    local = (pair_window.unsqueeze(1) == win.unsqueeze(0))
    slots, where = local.nonzero(as_tuple=True)
    batch.pair_slots = slots.to(device)
    batch.pair_rows = (where * window + pair_offset[slots]).to(device)


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the pass; the previous train/eval mode of every submodule is restored."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _progress(items: list, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="batch", leave=False))


class _CallableModule(types.ModuleType):
    """``negmonitor.probe`` is both this module and the function: once the submodule is imported, Python binds the
    package attribute to the module, so the module itself forwards calls to :func:`probe`."""

    def __call__(self, *args: object, **kwargs: object) -> "ProbeResult":
        return probe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
