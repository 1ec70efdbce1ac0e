"""The previous-weights snapshot of weight drift, saved beside the records instead of inside a checkpoint.

The snapshot is as large as the monitored projections' weights in its dtype (bf16, layers x neurons x d_in x 2 B:
Pythia-1.4B 24 x 8192 x 2048 x 2 B = 0.8 GB, Pythia-12B 36 x 20480 x 5120 x 2 B = 7.5 GB), so it lives in host
memory between measurements and stays out of the Lightning checkpoint's callback state. When a checkpoint is saved,
the snapshot it refers to (the weights at the checkpoint's last measurement) is written once to
``<records>/drift/<key>-step-<N>.safetensors`` (atomically; safetensors keeps bf16 exactly and loads no code) and
the checkpoint's state records that file's absolute path; resuming reads it back into host memory, from there (a
resumed run may log to a new folder, e.g. the logger's next version) or else from the current records folder, so
the first drift after a resume equals the uninterrupted run's. :func:`prune_snapshots` keeps the newest ``keep``
files per monitor (the monitor's ``drift_snapshots_kept``; it may keep all).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from negmonitor.atomic import atomic_path

__all__ = ["prune_snapshots", "read_snapshot", "snapshot_path", "write_snapshot"]


def snapshot_path(root: str | os.PathLike, key: str, step: int) -> Path:
    """Where the snapshot of monitor ``key`` taken at ``step`` lives under the records folder ``root``."""
    return Path(root) / "drift" / f"{key}-step-{int(step):010d}.safetensors"


def write_snapshot(path: str | os.PathLike, weights: dict[int, torch.Tensor], step: int) -> Path:
    """Save ``weights`` (layer -> rows, any dtype and device) to ``path`` atomically; returns the path."""
    tensors = {f"layer_{layer}": rows.detach().contiguous().cpu() for layer, rows in weights.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(int(step))})
    return Path(path)


def read_snapshot(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
    """The snapshot saved at ``path``, on ``device``, in its saved dtype."""
    tensors = load_file(str(path), device=str(device))
    return {int(name.removeprefix("layer_")): rows for name, rows in tensors.items()}


def prune_snapshots(root: str | os.PathLike, key: str, keep: int = 2) -> None:
    """Delete all but the ``keep`` most recently written snapshots of monitor ``key`` (by write time, not step: after
    a resume from an earlier checkpoint into the same folder, the abandoned run's later steps go first)."""
    pattern = re.compile(rf"{re.escape(key)}-step-(\d+)\.safetensors")
    found = sorted((p.stat().st_mtime_ns, int(m.group(1)), p)
                   for p in (Path(root) / "drift").glob(f"{key}-step-*.safetensors") if (m := pattern.fullmatch(p.name)))
    for *_, path in found[:-keep] if keep > 0 else found:
        path.unlink(missing_ok=True)
