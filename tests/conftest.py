"""Shared test set-up: make tests/ importable (tiny_models) and locate the real data beside the repo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny models run fastest on one thread, and the suite then behaves the same on a loaded 2-core machine.
torch.set_num_threads(1)

# The real data sets (README, "Test data"): $NEGMONITOR_DATA, else ../shared/data beside the repository.
SHARED_DATA = Path(os.environ.get("NEGMONITOR_DATA") or TESTS.parents[1] / "shared" / "data").expanduser()


def out_of_memory_above(limit: int, real, size_of, sizes: list[int]):
    """``real`` that records each call's batch size (``size_of(*args)``) in ``sizes`` and raises a simulated CUDA
    out-of-memory error for a batch larger than ``limit``."""
    def call(*args, **kwargs):
        sizes.append(size_of(*args))
        if sizes[-1] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)
    return call


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` beside the repo; skip where it is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} — see the README's 'Test data' (NEGMONITOR_DATA)")
    return SHARED_DATA


@pytest.fixture
def hub_offline(monkeypatch):
    """Make `datasets` and the hub client fail fast, as they do on a machine without network access."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
