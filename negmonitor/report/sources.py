"""What a report input folder holds, and its tables loaded into one :class:`RunData` per run.

A ``RUN_DIR`` given to ``negmonitor report`` may be

- a log folder holding ``negmonitor/`` (the tidy records of a live run or a replay),
- the records root itself (``scalars/``, ``neurons/``, ``pairs/``),
- a ``negmonitor probe --out`` folder (``neurons.parquet``, ``layers.parquet``, ``top_pairs.parquet``),
- a ``negmonitor ablate --out`` folder (``ablation.csv``, ``fraction_sweep.csv``, ``layer_groups.csv``, the
  selections, and the probe it ran in ``probe/``),
- or a folder above any of these (searched three levels down), each found folder becoming a run.

Only the tidy records and tables are read, never TensorBoard event files.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from negmonitor.atomic import read_json
from negmonitor.errors import NegmonitorError
from negmonitor.records import ROW_KEYS

RECORD_KINDS = ("scalars", "neurons", "pairs")
ABLATION_TABLES = ("ablation", "ablation_breakdown", "fraction_sweep", "fraction_sweep_breakdown", "layer_groups",
                   "layer_groups_breakdown")
PAIR_KEYS = ["run", "step", "layer", "neuron", "rank"]
TEXT_COLUMNS = {"condition": str, "how": str, "scope": str, "group": str, "layer_group": str, "suite": str, "level": str}
SEARCH_DEPTH = 3


@dataclass
class Source:
    """One detected input: its folder and kind (``records``, ``probe`` or ``ablate``)."""

    path: Path
    kind: str


@dataclass(eq=False)
class RunData:
    """Everything a report knows about one run (a live run, a replay, a probe or an ablation folder).

    Attributes:
        label: the run's name in legends and captions (unique within a report).
        path: the folder it was read from.
        kinds: what the folder held (``records``, ``probe``, ``ablate``).
        scalars: tidy scalar rows (``run, step, tokens_seen, layer, neuron, metric, value``).
        neurons: per-neuron snapshots (of a records folder: the last step's only; the figures that follow neurons
            over steps read ``cohort_curve``).
        pairs: top pairs of the top-MD neurons, all ranks (of a records folder: the last step's).
        histograms: the top-WD neurons' pre-activation histograms per step (``layer, neuron, bin, left, right,
            count``), from the records.
        tables: ablation tables by file stem (``ablation``, ``fraction_sweep``, ``layer_groups``, ...), plus
            ``ablation_selections``.
        meta: what is known about the model and settings (``model``, ``family``, ``probe_source``, ``cohort``,
            ``ablation_meta``, ``replay``).
        neuron_steps: the steps with per-neuron snapshots (None: those of ``neurons``).
        cohort_curve: the paper's cohort curve (``step, cohort, rest``) computed from the records one file at a time
            (None: from ``neurons``).
        first_live_cohort_step: the first step with live-cohort members in the records.
    """

    label: str
    path: Path
    kinds: tuple[str, ...]
    scalars: pd.DataFrame
    neurons: pd.DataFrame
    pairs: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    histograms: pd.DataFrame = field(default_factory=pd.DataFrame)
    neuron_steps: list[int] | None = None
    cohort_curve: pd.DataFrame | None = None
    first_live_cohort_step: int | None = None

    def table(self, name: str) -> pd.DataFrame | None:
        """An ablation table, or None when this run has none by that name."""
        frame = self.tables.get(name)
        return frame if frame is not None and not frame.empty else None


def detect(path: str | os.PathLike) -> list[Source]:
    """The inputs in ``path`` (itself, else folders up to three levels below it).

    Raises:
        NegmonitorError: the folder does not exist or holds nothing a report can read.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NegmonitorError(f"{root} is not a folder — give a log folder, a records folder, or a probe/ablate "
                              "--out folder")
    found = _walk(root, SEARCH_DEPTH)
    if found:
        return found
    raise NegmonitorError(f"{root} holds no negmonitor records, probe tables or ablation tables — point at a log "
                          "folder (with negmonitor/ inside), a records folder, or a probe/ablate --out folder")


def _walk(folder: Path, depth: int) -> list[Source]:
    """Sources in ``folder``, else in its sub-folders (not below a folder that is itself a source)."""
    found = _detect_here(folder)
    if found or depth == 0:
        return found
    children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [s for child in children for s in _walk(child, depth - 1)]


def _detect_here(folder: Path) -> list[Source]:
    """Sources in ``folder`` itself (not searching below, except ``negmonitor/`` and an ablate folder's ``probe/``)."""
    if _is_records_root(folder / "negmonitor"):
        return [Source(folder / "negmonitor", "records")]
    if _is_records_root(folder):
        return [Source(folder, "records")]
    out = []
    if any((folder / f"{name}.csv").is_file() for name in ("ablation", "fraction_sweep", "layer_groups")):
        out.append(Source(folder, "ablate"))
        if (folder / "probe" / "neurons.parquet").is_file():
            out.append(Source(folder / "probe", "probe"))
    elif (folder / "neurons.parquet").is_file():
        out.append(Source(folder, "probe"))
    return out


def _is_records_root(folder: Path) -> bool:
    return folder.is_dir() and any(any((folder / kind).glob("step-*.parquet")) for kind in RECORD_KINDS)


def load_runs(paths: Sequence[str | os.PathLike]) -> list[RunData]:
    """Detect and load every run in ``paths``; labels are made unique (a suffix from the folder where needed)."""
    runs: list[RunData] = []
    for path in paths:
        sources = detect(path)
        runs += _load_sources(sources)
    return _unique_labels(runs)


def _load_sources(sources: list[Source]) -> list[RunData]:
    """Records roots give one run per ``run`` value; an ablate folder and its ``probe/`` give one run together."""
    runs: list[RunData] = []
    ablate = {s.path: s for s in sources if s.kind == "ablate"}
    for source in sources:
        if source.kind == "records":
            runs += load_records(source.path)
        elif source.kind == "ablate":
            probe = next((s for s in sources if s.kind == "probe" and s.path.parent == source.path), None)
            runs.append(load_ablate(source.path, probe.path if probe else None))
        elif source.kind == "probe" and source.path.parent not in ablate:
            runs.append(load_probe(source.path))
    return runs


def _unique_labels(runs: list[RunData]) -> list[RunData]:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:
        if seen[run.label] > 1:
            run.label = f"{run.label} ({_short_path(run.path)})"
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
        if counts[run.label] > 1:
            run.label = f"{run.label} #{counts[run.label]}"
    return runs


def _short_path(path: Path) -> str:
    parts = [p for p in path.parts if p not in ("negmonitor", "probe")]
    return "/".join(parts[-2:]) if parts else str(path)


# ----------------------------------------------------------------------------------------------------------------
# records


def load_records(root: Path) -> list[RunData]:
    """One :class:`RunData` per ``run`` value of a records root.

    Scalars and histograms are read whole (hundreds of rows a step); of the per-neuron snapshots and top pairs
    (737k and 369k rows a step for Pythia-12B, 113M over a 154-checkpoint replay) only each run's last step is
    read, and the cohort curve that follows neurons over every step is computed one file at a time."""
    from negmonitor.monitoring.cohort import recorded_cohorts
    from negmonitor.records import RecordStore

    store = RecordStore(root)
    scalars = _typed_scalars(store.read_scalars())
    histograms = store.read("histograms")
    meta = _records_meta(root)
    neuron_files, pair_files = store.file_runs("neurons"), store.file_runs("pairs")
    cohorts = recorded_cohorts(store)
    labels = sorted(set(scalars.get("run", pd.Series(dtype=str)).astype(str).unique())
                    | {run for _, run, _ in neuron_files} | {run for _, run, _ in pair_files})
    if not labels:
        labels = [root.parent.name if root.name == "negmonitor" else root.name]
    runs = []
    for label in labels:
        neuron_steps = sorted({step for _, run, step in neuron_files if run == label})
        cohort = cohorts.get(label)
        runs.append(RunData(_display_name(label, root), root, ("records",), _only(scalars, label),
                            _last_step_rows(store, "neurons", neuron_files, label),
                            _last_step_rows(store, "pairs", pair_files, label), meta={**meta, "run": label},
                            histograms=_only(histograms, label), neuron_steps=neuron_steps,
                            cohort_curve=cohort.curve if cohort is not None else None,
                            first_live_cohort_step=cohort.first_live_step if cohort is not None else None))
    return runs


def _last_step_rows(store, kind: str, files: list[tuple[Path, str, int]], label: str) -> pd.DataFrame:
    """The rows of ``label``'s last recorded step of ``kind`` (its files merged, last write wins)."""
    steps = [step for _, run, step in files if run == label]
    if not steps:
        return pd.DataFrame(columns=ROW_KEYS[kind])
    return store.read(kind, steps=[max(steps)], run=label)


def _display_name(label: str, root: Path) -> str:
    """``version_0`` (Lightning's default run folder) becomes ``<logger name>/version_0``."""
    log_dir = root.parent if root.name == "negmonitor" else root
    if re.fullmatch(r"version_\d+", label) and log_dir.name == label and log_dir.parent.name:
        return f"{log_dir.parent.name}/{label}"
    return label


def _typed_scalars(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame({"run": pd.Series(dtype=str), "step": pd.Series(dtype="int64"),
                             "tokens_seen": pd.Series(dtype="float64"), "layer": pd.Series(dtype="int64"),
                             "neuron": pd.Series(dtype="int64"), "metric": pd.Series(dtype=str),
                             "value": pd.Series(dtype="float64")})
    out = frame.copy()
    out["metric"] = out["metric"].astype(str)
    out["run"] = out["run"].astype(str)
    return out


def _only(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    if "run" not in frame.columns or frame.empty:
        return frame.copy()
    return frame[frame["run"].astype(str) == label].reset_index(drop=True)


def _records_meta(root: Path) -> dict:
    """Replay settings (``replay.json``) and the cohort (``cohort.json``) where present."""
    meta: dict = {}
    replay = read_json(root / "replay.json")
    if replay:
        meta["replay"] = replay
        meta["series"] = replay.get("model") or replay.get("name")
        meta["probe_source"] = replay.get("probe")
    for info in sorted(Path(root).glob("run-*.json")):  # a monitored run's own description (model family)
        run_info = read_json(info) or {}
        meta.setdefault("family", run_info.get("family"))
        meta.setdefault("model_type", run_info.get("model_type"))
    cohort = read_json(root / "cohort.json")
    if cohort:
        meta["cohort"] = {k: cohort[k] for k in ("revision", "step", "cohort_frac") if k in cohort}
    return meta


# ----------------------------------------------------------------------------------------------------------------
# probe and ablate folders


def load_probe(folder: Path, label: str | None = None) -> RunData:
    """A ``probe --out`` folder as a one-measurement run (step from its revision, else 0)."""
    from negmonitor.result import ProbeResult

    result = ProbeResult.load(folder)
    meta = dict(result.meta)
    label = label or (folder.parent.name if folder.name == "probe" else folder.name)
    step = step_of_revision(meta.get("revision"))
    neurons = _identified(result.neurons, label, step)
    pairs = (_identified(result.top_pairs, label, step) if not result.top_pairs.empty
             else pd.DataFrame(columns=PAIR_KEYS))
    scalars = _typed_scalars(layer_scalars(result.layers, label, step))
    info = {"model": meta.get("model"), "revision": meta.get("revision"), "family": meta.get("family"),
            "probe_source": meta.get("probe_source"), "probe_tokens": meta.get("probe_tokens"), "probe": meta}
    return RunData(label, folder, ("probe",), scalars, neurons, pairs, meta=info)


def load_ablate(folder: Path, probe: Path | None = None) -> RunData:
    """An ``ablate --out`` folder (and its ``probe/`` when present) as one run."""
    tables = {name: pd.read_csv(folder / f"{name}.csv", dtype=TEXT_COLUMNS) for name in ABLATION_TABLES
              if (folder / f"{name}.csv").is_file()}
    selections = folder / "ablation_selections.parquet"
    if selections.is_file():
        tables["ablation_selections"] = pd.read_parquet(selections)
    for stem in ("pos_surprisal",):
        if (folder / f"{stem}.csv").is_file():
            tables[stem] = pd.read_csv(folder / f"{stem}.csv")
    ablation_meta = read_json(folder / "ablation_meta.json") or {}
    label = folder.name
    if probe is not None:
        run = load_probe(probe, label=label)
        run.path, run.kinds = folder, ("ablate", "probe")
    else:
        empty = pd.DataFrame(columns=["run", "step", "layer", "neuron"])
        run = RunData(label, folder, ("ablate",), _typed_scalars(pd.DataFrame()), empty, empty.copy(), meta={})
    run.tables = tables
    run.meta["ablation_meta"] = ablation_meta
    run.meta["model"] = run.meta.get("model") or ablation_meta.get("model")
    run.meta["revision"] = run.meta.get("revision") or ablation_meta.get("revision")
    return run


def layer_scalars(layers: pd.DataFrame, label: str, step: int) -> pd.DataFrame:
    """A probe's per-layer table as tidy scalar rows (the metric names the engine writes)."""
    from negmonitor.monitoring.engine import LAYER_COLUMNS

    rows = []
    for record in layers.to_dict("records"):
        for metric, column in LAYER_COLUMNS.items():
            if column in record:
                rows.append((label, step, np.nan, int(record["layer"]), -1, metric, float(record[column])))
    return pd.DataFrame(rows, columns=["run", "step", "tokens_seen", "layer", "neuron", "metric", "value"])


def _identified(frame: pd.DataFrame, label: str, step: int) -> pd.DataFrame:
    out = frame.copy()
    out.insert(0, "tokens_seen", np.nan)
    out.insert(0, "step", int(step))
    out.insert(0, "run", label)
    return out


def step_of_revision(revision: object) -> int:
    """``"step1000"`` → 1000; anything else → 0."""
    match = re.search(r"(\d+)$", str(revision or ""))
    return int(match.group(1)) if match else 0
