"""What every shard and every resumed run must agree on: the run's settings and the fixed cohort.

Both are small JSON files under ``<log dir>/negmonitor/``, written atomically and re-read:

- ``replay.json``: the model, its variant and the settings that change the numbers (probe, layers, cohort
  fraction, dtype, ablation). A run into a folder that holds a replay with other settings stops with a one-line
  error instead of mixing records.
- ``cohort.json``: the top-WD neurons per layer at the reference checkpoint, computed once. Both files are written
  *once*: the first process to finish writing wins (``os.link`` of a complete temporary file, which fails if the
  name exists), and every process then reads the winner's file, so concurrent shards cannot follow different
  cohorts even if their hardware breaks a tie differently.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from negmonitor.errors import NegmonitorError

RUN_FILE = "replay.json"
COHORT_FILE = "cohort.json"


def check_run_info(root: Path, info: dict[str, Any], fingerprint_keys: tuple[str, ...]) -> Path:
    """Write ``replay.json`` if absent; otherwise check that the settings in ``fingerprint_keys`` match.

    Raises:
        NegmonitorError: the folder holds a replay with different settings.
    """
    path = Path(root) / RUN_FILE
    old = _read_json(path)
    if old is not None:
        new = json.loads(json.dumps(info, default=str))
        changed = [k for k in fingerprint_keys if not _same(old.get(k), new.get(k))]
        if changed:
            detail = "; ".join(f"{k}: {old.get(k)!r} before, {new.get(k)!r} now" for k in changed[:3])
            raise NegmonitorError(f"{path.parent.parent} holds a replay with other settings ({detail}) — use a new "
                                  "log folder, or the same settings to resume")
        return path
    if not write_json_once(info, path):
        return check_run_info(root, info, fingerprint_keys)
    return path


def _same(old: Any, new: Any) -> bool:
    """Equal, or for settings recorded as dicts, equal in every key both have (a setting added since is not a
    change of settings)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(old[key] == new[key] for key in old.keys() & new.keys())
    return old == new


def read_cohort(root: Path) -> dict | None:
    """The saved cohort (``{"revision", "step", "cohort_frac", "layers", "cohort": {layer: [neurons]}}``) or None."""
    data = _read_json(Path(root) / COHORT_FILE)
    if data is None:
        return None
    data["cohort"] = {int(layer): [int(n) for n in neurons] for layer, neurons in data["cohort"].items()}
    return data


def write_cohort(root: Path, revision: str, step: int, cohort: dict[int, list[int]], cohort_frac: float,
                 layers: Any, explicit: bool = False) -> Path:
    """Save the cohort fixed at ``revision`` atomically (``explicit``: a reference the user chose)."""
    data = {"revision": revision, "step": int(step), "explicit": bool(explicit), "cohort_frac": float(cohort_frac),
            "layers": list(layers) if layers is not None else None,
            "cohort": {str(layer): [int(n) for n in neurons] for layer, neurons in sorted(cohort.items())}}
    path = Path(root) / COHORT_FILE
    write_json_once(data, path)
    return path


def check_cohort(saved: dict, cohort_revision: str | None) -> None:
    """A saved cohort must come from the reference the user asked for (when one was asked for).

    Raises:
        NegmonitorError: it was fixed at another revision.
    """
    if cohort_revision is not None and saved["revision"] != cohort_revision:
        raise NegmonitorError(f"this log folder's cohort was fixed at {saved['revision']}, not {cohort_revision} — "
                              "use a new log folder to follow another cohort")


def write_json_once(obj: Any, path: Path) -> bool:
    """Create ``path`` with ``obj`` as JSON unless it exists; True if this call created it (atomic either way)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: fall back to rename (last writer wins)
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise NegmonitorError(f"{path} is not readable JSON ({exc}) — delete it to start the replay afresh") from exc
