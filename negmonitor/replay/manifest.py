"""The replay manifest: for every revision, whether it loaded, a hash of its weights, and what was done with it.

Released series have holes (revisions never uploaded or not downloadable), misplaced checkpoints and
byte-identical ranges, so every revision tried gets one entry, written atomically to its own file
``<log dir>/negmonitor/manifest/step-<step>.json``: shards and resumed runs never clobber each other, and readers
merge the files. ``status`` is one of

- ``ok``: loaded and measured;
- ``duplicate``: loaded, but its weights are identical to the previous loaded revision's (not measured again);
- ``missing``: the revision does not exist or its files cannot be fetched (skipped; retried on resume);
- ``failed``: it loaded badly or its measurement raised (skipped; retried on resume).

:meth:`Manifest.read` adds ``identical_to``: the first earlier revision with the same weights hash, neighbour or
not (a misplaced checkpoint shows up there).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from negmonitor.atomic import read_json, write_json_atomic
from negmonitor.replay.revisions import step_of

STATUSES = ("ok", "duplicate", "missing", "failed")
DONE = ("ok", "duplicate")
COLUMNS = ["revision", "step", "tokens_seen", "variant", "status", "weights_sha256", "identical_to_previous",
           "previous", "identical_to", "error", "seconds", "shard", "finished_at", "dtype"]


@dataclass
class ManifestEntry:
    """What happened to one revision."""

    revision: str
    step: int
    tokens_seen: int
    variant: str
    status: str
    weights_sha256: str | None = None
    identical_to_previous: bool = False
    previous: str | None = None
    error: str | None = None
    seconds: float = math.nan
    shard: str = "1/1"
    finished_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))
    dtype: str | None = None  # the floating-point dtype the checkpoint's weights ran in, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown manifest status {self.status!r}")


class Manifest:
    """Per-revision manifest files under ``<root>/manifest/`` (``root`` = ``<log dir>/negmonitor``)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.folder = self.root / "manifest"
        self.summary_path = self.root / "manifest.json"

    def path(self, revision: str) -> Path:
        """The entry file of ``revision``."""
        return self.folder / f"step-{step_of(revision):09d}.json"

    def write(self, entry: ManifestEntry) -> Path:
        """Write one entry atomically (replacing an earlier entry of the same revision)."""
        data = asdict(entry)
        if isinstance(data["seconds"], float) and not math.isfinite(data["seconds"]):
            data["seconds"] = None
        return write_json_atomic(data, self.path(entry.revision))

    def entry(self, revision: str) -> dict | None:
        """The recorded entry of ``revision``, or ``None``."""
        return read_json(self.path(revision))

    def is_done(self, revision: str) -> bool:
        """Whether ``revision`` was loaded and handled (``ok`` or ``duplicate``); missing/failed ones are retried."""
        entry = self.entry(revision)
        return entry is not None and entry.get("status") in DONE

    def read(self, revisions: Sequence[str] | None = None) -> pd.DataFrame:
        """All entries (or those of ``revisions``, with ``pending`` rows for revisions not tried yet), step order."""
        files = sorted(self.folder.glob("step-*.json")) if self.folder.is_dir() else []
        rows = {}
        for data in map(read_json, files):
            if data is not None:
                rows[data["revision"]] = data
        if revisions is not None:
            rows = {r: rows.get(r) or {"revision": r, "step": step_of(r), "status": "pending"} for r in revisions}
        frame = pd.DataFrame(list(rows.values()), columns=[c for c in COLUMNS if c != "identical_to"])
        frame = frame.sort_values("step", kind="stable").reset_index(drop=True)
        frame.insert(COLUMNS.index("identical_to"), "identical_to",
                     pd.Series(_identical_to(frame), index=frame.index, dtype=object))
        return frame

    def save_summary(self, frame: pd.DataFrame) -> Path:
        """Write the merged view (as returned by :meth:`read`) to ``<root>/manifest.json``."""
        records = json.loads(frame.to_json(orient="records"))
        return write_json_atomic(records, self.summary_path)


def _identical_to(frame: pd.DataFrame) -> list[str | None]:
    """For each row, the first earlier revision with the same weights hash (``None`` when none)."""
    first: dict[str, str] = {}
    out: list[str | None] = []
    for revision, sha in zip(frame.revision, frame.weights_sha256):
        if isinstance(sha, str) and sha:
            out.append(first.get(sha))
            first.setdefault(sha, revision)
        else:
            out.append(None)
    return out


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 of the state dict (names, dtypes, shapes and bytes, in sorted name order), as loaded."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.cpu().contiguous().reshape(-1)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())  # the buffer itself: no second host copy
    return digest.hexdigest()


def format_manifest(frame: pd.DataFrame) -> str:
    """The manifest as a plain-text table (hash shortened to 12 characters)."""
    if frame.empty:
        return "(no revisions)"
    shown = frame.copy()
    for column in ("step", "tokens_seen"):
        shown[column] = shown[column].map(lambda v: f"{int(v)}" if isinstance(v, (int, float)) and v == v else "")
    shown["weights_sha256"] = shown["weights_sha256"].map(lambda s: s[:12] if isinstance(s, str) else "")
    shown["identical_to_previous"] = shown["identical_to_previous"].map(lambda v: "yes" if v is True else "")
    shown["identical_to"] = shown["identical_to"].map(lambda v: v if isinstance(v, str) else "")
    shown["error"] = shown["error"].map(lambda v: str(v)[:60] if isinstance(v, str) else "")
    shown["dtype"] = shown["dtype"].map(lambda v: v if isinstance(v, str) else "")
    shown["seconds"] = shown["seconds"].map(lambda v: f"{v:.1f}" if isinstance(v, (int, float)) and v == v else "")
    columns = ["revision", "step", "tokens_seen", "status", "dtype", "weights_sha256", "identical_to_previous",
               "identical_to", "seconds", "error"]
    shown = shown[columns].rename(columns={"weights_sha256": "sha256", "identical_to_previous": "same_as_prev"})
    return shown.fillna("").to_string(index=False)
