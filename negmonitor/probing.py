"""One probe pass: run the probe windows through the model and measure every monitored layer.

:func:`measure` returns one small :class:`~negmonitor.summary.LayerSummary` per layer (under DDP, from the
statistics reduced across ranks); :func:`probe` is the one-call API that returns a
:class:`~negmonitor.result.ProbeResult`. Layers are measured in groups that fit ``memory_budget``
(:mod:`negmonitor.budget`): each group is one pass over the probe set that stops after its last layer, and its
accumulators are summarised and dropped before the next group starts.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from negmonitor.adapters import MLPSite, find_blocks, find_sites
from negmonitor.budget import (DEFAULT_MEMORY_BUDGET, BatchLimit, LayerShape, Plan, eager_attention_bytes,
                               log_plan_once, parse_bytes, plan_measurement, retry_on_out_of_memory)
from negmonitor.capture import (BatchContext, GridRecorder, SiteRecorder, StopPass, check_hooks_fired, recording,
                                unwrap_compiled)
from negmonitor.metrics.streaming import GRID_ROWS
from negmonitor.distributed import FailureHold, Shard, agree_on_failure, forward_is_collective, gathers_weight
from negmonitor.errors import NegmonitorError
from negmonitor.evaluation._common import no_cache_inputs
from negmonitor.probeset import ProbeSet
from negmonitor.residual import block_inputs, can_start_midway, run_blocks, stop_before
from negmonitor.summary import LayerSummary, summarise_recorder

if TYPE_CHECKING:
    from negmonitor.result import ProbeResult


@dataclass
class ProbeSettings:
    """How a probe pass runs and summarises (defaults follow the paper where it says).

    ``memory_budget`` (bytes, or a size such as ``"2GiB"``; ``None``: no limit) bounds the extra memory one
    measurement allocates on the model's device; see :mod:`negmonitor.budget`. ``sample_neurons``: top-WD neurons
    per layer whose pair-position pre-activations are kept for images.
    """

    batch_size: int = 8
    top_neuron_frac: float = 0.05
    top_pairs: int = 100
    pairs_per_neuron_table: int = 10
    top_frac_for_jaccard: float = 0.05
    progress: bool = False
    n_bins: int | None = None
    memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET
    sample_neurons: int = 0

    def __post_init__(self) -> None:
        self.memory_budget = parse_bytes(self.memory_budget)
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise NegmonitorError(f"the probe batch size must be a positive integer, got {self.batch_size!r} — e.g. "
                                  "--batch-size 8 (batch_size=8)")


def probe(
    model: nn.Module,
    probe_set: ProbeSet,
    layers: Sequence[int] | int | None = None,
    tokenizer: object | None = None,
    settings: ProbeSettings | None = None,
    **overrides: object,
) -> "ProbeResult":
    """Measure WD, MD, moments and pair signs for every neuron of the chosen layers.

    Example::

        >>> result = negmonitor.probe(model, ProbeSet.build("text.txt", tokenizer), tokenizer=tokenizer)
        >>> result.layers[["layer", "wd_max", "wd_neg_share", "nn_share"]]
    """
    from negmonitor.result import ProbeResult

    settings = _settings(settings, overrides)
    sites = find_sites(unwrap_compiled(model), layers)
    summaries = measure(model, probe_set, sites, settings)
    return ProbeResult.from_summaries(summaries, sites, probe_set, tokenizer, settings)


def _settings(settings: ProbeSettings | None, overrides: dict) -> ProbeSettings:
    settings = settings or ProbeSettings()
    unknown = [key for key in overrides if not hasattr(settings, key)]
    if unknown:
        raise NegmonitorError(f"unknown probe setting {unknown[0]!r} — known: {', '.join(vars(settings))}")
    return replace(settings, **overrides) if overrides else settings  # checked again, as at construction


def measure(
    model: nn.Module,
    probe_set: ProbeSet,
    sites: Sequence[MLPSite],
    settings: ProbeSettings,
    rank: int = 0,
    world_size: int = 1,
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
    batch_limit: BatchLimit | None = None,
) -> list[LayerSummary]:
    """Run this process's share of the probe windows, group by group, and return one summary per site.

    Every rank must call it under DDP (the statistics are reduced across ranks before they are summarised; each
    local phase is closed by :func:`~negmonitor.distributed.agree_on_failure`, so every rank learns of a failure on
    any rank before the next collective). ``forward_context`` wraps each forward call (e.g. a Lightning precision
    plugin's autocast); the statistics accumulate in fp32 outside it. On CUDA out-of-memory (on any rank) every
    accumulator is dropped, the batch size halves and the measurement restarts on every rank (statistics are never
    half-updated); at batch size 1 a :class:`NegmonitorError` names the settings to change. ``batch_limit``, when
    given, caps the batch size and keeps what a retry lowered it to, for the caller's next measurement.
    """
    eager = unwrap_compiled(model)
    check_one_device(eager)
    with forward_context():  # the capture dtype the plan counts is the forward's (e.g. bf16 under autocast)
        plan = _plan(eager, probe_set, sites, settings, world_size)
    if rank == 0:  # every rank plans alike
        log_plan_once(plan, _shapes(sites), settings.batch_size)
    # Freed blocks stay in the allocator's cache for the training run (no empty_cache but after an out-of-memory
    # error: it would also drop the training run's cached blocks and make its next step allocate afresh).
    return retry_on_out_of_memory(
        lambda batch_size: _measure_groups(eager, probe_set, sites, settings, plan, batch_size, rank, world_size,
                                           forward_context),
        plan.batch_size, batch_limit, _device_of(eager), "the probe pass",
        "lower memory_budget (fewer layers per pass), the probe window, or the layers monitored")


def _shapes(sites: Sequence[MLPSite]) -> list[LayerShape]:
    return [LayerShape(site.layer, site.n_neurons, site.d_in) for site in sites]


def check_memory_budget(model: nn.Module, probe_set: ProbeSet, layers: Sequence[int] | int | None,
                        settings: ProbeSettings, world_size: int = 1) -> Plan:
    """Plan a measurement without running it, so that a budget too small for even one layer is refused at set-up
    (one line naming the smallest budget that works) rather than at every measurement of a training run. Call it
    in the probe forward's precision context: the capture dtype is part of the plan.

    Raises:
        NegmonitorError: when one layer does not fit ``settings.memory_budget`` even at probe batch size 1.
    """
    eager = unwrap_compiled(model)
    return _plan(eager, probe_set, find_sites(eager, layers), settings, world_size)


def _plan(model: nn.Module, probe_set: ProbeSet, sites: Sequence[MLPSite], settings: ProbeSettings,
          world_size: int) -> Plan:
    kwargs = {} if settings.n_bins is None else {"n_bins": settings.n_bins}
    n_bins = int(kwargs.get("n_bins", 4096))
    attention = eager_attention_bytes(model, probe_set.window)
    return plan_measurement(
        _shapes(sites), budget=settings.memory_budget, batch_size=settings.batch_size, window=probe_set.window,
        n_bins=n_bins, n_slots=2 * probe_set.n_pairs, cap_bytes=_capture_bytes(model),
        attention_bytes_per_row=attention, residual_bytes=_residual_bytes(model, probe_set, sites, settings, world_size))


def _residual_bytes(model: nn.Module, probe_set: ProbeSet, sites: Sequence[MLPSite], settings: ProbeSettings,
                    world_size: int) -> int:
    """Bytes of the hidden states entering one block for this process's windows (0 when passes cannot start
    part-way), in the parameters' dtype, which the residual stream keeps under autocast. A batch's cached input is
    dropped before its blocks run, so the pass holds one copy (the batch in flight is the forward's own)."""
    if not sites or not _may_resume(model, sites):
        return 0
    windows = -(-probe_set.n_windows // world_size)
    param = next(model.parameters(), None)
    width = param.element_size() if param is not None and param.is_floating_point() else 4
    return windows * probe_set.window * max(site.d_in for site in sites) * width


def _may_resume(model: nn.Module, sites: Sequence[MLPSite]) -> bool:
    """Whether a pass may start from cached hidden states (:mod:`negmonitor.residual`): not under FSDP, whose
    forward must run whole, and only for models that hand every block the same arguments and can run without a
    KV cache."""
    config = getattr(model, "config", None)
    return (hasattr(config, "use_cache") and can_start_midway(model)
            and not any(gathers_weight(site.projection) for site in sites))


def _capture_bytes(model: nn.Module) -> int:
    """Bytes per pre-activation as the forward produces them: the autocast dtype when autocast is on (as inside a
    Trainer with a mixed precision), else the parameters' dtype."""
    device = _device_of(model)
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.empty((), dtype=torch.get_autocast_dtype(device.type)).element_size()
    param = next(model.parameters(), None)
    return param.element_size() if param is not None and param.is_floating_point() else 4


def _measure_groups(model: nn.Module, probe_set: ProbeSet, sites: Sequence[MLPSite], settings: ProbeSettings,
                    plan: Plan, batch_size: int, rank: int, world_size: int,
                    forward_context: Callable[[], ContextManager]) -> list[LayerSummary]:
    summaries: list[LayerSummary] = []
    guarded = world_size > 1
    cache: list[torch.Tensor] | None = None  # hidden states entering this group's first block, one per batch
    blocks = find_blocks(model) if plan.resume else None
    grids = _shared_grids(model, probe_set, sites, forward_context) if world_size > 1 else None
    for g, group in enumerate(plan.groups):
        resume = None
        if blocks is not None:
            following = plan.groups[g + 1][0] if g + 1 < len(plan.groups) else None
            resume = Resume(blocks, sites[group[0]].layer if cache is not None else None, cache,
                            None if following is None else sites[following].layer)
        recorders = _measure_once(model, probe_set, [sites[i] for i in group], settings, batch_size, rank,
                                  world_size, plan.rows_per_update, forward_context, resume,
                                  None if grids is None else [grids[i] for i in group])
        cache = None if resume is None else resume.cache_out
        while recorders:  # reduce, summarise and drop one recorder at a time: the group's state shrinks as it goes
            recorder = recorders.pop(0)
            if guarded:
                recorder.reduce_across_ranks()  # collectives, in place (the last guard closed the pass)
            with agree_on_failure(guarded):  # local maths; no rank enters the next reduction if another failed
                summaries.append(summarise_recorder(recorder, settings.top_neuron_frac, settings.top_pairs,
                                                    settings.sample_neurons, settings.pairs_per_neuron_table))
                recorder.release()  # inside the guard: it allocates torchmetrics' small defaults
    return summaries


@dataclass
class Resume:
    """Where a pass starts and what it hands on (:mod:`negmonitor.residual`).

    ``start``: the block whose input ``cache_in`` holds, one tensor per batch (``None``: start from the
    embeddings); ``feed``: the block whose input this pass collects in ``cache_out`` for the next group, stopping
    there (``None``: the last group, which stops after its last layer).
    """

    blocks: nn.ModuleList
    start: int | None
    cache_in: list[torch.Tensor] | None
    feed: int | None
    cache_out: list[torch.Tensor] = field(default_factory=list)


def _measure_once(
    model: nn.Module,
    probe_set: ProbeSet,
    sites: Sequence[MLPSite],
    settings: ProbeSettings,
    batch_size: int,
    rank: int,
    world_size: int,
    rows_per_update: int | None = None,
    forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
    resume: Resume | None = None,
    grids: Sequence[GridRecorder] | None = None,
) -> list[SiteRecorder]:
    """One pass over this rank's windows for ``sites``, stopping each forward after the last of them (not under
    FSDP, whose forward must run whole: its units gather and free parameters in hooks), or, with ``resume``, at the
    next group's first block, and starting from cached hidden states when ``resume`` has them. ``grids`` (under
    DDP, from :func:`_shared_grids`) fix the sites' histogram grids; without them each takes its grid from the
    batch holding the probe's first window."""
    eager = unwrap_compiled(model)
    device = _device_of(eager)
    kwargs: dict = {} if settings.n_bins is None else {"n_bins": settings.n_bins}
    # Under DDP the grids come from _shared_grids (and a single-rank probe inside a DDP job must not broadcast: the
    # other ranks are not measuring).
    kwargs["sync_grid"] = False
    last = max(range(len(sites)), key=lambda i: sites[i].layer)
    feed = None if resume is None or resume.feed is None else resume.blocks[resume.feed]  # where this pass stops

    def stop_at(store: list[torch.Tensor] | None = None) -> ContextManager:
        return contextlib.nullcontext() if feed is None else stop_before(feed, store)

    may_stop = feed is None and not any(gathers_weight(site.projection) for site in sites)
    pair_flat = probe_set.pair_positions.reshape(-1)
    windows = probe_set.window_indices(rank, world_size)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    # Under FSDP each forward is a collective: every rank runs as many as rank 0 (its own, then throw-away ones
    # without hooks) before the guard's all-reduce, and a hook's failure is held until then (BatchContext.failures).
    extra = Shard(rank, world_size).extra_batches(probe_set.n_windows, batch_size) if forward_is_collective(eager) else 0
    # The state is the measurement's largest allocation; the inputs are copied to the device here too, before any
    # forward, so a rank that cannot hold them fails where every rank learns of it, not between collective forwards.
    with agree_on_failure(world_size > 1):
        recorders = [SiteRecorder(site, 2 * probe_set.n_pairs, rows_per_update=rows_per_update,
                                  stop_after=may_stop and i == last, **kwargs).to(device)
                     for i, site in enumerate(sites)]
        for recorder, calibrated in zip(recorders, grids or ()):
            recorder.take_grid(calibrated)
        inputs = _batch_inputs(probe_set, batches, pair_flat, device)
        spare = (probe_set.input_ids[:1].to(device), probe_set.attention_mask[:1].to(device)) if extra else None
    batch = BatchContext(failures=FailureHold(active=forward_is_collective(eager)))
    runner = getattr(eager, "base_model", eager)
    with _eval_no_grad(eager):
        with agree_on_failure(world_size > 1):  # every rank learns of a failure before the reductions that follow
            with recording(sites, recorders, batch), stop_at(None if feed is None else resume.cache_out):
                for index, this in enumerate(_progress(inputs, settings.progress, "probe")):
                    batch.valid_rows, batch.all_valid = this.valid_rows, this.all_valid
                    batch.pair_slots, batch.pair_rows = this.pair_slots, this.pair_rows
                    batch.grid_rows = this.grid_rows
                    with forward_context():
                        if resume is not None and resume.cache_in is not None:
                            _run_from_cache(runner, this.ids, this.mask, resume, index, sites[last].layer)
                        else:
                            _run(runner, this.ids, this.mask)
            for _ in range(extra):
                with forward_context():
                    runner(**no_cache_inputs(runner, *spare))
            batch.failures.raise_held()
            if batches:
                check_hooks_fired(recorders)
    return recorders


def _shared_grids(model: nn.Module, probe_set: ProbeSet, sites: Sequence[MLPSite],
                  forward_context: Callable[[], ContextManager]) -> list[GridRecorder]:
    """Every site's histogram grid from the calibration window (:func:`_calibration_inputs`), in one forward that
    stops after the last site (not under FSDP), then rank 0's grids sent to every rank, bit for bit, so that the
    ranks' states sum and equal a single process's. One forward per measurement: a forward per layer group, each
    from the embeddings, cost more than the probe pass itself at 8 ranks (8 windows a rank: 1)."""
    eager = unwrap_compiled(model)
    device = _device_of(eager)
    last = max(range(len(sites)), key=lambda i: sites[i].layer)
    may_stop = not any(gathers_weight(site.projection) for site in sites)
    calibrated = [GridRecorder(site, stop_after=may_stop and i == last) for i, site in enumerate(sites)]
    batch = BatchContext(failures=FailureHold(active=forward_is_collective(eager)))
    with agree_on_failure():  # the inputs on the device before any forward: under FSDP a forward is a collective
        calibration = _calibration_inputs(probe_set, device)
    with agree_on_failure():  # every rank learns of a failure here before the broadcasts
        with _eval_no_grad(eager), recording(sites, calibrated, batch), forward_context():
            _calibrate(getattr(eager, "base_model", eager), calibration, batch)
        batch.failures.raise_held()
        check_hooks_fired(calibrated)
    for recorder in calibrated:
        for tensor in recorder.grid:
            torch.distributed.broadcast(tensor, src=0)
    return calibrated


def _run(runner: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """One forward, ended early by the group's last hook."""
    try:
        runner(**no_cache_inputs(runner, ids, mask))
    except StopPass:
        pass


def _run_from_cache(runner: nn.Module, ids: torch.Tensor, mask: torch.Tensor, resume: Resume, index: int,
                    last_layer: int) -> None:
    """One batch from the hidden states cached at ``resume.start`` (released as they are used) up to the next
    group's first block (kept for it) or the group's last layer."""
    args, kwargs = block_inputs(runner, resume.blocks[0], **no_cache_inputs(runner, ids, mask))
    hidden, resume.cache_in[index] = resume.cache_in[index], None
    stop = last_layer + 1 if resume.feed is None else resume.feed
    try:
        hidden = run_blocks(resume.blocks, resume.start, stop, hidden, args, kwargs)
    except StopPass:
        return
    if resume.feed is not None:
        resume.cache_out.append(hidden)


def _calibration_inputs(probe_set: ProbeSet, device: torch.device) -> _BatchInputs:
    """The probe's first window with a real token (:func:`_grid_window`) as a batch of its own, without pairs."""
    no_pairs = probe_set.pair_positions.reshape(-1)[:0]
    return _batch_inputs(probe_set, [[_grid_window(probe_set)]], no_pairs, device)[0]


def _calibrate(runner: nn.Module, this: _BatchInputs, batch: BatchContext) -> None:
    """Run the calibration window (:func:`_calibration_inputs`) past :class:`GridRecorder` hooks: each takes its
    grid from it, as a single process does in the batch that holds that window.

    Under DDP each rank would otherwise take its grid from its own first batch; with a shared calibration window the
    reduced statistics equal the single-process ones.
    """
    batch.valid_rows, batch.grid_rows = this.valid_rows, this.grid_rows
    batch.pair_rows, batch.pair_slots = this.pair_rows, this.pair_slots
    _run(runner, this.ids, this.mask)


@dataclass
class _BatchInputs:
    """One probe batch on the device: token ids and mask ``[b, window]``, the rows of the flattened batch that are
    real tokens, the MD pair positions in it (``pair_rows``) with their buffer slots, and the rows the histogram
    grids are taken from (the probe's first window's, in the batch that holds it; else empty)."""

    ids: torch.Tensor
    mask: torch.Tensor
    valid_rows: torch.Tensor
    pair_slots: torch.Tensor
    pair_rows: torch.Tensor
    grid_rows: torch.Tensor
    all_valid: bool


def _batch_inputs(probe_set: ProbeSet, batches: list[list[int]], pair_flat: torch.Tensor,
                  device: torch.device) -> list[_BatchInputs]:
    """Every batch's inputs and row tables, worked out from the probe set's host tensors and moved to ``device``
    in one copy per kind for the whole pass: a copy from ordinary host memory (and a ``nonzero`` of a device
    tensor) waits for the device, so per-batch copies would stall the training stream at every batch."""
    if not batches:
        return []
    sizes = [len(chunk) for chunk in batches]
    order = [w for chunk in batches for w in chunk]
    host_mask = probe_set.attention_mask[order]
    host_masks = host_mask.split(sizes)
    ids, mask = probe_set.input_ids[order].to(device).split(sizes), host_mask.to(device).split(sizes)
    first = _grid_window(probe_set)
    tables = [_batch_rows(chunk, m, pair_flat, probe_set.window, first) for chunk, m in zip(batches, host_masks)]
    valid, slots, rows, grid = (torch.cat(kind).to(device).split([len(t) for t in kind]) for kind in zip(*tables))
    return [_BatchInputs(*fields, all_valid=len(table[0]) == m.numel())
            for *fields, table, m in zip(ids, mask, valid, slots, rows, grid, tables, host_masks)]


def _batch_rows(chunk: list[int], host_mask: torch.Tensor, pair_flat: torch.Tensor, window: int,
                grid_window: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the host, for the windows ``chunk``: the rows of the flattened batch that are real tokens, the slots and
    rows of the MD pair positions that fall in it, and the grid rows (:func:`_grid_rows`)."""
    valid_rows = host_mask.reshape(-1).nonzero().squeeze(1)
    win = torch.as_tensor(chunk, dtype=torch.long)
    pair_window, pair_offset = pair_flat // window, pair_flat % window
    slots, where = (pair_window.unsqueeze(1) == win.unsqueeze(0)).nonzero(as_tuple=True)
    return valid_rows, slots, where * window + pair_offset[slots], _grid_rows(valid_rows, chunk, window, grid_window)


def _grid_window(probe_set: ProbeSet) -> int:
    """The probe window the histogram grids come from: the first with a real token (0 when none has one)."""
    filled = probe_set.attention_mask.any(dim=1).nonzero()
    return int(filled[0, 0]) if filled.numel() else 0


def _grid_rows(valid_rows: torch.Tensor, chunk: list[int], window: int, grid_window: int = 0) -> torch.Tensor:
    """Rows of the flattened batch of windows ``chunk`` that fix the histogram grids: up to ``GRID_ROWS`` evenly
    spaced real tokens of window ``grid_window`` (:func:`_grid_window`), whatever the batch size, so a budget or
    an out-of-memory retry that lowers the batch size gives the same grid, hence the same statistics. Empty when
    ``chunk`` does not hold that window."""
    if grid_window not in chunk:
        return valid_rows[:0]
    start = chunk.index(grid_window) * window
    first = valid_rows[(valid_rows >= start) & (valid_rows < start + window)]
    return first[:: max(1, -(-first.numel() // GRID_ROWS))]


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


def check_one_device(model: nn.Module) -> None:
    """Refuse a model whose parameters sit on several devices (``device_map="auto"`` across GPUs) or are offloaded
    (accelerate leaves an offloaded parameter on the ``meta`` device until its layer runs): the probe's
    accumulators and row tables live on one device, beside every monitored layer, and the drift reads weights."""
    devices = sorted({str(p.device) for p in model.parameters()})
    if len(devices) > 1:
        raise NegmonitorError(f"the model's parameters are spread over {', '.join(devices)} (a device_map across "
                              "devices, or offloading to the CPU or disk): negmonitor measures a model held whole on "
                              "one device — load it onto one device (device_map={'': 0}, --device), or spread the "
                              "work with DDP or FSDP")


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _progress(items: list, enabled: bool, desc: str) -> Iterator:
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit="batch", leave=False))
