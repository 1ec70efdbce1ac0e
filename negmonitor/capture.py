"""Forward hooks that stream MLP pre-activations into accumulators, one batch at a time.

Each monitored site gets a :class:`SiteRecorder`: summable per-neuron statistics (WD histogram, moments) and, for
the few token positions sampled as MD pairs, their input vectors and outputs. A hook sees a batch's
``[batch, seq, neurons]`` output, keeps the unpadded rows only, hands them to the recorder and drops them, so no
``[tokens x neurons]`` matrix outlives its batch. Hooks are installed by :func:`recording`, which removes exactly
the hooks it added, in ``finally``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Sequence

import torch
from torch import nn
from torchmetrics import Metric

from negmonitor.adapters import MLPSite
from negmonitor.errors import NegmonitorError
from negmonitor.metrics.streaming import NeuronStatsAccumulator


class PairBuffer(Metric):
    """Input vectors and outputs at the MD pair positions; slots not seen here stay zero, so a sum merges ranks."""

    full_state_update = False

    def __init__(self, n_slots: int, d_in: int, n_neurons: int) -> None:
        super().__init__()
        self.add_state("x", torch.zeros(n_slots, d_in), dist_reduce_fx="sum")
        self.add_state("y", torch.zeros(n_slots, n_neurons), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(n_slots), dist_reduce_fx="sum")

    def update(self, slots: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:  # type: ignore[override]
        """Store the rows for ``slots``."""
        self.x[slots] = x.float()
        self.y[slots] = y.float()
        self.seen[slots] = 1.0

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the buffers."""
        return {"x": self.x, "y": self.y, "seen": self.seen}


class SiteRecorder(nn.Module):
    """Accumulators for one site: per-neuron statistics, pair rows and a count of tokens with non-finite values."""

    def __init__(self, site: MLPSite, n_pair_slots: int, **accumulator_kwargs: object) -> None:
        super().__init__()
        self.layer = site.layer
        self.stats = NeuronStatsAccumulator(site.n_neurons, **accumulator_kwargs)
        self.pairs = PairBuffer(n_pair_slots, site.d_in, site.n_neurons)
        self.register_buffer("nonfinite_tokens", torch.zeros((), dtype=torch.long))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def observe(self, x_in: torch.Tensor, y: torch.Tensor, batch: "BatchContext") -> None:
        """Take one batch: ``x_in`` ``[B, T, d]`` and the pre-activations ``y`` ``[B, T, n]``."""
        flat_y = y.detach().reshape(-1, y.shape[-1])
        valid = flat_y[batch.valid_rows]
        if batch.calibrating:
            self.stats.init_grid(valid)
            return
        self.stats.update(valid)
        self.nonfinite_tokens += (~torch.isfinite(valid)).any(dim=1).sum()
        self.calls += 1
        # every batch updates the buffer, with no rows when it holds no pair position: a probe without MD pairs
        # (or a rank without any) then computes zeros, not torchmetrics' "compute before update" warning
        flat_x = x_in.detach().reshape(-1, x_in.shape[-1])
        self.pairs.update(batch.pair_slots, flat_x[batch.pair_rows], flat_y[batch.pair_rows])


@dataclass
class BatchContext:
    """What the hooks need to know about the batch being run: unpadded rows and pair rows with their slots."""

    valid_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    pair_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    pair_slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    calibrating: bool = False


def _hook(recorder: SiteRecorder, batch: BatchContext, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    with torch.autocast(output.device.type, enabled=False):  # statistics in fp32 even inside a mixed-precision forward
        recorder.observe(args[0], output, batch)


@contextlib.contextmanager
def recording(sites: Sequence[MLPSite], recorders: Sequence[SiteRecorder], batch: BatchContext) -> Iterator[None]:
    """Install one forward hook per site feeding its recorder; remove exactly those hooks on exit."""
    handles = []
    try:
        for site, recorder in zip(sites, recorders):
            handles.append(site.projection.register_forward_hook(partial(_hook, recorder, batch)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Return the eager module behind a ``torch.compile`` wrapper (hooks added after compiling never fire)."""
    return getattr(model, "_orig_mod", model)


def check_hooks_fired(recorders: Sequence[SiteRecorder]) -> None:
    """Refuse to report statistics from hooks that never ran (e.g. a model compiled after wrapping)."""
    silent = [r.layer for r in recorders if int(r.calls) == 0]
    if silent:
        raise NegmonitorError(
            f"the capture hooks on layers {silent} never ran — the model is probably compiled with torch.compile "
            "or its forward bypasses the MLP modules; pass the uncompiled model (model._orig_mod)"
        )
