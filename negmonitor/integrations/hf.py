"""The monitor for the Hugging Face ``transformers.Trainer``: the Lightning callback's measurements, schedule,
records and TensorBoard tags, from the same code.

:class:`NegativeDifferentiationCallback` holds a :class:`~negmonitor.callbacks.NegativeDifferentiationMonitor`
(settings, probe set, engine, ablation rows, record files, tag scheme) and drives it through its trainer-agnostic
methods from the ``Trainer``'s events: the probe set is built at ``on_train_begin``, and steps are measured at
``on_train_begin`` (step 0), ``on_step_end`` (after each optimizer step) and ``on_train_end``, on
``state.global_step``. Records go to ``<logging dir>/negmonitor/`` and the curves to a TensorBoard event file in
that folder. Under DDP every rank measures (the probe pass reduces across ranks) and rank zero writes. The monitor's
state (cohort, measured steps) is saved beside each checkpoint (the weight snapshot for drift beside the records) and read back when training resumes
from ``output_dir/checkpoint-<step>``.

Example::

    >>> from transformers import Trainer, TrainingArguments
    >>> from negmonitor.integrations.hf import NegativeDifferentiationCallback
    >>> callback = NegativeDifferentiationCallback(probe="probe.txt", every_n_steps=500, log_spaced_until=512)
    >>> trainer = Trainer(model, TrainingArguments("out"), train_dataset=ds, processing_class=tok,
    ...                   callbacks=[callback])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager

from transformers import TrainerCallback

from negmonitor.callbacks.monitor import NegativeDifferentiationMonitor
from negmonitor.distributed import agree_on_failure
from negmonitor.errors import NegmonitorError
from negmonitor.monitoring.tensorboard import WriterSink


@dataclass(frozen=True)
class _Ranks:
    """What the monitor's measurement reads of a trainer: the ranks, and the precision context training runs in."""

    global_rank: int
    world_size: int
    is_global_zero: bool
    forward_context: Callable[[], ContextManager] = field(default=contextlib.nullcontext, compare=False)


class NegativeDifferentiationCallback(TrainerCallback):
    """Measure WD, negative-side share, MD, pair signs, weight drift and ablation damage in a ``transformers.Trainer``.

    Args:
        probe: the probe text (required): a :class:`~negmonitor.probeset.ProbeSet`, a list of strings, a text file
            or folder, or a dataset id ``ID[:CONFIG[:SPLIT]]``.
        tokenizer: the tokenizer (default: the ``Trainer``'s ``processing_class``).
        log_dir: where the ``negmonitor/`` folder (records and event file) goes (default: ``args.logging_dir``
            where the ``TrainingArguments`` have it, else ``$TENSORBOARD_LOGGING_DIR``, else ``args.output_dir``).
        run_name: the ``run`` column (default: the name of ``args.run_name`` or ``args.output_dir``).
        tokens_per_step: tokens per optimizer step (default: ``state.num_input_tokens_seen``, counted when
            ``TrainingArguments(include_num_input_tokens_seen=True)``; 0 otherwise).
        **settings: every other argument of :class:`~negmonitor.callbacks.NegativeDifferentiationMonitor`
            (``every_n_steps``, ``log_spaced_until``, ``at_end``, ``layers``, ``probe_tokens``, ``ablation``,
            ``minimal_pairs``, ``ppl_text``, ``media_every_n_steps``, ``families``, ``strict``,
            ``drift_snapshots_kept``, ...). ``probe_precision="trainer"`` (default) runs the probe forward under the
            autocast training uses (``TrainingArguments(bf16=True)``: bf16, ``fp16=True``: fp16, else none);
            ``"fp32"`` turns autocast off. ``run-<key>.json`` records what the forward ran in.

    Raises:
        NegmonitorError: no probe, or a setting out of range (at construction); FSDP or DeepSpeed training, or no
            tokenizer (at ``on_train_begin``, before the first step).
    """

    def __init__(self, probe: Any, tokenizer: Any = None, log_dir: str | os.PathLike | None = None,
                 run_name: str | None = None, tokens_per_step: int | None = None, **settings: Any) -> None:
        if probe is None:
            raise NegmonitorError("NegativeDifferentiationCallback needs probe text — pass probe= a text file, a "
                                  "folder, a list of strings or a dataset id such as wikitext:wikitext-2-raw-v1:test")
        self.monitor = NegativeDifferentiationMonitor(probe=probe, tokenizer=tokenizer, log_dir=log_dir,
                                                      run_name=run_name, tokens_per_step=tokens_per_step, **settings)
        self._writer: Any = None
        self._ranks: _Ranks | None = None

    @property
    def measured_steps(self) -> list[int]:
        """Steps measured so far (every rank's list is the same)."""
        return self.monitor.measured_steps

    @property
    def records_dir(self) -> Path | None:
        """``<log dir>/negmonitor`` once training has begun."""
        return self.monitor._store.root if self.monitor._store is not None else None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, processing_class: Any = None,
                       **kwargs: Any) -> None:
        """Check the set-up, open the records and the event file, build the probe set, measure step 0."""
        sharded = sharded_training(args, model)
        if sharded is not None:
            raise NegmonitorError(f"negmonitor's Hugging Face callback does not support {sharded} — train with DDP "
                                  "or one process, or use the Lightning callback (which supports FSDP)")
        monitor = self.monitor
        again = self._writer is not None  # train() again: auto_find_batch_size's retry, or a second call
        if again:
            self._writer.close()
            self._writer = None
        monitor._reset_run()  # a resume's state is read back below
        # a retry writes over its own failed attempt's records, not another run's
        monitor._check_overwrite = not again
        tokenizer = monitor.tokenizer or processing_class or kwargs.get("tokenizer")
        monitor.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds its tokenizer
        if monitor.tokenizer is None:
            raise NegmonitorError("no tokenizer: pass Trainer(processing_class=tokenizer) or "
                                  "NegativeDifferentiationCallback(tokenizer=...)")
        model = getattr(model, "_orig_mod", model)
        self._ranks = _Ranks(int(args.process_index), int(args.world_size), bool(state.is_world_process_zero),
                             training_autocast(args, model))
        saved = self._read_state(args, state)
        # A resumed run goes on in the records folder it began in (transformers 4's default logging_dir is new at
        # every launch); log_dir= overrides. A fresh run opens its own.
        began = Path(saved["records_root"]).parent if saved and saved.get("records_root") else None
        root = (Path(monitor.log_dir) if monitor.log_dir else began if began is not None and began.is_dir()
                else hf_log_dir(args))
        with agree_on_failure(phase="set-up"):  # a rank that fails ends every rank's run, none waits in a collective
            self._set_up(args, model, monitor, root)
        if saved is not None:
            monitor.load_state_dict(saved)
        self._maybe_measure(state, monitor.schedule.due(state.global_step))

    def _set_up(self, args: Any, model: Any, monitor: NegativeDifferentiationMonitor, root: Path) -> None:
        """Open the records under ``root``, build the probe set, check the budget; then (rank zero) write run.json
        and open the event file: a run refused here leaves neither an empty TensorBoard run nor a run.json."""
        monitor._open(root, [], self._ranks.is_global_zero,
                      run_name=Path(str(getattr(args, "run_name", None) or args.output_dir)).name)
        monitor._hf_model = model
        monitor.precision_used = monitor._precision_in_use(self._ranks)
        monitor._prepare(model, None, self._ranks.is_global_zero)
        monitor._check_budget(self._ranks)
        if self._ranks.is_global_zero:
            from torch.utils.tensorboard import SummaryWriter

            monitor._write_run_info()
            self._writer = SummaryWriter(log_dir=str(root / "negmonitor"))
            monitor._sinks.append(WriterSink(self._writer))
            if not monitor.tokens_per_step and args.include_num_input_tokens_seen in (False, "no", None):
                import warnings

                warnings.warn("negmonitor: tokens_seen is recorded as 0 — set TrainingArguments("
                              "include_num_input_tokens_seen=True) or NegativeDifferentiationCallback("
                              "tokens_per_step=...)", stacklevel=2)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save the monitor's state (cohort, measured steps) beside the checkpoint just written, and the weight
        snapshot for drift beside the records."""
        if self._ranks is not None and self._ranks.is_global_zero:
            path = self._state_path(args, state.global_step)
            if path.parent.is_dir():
                self._write_state(path)
            self.monitor._save_snapshot(True)  # the weight snapshot lives beside the records, not in the state

    def _write_state(self, path: Path) -> None:
        """``torch.save`` the monitor's state to ``path`` atomically; a failure (a full disk) is warned about once
        and training goes on, its checkpoint without the monitor's state (``strict`` re-raises)."""
        import torch

        from negmonitor.atomic import atomic_path

        try:
            with atomic_path(path) as tmp:
                torch.save(self.monitor.state_dict(), tmp)
        except Exception as exc:
            self.monitor._write_failed(exc, "state", f"negmonitor: could not save the monitor's state to {path} "
                                       f"({type(exc).__name__}: {exc}); training goes on, but a run resumed from "
                                       "this checkpoint starts the monitor afresh (new cohort, no drift at first) "
                                       "(no further warning)")

    def _read_state(self, args: Any, state: Any) -> dict | None:
        """On a resume (``global_step > 0``), the state saved beside the checkpoint (see :meth:`_state_paths`).

        Rank 0 wrote it and rank 0 reads it; under DDP every rank gets rank 0's copy: another node's disk may lack
        the file (``save_on_each_node``), and ranks that disagreed about the steps already measured would measure
        at different steps and wait on each other's collectives. A state that measured past the step resumed at (a
        stale ``resume_from_checkpoint``) is not this checkpoint's: left out, with a warning."""
        if state.global_step <= 0:
            return None
        import warnings

        import torch

        step = int(state.global_step)
        candidates = self._state_paths(args, step)
        saved = None
        with agree_on_failure(phase="resume"):  # an unreadable file ends every rank's run, not one
            if self._ranks.is_global_zero:
                found = next((path for path in candidates if path.is_file()), None)
                if found is not None:
                    saved = torch.load(found, map_location="cpu", weights_only=True)  # plain data; no code runs
                    if max(saved.get("measured_steps") or [0]) > step:
                        warnings.warn(f"negmonitor: the monitor's state at {found} measured past step {step}, where "
                                      "this run resumed: it is another checkpoint's, left out", stacklevel=2)
                        saved, found = None, None
                if found is None:
                    warnings.warn(f"negmonitor: resumed at step {step} without the monitor's state "
                                  f"(looked for {' and '.join(str(c) for c in candidates)}): it starts afresh — a new "
                                  "cohort at its next measurement, no drift until the one after", stacklevel=2)
        return _from_rank_zero(saved)

    def _state_path(self, args: Any, step: int) -> Path:
        return Path(args.output_dir) / f"checkpoint-{int(step)}" / f"negmonitor-{self.monitor.record_key}.pt"

    def _state_paths(self, args: Any, step: int) -> list[Path]:
        """Where a resumed run's state may be: beside ``output_dir/checkpoint-<step>``, or in the folder
        ``TrainingArguments(resume_from_checkpoint=)`` names (the Trainer does not tell callbacks the folder it
        resumed from; the example scripts set it there)."""
        paths = [self._state_path(args, step)]
        resumed = getattr(args, "resume_from_checkpoint", None)
        if isinstance(resumed, (str, os.PathLike)) and Path(resumed).is_dir():
            paths.append(Path(resumed) / f"negmonitor-{self.monitor.record_key}.pt")
        return list(dict.fromkeys(paths))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Measure when the optimizer step just taken is scheduled; the last step (``max_steps``, also of an
        epoch-based run) is the final measurement, taken here, before the Trainer may load its best checkpoint."""
        step = int(state.global_step)
        last = 0 < int(getattr(state, "max_steps", 0) or 0) <= step
        schedule = self.monitor.schedule
        self._maybe_measure(state, schedule.due(step) or (last and schedule.at_end), final=last)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Final measurement of a run that stopped early (e.g. early stopping), unless the Trainer has just put its
        best checkpoint's weights in the model (``load_best_model_at_end``); close the event file."""
        try:
            step, monitor = int(state.global_step), self.monitor
            if self._ranks is None or not monitor.schedule.at_end:
                return
            reloaded = bool(_from_rank_zero(getattr(args, "load_best_model_at_end", False)
                                            and getattr(state, "best_model_checkpoint", None)))
            if not reloaded:
                self._count_tokens(state)
                monitor._end_of_training(self._ranks, step)
            elif self._ranks.is_global_zero and (step not in monitor.measured_steps or (
                    monitor._last is not None and monitor._last.step == step and not monitor._last.final)):
                import warnings

                what = ("no final measurement" if step not in monitor.measured_steps
                        else "the final measurement's ablation and media are left out")
                warnings.warn(f"negmonitor: {what} at step {step}: the model now holds the best checkpoint "
                              f"({state.best_model_checkpoint}, load_best_model_at_end), not step {step}'s weights",
                              stacklevel=2)
        finally:
            self.monitor._last = None  # the last measurement's tables are not kept past training
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def _maybe_measure(self, state: Any, due: bool, final: bool = False) -> None:
        step = int(state.global_step)
        if not due or step in self.monitor.measured_steps or self._ranks is None:
            return
        self._count_tokens(state)
        self.monitor._measure(self._ranks, step, final)

    def _count_tokens(self, state: Any) -> None:
        monitor = self.monitor
        monitor.tokens_seen = (int(state.global_step) * monitor.tokens_per_step if monitor.tokens_per_step
                               else int(getattr(state, "num_input_tokens_seen", 0) or 0))


def _from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (under DDP, ranks deciding apart could send one into a collective alone:
    the Trainer sets ``best_model_checkpoint`` only where the checkpoint folder exists on that node, and rank 0
    alone reads the monitor's saved state)."""
    import torch

    from negmonitor.distributed import is_distributed

    if not is_distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def training_autocast(args: Any, model: Any) -> Callable[[], ContextManager]:
    """The autocast the ``Trainer`` trains under (accelerate's, set by ``args.bf16`` / ``args.fp16``), as a
    context factory for the probe forward; no autocast for full-precision training. Its weight cache is off: a probe
    forward uses each weight once, and the cache would hold a half-precision copy of every fp32 weight through a
    whole ablation (2.8 GB for Pythia-1.4B, outside the memory budget), as Lightning's mixed precision does too."""
    import torch

    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def hf_log_dir(args: Any) -> Path:
    """The folder a fresh run's ``negmonitor/`` records go under: ``args.logging_dir`` (transformers 4), else
    ``$TENSORBOARD_LOGGING_DIR`` (where transformers 5's TensorBoard callback writes), else ``args.output_dir``."""
    logging_dir = getattr(args, "logging_dir", None) or os.environ.get("TENSORBOARD_LOGGING_DIR")
    return Path(logging_dir or args.output_dir).expanduser()


def sharded_training(args: Any, model: Any) -> str | None:
    """The sharded set-up this Trainer runs under (``None``: none), found where each way of asking for it shows:
    ``TrainingArguments`` (``fsdp=``, ``deepspeed=``), accelerate's state (an ``accelerate launch --config_file`` run
    leaves ``args.fsdp`` unset), or the parameters themselves (ZeRO-3 partitions, FSDP's flat or DTensor shards).
    The callback sees the bare model, so under any of them its probe forward and weight reads would see shards."""
    if getattr(args, "fsdp", None):
        return "FSDP (TrainingArguments.fsdp)"
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None) is not None:
        return "DeepSpeed (TrainingArguments.deepspeed)"
    try:
        from accelerate.state import AcceleratorState, is_initialized
        from accelerate.utils import DistributedType
    except ImportError:
        pass
    else:
        if is_initialized() and AcceleratorState().distributed_type in (DistributedType.FSDP,
                                                                         DistributedType.DEEPSPEED):
            return f"{AcceleratorState().distributed_type.value} (the accelerate config)"
    for param in getattr(model, "parameters", lambda: [])():
        if hasattr(param, "ds_id"):
            return "DeepSpeed ZeRO-3 (partitioned parameters)"
        if type(param).__name__ in ("DTensor", "FlatParameter"):
            return f"FSDP ({type(param).__name__} parameters)"
    return None
