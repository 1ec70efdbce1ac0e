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
from collections.abc import Iterable, Sequence
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
        return sorted({_file_step(p) for p in folder.glob("step-*.parquet")})

    def write(self, kind: str, frame: pd.DataFrame, step: int, key: str | None = None) -> Path:
        """Write one measurement's rows atomically and return the file."""
        return write_parquet_atomic(frame.reset_index(drop=True), self.path(kind, step, key))

    def write_scalars(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame, key: str | None = None) -> Path:
        """Write ``rows`` (``layer, neuron, metric, value``) with the identifying columns added."""
        return self.write("scalars", _identify(rows, run, step, tokens_seen)[SCALAR_COLUMNS], step, key)

    def write_neurons(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame, key: str | None = None) -> Path:
        """Write a per-neuron snapshot (``layer, neuron, wd, ...``) with the identifying columns first, its
        statistics in float32 (:func:`_compact`)."""
        return self.write("neurons", _compact(_identify(rows, run, step, tokens_seen)), step, key)

    def write_pairs(self, run: str, step: int, tokens_seen: int, rows: pd.DataFrame, key: str | None = None) -> Path:
        """Write the top differentiated pairs (``layer, neuron, rank, ...``) with the identifying columns first, their
        values in float32."""
        return self.write("pairs", _compact(_identify(rows, run, step, tokens_seen)), step, key)

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

    def files(self, kind: str, steps: Iterable[int] | None = None) -> list[Path]:
        """The record files of ``kind`` (of ``steps`` only, when given), in step order (by name: a step's keyed
        files, ``step-N-key``, before its plain one)."""
        folder = self.root / kind
        files = sorted(folder.glob("step-*.parquet")) if folder.exists() else []
        if steps is not None:
            wanted = {int(s) for s in steps}
            files = [f for f in files if _file_step(f) in wanted]
        return files

    def file_runs(self, kind: str) -> list[tuple[Path, str, int]]:
        """``(file, run, step)`` of every record file of ``kind``: each file holds one run's rows of one step, so
        its run is read from its first row only (not a column of 737k rows per Pythia-12B step)."""
        import pyarrow.parquet as pq

        out = []
        for path in self.files(kind):
            handle = pq.ParquetFile(path)
            if handle.metadata.num_rows == 0:
                continue
            first = handle.read_row_group(0, columns=["run"]).column(0)[0].as_py()
            out.append((path, str(first), _file_step(path)))
        return out

    def read(self, kind: str = "scalars", columns: Sequence[str] | None = None,
             steps: Iterable[int] | None = None, run: str | None = None) -> pd.DataFrame:
        """Rows of ``kind``, merged across files, duplicates dropped (last file wins): all of them, or only
        ``columns`` (plus the row keys) of ``steps`` and of ``run`` — the per-neuron records of a Pythia-12B replay
        are 113M rows, ~37 GB in pandas, when a figure needs one step's or one column's."""
        files = self.files(kind, steps)
        row_keys = ROW_KEYS.get(kind, ROW_KEYS["neurons"])
        wanted = None if columns is None else list(dict.fromkeys([*row_keys, *columns]))
        if not files:
            return pd.DataFrame(columns=wanted or (SCALAR_COLUMNS if kind == "scalars" else row_keys))
        frames = [_read_file(f, wanted) for f in files]
        frame = pd.concat(frames, ignore_index=True)
        if run is not None:
            frame = frame[frame["run"].astype(str) == str(run)]
        keys = [c for c in row_keys if c in frame]
        return frame.drop_duplicates(subset=keys, keep="last").sort_values(keys).reset_index(drop=True)

    def read_scalars(self) -> pd.DataFrame:
        """All scalar rows."""
        return self.read("scalars")

    def read_neurons(self) -> pd.DataFrame:
        """All per-neuron snapshot rows."""
        return self.read("neurons")


def _compact(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its float64 columns in float32 (7 significant digits, ~6e-8 relative: far below what any
    figure or ranking resolves; the pre-activations themselves are fp32 or coarser): 737k rows a step for
    Pythia-12B take 59 B a row on disk instead of 103, ~6.7 GB instead of ~12 GB over its 154 checkpoints."""
    wide = [c for c in frame.columns if frame[c].dtype == "float64"]
    return frame.astype({c: "float32" for c in wide}) if wide else frame


def _file_step(path: Path) -> int:
    return int(path.name[5:14])


def _read_file(path: Path, columns: list[str] | None) -> pd.DataFrame:
    """One record file, only the ``columns`` it has of those asked for (all when None)."""
    if columns is None:
        return pd.read_parquet(path)
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in columns if c in present])


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
