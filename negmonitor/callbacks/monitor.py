"""Lightning callbacks that measure Wasserstein neurons while a model trains.

:class:`NegativeDifferentiationMonitor` runs one probe pass per scheduled step and logs every family of curves
(WD and cohort, pair signs, weight drift, ablation damage). The single-purpose monitors
(:class:`WassersteinMonitor`, :class:`PairSignMonitor`, :class:`WeightDriftMonitor`, :class:`AblationMonitor`) are
the same machinery with one family switched on. Per-layer summaries go to every logger on the Trainer (media to
those that take them, see :mod:`negmonitor.callbacks.loggers`), and every value to tidy parquet records under
``<log dir>/negmonitor/``.

Example::

    >>> from lightning import Trainer
    >>> from negmonitor.callbacks import NegativeDifferentiationMonitor
    >>> monitor = NegativeDifferentiationMonitor(probe="probe.txt", every_n_steps=500)
    >>> trainer = Trainer(callbacks=[monitor])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from negmonitor.ablation import AblationSettings, check_perplexity_budget
from negmonitor.adapters import find_sites
from negmonitor.budget import DEFAULT_MEMORY_BUDGET, BatchLimit
from negmonitor.callbacks.loggers import logger_sinks, records_log_dir
from negmonitor.callbacks.schedule import Schedule
from negmonitor.distributed import Shard, agree_on_failure
from negmonitor.errors import AblationBypassed, NegmonitorError, UnreadableWeight
from negmonitor.monitoring import engine
from negmonitor.monitoring import tensorboard as tb
from negmonitor.monitoring.engine import MonitorSettings, MonitorState
from negmonitor.probing import ProbeSettings, check_memory_budget, check_one_device
from negmonitor.probeset import ProbeSet
from negmonitor.records import RecordStore, failure_rows

FAMILIES = ("wd", "md", "moments", "jaccard", "health", "cohort", "pairs", "drift", "ablation")
PROBE_PRECISIONS = ("trainer", "fp32")
_PRECISION_NAMES = {torch.float32: "32", torch.float64: "64", torch.bfloat16: "bf16", torch.float16: "16"}
# cosine dissimilarity below which a snapshot's rounding (bias ~3e-6 in bf16, ~5e-8 in fp16) is over ~3% of it
DRIFT_RESOLUTION = {torch.bfloat16: 1e-4, torch.float16: 2e-6}


class NegativeDifferentiationMonitor(Callback):
    """Measure WD, negative-side share, MD, pair signs, weight drift and ablation damage on a schedule.

    Args:
        probe: a :class:`ProbeSet`, a list of strings, a text file or folder, or a dataset id
            (``ID[:CONFIG[:SPLIT]]``). The probe tokens are the same at every measurement.
        every_n_steps: measure every N optimizer steps.
        log_spaced_until: also measure at steps 0, 1, 2, 4, … up to this step (0: off).
        at_end: measure when training ends.
        tokenizer: the tokenizer (default: found as ``.tokenizer`` on the module or the datamodule).
        model_attr: attribute of the LightningModule holding the transformers model (default: found automatically).
        layers: layer indices to monitor (default: all).
        probe_tokens, probe_window, n_pairs, seed, probe_batch_size: probe-set construction and pass settings. The
            windows are the paper's (the text as one stream, consecutive windows of ``probe_window`` tokens, clipped
            to the model), but only the first ``probe_tokens`` (16,384) by default, not the whole split: the probe
            runs inside training at every measurement, and 8 windows of 2,048 tokens cost one extra forward pass
            of a training batch or so, where WikiText-2 test (~280k tokens) would cost 17 of them each time.
            ``probe_tokens=None`` takes the whole text.
        cohort_frac: share of neurons per layer in the top-WD cohort followed for the whole run.
        cohort_step: fix the cohort at the first measurement at or after this step (default: ``warmup_steps``).
        warmup_steps: no cohort is fixed before this step.
        ablation: :class:`~negmonitor.ablation.AblationSettings`, a dict of its fields, ``True`` (defaults) or
            ``None`` (off).
        ablation_every_n_steps: ablation cadence (default: ``every_n_steps``): at the first measurement, the first
            one at or after each multiple of it, and the last one of training.
        minimal_pairs: pairs for the ablation accuracy: a DataFrame (BLiMP- or TSE-shaped), a BLiMP folder of JSONL
            files, a TSE folder of pickles, ``"blimp"`` (the hub's ``nyu-mll/blimp``), ``"datamodule"`` (the
            datamodule's ``minimal_pairs()``, e.g. the built-in grammar's), or a list of these with at most one
            BLiMP-shaped and one TSE-shaped set (scored in the same protocol run).
        minimal_pairs_sample: pairs per sub-dataset / construction when loading ``minimal_pairs`` (seeded).
        ppl_text: text for the ablation perplexity: a string, a list of strings, a text file, a dataset id
            (``ID[:CONFIG[:SPLIT]]``) or ``None`` (the datamodule's held-out texts when it has them).
        media_every_n_steps: cadence of histograms, images and top-pair text (default: 5 × ``every_n_steps``): at the
            first measurement, the first one at or after each multiple of it, and the last one.
        log_dir: where records go (default: the first logger's ``log_dir``, else its ``save_dir/name/version``,
            else ``default_root_dir/lightning_logs/version_N``: a folder unique to the run).
        run_name: the ``run`` column of the records (default: the log folder's name, e.g. ``version_0`` or the
            W&B / MLflow run id).
        tokens_per_step: tokens per optimizer step (default: counted from the batches' ``input_ids`` shapes).
        strict: re-raise a failure inside a measurement instead of warning (once) and recording it.
        families: which curve families to log (default: all).
        memory_budget: extra memory one measurement may allocate on the model's device: bytes or a size such as
            ``"2GiB"`` (default 2 GiB; ``None``: no limit). Layers are measured in groups that fit, one partial pass
            over the probe set per group; the grouping is logged once. It bounds the ablation's perplexity forwards
            too, unless ``ablation`` sets a ``memory_budget`` of its own (a dict naming one, even the default; an
            ``AblationSettings`` with another value than the default).
        probe_precision: ``"trainer"`` (default) runs the probe forward inside the trainer's precision context, as
            training runs (autocast under ``"bf16-mixed"``); ``"fp32"`` forces full precision, which weights held
            in bf16 or fp16 (``"bf16-true"``) cannot give: the forward then runs in the weights' dtype, with one
            warning. The statistics accumulate in fp32 either way; ``run-<key>.json`` records what the forward ran
            in (``probe_precision``: ``"bf16-mixed"``, ``"32-true"``, ``"bf16-true"``, ...).
        drift_dtype: dtype of the previous-weights snapshot for weight drift, kept in host memory between
            measurements (``"bf16"``, default; ``"fp32"`` for drift between measurements only a few warm-up steps
            apart); the drift is computed one layer at a time on the model's device. It is saved beside the
            records when a checkpoint is saved, never inside the checkpoint.
        drift_snapshots_kept: how many of those saved snapshots to keep, newest first (default 2; ``None`` keeps
            all). A checkpoint whose snapshot was removed resumes without drift at its first measurement, so keep
            as many as the checkpoints you may resume from (``ModelCheckpoint(save_top_k=-1)``: ``None``). Each is
            as large as the monitored weights in ``drift_dtype``: ~0.8 GB for Pythia-1.4B, 7.5 GB for Pythia-12B
            in bf16.

    Raises:
        NegmonitorError: a setting is out of range (raised at construction).
    """

    def __init__(
        self,
        probe: Any = None,
        every_n_steps: int = 500,
        log_spaced_until: int = 0,
        at_end: bool = True,
        tokenizer: Any = None,
        model_attr: str | None = None,
        layers: Sequence[int] | None = None,
        probe_tokens: int | None = 16_384,
        probe_window: int = 2_048,
        n_pairs: int = 1_000,
        seed: int = 0,
        probe_batch_size: int = 8,
        cohort_frac: float = 0.05,
        cohort_step: int | None = None,
        warmup_steps: int = 0,
        ablation: AblationSettings | dict | bool | None = None,
        ablation_every_n_steps: int | None = None,
        minimal_pairs: Any = None,
        minimal_pairs_sample: int = 40,
        ppl_text: Any = None,
        media_every_n_steps: int | None = None,
        log_dir: str | os.PathLike | None = None,
        run_name: str | None = None,
        tokens_per_step: int | None = None,
        strict: bool = False,
        families: Sequence[str] | None = None,
        memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET,
        probe_precision: str = "trainer",
        drift_dtype: str | torch.dtype = "bf16",
        drift_snapshots_kept: int | None = 2,
    ) -> None:
        super().__init__()
        if not 0.0 < cohort_frac <= 1.0:
            raise NegmonitorError(f"cohort_frac must be in (0, 1], got {cohort_frac} — e.g. 0.05 for the top 5%")
        if probe_precision not in PROBE_PRECISIONS:
            raise NegmonitorError(f"probe_precision must be one of {', '.join(PROBE_PRECISIONS)}, got "
                                  f"{probe_precision!r}")
        if drift_snapshots_kept is not None and (isinstance(drift_snapshots_kept, bool)
                                                 or not isinstance(drift_snapshots_kept, int) or drift_snapshots_kept < 1):
            raise NegmonitorError(f"drift_snapshots_kept must be a positive integer or None (keep all), got "
                                  f"{drift_snapshots_kept!r}")
        unknown = set(families or ()) - set(FAMILIES)
        if unknown:
            raise NegmonitorError(f"unknown families {sorted(unknown)} — choose from {', '.join(FAMILIES)}")
        self.schedule = Schedule(every_n_steps, log_spaced_until, at_start=True, at_end=at_end)
        self.probe_source = probe
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.probe_kwargs = dict(n_tokens=probe_tokens, window=probe_window, n_pairs=n_pairs, seed=seed)
        self.families = tuple(families or FAMILIES)
        self.settings = MonitorSettings(
            layers=layers, cohort_frac=cohort_frac, cohort_step=cohort_step, warmup_steps=warmup_steps,
            weight_drift="drift" in self.families, drift_dtype=_snapshot_dtype(drift_dtype),
            probe=ProbeSettings(batch_size=probe_batch_size, top_neuron_frac=0.05, top_pairs=100,
                                memory_budget=memory_budget),
        )
        self.ablation = None
        if ablation is not None and ablation is not False and "ablation" in self.families:
            from negmonitor.monitoring.ablation_rows import as_settings

            # One budget for the whole measurement: it also bounds the ablation's perplexity batches, unless the
            # ablation settings give their own (a dict naming one, even the default; settings with another value).
            self.ablation = as_settings(ablation)
            own_budget = ("memory_budget" in ablation if isinstance(ablation, dict)
                          else self.ablation.memory_budget != DEFAULT_MEMORY_BUDGET)
            if not own_budget:
                self.ablation = replace(self.ablation, memory_budget=memory_budget)
        self.ablation_every = ablation_every_n_steps or every_n_steps
        self.minimal_pairs = minimal_pairs
        self.minimal_pairs_sample = minimal_pairs_sample
        self.ppl_text = ppl_text
        self.media_every = media_every_n_steps if media_every_n_steps is not None else 5 * every_n_steps
        self.log_dir = log_dir
        self.run_name = run_name
        self._given = dict(run_name=run_name, tokenizer=tokenizer, minimal_pairs=minimal_pairs,  # as passed
                           ppl_text=ppl_text, ablation=self.ablation)
        self._off = False  # fast_dev_run: nothing measured or written
        self.tokens_per_step = tokens_per_step
        self.strict = strict
        self.probe_precision = probe_precision
        self.precision_used: str | None = None
        self.drift_snapshots_kept = drift_snapshots_kept
        self.state = MonitorState()
        self._batch_limit = BatchLimit()  # lowered by an out-of-memory retry, for the later measurements
        self._evaluation_batch_limits: dict[str, BatchLimit] = {}  # the same for the ablation's evaluations
        self.failures = 0
        self._snapshot_to_read: int | None = None
        self._snapshot_saved: int | None = None
        self._snapshot_file: Path | None = None  # where the snapshot of step _snapshot_saved (or _to_read) is
        self._drift_warned = False  # drift below the snapshot dtype's resolution: said once
        self._frozen_warned = False  # no monitored weight moved: said once
        self._zero_drifts = 0  # consecutive measurements where no monitored weight moved
        self._tokens_warned = False
        self._writes_warned: set[str] = set()  # kinds of side write (snapshot, failure row, ...) already warned about
        self.measured_steps: list[int] = []
        self.tokens_seen = 0
        self.timings: dict[str, float] = {}
        self._probe_set: ProbeSet | None = None
        self._store: RecordStore | None = None
        self._sinks: list[Any] = []  # where the curves go (rank zero only): one per logger, or a writer
        self._hf_model: torch.nn.Module | None = None
        self._last: _LastMeasurement | None = None
        self._check_overwrite = True  # a fresh run's folder holding another run's records is said once

    # -- Lightning hooks --------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.schedule.every_n_steps, families=self.families,
                                        layers=self.settings.layers, cohort_frac=self.settings.cohort_frac,
                                        seed=self.probe_kwargs["seed"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the record folder and decide, once, what each logger gets (scalars; media where it can)."""
        if stage != "fit":
            return
        self._off = bool(getattr(trainer, "fast_dev_run", False))
        if self._off:  # a smoke test of the user's run: no full measurement, ablation or records folder
            rank_zero_warn("negmonitor: fast_dev_run — the monitor measures nothing and writes nothing in this run")
            return
        check_strategy(trainer.strategy)
        if trainer.global_step == 0:  # a new run (a resumed one's state is restored after this hook)
            self._reset_run()
        if not trainer.is_global_zero:
            with agree_on_failure(phase="set-up"):  # rank 0's folder check below: a failure ends every rank
                self._open(Path(self.log_dir or trainer.default_root_dir), [], is_global_zero=False)
            return
        with agree_on_failure(phase="set-up"):
            root = Path(self.log_dir) if self.log_dir else records_log_dir(trainer.loggers, trainer.default_root_dir)
            sinks, scalars_only = logger_sinks(trainer.loggers)
            self._open(root, sinks, is_global_zero=True)
        if not trainer.loggers:
            rank_zero_warn(f"negmonitor: no logger on this Trainer; curves go to the parquet records under "
                           f"{self._store.root} only")
        elif scalars_only:
            rank_zero_warn(f"negmonitor: {', '.join(scalars_only)} takes scalars only; the WD histograms, top-neuron "
                           "images and top-pair tables go to TensorBoard / W&B loggers (all numbers are in the "
                           f"records under {self._store.root})")

    def _reset_run(self) -> None:
        """Forget a previous run's measurements (the callback reused with a new Trainer: notebooks, sweeps, two
        stages): steps measured, cohort, weight snapshot, tokens, failures and warnings start afresh."""
        self.state = MonitorState()
        self.measured_steps, self.tokens_seen, self.failures, self.timings = [], 0, 0, {}
        # what the last run resolved (its name, tokenizer, datamodule's texts) gives way to what was passed
        self.run_name, self.tokenizer, self.minimal_pairs, self.ppl_text, self.ablation = (
            self._given[k] for k in ("run_name", "tokenizer", "minimal_pairs", "ppl_text", "ablation"))
        self.settings = replace(self.settings, weight_drift="drift" in self.families)
        self._batch_limit, self._evaluation_batch_limits = BatchLimit(), {}
        self._snapshot_to_read = self._snapshot_saved = self._snapshot_file = None
        self._drift_warned = self._frozen_warned = self._tokens_warned = False
        self._zero_drifts = 0
        self._writes_warned = set()
        self._last = None
        self._check_overwrite = True

    def _open(self, root: Path, sinks: list[Any], is_global_zero: bool, run_name: str | None = None) -> None:
        """Trainer-agnostic set-up (also the HF callback's): the records under ``root/negmonitor``, the sinks; the
        run's name is the one given, else ``run_name``, else the folder's."""
        self._store = RecordStore.for_logdir(root)
        self.run_name = self._given["run_name"] or run_name or root.resolve().name
        self._sinks = sinks
        if is_global_zero:
            from negmonitor.atomic import ensure_writable_dir

            ensure_writable_dir(self._store.root, "negmonitor record folder")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the transformers model and tokenizer (built by now) and build the fixed probe set."""
        if self._off:
            return
        self.tokenizer = self.tokenizer or _find_tokenizer(pl_module, trainer)
        if self.tokenizer is None:
            raise NegmonitorError("no tokenizer found on the LightningModule or datamodule (.tokenizer) — pass "
                                  "NegativeDifferentiationMonitor(tokenizer=...)")
        # Each rank prepares alone (a probe file or hub cache only one node has): a failure ends every rank's run
        # together, instead of leaving the others waiting in training's first collective.
        with agree_on_failure(phase="set-up"):
            self._hf_model = find_hf_model(pl_module, self.model_attr)
            self.precision_used = self._precision_in_use(trainer)
            self._prepare(self._hf_model, getattr(trainer, "datamodule", None), trainer.is_global_zero)
            self._check_budget(trainer)
            if trainer.is_global_zero:
                self._write_run_info()  # last: a run refused at set-up leaves no run.json for the report to find

    def _precision_in_use(self, trainer: Trainer) -> str:
        """What the probe forward computes in, named as Lightning names precisions: the autocast dtype inside its
        context (``"bf16-mixed"``), else the weights' (``"32-true"``, ``"bf16-true"``). Warns (once, rank zero)
        when ``probe_precision="fp32"`` cannot be honoured because the weights themselves are half precision."""
        param = next(self._hf_model.parameters())
        with self._forward_context(trainer)():
            autocast = param.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(param.device.type)
            dtype = torch.get_autocast_dtype(param.device.type) if autocast else param.dtype
        name = f"{_PRECISION_NAMES.get(dtype, str(dtype).removeprefix('torch.'))}-{'mixed' if autocast else 'true'}"
        if self.probe_precision == "fp32" and dtype not in (torch.float32, torch.float64):
            configured = getattr(trainer, "precision", None)  # the HF callback's stand-in has none
            rank_zero_warn(f"negmonitor: probe_precision='fp32' cannot be honoured: the model's weights are {dtype}"
                           f"{f' (trainer precision {configured!r})' if configured else ''}, so the probe forward "
                           f"runs in {dtype}; run.json records probe_precision={name!r}")
        return name

    def _check_budget(self, trainer: Trainer) -> None:
        """Refuse a memory budget too small for one layer (or, with ablation, one perplexity window) now, before
        training starts, not at every measurement."""
        with self._forward_context(trainer)():  # as the measurement and the ablation run: autocast's logits
            if self.ablation is not None and self.ppl_text is not None:
                check_perplexity_budget(self._hf_model, self.tokenizer, self.ablation)
            check_memory_budget(self._hf_model, self._probe_set, self.settings.layers, self.settings.probe,
                                trainer.world_size)

    def _prepare(self, hf_model: torch.nn.Module, datamodule: Any, is_global_zero: bool) -> None:
        """Trainer-agnostic (also the HF callback's): resolve the ablation data, build the probe set."""
        self._hf_model = hf_model
        source = self.probe_source
        if source is None and hasattr(datamodule, "probe_texts"):
            source = datamodule.probe_texts()
        if self.ablation is not None:
            self.minimal_pairs = resolve_minimal_pairs(self.minimal_pairs, datamodule, self.minimal_pairs_sample,
                                                       self.ablation.npi_pairs)
            self.ppl_text = resolve_ppl_text(self.ppl_text, datamodule)
            if is_global_zero:
                _warn_what_ablation_leaves_out(self.minimal_pairs, self.ppl_text)
        check_one_device(hf_model)  # refused now, not failed at every measurement
        if self.settings.weight_drift:  # a site whose weight it cannot read: drift is left out, said once
            try:
                for site in find_sites(hf_model, self.settings.layers):
                    site.check_weight_readable()
            except UnreadableWeight as exc:
                self.settings = replace(self.settings, weight_drift=False)
                if is_global_zero:
                    rank_zero_warn(f"negmonitor: weight drift is left out of this run: {exc.reason} (the other "
                                   "curves run)")
        max_positions = getattr(self._hf_model.config, "max_position_embeddings", None)
        self._probe_set = ProbeSet.build(source, self.tokenizer, max_positions=max_positions, **self.probe_kwargs)

    def _write_run_info(self) -> None:
        """``run.json`` beside the records: what was monitored and how (read by the report)."""
        from negmonitor.adapters import model_family
        from negmonitor.atomic import write_json_atomic

        info = {"run": self.run_name, "monitor": type(self).__name__, "family": model_family(self._hf_model),
                "model_type": getattr(self._hf_model.config, "model_type", None),
                "probe_source": self._probe_set.source, "probe_tokens": self._probe_set.n_tokens,
                "probe_window": self._probe_set.window, "n_pairs": self._probe_set.n_pairs,
                "cohort_frac": self.settings.cohort_frac, "cohort_step": self.settings.cohort_step,
                "warmup_steps": self.settings.warmup_steps, "every_n_steps": self.schedule.every_n_steps,
                "families": list(self.families), "record_key": self.record_key,
                "probe_precision": self.precision_used, "drift_dtype": str(self.settings.drift_dtype),
                # fp32 matmuls run in TF32 under "high" (TrainingArguments(tf32=True), torch_compile with bf16)
                "float32_matmul_precision": torch.get_float32_matmul_precision()}
        write_json_atomic(info, self._store.root / f"run-{self.record_key}.json")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure the starting point (step 0) when scheduled."""
        if self._off:
            return
        step = trainer.global_step
        if self.schedule.due(step) and step not in self.measured_steps:
            self._measure(trainer, step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count tokens (from shapes only) and measure when the step is scheduled."""
        if self._off:
            return
        self._count_tokens(batch, trainer)
        step = trainer.global_step
        final = 0 < trainer.max_steps <= step
        if (self.schedule.due(step) or (final and self.schedule.at_end)) and step not in self.measured_steps:
            self._measure(trainer, step, final=final)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Final measurement (see :meth:`_end_of_training`)."""
        if not self._off:
            self._end_of_training(trainer, trainer.global_step)

    def _end_of_training(self, trainer: Any, step: int) -> None:
        """Trainer-agnostic (also the HF callback's): the final measurement at the last step. A run whose end was
        not known at its last step (``max_epochs``, early stopping, ``max_time``) measured that step, if scheduled,
        as an ordinary one: what a final measurement adds — the ablation when it was not due, the media — is added
        now from that measurement, with the same weights (no second probe pass, no drift against itself). A failure
        there is warned about (the measurement itself is recorded); ``strict`` re-raises."""
        last, self._last = self._last, None  # not kept past training
        if not self.schedule.at_end:
            return
        if step not in self.measured_steps:
            self._measure(trainer, step, final=True)
            self._last = None
            return
        if last is None or last.step != step or last.final:
            return
        try:
            extra = pd.DataFrame(columns=last.scalars.columns)
            if self.ablation is not None and not last.ablated:
                with _strategy_context(trainer, self._hf_model):
                    rows = self._ablation_rows_or_none(last.measurement, trainer)
                extra = rows if rows is not None else extra
            if not trainer.is_global_zero:
                return
            extra = extra[extra.metric.map(_family).isin(self.families)]
            self._write_records(last.measurement, pd.concat([last.scalars, extra], ignore_index=True), step)
            self._log(last.measurement, extra, step, media=not last.media)
        except Exception as exc:  # the end of a long training run: reported, never raised
            if self.strict:
                raise
            from negmonitor.distributed import PeerFailure

            if not isinstance(exc, PeerFailure) or trainer.is_global_zero:
                warnings.warn(f"negmonitor: the final additions (ablation, media) to step {step}'s measurement "
                              f"failed ({type(exc).__name__}: {exc}); its recorded measurement stands", stacklevel=2)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Say so when a resumed fit's checkpoint holds a state of this monitor's class under other settings, none
        under these: Lightning keys a callback's state by its settings, so it drops that state with a generic note
        and the monitor starts afresh. (Another monitor of the class on this Trainer keeps its own key.)"""
        if self._off or getattr(getattr(trainer, "state", None), "fn", None) != "fit":
            return
        saved = [key for key in (checkpoint.get("callbacks") or {}) if isinstance(key, str)]
        name = type(self).__qualname__
        here = {getattr(callback, "state_key", None) for callback in trainer.callbacks}
        others = [key for key in saved if key.startswith(name + "{") and key not in here]
        if others and self.state_key not in saved:
            rank_zero_warn(f"negmonitor: the checkpoint holds a {name} state saved with other settings "
                           f"({others[0][len(name):]}); with these ({self.state_key[len(name):]}) the monitor starts "
                           "afresh — a new cohort at its next measurement, its token count restarted, no drift until "
                           "the one after; resume with the same settings to continue its records")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the weight snapshot this checkpoint's state refers to beside the records (once per snapshot)."""
        if not self._off:
            self._save_snapshot(trainer.is_global_zero)

    def _save_snapshot(self, is_global_zero: bool) -> None:
        """Trainer-agnostic (also the HF callback's): write the weight snapshot the state refers to, once."""
        if is_global_zero and self.state.prev_weights and self._store is not None:
            from negmonitor.monitoring.drift_snapshot import prune_snapshots, write_snapshot

            if self._snapshot_saved != self.state.prev_step:
                path = self._snapshot_target()
                try:  # a full disk must not end the training run (nor its checkpoint)
                    write_snapshot(path, self.state.prev_weights, self.state.prev_step)
                    self._snapshot_saved, self._snapshot_file = self.state.prev_step, path
                    if self.drift_snapshots_kept is not None:
                        prune_snapshots(self._store.root, self.record_key, keep=self.drift_snapshots_kept)
                except Exception as exc:
                    written = self._snapshot_saved == self.state.prev_step  # the pruning failed
                    what = "remove the older weight snapshots beside" if written else "write"
                    self._write_failed(exc, "snapshot", f"negmonitor: could not {what} the weight snapshot of step "
                                       f"{self.state.prev_step} at {path} ({type(exc).__name__}: {exc}); training "
                                       "goes on, but a run resumed from a checkpoint without its snapshot measures "
                                       "no drift at its first measurement (no further warning)")

    def _write_failed(self, exc: Exception, kind: str, message: str) -> None:
        """A write beside training failed (a full disk): ``strict`` re-raises; else ``message`` is warned at the first
        failure of this ``kind`` only, and training goes on."""
        if self.strict:
            raise exc
        if kind not in self._writes_warned:
            self._writes_warned.add(kind)
            warnings.warn(message, stacklevel=3)

    def _snapshot_target(self) -> Path:
        """Absolute path the snapshot of ``state.prev_step`` is written to, in this run's records folder."""
        from negmonitor.monitoring.drift_snapshot import snapshot_path

        return snapshot_path(self._store.root, self.record_key, self.state.prev_step).resolve()

    def _snapshot_location(self) -> str | None:
        """Where the snapshot the state refers to is, for ``state_dict``: the file written or read back, else the one
        this checkpoint's ``on_save_checkpoint`` (called after ``state_dict``) writes."""
        step = self.state.prev_step
        if step is None or self._store is None or not self.settings.weight_drift:
            return None
        if self._snapshot_file is not None and step in (self._snapshot_saved, self._snapshot_to_read):
            return str(self._snapshot_file)
        return str(self._snapshot_target())

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.to_dict(), "measured_steps": list(self.measured_steps),
                "tokens_seen": self.tokens_seen, "snapshot_file": self._snapshot_location(),
                "records_root": str(self._store.root.resolve()) if self._store is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = MonitorState.from_dict(state_dict.get("state", {}))
        self._snapshot_to_read = self.state.prev_step if self.state.prev_weights is None else None
        saved = state_dict.get("snapshot_file")
        self._snapshot_file = Path(saved) if saved else None
        self._snapshot_saved = None
        self.measured_steps = list(state_dict.get("measured_steps", []))
        self.tokens_seen = int(state_dict.get("tokens_seen", 0))
        self._say_where_the_run_began(state_dict.get("records_root"))

    def _say_where_the_run_began(self, saved_root: str | None) -> None:
        """A resumed run whose logger opened a new folder (``TensorBoardLogger(version=None)``, a requeued job) writes
        its records there: said once, with how to keep one folder (continuing in the old one silently could write
        over another run's records: a run branched from a checkpoint looks the same)."""
        if not saved_root or self._store is None or Path(saved_root) == self._store.root.resolve():
            return
        rank_zero_warn(f"negmonitor: this resumed run's records go to {self._store.root}; it began in {saved_root} "
                       "(the report reads each folder as a run) — to keep one folder, resume with log_dir= that "
                       "folder's parent, or give the logger a fixed version")

    @property
    def record_key(self) -> str:
        """Suffix of this instance's record files, so two monitors in one Trainer never overwrite each other."""
        import hashlib

        return hashlib.sha1(self.state_key.encode()).hexdigest()[:8]

    # -- measurement ------------------------------------------------------------------------------------------

    def _count_tokens(self, batch: Any, trainer: Trainer) -> None:
        if self.tokens_per_step:
            self.tokens_seen = trainer.global_step * self.tokens_per_step
            return
        # a Mapping: transformers' collators return a BatchEncoding (a UserDict, not a dict)
        ids = (batch.get("input_ids") if isinstance(batch, Mapping) else batch[0] if isinstance(batch, (list, tuple))
               else batch)
        if isinstance(ids, torch.Tensor):
            self.tokens_seen += int(ids.numel()) * trainer.world_size  # shape only: no device sync
        elif not self._tokens_warned:
            self._tokens_warned = True
            rank_zero_warn(f"negmonitor: cannot count the tokens of a {type(batch).__name__} batch (no input_ids "
                           "tensor in it); tokens_seen stays 0 — pass tokens_per_step=")

    def _measure(self, trainer: Trainer, step: int, final: bool = False) -> None:
        """One measurement; any failure (out of memory included, on any rank) is warned once, recorded as
        ``health/measurement_failed`` and skipped by every rank together; training goes on (``strict`` re-raises).

        Trainer-agnostic: of ``trainer`` only global_rank, world_size and is_global_zero are needed (the HF callback
        passes a stand-in with those three; strategy and precision plug-in are used where present)."""
        try:
            if trainer.is_global_zero:
                self._read_snapshot()
                if not self.measured_steps and step == 0 and self._check_overwrite:
                    self._say_if_overwriting()
            self._measure_unguarded(trainer, step, final)
        except Exception as exc:  # a failed measurement must not end a long training run
            if self.strict:
                raise
            self._record_failure(trainer, step, exc)
        finally:
            if step not in self.measured_steps:
                self.measured_steps.append(step)

    def _say_if_overwriting(self) -> None:
        """Before a fresh run's first measurement (step 0): warn once if its records folder already holds this
        monitor's records from another run (a fixed ``log_dir``, logger version or ``output_dir``), which this run
        would overwrite step by step and the report read as one run. Advice only: never raises (rank 0 alone runs
        it, before the measurement's collectives)."""
        try:
            if self._store is None:
                return
            earlier = sorted((self._store.root / "scalars").glob(f"step-*-{self.record_key}.parquet"))
            if earlier:
                rank_zero_warn(f"negmonitor: {self._store.root} already holds this monitor's records of "
                               f"{len(earlier)} step(s) from another run; this run writes over them step by step "
                               "(the report would read the two as one run) — give this run its own folder (a new "
                               "logger version, output_dir, or log_dir=)")
        except Exception:  # noqa: BLE001 - a listing that fails costs the advice, never the measurement
            pass

    def _record_failure(self, trainer: Trainer, step: int, exc: Exception) -> None:
        """Warn at the first failure only (each rank about its own; rank 0 also about another rank's), then write
        the ``health/measurement_failed`` row."""
        from negmonitor.distributed import PeerFailure

        self.failures += 1
        peer = isinstance(exc, PeerFailure)
        if self.failures == 1 and (not peer or trainer.is_global_zero):
            where = f" on rank {trainer.global_rank}" if trainer.world_size > 1 and not peer else ""
            warnings.warn(f"negmonitor: measurement at step {step} failed{where} ({type(exc).__name__}: {exc}); "
                          "training goes on; this and any later failure is recorded as 'health/measurement_failed' "
                          "(no further warning)", stacklevel=2)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # what the failed pass held goes back to the training run
        if trainer.is_global_zero and self._store is not None:
            self._write_failure_row(step)
        if trainer.is_global_zero:
            self._log_failure(step)

    def _log_failure(self, step: int) -> None:
        """The ``health/measurement_failed`` curve to every sink (a point at 1 per failed step), so a failure shows
        in the dashboard the other curves are read in; a sink that fails here is left alone (never raises)."""
        metrics = tb.scalar_metrics(failure_rows())
        for sink in self._sinks:
            try:
                sink.log_scalars(metrics, step)
                sink.flush()
            except Exception:  # noqa: BLE001 - the failure is warned about and in the records already
                pass

    def _write_failure_row(self, step: int) -> None:
        """The ``health/measurement_failed`` row; a records folder that cannot take it (a full disk) is warned about
        once and training goes on (``strict`` re-raises)."""
        rows = failure_rows()
        try:
            self._store.write_scalars(self.run_name, step, self.tokens_seen, rows, key=f"{self.record_key}-failed")
        except Exception as exc:
            self._write_failed(exc, "failure row", f"negmonitor: could not record the failed measurement of step "
                               f"{step} under {self._store.root} ({type(exc).__name__}: {exc}); training goes on, the "
                               "records miss this and any later such row (no further warning)")

    def _read_snapshot(self) -> None:
        """After a resume, read the weight snapshot the checkpoint refers to into host memory: from where the
        checkpoint's state says it was saved, else from this run's records folder (moved with the run).

        Never raises: it runs on rank 0 only, before the measurement's collectives."""
        step, self._snapshot_to_read = self._snapshot_to_read, None
        if step is None or not self.settings.weight_drift or self._store is None:
            return
        from negmonitor.monitoring.drift_snapshot import read_snapshot, snapshot_path

        here = snapshot_path(self._store.root, self.record_key, step).resolve()
        candidates = list(dict.fromkeys(p for p in (self._snapshot_file, here) if p is not None))
        path = next((p for p in candidates if p.is_file()), candidates[0])
        try:
            self.state.prev_weights = read_snapshot(path, "cpu")
            self._snapshot_saved, self._snapshot_file = step, path
        except Exception as exc:  # noqa: BLE001 - a missing snapshot costs one drift value, never the run
            why = "is missing" if not path.is_file() else f"cannot be read ({type(exc).__name__}: {exc})"
            warnings.warn(f"negmonitor: the weight snapshot of step {step} at {path} {why}; weight drift restarts at "
                          "this measurement (its drift rows are missing once)", stacklevel=2)
            self.state.prev_weights, self.state.prev_step, self._snapshot_file = None, None, None

    def _measure_unguarded(self, trainer: Trainer, step: int, final: bool = False) -> None:
        self.timings = {}  # this measurement's phases only
        with _strategy_context(trainer, self._hf_model):
            start = time.perf_counter()
            measurement = engine.take_measurement(self._hf_model, self._probe_set, step, self.settings, self.state,
                                                  tokenizer=self.tokenizer, rank=trainer.global_rank,
                                                  world_size=trainer.world_size,
                                                  forward_context=self._forward_context(trainer),
                                                  batch_limit=self._batch_limit)
            self.timings["probe"] = time.perf_counter() - start
            scalars = measurement.scalars
            ablated = self.ablation is not None and (final or self._due(step, max(1, self.ablation_every)))
            if ablated:
                # every rank evaluates its share (DDP, FSDP): no rank waits for another
                start = time.perf_counter()
                rows = self._ablation_rows_or_none(measurement, trainer)
                ablated = rows is not None
                if ablated:
                    scalars = pd.concat([scalars, rows], ignore_index=True)
                self.timings["ablation"] = time.perf_counter() - start
        media = final or self._due(step, self.media_every)
        # kept (every rank) until the next measurement: a run that turns out to have ended here is finished from it
        self._last = _LastMeasurement(step, measurement, scalars[scalars.metric.map(_family).isin(self.families)],
                                      final, ablated, media)
        if not trainer.is_global_zero:
            return  # every rank has the same numbers; rank 0 writes them
        self._check_drift_resolution(measurement.neurons, step)
        start = time.perf_counter()
        self._write_records(measurement, self._last.scalars, step)
        self._log(measurement, self._last.scalars, step, media=media)
        self.timings["logging"] = time.perf_counter() - start

    def _write_records(self, measurement: engine.Measurement, scalars: pd.DataFrame, step: int) -> None:
        """One step's records (atomic parquet): ``scalars`` as given, the neuron table, the top pairs (built only
        when recorded) and the histograms (the top neurons' real distributions, for the report's Fig. 1c/6b)."""
        pairs = measurement.result.top_pairs if "pairs" in self.families else None
        self._store.write_measurement(self.run_name, step, self.tokens_seen, scalars, measurement.neurons, pairs,
                                      measurement.histograms, key=self.record_key)

    def _log(self, measurement: engine.Measurement, scalars: pd.DataFrame, step: int, media: bool) -> None:
        """Curves to every sink, media to those that take them; a sink that fails is warned about, not fatal."""
        metrics = tb.scalar_metrics(scalars)
        for sink in self._sinks:
            try:
                sink.log_scalars(metrics, step)
                if media and sink.media:
                    sink.log_media(measurement, step, pairs="pairs" in self.families)
                sink.flush()
            except Exception as exc:  # a logger's failure must not cost the records or end the run
                if self.strict:
                    raise
                rank_zero_warn(f"negmonitor: logging step {step} to {sink.name} failed ({type(exc).__name__}: "
                               f"{exc}); the records have every number")

    def _check_drift_resolution(self, neurons: pd.DataFrame, step: int) -> None:
        """Warn once when no monitored weight moved over two measurements in a row (frozen: LoRA on other modules, a
        zero learning rate; one such measurement may be a warm-up from 0 or a step the grad scaler skipped), and
        once when drift is too small for a bf16/fp16 snapshot to resolve (measurements close together)."""
        if "drift_cos_dissim" not in neurons or neurons.drift_cos_dissim.isna().all():
            return
        frozen = float(neurons.drift_cos_dissim.abs().max()) == 0.0
        self._zero_drifts = self._zero_drifts + 1 if frozen else 0
        if frozen:
            if self._zero_drifts >= 2 and not self._frozen_warned:
                self._frozen_warned = True
                below = ("" if self.settings.drift_dtype == torch.float32 else f", or their changes are below what a "
                         f"{self.settings.drift_dtype} snapshot resolves (drift_dtype='fp32' tells the two apart)")
                rank_zero_warn(f"negmonitor: no monitored MLP weight changed over the last two measurements (step "
                               f"{step}): they are frozen (LoRA on other modules, a zero learning rate){below}; the "
                               "drift curves stay at 0")
            return
        if self._drift_warned or self.settings.drift_dtype == torch.float32:
            return
        median = float(neurons.drift_cos_dissim.median())
        if median < DRIFT_RESOLUTION[self.settings.drift_dtype]:
            self._drift_warned = True
            rank_zero_warn(f"negmonitor: weight drift at step {step} (median cosine dissimilarity {median:.1e}) is "
                           f"below what a {self.settings.drift_dtype} snapshot resolves well — pass drift_dtype='fp32' "
                           "for measurements this close together")

    def _forward_context(self, trainer: Trainer) -> Any:
        """The probe forward's context: the trainer's precision (autocast under mixed precision) or plain fp32."""
        if self.probe_precision == "fp32":
            device_type = next(self._hf_model.parameters()).device.type
            return lambda: torch.autocast(device_type, enabled=False)
        plugin = getattr(trainer, "precision_plugin", None)
        if plugin is not None:
            return plugin.forward_context
        return getattr(trainer, "forward_context", contextlib.nullcontext)  # the HF callback's: its training autocast

    def _due(self, step: int, every: int) -> bool:
        """First measurement, or the first one at or after a multiple of ``every`` (``media_every_n_steps: 250``
        with measurements every 100 steps: 0, 300, 500, 800, ... rather than only the common multiples)."""
        previous = max((s for s in self.measured_steps if s < step), default=None)
        if previous is None:
            return True
        return every > 0 and step // every > previous // every

    def _ablation_rows_or_none(self, measurement: engine.Measurement, trainer: Any) -> pd.DataFrame | None:
        """This rank's share of the ablation rows, evaluated in the probe forward's precision context (bf16-mixed:
        autocast; not fp32 at twice the activations); ``None``, and no ablation for the rest of the run (said once),
        when the model's MLP never calls the activation module an ablation replaces (a fused kernel): every rank
        runs the same model, so every rank finds it at the same evaluation."""
        try:
            with self._forward_context(trainer)():  # the precision the neurons were ranked in, as training runs
                return self._ablation_rows(measurement, Shard(trainer.global_rank, trainer.world_size))
        except AblationBypassed as exc:
            self.ablation = None
            rank_zero_warn(f"negmonitor: ablation is left out of this run: {exc} (the other curves run)")
            return None

    def _ablation_rows(self, measurement: engine.Measurement, shard: Shard | None = None) -> pd.DataFrame:
        from negmonitor.monitoring.ablation_rows import ablation_scalar_rows

        return ablation_scalar_rows(self._hf_model, self.tokenizer, measurement.result, self.ablation,
                                    self.minimal_pairs, self.ppl_text, shard=shard,
                                    batch_limits=self._evaluation_batch_limits)


class WassersteinMonitor(NegativeDifferentiationMonitor):
    """WD, its negative-side share, MD and moments per layer, and the top-WD cohort (one probe pass)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("families", ("wd", "md", "moments", "jaccard", "health", "cohort"))
        super().__init__(*args, **kwargs)


class PairSignMonitor(NegativeDifferentiationMonitor):
    """NN / PN / PP shares among the top pairs of the top-MD neurons, and top-pair tables."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("families", ("pairs", "md", "health"))
        super().__init__(*args, **kwargs)


class WeightDriftMonitor(NegativeDifferentiationMonitor):
    """Weight drift (cosine dissimilarity between successive snapshots, layer-normalised) of the cohort vs the rest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("families", ("drift", "cohort", "health"))
        super().__init__(*args, **kwargs)


class AblationMonitor(NegativeDifferentiationMonitor):
    """Damage of sign-specific ablation (Wasserstein vs random vs perplexity-matched) over training."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("families", ("ablation", "health"))
        if kwargs.get("ablation") is None:
            kwargs["ablation"] = AblationSettings()
        super().__init__(*args, **kwargs)


def resolve_minimal_pairs(spec: Any, datamodule: Any = None, sample: int | None = 40,
                          npi_pairs: str = "both") -> pd.DataFrame | list[pd.DataFrame] | None:
    """Minimal pairs from a DataFrame, ``"datamodule"``, ``"blimp"`` (hub), a BLiMP / TSE folder, or a list of these.

    A TSE folder's sample is drawn from the NPI pairs the protocol scores (``npi_pairs``).
    """
    if spec is None or isinstance(spec, pd.DataFrame):
        return spec
    if isinstance(spec, (list, tuple)):
        from negmonitor.monitoring.ablation_rows import pair_slots

        frames = [resolve_minimal_pairs(item, datamodule, sample, npi_pairs) for item in spec]
        pair_slots(frames)  # at most one of each shape: fail now, not at the first ablation
        return frames
    from negmonitor.evaluation import load_blimp, load_tse

    text = str(spec)
    if text == "datamodule":
        if not hasattr(datamodule, "minimal_pairs"):
            raise NegmonitorError("minimal_pairs='datamodule' but the datamodule has no minimal_pairs() — pass a "
                                  "BLiMP or TSE folder instead")
        return datamodule.minimal_pairs(sample) if sample else datamodule.minimal_pairs()
    if text == "blimp":
        return load_blimp(None, sample_per_uid=sample)
    path = Path(text).expanduser()
    if path.is_dir() and any(path.glob("*.pickle")):
        return load_tse(path, sample_per_construction=sample, npi_pairs=npi_pairs)
    return load_blimp(path, sample_per_uid=sample)


def _warn_what_ablation_leaves_out(minimal_pairs: Any, ppl_text: Any) -> None:
    """Say at set-up, once, which damage measures an ablation run will not have, and how to get them."""
    if ppl_text is None:
        warnings.warn("negmonitor: ablation has no perplexity text (ppl_text=None and the datamodule has no "
                      "probe_texts()): the ablation/ppl_* curves and the perplexity-matched control are left out — pass "
                      "ppl_text='wikitext:wikitext-2-raw-v1:validation' or a text file", stacklevel=3)
    if minimal_pairs is None:
        warnings.warn("negmonitor: ablation has no minimal pairs (minimal_pairs=None): the ablation/acc_drop curves "
                      "are left out — pass minimal_pairs='blimp', a BLiMP or TSE folder, or 'datamodule'", stacklevel=3)


def resolve_ppl_text(spec: Any, datamodule: Any = None) -> Any:
    """Perplexity text from a string/list, a file, a dataset id ``ID[:CONFIG[:SPLIT]]``, or the datamodule."""
    if spec is None:
        return datamodule.probe_texts() if hasattr(datamodule, "probe_texts") else None
    if not isinstance(spec, str) or not _looks_like_source(spec):
        return spec  # the text itself
    from negmonitor.evaluation.lm_perplexity import load_perplexity_text

    if Path(spec).expanduser().exists() or ":" not in spec:
        return load_perplexity_text(spec)
    dataset_id, config, *split = spec.split(":")
    return load_perplexity_text(dataset_id, config or None, split[0] if split else "validation")


def _looks_like_source(text: str) -> bool:
    """A short, single-token string is a path or a dataset id; anything else is text to evaluate."""
    return len(text) < 1024 and not any(c.isspace() for c in text)


def _snapshot_dtype(spec: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype) for the weight snapshot."""
    from negmonitor.models import parse_dtype

    try:
        dtype = parse_dtype(spec)
    except NegmonitorError:
        dtype = None
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise NegmonitorError(f"drift_dtype must be one of bf16, fp16, fp32, got {spec!r}")
    return dtype


@dataclass
class _LastMeasurement:
    """The latest measurement, kept until the next: if training turns out to have ended at its step, the final
    measurement's additions (ablation, media) are made from it."""

    step: int
    measurement: engine.Measurement
    scalars: pd.DataFrame  # as recorded (the families kept)
    final: bool
    ablated: bool
    media: bool


def _family(metric: str) -> str:
    return metric.split("/", 1)[0]


def find_hf_model(pl_module: LightningModule, model_attr: str | None = None) -> torch.nn.Module:
    """The transformers model inside ``pl_module`` (``model_attr``, or the first ``PreTrainedModel`` submodule)."""
    from transformers import PreTrainedModel

    if model_attr:
        model = getattr(pl_module, model_attr, None)
        if model is None:
            raise NegmonitorError(f"the LightningModule has no attribute {model_attr!r} — fix model_attr")
        return getattr(model, "_orig_mod", model)
    for module in pl_module.modules():
        candidate = getattr(module, "_orig_mod", module)
        if isinstance(candidate, PreTrainedModel):
            return candidate
    raise NegmonitorError("no transformers PreTrainedModel found inside the LightningModule — pass "
                          "model_attr='name_of_the_attribute'")


def _find_tokenizer(pl_module: LightningModule, trainer: Trainer) -> Any:
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        tokenizer = getattr(owner, "tokenizer", None) if owner is not None else None
        if tokenizer is not None:
            return tokenizer
    return None


def check_strategy(strategy: Any) -> None:
    """Refuse strategies the monitor cannot measure under: DeepSpeed (its ZeRO stages shard parameters in ways the
    probe pass and the weight reads do not follow) and ``ModelParallelStrategy`` (FSDP2 / tensor parallel: DTensor
    weights, and forwards that are collectives the monitor does not know of)."""
    names = [cls.__name__.lower() for cls in type(strategy).__mro__]
    if any("deepspeed" in name or "modelparallel" in name for name in names):
        raise NegmonitorError(f"negmonitor does not support {type(strategy).__name__} — train with strategy='ddp' or "
                              "FSDPStrategy (the monitor measures whole layers under both)")


def _strategy_context(trainer: Trainer, hf_model: torch.nn.Module) -> Any:
    """Under FSDP: route the model's calls through the FSDP wrapper and read whole weights (see
    :func:`negmonitor.distributed.fsdp_routing`); otherwise nothing."""
    from negmonitor.distributed import fsdp_routing, is_fsdp

    root = getattr(getattr(trainer, "strategy", None), "model", None)  # the HF callback passes ranks only
    if is_fsdp(root):
        return fsdp_routing(root, trainer.lightning_module, hf_model)
    return contextlib.nullcontext()
