"""Tidy records: the one schema every producer writes and every consumer reads.

Layout under ``<log dir>/negmonitor/``::

    scalars/step-000001000.parquet    run, step, tokens_seen, layer, neuron, metric, value
    neurons/step-000001000.parquet    run, step, tokens_seen, layer, neuron, wd, wd_neg, ..., in_cohort

One file per measurement (and per ``key``, e.g. a replay shard or an ablation pass), written atomically, so a crash
never leaves a half-written file, resuming can test whether a step is done, and several processes can write into
one folder without clobbering each other. Readers merge all files and drop duplicates (last write wins).
Per-layer summaries have ``neuron = -1``; whole-model values have ``layer = -1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from negmonitor.atomic import write_parquet_atomic

SCALAR_COLUMNS = ["run", "step", "tokens_seen", "layer", "neuron", "metric", "value"]
KEY_COLUMNS = ["run", "step", "layer", "neuron", "metric"]
ROW_KEYS = {"scalars": KEY_COLUMNS, "neurons": ["run", "step", "layer", "neuron"],
            "pairs": ["run", "step", "layer", "neuron", "rank"],
            "histograms": ["run", "step", "layer", "neuron", "bin"]}


class RecordStore:
    """Reads and writes the tidy records of one log folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @classmethod
    def for_logdir(cls, log_dir: str | os.PathLike) -> "RecordStore":
        """The store under ``<log_dir>/negmonitor``."""
        return cls(Path(log_dir) / "negmonitor")

    def path(self, kind: str, step: int, key: str | None = None) -> Path:
        """File of one measurement: ``<root>/<kind>/step-<step>[-<key>].parquet``."""
        suffix = f"-{key}" if key else ""
        return self.root / kind / f"step-{int(step):09d}{suffix}.parquet"

    def has(self, step: int, key: str | None = None, kind: str = "scalars") -> bool:
        """Whether the measurement of ``step`` (and ``key``) is already recorded."""
        return self.path(kind, step, key).exists()

    def steps(self, kind: str = "scalars") -> list[int]:
        """Steps that have at least one record file."""
        folder = self.root / kind
        if not folder.exists():
            return []
        return sorted({int(p.name[5:14]) for p in folder.glob("step-*.parquet")})

    def write(self, kind: str, frame: pd.DataFrame, step: int, key: str | None = None) -> Path:
        """Write one measurement's rows atomically and return the file."""
        return write_parquet_atomic(frame.reset_index(drop=True), self.path(kind, step, key))

    def write_scalars(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame, key: str | None = None) -> Path:
        """Write ``rows`` (``layer, neuron, metric, value``) with the identifying columns added."""
        return self.write("scalars", _identify(rows, run, step, tokens_seen)[SCALAR_COLUMNS], step, key)

    def write_neurons(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame, key: str | None = None) -> Path:
        """Write a per-neuron snapshot (``layer, neuron, wd, ...``) with the identifying columns first."""
        return self.write("neurons", _identify(rows, run, step, tokens_seen), step, key)

    def write_pairs(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame, key: str | None = None) -> Path:
        """Write the top differentiated pairs (``layer, neuron, rank, ...``) with the identifying columns first."""
        return self.write("pairs", _identify(rows, run, step, tokens_seen), step, key)

    def write_histograms(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame,
                         key: str | None = None) -> Path:
        """Write the top neurons' pre-activation histograms (``layer, neuron, bin, left, right, count``)."""
        return self.write("histograms", _identify(rows, run, step, tokens_seen), step, key)

    def write_measurement(self, run: str, step: int, tokens_seen: int, scalars: pd.DataFrame,
                          neurons: pd.DataFrame, pairs: pd.DataFrame | None = None,
                          histograms: pd.DataFrame | None = None, key: str | None = None) -> None:
        """Write one measurement's records: neurons, pairs and histograms (each when there are rows), scalars last,
        since a step's scalars file is what marks it recorded (a resume skips it)."""
        self.write_neurons(run, step, tokens_seen, neurons, key=key)
        if pairs is not None and not pairs.empty:
            self.write_pairs(run, step, tokens_seen, pairs, key=key)
        if histograms is not None and not histograms.empty:
            self.write_histograms(run, step, tokens_seen, histograms, key=key)
        self.write_scalars(run, step, tokens_seen, scalars, key=key)

    def read(self, kind: str = "scalars") -> pd.DataFrame:
        """All rows of ``kind``, merged across files, duplicates dropped (last file wins)."""
        folder = self.root / kind
        files = sorted(folder.glob("step-*.parquet")) if folder.exists() else []
        row_keys = ROW_KEYS.get(kind, ROW_KEYS["neurons"])
        if not files:
            return pd.DataFrame(columns=SCALAR_COLUMNS if kind == "scalars" else row_keys)
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        keys = [c for c in row_keys if c in frame]
        return frame.drop_duplicates(subset=keys, keep="last").sort_values(keys).reset_index(drop=True)

    def read_scalars(self) -> pd.DataFrame:
        """All scalar rows."""
        return self.read("scalars")

    def read_neurons(self) -> pd.DataFrame:
        """All per-neuron snapshot rows."""
        return self.read("neurons")


def _identify(rows: pd.DataFrame, run: str, step: int, tokens_seen: int) -> pd.DataFrame:
    frame = rows.copy()
    frame.insert(0, "tokens_seen", int(tokens_seen))
    frame.insert(0, "step", int(step))
    frame.insert(0, "run", str(run))
    return frame


def scalar_rows(rows: list[tuple[int, int, str, float]]) -> pd.DataFrame:
    """Make a ``layer, neuron, metric, value`` frame from tuples (collected in a list, built once)."""
    return pd.DataFrame(rows, columns=["layer", "neuron", "metric", "value"]).astype(
        {"layer": "int64", "neuron": "int64", "metric": "string", "value": "float64"})


def failure_rows() -> pd.DataFrame:
    """The whole-model ``health/measurement_failed`` row (value 1) a failed measurement is recorded and logged as."""
    return scalar_rows([(-1, -1, "health/measurement_failed", 1.0)])
