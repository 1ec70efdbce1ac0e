"""Which checkpoints to replay: Pythia's published schedule, presets, explicit lists and shards.

Revisions are named ``step<N>`` everywhere (Pythia's branch names); an explicit list may also give bare step
numbers. A *schedule* is the ordered list of revisions a series publishes; a *spec* picks from it:

- ``all``: the whole schedule (Pythia: ``step0, step1, step2, step4 … step512, step1000 … step143000``, 154);
- ``log:N``: ``N`` revisions log-spaced in step (the first and the last always included);
- ``step0,step1000,143000``: an explicit list (names or step numbers), or a Python list of them.

``--shard K/N`` (1-based) gives process ``K`` of ``N`` a contiguous block of the resolved list, so each process
loads one extra (predecessor) checkpoint at most.

Example::

    >>> [r for r in resolve_revisions("log:4", pythia_schedule())]
    ['step0', 'step64', 'step3000', 'step143000']
    >>> parse_shard("2/3")
    (2, 3)
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from negmonitor.errors import NegmonitorError

PYTHIA_TOKENS_PER_STEP = 2_097_152
PYTHIA_FINAL_STEP = 143_000
PRESETS = ("all", "log:N")
_STEP_NAME = re.compile(r"^step(\d+)$")


def pythia_schedule() -> list[str]:
    """Pythia's published revisions: ``step0``, ``step1``, ``step2``, ``step4`` … ``step512``, then every 1,000."""
    early = [0] + [2 ** i for i in range(10)]
    return [f"step{s}" for s in early + list(range(1_000, PYTHIA_FINAL_STEP + 1, 1_000))]


def is_pythia(model_id: str) -> bool:
    """Whether ``model_id`` names a Pythia model (its schedule and tokens per step apply)."""
    return "pythia" in str(model_id).lower()


def variant_of(model_id: str) -> str:
    """The family variant: ``deduped`` (trained on the deduplicated Pile) or ``standard``."""
    return "deduped" if "deduped" in str(model_id).lower() else "standard"


def step_of(revision: str) -> int:
    """The step of a ``step<N>`` revision name.

    Raises:
        NegmonitorError: the name is not ``step<N>``.
    """
    match = _STEP_NAME.match(str(revision).strip())
    if not match:
        raise NegmonitorError(f"revision {revision!r} is not named step<N> — replay needs the step in the name "
                              "(e.g. step1000, or just 1000)")
    return int(match.group(1))


def revision_name(item: str | int) -> str:
    """Normalise ``1000``, ``"1000"`` or ``"step1000"`` to ``"step1000"``."""
    text = str(item).strip()
    if text.isdigit():
        return f"step{int(text)}"
    return f"step{step_of(text)}"


def sort_by_step(revisions: Sequence[str]) -> list[str]:
    """Revisions in step order, duplicates removed."""
    return sorted(dict.fromkeys(revisions), key=step_of)


def resolve_revisions(spec: str | Sequence[str | int], schedule: Sequence[str]) -> list[str]:
    """Turn a preset (``all``, ``log:N``) or an explicit list into the ordered revisions to replay.

    Explicit revisions are returned as given (normalised and sorted by step); checking that they exist is the
    series' job. Presets pick from ``schedule``.

    Raises:
        NegmonitorError: unknown preset, ``N`` not a positive integer, an empty list or an empty schedule.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return _non_empty(sort_by_step(schedule), spec)
        if text.startswith("log:"):
            return _non_empty(log_spaced(sort_by_step(schedule), _count(text[4:], spec)), spec)
        items = [part for part in text.split(",") if part.strip()]
        if not items or not all(_looks_like_revision(part) for part in items):
            raise NegmonitorError(f"unknown revisions {spec!r} — use a preset (all, log:N) or a comma-separated "
                                  "list such as step0,step1000,step143000")
    else:
        items = list(spec)
        if not items:
            raise NegmonitorError("the revision list is empty — give at least one revision, e.g. ['step1000']")
    return sort_by_step([revision_name(item) for item in items])


def log_spaced(schedule: Sequence[str], n: int) -> list[str]:
    """``n`` revisions of ``schedule`` spread evenly in ``log(step + 1)``; the first and last always included."""
    if n >= len(schedule):
        return list(schedule)
    steps = [step_of(r) for r in schedule]
    logs = [math.log(s + 1) for s in steps]
    lo, hi = logs[0], logs[-1]
    targets = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [hi]
    chosen: set[int] = set()
    for target in targets:
        best = min((i for i in range(len(schedule)) if i not in chosen), key=lambda i: (abs(logs[i] - target), i))
        chosen.add(best)
    return [schedule[i] for i in sorted(chosen)]


def parse_shard(text: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"K/N"`` (1-based, ``1 <= K <= N``) or ``(K, N)`` → ``(K, N)``; ``None`` → ``(1, 1)``.

    Raises:
        NegmonitorError: anything else, e.g. ``3/2`` or ``0/2``.
    """
    if text is None:
        return 1, 1
    if isinstance(text, tuple):
        k, n = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
        if not match:
            raise NegmonitorError(f"--shard must look like K/N (e.g. 1/2), got {text!r}")
        k, n = int(match.group(1)), int(match.group(2))
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n):
        raise NegmonitorError(f"--shard {k}/{n} is out of range — K runs from 1 to N, e.g. 1/2 and 2/2")
    return k, n


def shard_indices(n_revisions: int, shard: tuple[int, int]) -> list[int]:
    """Indices of the contiguous block of ``n_revisions`` that shard ``K/N`` replays (blocks differ by <= 1)."""
    k, n = shard
    base, extra = divmod(n_revisions, n)
    start = (k - 1) * base + min(k - 1, extra)
    return list(range(start, start + base + (1 if k - 1 < extra else 0)))


def _count(text: str, spec: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise NegmonitorError(f"preset {spec!r} needs a positive count — e.g. log:16")
    return int(text)


def _looks_like_revision(text: str) -> bool:
    text = text.strip()
    return text.isdigit() or bool(_STEP_NAME.match(text))


def _non_empty(revisions: list[str], spec: str) -> list[str]:
    if not revisions:
        raise NegmonitorError(f"preset {spec!r} found no revisions in this series — check the model or folder")
    return revisions
