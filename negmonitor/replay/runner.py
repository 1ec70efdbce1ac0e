"""Replay a checkpoint series through the same monitors as a live run.

:func:`replay` loads one checkpoint at a time, runs the shared measurement engine on it with ``global_step`` =
the checkpoint's step, and writes the same tidy records and TensorBoard tags as the Lightning callback, so a
replayed series and a live run overlay in one TensorBoard. Around that it keeps the bookkeeping a released
series needs:

- **Cohort**: the top-WD neurons at a reference checkpoint (default: the last of the list that loads), found by a
  first pass and saved as ``cohort.json``; every checkpoint, earlier ones included, follows that same cohort.
- **Weight drift** between successive loaded checkpoints of the full list. A process whose first checkpoint's
  predecessor was not loaded by it (a shard, a resumed run) loads that predecessor once for its weights, so
  shards and resumed runs give exactly the single-process numbers.
- **Manifest**: one entry per revision (loaded or not, weights hash, identical to its predecessor); a missing or
  broken revision is recorded and skipped, never fatal.
- **Resume**: revisions whose entry says ``ok``/``duplicate`` (and whose records exist) are skipped; ``missing``
  and ``failed`` ones are tried again.
- **Shards**: ``shard=(K, N)`` replays the K-th contiguous block; all shards write into one log folder, one file
  per checkpoint, merged on read.

Example::

    >>> result = replay("EleutherAI/pythia-160m", "log:16", "runs/pythia-160m", probe="probe.txt")  # doctest: +SKIP
    >>> print(result.summary())                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from negmonitor.adapters import find_sites
from negmonitor.atomic import ensure_writable_dir
from negmonitor.errors import NegmonitorError, first_line
from negmonitor.models import parse_device, parse_dtype
from negmonitor.monitoring import engine
from negmonitor.monitoring import tensorboard as tb
from negmonitor.monitoring.engine import MonitorSettings, MonitorState
from negmonitor.budget import DEFAULT_MEMORY_BUDGET, BatchLimit
from negmonitor.probing import ProbeSettings
from negmonitor.probeset import TEXT_SUFFIXES, ProbeSet, load_probe_texts
from negmonitor.records import RecordStore, failure_rows
from negmonitor.replay.manifest import Manifest, ManifestEntry, format_manifest, weights_sha256
from negmonitor.replay.revisions import parse_shard, resolve_revisions, revision_name, shard_indices, step_of
from negmonitor.replay.sources import CheckpointMissing, HubSeries, Series, open_series
from negmonitor.replay.state import check_cohort, check_run_info, read_cohort, write_cohort
from negmonitor.validation import check_fraction

FINGERPRINT = ("model", "variant", "probe", "probe_tokens", "probe_window", "n_pairs", "seed", "layers",
               "cohort_frac", "dtype", "ablation", "tokens_per_step")
logger = logging.getLogger("negmonitor.replay")
MEDIA_POINTS = 32
UNFINGERPRINTED = ("memory_budget", "progress")  # ablation settings that change how it runs, not its numbers
MAX_LOAD_FAILURES = 3  # broken (not missing) checkpoints in a row before a replay stops: something systemic
BIG_MODEL_PARAMS = 50_000_000  # above this, a freed checkpoint is worth a full gc.collect()


@dataclass
class ReplaySettings:
    """How a replay runs (everything but the model, the revisions, the log folder and the probe).

    Args:
        probe_tokens, probe_window, n_pairs, seed, batch_size: probe-set construction and pass settings (default:
            the whole probe text in windows of 2,048 tokens, as the paper).
        memory_budget: extra device memory one measurement may allocate (bytes or e.g. ``"2GiB"``; None: no limit).
        layers: layer indices to monitor (None: all).
        cohort_frac: share of neurons per layer in the top-WD cohort.
        cohort_revision: the reference checkpoint of the cohort (default: the last of the list that loads).
        ablation: an :class:`~negmonitor.ablation.AblationSettings` to measure ablation damage at every checkpoint.
        minimal_pairs: minimal pairs (``suite, sentence_good, sentence_bad``) for the ablation accuracy: one
            BLiMP- or TSE-shaped DataFrame, or a list with at most one of each.
        ppl_text: text for the ablation perplexity.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (default: fp32 on CPU, as saved on a GPU); recorded in the run info.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        shard: ``"K/N"`` or ``(K, N)``: replay the K-th of N contiguous blocks of the list (1-based).
        tokenizer: a tokenizer or a folder/hub id to load one from (default: the series' own).
        tokens_per_step: tokens per step (default: 2,097,152 for Pythia; recorded by Lightning checkpoints).
        module: LightningModule class (or ``"package.module:Class"``) for ``.ckpt`` series.
        model_attr: the module attribute that holds the transformers model (default: found automatically).
        cache_dir: hub cache folder (default: ``HF_HUB_CACHE``).
        run_name: the ``run`` column of the records (default: the log folder's name).
        media_every: histograms/images/top-pair text at every N-th checkpoint of the list (default: ~32 in all).
        image_neurons: top-WD neurons per layer in the pre-activation images.
        tensorboard: write TensorBoard events into the log folder.
        progress: show a progress bar over the checkpoints.
        evict_cache: delete each hub revision from the hub cache once its manifest entry is written (long series of
            big models: Pythia-12B's 154 checkpoints take ~3.7 TB); local series are never touched.
    """

    probe_tokens: int | None = None
    probe_window: int = 2_048
    n_pairs: int = 1_000
    seed: int = 0
    batch_size: int = 8
    memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET
    layers: Sequence[int] | None = None
    cohort_frac: float = 0.05
    cohort_revision: str | int | None = None
    ablation: Any = None
    minimal_pairs: Any = None
    ppl_text: Any = None
    dtype: str | None = None
    device: str | None = None
    shard: str | tuple[int, int] | None = None
    tokenizer: Any = None
    tokens_per_step: int | None = None
    module: Any = None
    model_attr: str | None = None
    cache_dir: str | os.PathLike | None = None
    run_name: str | None = None
    media_every: int | None = None
    image_neurons: int = 4
    tensorboard: bool = True
    progress: bool = True
    evict_cache: bool = False


@dataclass
class ReplayResult:
    """What a replay produced: the merged manifest and where everything was written."""

    logdir: Path
    records_root: Path
    manifest: pd.DataFrame
    manifest_path: Path
    cohort_path: Path
    events_dir: Path | None
    revisions: list[str]
    shard: tuple[int, int]
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def read_scalars(self) -> pd.DataFrame:
        """All scalar records of the log folder (every shard merged)."""
        return RecordStore(self.records_root).read_scalars()

    def read_neurons(self) -> pd.DataFrame:
        """All per-neuron snapshots of the log folder (every shard merged)."""
        return RecordStore(self.records_root).read_neurons()

    def summary(self) -> str:
        """The manifest table and the paths of every output."""
        counts = self.manifest.status.value_counts().to_dict()
        lines = [format_manifest(self.manifest), "",
                 "revisions: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                 f"records:     {self.records_root}/ (scalars/, neurons/, pairs/, histograms/ — RecordStore(...).read_scalars())",
                 f"manifest:    {self.manifest_path} (per revision: {self.records_root / 'manifest'}/)",
                 f"cohort:      {self.cohort_path}"]
        if self.events_dir is not None:
            lines.append(f"TensorBoard: tensorboard --logdir {self.events_dir}")
        return "\n".join(lines)


@dataclass
class _Loaded:
    """A loaded checkpoint's identity and weight rows (kept as the predecessor of the next one)."""

    revision: str
    sha: str
    rows: dict[int, torch.Tensor]


def replay(model: str | os.PathLike, revisions: str | Sequence[str | int] = "all",
           logdir: str | os.PathLike = "runs/replay", probe: Any = None, settings: ReplaySettings | None = None,
           **overrides: Any) -> ReplayResult:
    """Replay the checkpoints ``revisions`` of ``model`` through the monitors into ``logdir``.

    Args:
        model: a hub id (``EleutherAI/pythia-160m``), a folder of step-named ``save_pretrained`` folders, or a
            folder of Lightning ``.ckpt`` files.
        revisions: ``"all"``, ``"log:N"``, ``"step0,step1000"`` or a list of names / step numbers.
        logdir: log folder (records under ``<logdir>/negmonitor``, TensorBoard events in ``<logdir>``).
        probe: probe text (a :class:`ProbeSet`, strings, a text file or folder, or a dataset id; default
            WikiText-2 test).
        settings: :class:`ReplaySettings`; keyword ``overrides`` set single fields (``shard=(1, 2)``).

    Raises:
        NegmonitorError: bad settings, an unwritable log folder, an unknown model or revision, or a model family
            without an adapter (all before any long work where they can be checked).
    """
    settings = _settings(settings, overrides)
    runner = _Replay(model, revisions, Path(logdir), probe, settings)
    try:
        runner.run()
    except BaseException:
        with contextlib.suppress(Exception):  # each revision's entry is on disk already: summarise them
            runner.result()
        raise
    return runner.result()


def read_manifest(logdir: str | os.PathLike) -> pd.DataFrame:
    """The merged manifest of a replay log folder (every shard's entries)."""
    return Manifest(Path(logdir) / "negmonitor").read()


class _Replay:
    """One process's replay: checks, cohort pass, then its shard of the checkpoints."""

    def __init__(self, model: Any, revisions: Any, logdir: Path, probe: Any, settings: ReplaySettings) -> None:
        self.settings = settings
        self.shard = parse_shard(settings.shard)
        self.device = parse_device(settings.device)
        self.dtype = parse_dtype(settings.dtype)
        if self.dtype is None and self.device.type == "cpu":
            self.dtype = torch.float32  # fp16 checkpoints (Pythia) are slow and lossy on CPU
        check_fraction(settings.cohort_frac, "cohort_frac")
        self.ablation_rows = _ablation_function() if settings.ablation is not None else None
        self.logdir = ensure_writable_dir(logdir, "log folder")
        self.store = RecordStore.for_logdir(self.logdir)
        ensure_writable_dir(self.store.root, "negmonitor record folder")
        self.manifest = Manifest(self.store.root)
        self.series: Series = open_series(model, settings.cache_dir, settings.tokens_per_step, settings.module,
                                          settings.model_attr)
        self.available = self.series.available()
        self.revisions = resolve_revisions(revisions, self.series.schedule())
        if _is_explicit(revisions):
            self.series.check_explicit(self.revisions)
        self.cohort_revision = revision_name(settings.cohort_revision) if settings.cohort_revision is not None else None
        if self.cohort_revision is not None:
            self.series.check_explicit([self.cohort_revision])
        self.probe_source = probe
        _check_probe_path(probe)
        self.run_name = settings.run_name or self.logdir.resolve().name
        check_run_info(self.store.root, self._run_info(), FINGERPRINT)
        # The drift's snapshots are kept in the dtype each checkpoint's weights are in (exact: Pythia's early
        # checkpoints, steps 1, 2, 4, ..., move by far less than a coarser rounding resolves), on the host.
        self._batch_limit = BatchLimit()  # lowered by an out-of-memory retry, for the later checkpoints
        self._evaluation_batch_limits: dict[str, BatchLimit] = {}  # the same for the ablation's evaluations
        self.monitor = MonitorSettings(layers=settings.layers, cohort_frac=settings.cohort_frac, warmup_steps=0,
                                       weight_drift=True,
                                       image_neurons=settings.image_neurons,
                                       probe=ProbeSettings(batch_size=settings.batch_size, top_neuron_frac=0.05,
                                                           memory_budget=settings.memory_budget,
                                                           top_pairs=100))
        self.media_every = settings.media_every or max(1, -(-len(self.revisions) // MEDIA_POINTS))
        self.tokenizer: Any = None
        self.probe_set: ProbeSet | None = None
        self.cohort: dict | None = None
        self.writer: Any = None
        self._loaded_params = 0
        self.processed: list[str] = []
        self._settings_proven = False  # a revision measured with these settings (here, or recorded by an earlier run)
        self._broken_loads = 0  # checkpoints in a row that failed to load (not missing ones)
        self.skipped: list[str] = []

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Fix (or re-read) the cohort, then replay this shard's checkpoints in order."""
        if self.settings.tokenizer is not None:  # a tokenizer given by path fails here, before any checkpoint loads
            self.tokenizer = self._load_tokenizer(self.revisions[-1])
        self.cohort = self._fix_cohort()
        indices = shard_indices(len(self.revisions), self.shard)
        self.writer = self._open_writer() if self.settings.tensorboard else None
        try:
            self._loop(indices)
        finally:
            if self.writer is not None:
                self.writer.close()

    def _loop(self, indices: list[int]) -> None:
        previous: _Loaded | None = None
        chained = bool(indices) and indices[0] == 0  # is `previous` the true predecessor of the next index?
        for index in _progress(indices, self.settings.progress, self.revisions, self.shard):
            revision = self.revisions[index]
            if self._already_done(index):
                self.skipped.append(revision)
                chained = False
                continue
            if not chained:
                previous = None  # its rows go before the predecessor's are read
                previous = self._predecessor(index)
            previous = self._replay_one(index, previous)
            chained = True
            self.processed.append(revision)

    def _replay_one(self, index: int, previous: _Loaded | None) -> _Loaded | None:
        """Load, hash, measure and record one revision; return the new predecessor for the next one."""
        revision = self.revisions[index]
        start = time.perf_counter()
        entry = ManifestEntry(revision, step_of(revision), self.series.tokens_seen(revision), self.series.variant,
                              "missing", previous=previous.revision if previous else None,
                              shard=f"{self.shard[0]}/{self.shard[1]}")
        if not self._may_exist(revision):
            entry.error = "not among the series' available revisions"
            logger.info("%s: not among the available revisions of %s — skipped", revision, self.series.name)
            self.manifest.write(entry)
            return previous
        try:
            model = self._load(revision)
        except Exception as exc:  # noqa: BLE001 - a missing or broken checkpoint is recorded, never fatal
            self._release(exc)
            missing = isinstance(exc, CheckpointMissing)
            entry.status = "missing" if missing else "failed"
            entry.error = str(exc) if missing else f"load: {type(exc).__name__}: {first_line(exc)}"
            logger.warning("%s: %s (%s) — skipped, recorded in the manifest", revision, entry.status, entry.error)
            self.manifest.write(entry)
            self._broken_loads = 0 if missing else self._broken_loads + 1
            systemic = not missing and _fails_every_load(exc)
            if systemic or (not missing and self._broken_loads >= MAX_LOAD_FAILURES):
                raise NegmonitorError(f"{revision} could not be loaded ({entry.error}); "
                                      f"{'' if systemic else f'{self._broken_loads} in a row, '}so the "
                                      "replay stops rather than load (and download) every later revision to fail the "
                                      "same way — fix it and run the same command again: what is recorded is "
                                      "kept") from exc
            return previous
        self._broken_loads = 0
        entry.dtype = _weights_dtype(model)  # what it ran in, also where --dtype left it as saved
        loaded: _Loaded | None = None
        try:
            loaded = _Loaded(revision, weights_sha256(model), {})
            entry.weights_sha256 = loaded.sha
            entry.identical_to_previous = previous is not None and previous.sha == loaded.sha
            if entry.identical_to_previous:
                entry.status, rows = "duplicate", previous.rows  # the same weights: the same snapshot, not a copy
            else:
                entry.status, entry.error, rows = self._measure(model, index, previous)
            # A measured revision's rows are the drift's new snapshot (one host copy of the weights, not two).
            loaded.rows = rows if rows is not None else self._weight_rows(model)
        except Exception as exc:  # noqa: BLE001 - hashing or copying one checkpoint must not end a long replay
            if self._ends_the_replay(exc):
                raise
            entry.status, entry.error, loaded = "failed", f"{type(exc).__name__}: {first_line(exc)}", None
            warnings.warn(f"negmonitor replay: {revision} failed ({entry.error}); recorded in the manifest, the "
                          "replay goes on", stacklevel=2)
        finally:
            del model
            self._release()
        entry.seconds = time.perf_counter() - start
        self.manifest.write(entry)
        self._evict(revision)
        return loaded

    def _measure(self, model: nn.Module, index: int,
                 previous: _Loaded | None) -> tuple[str, str | None, dict[int, torch.Tensor] | None]:
        """Measure one checkpoint and write its records: ``("ok", None, rows)`` with this revision's weight rows
        (the drift's new snapshot), or ``("failed", why, None)`` when the measurement raises. The predecessor's rows
        are handed to the drift, which frees each layer once compared (it is not needed after this revision)."""
        revision = self.revisions[index]
        step, tokens = step_of(revision), self.series.tokens_seen(revision)
        state = MonitorState(cohort=self.cohort["cohort"], cohort_step=self.cohort["step"],
                             prev_weights=previous.rows if previous else None,
                             prev_step=step_of(previous.revision) if previous else None)
        if previous is not None:
            previous.rows = {}
        settings = dataclasses.replace(self.monitor, drift_dtype=_snapshot_dtype(model, self.settings.layers))
        try:
            measurement = engine.take_measurement(model, self._probe_for(model), step, settings, state,
                                                  tokenizer=self.tokenizer, batch_limit=self._batch_limit)
            scalars = measurement.scalars
            if self.ablation_rows is not None:
                extra = self.ablation_rows(model, self.tokenizer, measurement.result, self.settings.ablation,
                                           self.settings.minimal_pairs, self.settings.ppl_text,
                                           batch_limits=self._evaluation_batch_limits)
                scalars = pd.concat([scalars, extra], ignore_index=True)
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not end a long replay
            if self._ends_the_replay(exc):
                raise
            warnings.warn(f"negmonitor replay: measurement of {revision} failed ({type(exc).__name__}: {exc}); "
                          "recorded as failed, the replay goes on", stacklevel=2)
            failed = failure_rows()
            self.store.write_scalars(self.run_name, step, tokens, failed, key="failed")
            if self.writer is not None:  # the curve too, beside the revisions' other curves
                tb.WriterSink(self.writer).log_scalars(tb.scalar_metrics(failed), step)
            return "failed", f"measure: {type(exc).__name__}: {first_line(exc)}", None
        self._write(measurement, scalars, index, step, tokens)
        self._settings_proven = True
        return "ok", None, state.prev_weights

    def _ends_the_replay(self, exc: Exception) -> bool:
        """Whether a revision's failure ends the replay: negmonitor's own error (a setting, or out of memory even at
        batch size 1) before any revision was measured with these settings, so a setting's error shows at once;
        once one was (in this process, or recorded ``ok`` by an earlier run in the manifest), it is recorded."""
        if not isinstance(exc, NegmonitorError) or self._settings_proven:
            return False
        self._settings_proven = bool((self.manifest.read().status == "ok").any())
        return not self._settings_proven

    def _write(self, measurement: engine.Measurement, scalars: pd.DataFrame, index: int, step: int,
               tokens: int) -> None:
        """Records first (parquet, atomic), then the TensorBoard view of the same numbers."""
        self.store.write_measurement(self.run_name, step, tokens, scalars, measurement.neurons,
                                     measurement.result.top_pairs, measurement.histograms)
        self.store.path("scalars", step, "failed").unlink(missing_ok=True)
        if self.writer is None:
            return
        sink = tb.WriterSink(self.writer)
        sink.log_scalars(tb.scalar_metrics(scalars), step)
        if index % self.media_every == 0 or index == len(self.revisions) - 1:
            sink.log_media(measurement, step)
        sink.flush()

    # -- predecessor, cohort, resume --------------------------------------------------------------------------

    def _predecessor(self, index: int) -> _Loaded | None:
        """The last revision before ``index`` in the full list that loads (its hash and weight rows), passing over
        the ones recorded as unloadable, as :meth:`_expected_previous` does (so a resume finds the drift it wants)."""
        for earlier in range(index - 1, -1, -1):
            revision = self.revisions[earlier]
            if not self._may_exist(revision) or not self._can_precede(revision):
                continue
            try:
                model = self._load(revision)
            except CheckpointMissing:
                continue
            except Exception as exc:  # noqa: BLE001 - a failure that is no missing file: no drift this time
                warnings.warn(f"negmonitor replay: the predecessor {revision} did not load ({first_line(exc)}); the "
                              f"next revision's drift is left out", stacklevel=2)
                return None
            try:
                return _Loaded(revision, weights_sha256(model), self._weight_rows(model))
            finally:
                del model
                self._release()
                if self.manifest.is_done(revision):  # another shard's revision stays until that shard records it
                    self._evict(revision)
        return None

    def _fix_cohort(self) -> dict:
        """Re-read ``cohort.json``, or find the cohort with a first pass on the reference checkpoint and save it."""
        saved = read_cohort(self.store.root)
        if saved is not None:
            check_cohort(saved, self.cohort_revision)
            self._check_cohort_reference(saved)
            return saved
        explicit = self.cohort_revision is not None
        candidates = [self.cohort_revision] if explicit else list(reversed(self.revisions))
        errors, broken = [], 0
        for revision in candidates:
            if not explicit and not self._may_exist(revision):
                continue
            if self.settings.progress:
                print(f"negmonitor replay: fixing the cohort at {revision} (first pass: loading it)", file=sys.stderr)
            try:
                model = self._load(revision)
            except Exception as exc:  # noqa: BLE001 - the default reference walks back past a missing or broken one
                self._release(exc)
                if explicit:
                    raise NegmonitorError(f"the cohort reference {revision} could not be loaded ({first_line(exc)}) "
                                          "— choose another with --cohort-revision") from exc
                if _fails_every_load(exc):  # every earlier revision would fail the same way (and download first)
                    raise NegmonitorError(f"the cohort reference {revision} could not be loaded "
                                          f"({type(exc).__name__}: {first_line(exc)}) — fix this (a smaller --dtype, "
                                          "free memory, --tokenizer) and run again") from exc
                errors.append(f"{revision}: {first_line(exc)}")
                broken += not isinstance(exc, CheckpointMissing)
                if broken >= MAX_LOAD_FAILURES:  # broken files, one after another: stop before downloading more
                    break
                continue
            try:
                state = MonitorState()
                settings = dataclasses.replace(self.monitor, weight_drift=False)
                engine.take_measurement(model, self._probe_for(model), step_of(revision), settings, state,
                                        tokenizer=self.tokenizer, batch_limit=self._batch_limit)
            finally:
                del model
                self._release()
            write_cohort(self.store.root, revision, step_of(revision), state.cohort, self.settings.cohort_frac,
                         self.settings.layers, explicit=explicit)
            return read_cohort(self.store.root)
        detail = f" (last error: {errors[-1]})" if errors else ""
        raise NegmonitorError(f"no cohort reference could be loaded from the {len(self.revisions)} revisions of "
                              f"{self.series.name}{detail} — check the model, the revisions and your network or hub "
                              "cache, or choose one with --cohort-revision")

    def _already_done(self, index: int) -> bool:
        """Recorded (``ok``/``duplicate``, with its records) with a drift that spans no revision of this list: one
        recorded by a replay of a sparser list (``step0,step20``, then ``all``) is measured again, its drift now
        from the revision before it in this list (``step10``), as one replay of the whole list would give."""
        revision = self.revisions[index]
        entry = self.manifest.entry(revision)
        if entry is None or not self.manifest.is_done(revision):
            return False
        expected, recorded = self._expected_previous(index), entry.get("previous")
        if expected is not None and (recorded is None or step_of(recorded) < step_of(expected)):
            return False  # its drift spans a revision of this list
        return entry["status"] == "duplicate" or self.store.has(step_of(revision))

    def _expected_previous(self, index: int) -> str | None:
        """The revision a replay of this list takes ``index``'s drift from: the nearest earlier one not known to be
        unloadable (absent from the series, or recorded missing or failing to load)."""
        for earlier in range(index - 1, -1, -1):
            revision = self.revisions[earlier]
            if self._may_exist(revision) and self._can_precede(revision):
                return revision
        return None

    def _can_precede(self, revision: str) -> bool:
        """Not recorded as unable to hand on its weights: missing, or failed before its weights were read (a load
        or hashing failure; a failed measurement still hands them on)."""
        entry = self.manifest.entry(revision) or {}
        status = entry.get("status")
        return status != "missing" and not (status == "failed"
                                            and not str(entry.get("error") or "").startswith("measure:"))

    def _check_cohort_reference(self, saved: dict) -> None:
        """Warn when the folder's cohort was fixed at a revision before the end of this list (a pilot replay's
        folder reused for a longer list): the records keep one cohort, so it stays, but it is not this list's
        default reference."""
        if self.cohort_revision is not None or saved.get("explicit"):
            return
        later = [r for r in self.revisions if self._may_exist(r) and step_of(r) > int(saved["step"])
                 and self._can_precede(r)]
        if later:
            warnings.warn(f"negmonitor replay: this log folder's cohort was fixed at {saved['revision']} by an "
                          f"earlier replay, but this list goes on to {later[-1]}; every revision follows the "
                          f"{saved['revision']} cohort (use a new log folder to fix it at {later[-1]})", stacklevel=3)

    def _may_exist(self, revision: str) -> bool:
        return self.available is None or revision in self.available

    # -- loading ----------------------------------------------------------------------------------------------

    def _load(self, revision: str) -> nn.Module:
        model = self.series.load(revision, self.dtype, self.device)
        self._loaded_params = sum(p.numel() for p in model.parameters())
        if self.tokenizer is None:
            try:
                self.tokenizer = self._load_tokenizer(revision)
            except Exception as exc:
                if isinstance(self.series, HubSeries):  # that revision's files: an earlier one may have them
                    raise
                raise _NoTokenizer(first_line(exc)) from exc  # the series' one tokenizer: every revision fails
        return model

    def _evict(self, revision: str) -> None:
        """With ``evict_cache``, free the disk of a revision that is recorded (a failure to is warned, not fatal)."""
        if not self.settings.evict_cache:
            return
        try:
            freed = self.series.evict(revision)
        except Exception as exc:  # noqa: BLE001 - the records are written; the disk is the user's to clean then
            warnings.warn(f"negmonitor replay: could not remove {revision} from the hub cache ({first_line(exc)})",
                          stacklevel=2)
            return
        if freed:
            logger.info("%s: removed from the hub cache (%.1f GB freed)", revision, freed / 1e9)

    def _release(self, failure: BaseException | None = None) -> None:
        """Return a dropped checkpoint's memory before the next one loads (a full collection only where it pays);
        after a failed load, its traceback's frames let go of the tensors loaded so far first."""
        if failure is not None:
            traceback.clear_frames(failure.__traceback__)
        if self.device.type == "cuda" or self._loaded_params > BIG_MODEL_PARAMS:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load_tokenizer(self, revision: str) -> Any:
        given = self.settings.tokenizer
        if given is None:
            reference = self.cohort["revision"] if self.cohort else revision
            return self.series.load_tokenizer(reference)
        if isinstance(given, (str, os.PathLike)):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(str(given))
            except Exception as exc:
                raise NegmonitorError(f"could not load tokenizer {str(given)!r} ({first_line(exc)}) — pass a "
                                      "tokenizer folder or hub id") from exc
        return given

    def _probe_for(self, model: nn.Module) -> ProbeSet:
        if self.probe_set is None:
            s = self.settings
            max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            self.probe_set = ProbeSet.build(self.probe_source, self.tokenizer, n_tokens=s.probe_tokens,
                                            window=s.probe_window, n_pairs=s.n_pairs, seed=s.seed,
                                            max_positions=max_positions)
        return self.probe_set

    def _weight_rows(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """The drift's snapshot of ``model``: each monitored layer's weight rows on the host, in their own dtype
        (as a measurement leaves it in ``MonitorState.prev_weights``)."""
        rows = {site.layer: site.weight_rows().detach() for site in find_sites(model, self.settings.layers)}
        return {layer: engine.host_copy(weights, weights.dtype) for layer, weights in rows.items()}

    def _open_writer(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter(log_dir=str(self.logdir))
        except Exception as exc:  # noqa: BLE001 - records still get every number
            warnings.warn(f"negmonitor replay: no TensorBoard writer ({exc}); numbers go to the records only",
                          stacklevel=2)
            return None

    # -- reporting --------------------------------------------------------------------------------------------

    def _run_info(self) -> dict:
        s = self.settings
        return {**self.series.describe(), "probe": _probe_id(self.probe_source), "probe_tokens": s.probe_tokens,
                "probe_window": s.probe_window, "n_pairs": s.n_pairs, "seed": s.seed,
                "layers": list(s.layers) if s.layers is not None else None, "cohort_frac": s.cohort_frac,
                "dtype": str(self.dtype) if self.dtype else None, "ablation": _settings_dict(s.ablation),
                **_token_count(self.series), "run": self.run_name}

    def result(self) -> ReplayResult:
        frame = self.manifest.read(self.revisions)
        path = self.manifest.save_summary(frame)
        return ReplayResult(self.logdir, self.store.root, frame, path, self.store.root / "cohort.json",
                            self.logdir if self.settings.tensorboard else None, list(self.revisions), self.shard,
                            self.processed, self.skipped)


class _NoTokenizer(NegmonitorError):
    """The series' tokenizer did not load (every revision would fail the same way)."""


def _fails_every_load(exc: BaseException) -> bool:
    """Whether a load failed for a reason no other revision escapes: out of memory, or no tokenizer."""
    return isinstance(exc, (torch.OutOfMemoryError, _NoTokenizer)) or "out of memory" in str(exc).lower()


def _settings(settings: ReplaySettings | None, overrides: dict) -> ReplaySettings:
    settings = dataclasses.replace(settings) if settings is not None else ReplaySettings()
    known = {f.name for f in dataclasses.fields(ReplaySettings)}
    for key, value in overrides.items():
        if key not in known:
            raise NegmonitorError(f"unknown replay setting {key!r} — known: {', '.join(sorted(known))}")
        setattr(settings, key, value)
    return settings


def _ablation_function() -> Callable:
    try:
        from negmonitor.monitoring.ablation_rows import ablation_scalar_rows
    except ImportError as exc:
        raise NegmonitorError("ablation during replay needs negmonitor.monitoring.ablation_rows, which this install "
                              "lacks — run without --ablate") from exc
    return ablation_scalar_rows


def _is_explicit(revisions: Any) -> bool:
    return not (isinstance(revisions, str) and (revisions.strip() == "all" or revisions.strip().startswith("log:")))


def _check_probe_path(probe: Any) -> None:
    """A probe given as a local path must exist before any checkpoint loads (a dataset id is checked later)."""
    if isinstance(probe, (str, os.PathLike)):
        text = os.fspath(probe)
        if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.endswith(TEXT_SUFFIXES):
            load_probe_texts(probe)


def _probe_id(probe: Any) -> str:
    """A stable identity of the probe source (strings and probe sets by content hash)."""
    if probe is None:
        return "default"
    if isinstance(probe, ProbeSet):
        return "probeset:" + hashlib.sha256(probe.input_ids.numpy().tobytes()).hexdigest()[:16]
    if isinstance(probe, (list, tuple)):
        return "strings:" + hashlib.sha256("\x00".join(map(str, probe)).encode()).hexdigest()[:16]
    path = Path(os.fspath(probe)).expanduser()
    return str(path.resolve()) if path.exists() else str(probe)


def _progress(indices: list[int], enabled: bool, revisions: list[str], shard: tuple[int, int]):
    """A tqdm bar over this process's checkpoints (with ETA), naming the current revision."""
    if not enabled:
        yield from indices
        return
    from tqdm.auto import tqdm

    desc = "replay" if shard == (1, 1) else f"replay {shard[0]}/{shard[1]}"
    with tqdm(indices, desc=desc, unit="ckpt", dynamic_ncols=True) as bar:
        for index in bar:
            bar.set_postfix_str(revisions[index])
            yield index


def _token_count(series: Series) -> dict:
    """``tokens_per_step`` as it is known (given, Pythia's, or the one ratio the checkpoints' recorded token counts
    agree on; ``None`` when unknown) and where ``tokens_seen`` comes from."""
    given = getattr(series, "tokens_per_step", None) or None
    recorded = {int(step_of(r)): int(t) for r, t in getattr(series, "_tokens", {}).items() if t is not None}
    ratios = {t / s for s, t in recorded.items() if s > 0}
    if given is None and len(ratios) == 1 and float(next(iter(ratios))).is_integer():
        given = int(ratios.pop())  # every checkpoint agrees: tokens seen = step x this
    if recorded:
        source = "recorded in each checkpoint"
    else:
        source = "step x tokens_per_step" if given else "unknown (recorded as 0)"
    return {"tokens_per_step": given, "tokens_seen_from": source}


def _settings_dict(settings: Any) -> dict | None:
    """A settings dataclass as a plain dict (compared key by key on a resume: a setting a later version adds does
    not refuse a folder an earlier one started)."""
    if settings is None:
        return None
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in UNFINGERPRINTED}


def _weights_dtype(model: nn.Module) -> str | None:
    """The dtype of the model's floating-point weights, as ``"float32"`` / ``"bfloat16"`` (``None`` if it has none)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _snapshot_dtype(model: nn.Module, layers: Sequence[int] | None) -> torch.dtype:
    """The dtype of the monitored weights (the drift's snapshot keeps it: exact, and half an fp32 copy for fp16 or
    bf16 checkpoints — 7.5 GB instead of 15 GB on the host for Pythia-12B)."""
    sites = find_sites(model, layers)
    dtype = sites[0].weight_rows().dtype if sites else torch.float32
    return dtype if dtype.is_floating_point else torch.float32
