"""How a measurement shares its work across the processes of a DDP or FSDP run.

- :class:`Shard`: this process's rank and the world size. Evaluations take every ``world_size``-th item from
  ``rank`` on, sum their numbers across processes (:meth:`Shard.sum`), and pad with throw-away batches so every
  process runs the same number of forward passes (:meth:`Shard.extra_batches`). Under FSDP each forward pass is a
  collective, so unequal counts would hang; under DDP the padding costs no wall time (a rank with fewer batches
  would otherwise wait for the others at the sum).
- :func:`fsdp_routing`: under FSDP, calls to the transformers model (and its ``base_model``) run through the FSDP
  root wrapper, which gathers the parameters as in training, and :func:`full_weight` reads a whole weight from its
  shards (``summon_full_params`` of the one FSDP unit that holds it).

Every process must run the same calls in the same order: each sum, forward pass and weight read is a collective.
- :func:`agree_on_failure`: every rank learns of a failure on any rank before the next collective, so no rank
  waits for one that left. A measurement alternates local work (this rank's share of the probe pass) and collectives
  (grid broadcast, reductions); each local phase is closed by one small all-reduce of "did I fail, and how", and when
  any rank failed every rank raises, so all skip the measurement together. Outside ``torch.distributed`` it does
  nothing.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from negmonitor.peft_layers import applied_weight

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` processes sharing an evaluation."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """True when more than one process shares the work."""
        return self.world_size > 1

    def take(self, items: Sequence[T]) -> list[T]:
        """This process's items: every ``world_size``-th from ``rank`` on (round robin, as the probe windows)."""
        return list(items[self.rank :: self.world_size])

    def extra_batches(self, n_items: int, batch_size: int) -> int:
        """Throw-away batches this process runs after its own, so every process runs as many as rank 0 (the most)."""
        most = math.ceil(len(range(0, n_items, self.world_size)) / batch_size)
        mine = math.ceil(len(range(self.rank, n_items, self.world_size)) / batch_size)
        return most - mine

    def reduction_device(self, device: torch.device) -> torch.device:
        """Where a tensor for :meth:`sum_` must live: the current GPU under NCCL, else ``device``. Make it inside the
        failure guard (:func:`agree_on_failure`), so an out-of-memory error allocating it reaches every process."""
        if self.active and torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` (on :meth:`reduction_device`) over the processes in place, allocating nothing; returns it."""
        if self.active:
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        return values


def reduce_in_place(tensors: Sequence[tuple[torch.Tensor, str]]) -> None:
    """All-reduce each ``(tensor, op)`` in place across the processes, ``op`` one of ``"sum"``, ``"min"``, ``"max"``.

    In place, so a reduction holds no more than the state itself: torchmetrics' own sync all-gathers every rank's copy
    and stacks them (``world_size + 1`` copies of a histogram at once). A CPU tensor under NCCL goes through one
    device copy at a time. No-op outside ``torch.distributed`` with more than one process.
    """
    if not is_distributed():
        return
    ops = {"sum": torch.distributed.ReduceOp.SUM, "min": torch.distributed.ReduceOp.MIN,
           "max": torch.distributed.ReduceOp.MAX}
    nccl = torch.distributed.get_backend() == "nccl"
    for tensor, op in tensors:
        if nccl and tensor.device.type != "cuda":
            staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(staged, op=ops[op])
            tensor.copy_(staged)
        else:
            torch.distributed.all_reduce(tensor, op=ops[op])


# --------------------------------------------------------------------------------------------------------------
# FSDP

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def is_fsdp(module: nn.Module | None) -> bool:
    """Whether ``module`` is, or contains, an FSDP (v1) unit."""
    if module is None or not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


@contextlib.contextmanager
def fsdp_routing(root: nn.Module, inner: nn.Module, model: nn.Module) -> Iterator[None]:
    """Inside: ``model(...)`` and ``model.base_model(...)`` run through the FSDP ``root`` wrapper of ``inner`` (the
    LightningModule holding ``model``), so FSDP gathers the parameters as it does in training; :func:`full_weight`
    knows which FSDP unit holds each of ``model``'s modules. Everything is put back on exit."""
    targets = [model] + [m for m in [getattr(model, "base_model", None)] if isinstance(m, nn.Module) and m is not model]
    router = _Router(root, inner)
    originals = [(m, m.__dict__.get("forward")) for m in targets]
    owners = _innermost_owners(root)
    try:
        for module, saved in originals:
            module.forward = router.wrap(saved or type(module).forward.__get__(module))
        _OWNERS.update(owners)
        yield
    finally:
        for module, saved in originals:
            if saved is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = saved
        for module in owners:
            _OWNERS.pop(module, None)


class _Router:
    """Runs a call as the FSDP root's forward: the root's inner module's ``forward`` is swapped for the call for the
    length of one root forward (what Lightning does for ``training_step``). Nested calls run directly."""

    def __init__(self, root: nn.Module, inner: nn.Module) -> None:
        self.root, self.inner, self.depth = root, inner, 0

    def wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def routed(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                return forward(*args, **kwargs)
            self.depth += 1
            saved = self.inner.__dict__.get("forward")
            result: list[Any] = []

            def through(*_: Any, **__: Any) -> None:
                result.append(forward(*args, **kwargs))

            self.inner.forward = through
            try:
                self.root()
            finally:
                self.depth -= 1
                if saved is None:
                    self.inner.__dict__.pop("forward", None)
                else:
                    self.inner.forward = saved
            return result[0]

        return routed


def _innermost_owners(root: nn.Module) -> dict[nn.Module, nn.Module]:
    """Each module under ``root`` → the innermost FSDP unit around it (the one whose flat parameter holds its own
    parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    owners: dict[nn.Module, nn.Module] = {}

    def visit(module: nn.Module, owner: nn.Module | None) -> None:
        if isinstance(module, FullyShardedDataParallel):
            owner = module
        if owner is not None:
            owners[module] = owner
        for child in module.children():
            visit(child, owner)

    visit(root, None)
    return owners


def forward_is_collective(model: nn.Module) -> bool:
    """Whether a forward pass of ``model`` is a collective (FSDP units gather parameters in it, inside
    :func:`fsdp_routing`): then every process must run as many as the others."""
    return any(module in _OWNERS for module in model.modules())


def gathers_weight(module: nn.Module) -> bool:
    """Whether :func:`full_weight` of ``module`` is a collective (an FSDP unit holds it, inside :func:`fsdp_routing`)."""
    return bool(_weight_owners(module))


def join_weight_read(module: nn.Module) -> None:
    """Take part in another rank's :func:`full_weight` of ``module`` without copying it: enter and leave the
    gathers (collectives when FSDP units hold its weights; nothing otherwise)."""
    with _gathered(module):
        pass


def full_weight(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as its forward applies it (:func:`negmonitor.peft_layers.applied_weight`: under LoRA the
    base plus the adapters' delta) in its full shape: gathered from the shards when FSDP units hold it (inside
    :func:`fsdp_routing`; a collective) and then a copy, else the weight itself (detached)."""
    with _gathered(module) as gathered:
        weight = applied_weight(module)
        if gathered and any(weight.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                            for p in module.parameters()):
            weight = weight.clone()  # the gathered parameter is freed on leaving
        return weight


def _weight_owners(module: nn.Module) -> list[nn.Module]:
    """The innermost FSDP units holding the parameters of ``module`` and its submodules (a LoRA layer's adapters
    may be units of their own), in module order: the same on every rank."""
    return list(dict.fromkeys(_OWNERS[m] for m in module.modules() if m in _OWNERS))


@contextlib.contextmanager
def _gathered(module: nn.Module) -> Iterator[bool]:
    """Inside: ``module``'s parameters whole (each FSDP unit holding them summoned, without its children); yields
    whether any was gathered."""
    owners = _weight_owners(module)
    with contextlib.ExitStack() as stack:
        if owners:
            from torch.distributed.fsdp import FullyShardedDataParallel

            for owner in owners:
                stack.enter_context(FullyShardedDataParallel.summon_full_params(owner, recurse=False,
                                                                                writeback=False))
        yield bool(owners)


# --------------------------------------------------------------------------------------------------------------
# Failures

_OK, _OUT_OF_MEMORY, _OTHER = 0, 1, 2


class PeerFailure(RuntimeError):
    """A measurement phase failed on another rank; this rank skips the measurement too."""

    def __init__(self, ranks: list[int], phase: str | None = None) -> None:
        message = (f"the measurement failed on rank(s) {ranks} (see the warning there); every rank skips it"
                   if phase is None else f"negmonitor's {phase} failed on rank(s) {ranks} (see the error there); "
                   "every rank stops")
        super().__init__(message)
        self.ranks = ranks


class PeerOutOfMemory(PeerFailure, torch.OutOfMemoryError):
    """Out of memory on another rank: an ``OutOfMemoryError``, so a retry at a smaller batch runs on every rank."""


class FailureHold:
    """The first error of the work around collective forwards, held until after the last forward.

    Under FSDP each forward is a collective (every unit gathers its parameters): a rank that raised part-way through
    a loop of forwards (in a capture hook, or scoring a batch's logits) would leave the others waiting in gathers it
    never joins. Inside ``with hold:`` an error is kept instead of raised (when ``active``); the caller skips that
    work from then on (:attr:`failed`) but runs every forward, and :meth:`raise_held` raises the error after the
    last one, inside the caller's :func:`agree_on_failure`. Inactive, errors pass straight through. A failure
    inside the model's own forward is not held: FSDP's state after it is not known, as in a training step.
    """

    def __init__(self, active: bool) -> None:
        self.active = active
        self.failure: Exception | None = None

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def __enter__(self) -> "FailureHold":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> bool:
        if not (self.active and isinstance(error, Exception)):
            return False
        self.failure = error
        return True

    def raise_held(self) -> None:
        """Raise (and forget) the held error, if any."""
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure


def is_distributed() -> bool:
    """``torch.distributed`` is initialised with more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def agree_on_failure(enabled: bool = True, phase: str | None = None) -> Iterator[None]:
    """Run a local phase; on leaving it, all ranks all-reduce one code each and raise together if any failed.

    The rank that failed re-raises its own exception; the others raise :class:`PeerOutOfMemory` when every failure
    was an out-of-memory error (so a batch-halving retry stays in step on all ranks), else :class:`PeerFailure`.
    A rank whose own out-of-memory error meets another rank's other failure raises :class:`PeerFailure` (from its
    own), so no rank retries alone. The block must contain no collective.

    Args:
        enabled: ``False`` runs the block unguarded (e.g. a single-process pass).
        phase: what the block does, when it is not part of a measurement (``"set-up"``): the other ranks' error
            then names it and says the run stops.
    """
    if not (enabled and is_distributed()):
        yield
        return
    dist = torch.distributed
    # allocated before the block, so a block that ran the device out of memory still has its flags
    codes = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=_flag_device())
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks before the next collective
        error = exc
    codes[dist.get_rank()] = _code(error)
    dist.all_reduce(codes)
    worst = int(codes.max())
    if worst == _OK:
        return
    if error is not None and _code(error) == worst:
        raise error
    ranks = [int(r) for r in codes.nonzero().flatten()]
    raise (PeerOutOfMemory if worst == _OUT_OF_MEMORY else PeerFailure)(ranks, phase) from error


def _code(error: BaseException | None) -> int:
    if error is None:
        return _OK
    return _OUT_OF_MEMORY if isinstance(error, torch.OutOfMemoryError) else _OTHER


def _flag_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo and others take CPU tensors."""
    if "nccl" in str(torch.distributed.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
