"""Atomic file writes: a crash never leaves a half-written output.

Everything negmonitor writes goes to a temporary name in the destination folder and is renamed into place with
:func:`os.replace`, which is atomic on POSIX and Windows file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from negmonitor.errors import NegmonitorError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_parquet_atomic(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` to parquet at ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    return write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or ``None`` when it is missing or unreadable (a file written elsewhere, being replaced)."""
    target = Path(path)
    if not target.is_file():
        return None
    try:
        return json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` if needed and prove it can be written, before any long work starts."""
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".negmonitor-write-test-"):
            pass
    except OSError as exc:
        raise NegmonitorError(f"{what} {folder} cannot be written ({exc.strerror or exc}) — choose a writable path") from exc
    return folder
