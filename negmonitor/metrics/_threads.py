"""Run independent blocks of CPU work on the threads torch is allowed to use, with reusable scratch buffers.

Torch's own intra-op threads help little here: the histogram's ``scatter_add_`` runs serially, and ops on
cache-sized blocks are too small to amortise a parallel region. So blocks of neurons are split across Python
threads instead (torch releases the GIL inside every op), with torch's intra-op threads set to one for the
duration so that the two levels do not oversubscribe the cores. The number of threads is ``thread_budget()``:
``torch.get_num_threads()``, what the user (or ``OMP_NUM_THREADS``, or torchrun) allowed. The workers run in the
caller's grad and inference modes (both are thread-local in torch).

``torch.set_num_threads`` is process-wide: while one call has torch pinned to one thread, another user thread that
starts using torch then takes one thread as its own budget (torch initialises each thread's count once).
Statistics are computed from one thread at a time in negmonitor itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["worker_count", "block_width", "run_split", "scratch", "single_torch_thread", "thread_budget"]

T = TypeVar("T")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_LOCAL = threading.local()


def worker_count(device: torch.device, n_tasks: int) -> int:
    """Threads to use for ``n_tasks`` blocks on ``device``: torch's thread budget on CPU, one elsewhere."""
    if device.type != "cpu":
        return 1
    return max(1, min(thread_budget(), n_tasks))


def block_width(n_rows: int, n_columns: int, budget: int, workers: int, min_width: int = 1) -> int:
    """Columns per block: about ``budget`` values of ``n_rows`` each (at least ``min_width`` columns), and no more
    than an even share of ``n_columns`` per worker, so that every worker gets a block."""
    share = -(-n_columns // max(1, workers))
    return max(1, min(share, max(min_width, budget // max(1, n_rows))))


def thread_budget() -> int:
    """The CPU threads this work may use: torch's, or what it was before ``single_torch_thread`` pinned it to one."""
    return getattr(_LOCAL, "budget", None) or torch.get_num_threads()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(thread_name_prefix="negmonitor")
        return _POOL


@contextmanager
def single_torch_thread(device: torch.device) -> Iterator[None]:
    """Torch's CPU ops on one intra-op thread inside the block (restored after, also on exceptions).

    For work whose parallelism is ``run_split``'s: a parallel op just before it would leave OpenMP's workers
    spinning (libgomp's default wait policy) on the cores its threads need. Nothing changes for other devices.
    """
    if device.type != "cpu":
        yield
        return
    previous, outer_budget = torch.get_num_threads(), getattr(_LOCAL, "budget", None)
    _LOCAL.budget = thread_budget()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        _LOCAL.budget = outer_budget


def run_split(work: Callable[[Sequence[T]], None], items: Sequence[T], workers: int) -> None:
    """Call ``work`` on ``workers`` contiguous slices of ``items`` concurrently (in this thread if one)."""
    if workers <= 1 or len(items) <= 1:
        work(items)
        return
    bounds = [round(i * len(items) / workers) for i in range(workers + 1)]
    parts = [items[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    previous = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def in_callers_modes(part: Sequence[T]) -> None:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(part)

    torch.set_num_threads(1)
    try:
        futures = [_pool().submit(in_callers_modes, part) for part in parts[1:]]
        try:
            work(parts[0])
        finally:
            errors = [f.exception() for f in futures]  # wait for every thread before anything else happens
        for error in errors:
            if error is not None:
                raise error
    finally:
        torch.set_num_threads(previous)


def scratch(slot: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A contiguous scratch tensor of ``shape``, reused by this thread for the same ``slot``, dtype and device.

    Fresh multi-megabyte tensors for every block cost page faults (measured: they doubled the time of the
    histogram update), so each thread keeps its buffers; they grow to the largest block seen and no further.
    """
    buffers: dict[tuple[int, torch.dtype, torch.device], Tensor] = _LOCAL.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    numel = math.prod(shape)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a buffer made under inference mode could not be written outside it
            buffer = torch.empty(numel, dtype=dtype, device=device)
        buffers[key] = buffer
    return buffer[:numel].view(shape)
