"""Every rank learns of a failure on any rank before the next collective, so no rank waits for one that left.

A measurement under ``torch.distributed`` alternates local work (this rank's share of the probe pass) and
collectives (grid broadcast, reductions). If one rank fails in a local phase and the others enter the next
collective, they wait forever (or pair that collective with an unrelated one, e.g. DDP's gradient all-reduce).
:func:`agree_on_failure` closes each local phase with one small all-reduce of "did I fail, and how": when any rank
failed, every rank raises, so all skip the measurement together. Outside ``torch.distributed`` it does nothing.

Example::

    >>> with agree_on_failure():
    ...     local_probe_pass()          # no collectives inside
    >>> reduce_accumulators()           # reached by every rank, or by none
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["PeerFailure", "PeerOutOfMemory", "agree_on_failure", "is_distributed"]

_OK, _OUT_OF_MEMORY, _OTHER = 0, 1, 2


class PeerFailure(RuntimeError):
    """A measurement phase failed on another rank; this rank skips the measurement too."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"the measurement failed on rank(s) {ranks} (see the warning there); every rank skips it")
        self.ranks = ranks


class PeerOutOfMemory(PeerFailure, torch.OutOfMemoryError):
    """Out of memory on another rank: an ``OutOfMemoryError``, so a retry at a smaller batch runs on every rank."""


def is_distributed() -> bool:
    """``torch.distributed`` is initialised with more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def agree_on_failure(enabled: bool = True) -> Iterator[None]:
    """Run a local phase; on leaving it, all ranks all-reduce one code each and raise together if any failed.

    The rank that failed re-raises its own exception; the others raise :class:`PeerOutOfMemory` when every failure
    was an out-of-memory error (so a batch-halving retry stays in step on all ranks), else :class:`PeerFailure`.
    A rank whose own out-of-memory error meets another rank's other failure raises :class:`PeerFailure` (from its
    own), so no rank retries alone. The block must contain no collective.

    Args:
        enabled: ``False`` runs the block unguarded (e.g. a single-process pass).
    """
    if not (enabled and is_distributed()):
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks before the next collective
        error = exc
    dist = torch.distributed
    codes = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_flag_device())
    codes[dist.get_rank()] = _code(error)
    dist.all_reduce(codes)
    worst = int(codes.max())
    if worst == _OK:
        return
    if error is not None and _code(error) == worst:
        raise error
    ranks = [int(r) for r in codes.nonzero().flatten()]
    raise (PeerOutOfMemory if worst == _OUT_OF_MEMORY else PeerFailure)(ranks) from error


def _code(error: BaseException | None) -> int:
    if error is None:
        return _OK
    return _OUT_OF_MEMORY if isinstance(error, torch.OutOfMemoryError) else _OTHER


def _flag_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and others take CPU tensors."""
    if "nccl" in str(torch.distributed.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
