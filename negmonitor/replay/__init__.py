"""Checkpoint-series replay: run released (Pythia) or local checkpoints through the same monitors as a live run.

Main entry points::

    replay(model, revisions, logdir, probe=None, **settings) -> ReplayResult   # the Python API
    read_manifest(logdir) -> DataFrame                                        # per-revision load/hash/status
    resolve_revisions("log:16", pythia_schedule())                            # presets → revision names

Modules: :mod:`~negmonitor.replay.revisions` (schedules, presets, shards), :mod:`~negmonitor.replay.sources`
(hub / step folders / Lightning checkpoints), :mod:`~negmonitor.replay.manifest` (integrity records),
:mod:`~negmonitor.replay.state` (settings and cohort shared by shards and resumes),
:mod:`~negmonitor.replay.runner` (the loop). Names are imported on first use, so the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Manifest": "manifest", "ManifestEntry": "manifest", "format_manifest": "manifest", "weights_sha256": "manifest",
    "PYTHIA_TOKENS_PER_STEP": "revisions", "log_spaced": "revisions", "parse_shard": "revisions",
    "pythia_schedule": "revisions", "resolve_revisions": "revisions", "shard_indices": "revisions",
    "ReplayResult": "runner", "ReplaySettings": "runner", "read_manifest": "runner", "replay": "runner",
    "HubSeries": "sources", "LightningSeries": "sources", "StepDirSeries": "sources", "open_series": "sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import public names on first use."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"negmonitor.replay.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'negmonitor.replay' has no attribute {name!r}")
