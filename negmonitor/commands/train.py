"""``negmonitor train --config training_configs/NAME.yaml [overrides]``: pretrain with the monitor attached.

Built on ``LightningCLI``: model (``CausalLMModule``), data (``TextDataModule``), trainer and the monitor
(``monitor:`` section, a :class:`~negmonitor.callbacks.NegativeDifferentiationMonitor`) all live in one YAML file,
every key can be overridden on the command line (``--trainer.max_steps 100``), and the resolved config is saved as
``config.yaml`` next to the logs. At the end it prints where the logs are and the headline numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from negmonitor.errors import NegmonitorError


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to ``negmonitor --help`` (its own arguments are parsed by LightningCLI)."""
    parser = sub.add_parser("train", help="pretrain a model from a YAML config with the monitor attached",
                            description="negmonitor train --config training_configs/tiny-neox-cpu.yaml "
                                        "[--trainer.max_steps N ...]; `negmonitor train --help` lists every key.",
                            add_help=False)
    parser.set_defaults(func=lambda args: run_train([]))


def build_cli(argv: Sequence[str], run: bool = False):
    """Parse ``argv`` and instantiate model, datamodule, monitor and trainer (without fitting)."""
    from lightning.pytorch.cli import LightningCLI

    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.train.datamodule import TextDataModule
    from negmonitor.train.module import CausalLMModule

    class TrainCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(NegativeDifferentiationMonitor, "monitor")

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # we pass argv on purpose
        return TrainCLI(CausalLMModule, TextDataModule, args=list(argv), run=run,
                        save_config_kwargs={"overwrite": True}, parser_kwargs={"prog": "negmonitor train"})


def run_train(argv: Sequence[str]) -> int:
    """Train, then print where the logs are and the headline numbers."""
    argv = list(argv)
    if not argv:
        argv = ["--help"]
    _check_config_exists(argv)
    with _no_lightning_tips():
        cli = build_cli(argv)
        _prepare_vocab(cli)
        _keep_last_checkpoint(cli.trainer)
        _step_progress_bar(cli)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    saved = save_final(cli.trainer, cli.model, cli.datamodule)
    if cli.trainer.is_global_zero:
        print(summary(cli.trainer, saved))
    return 0


@contextlib.contextmanager
def _no_lightning_tips() -> Iterator[None]:
    """Drop Lightning's advertising lines ("💡 Tip: ... try installing litlogger") while ``train`` runs."""
    import logging

    class NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in str(record.msg)

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch.utilities.rank_zero",
                                                    "lightning.fabric.utilities.rank_zero")]
    tips = NoTips()
    for logger in loggers:
        logger.addFilter(tips)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


def _step_progress_bar(cli) -> None:
    """A step-based bar (lines when not a terminal) in place of Lightning's default epoch bar, for step-bounded
    runs whose config names no progress bar."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.train.progress import StepProgressBar

    trainer = cli.trainer
    configured = "ProgressBar" in str(cli.config.get("trainer", {}).get("callbacks"))
    default = trainer.progress_bar_callback
    if trainer.max_steps > 0 and not configured and type(default) in (RichProgressBar, TQDMProgressBar):
        trainer.callbacks.remove(default)
        monitors = [i for i, c in enumerate(trainer.callbacks) if isinstance(c, NegativeDifferentiationMonitor)]
        # after the monitors: its hooks then see each measurement (and its timings) as soon as it is taken
        trainer.callbacks.insert(max(monitors, default=len(trainer.callbacks) - 1) + 1, StepProgressBar())


def _keep_last_checkpoint(trainer) -> None:
    """``ModelCheckpoint(save_last=True)`` unless the config says otherwise, so a stopped run leaves ``last.ckpt``."""
    for callback in trainer.checkpoint_callbacks:
        if callback.save_last is None:
            callback.save_last = True


def save_final(trainer, module, datamodule) -> dict[str, Path]:
    """Save the model at the end of training: ``last.ckpt`` (resumable) and a ``save_pretrained`` folder with its
    tokenizer (``<log dir>/final_model``), which every command takes as ``--model``.

    Every rank calls it (the checkpoint is a collective call); only rank 0 writes the folder.
    """
    from negmonitor.callbacks.monitor import find_hf_model
    from negmonitor.checkpoints import FINAL_MODEL_DIR

    saved: dict[str, Path] = {}
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        folder = Path(checkpoint.dirpath or log_dir / "checkpoints")
        saved["last checkpoint"] = folder / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(saved["last checkpoint"], weights_only=False)  # resumable: optimizer included
    final = log_dir / FINAL_MODEL_DIR
    if trainer.is_global_zero:
        from negmonitor.models import quiet_transformers

        with quiet_transformers():
            find_hf_model(module).save_pretrained(final)
        tokenizer = getattr(module, "tokenizer", None) or getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(final)
    saved["final model"] = final
    return saved


def _check_config_exists(argv: list[str]) -> None:
    for flag, value in zip(argv, argv[1:]):
        if flag in ("--config", "-c") and not Path(value).exists():
            raise NegmonitorError(f"config file {value} does not exist — see training_configs/ for ready ones")


def _prepare_vocab(cli) -> None:
    """Give the model its tokenizer's vocabulary before fitting (the tokenizer is trained or loaded here)."""
    datamodule = cli.datamodule
    datamodule.prepare_data()
    datamodule.setup("fit")
    if hasattr(cli.model, "configure_tokenizer"):
        cli.model.configure_tokenizer(datamodule.tokenizer)


def summary(trainer, saved: dict[str, Path] | None = None) -> str:
    """Where the logs and saved models are, how to open them, and start/end values of the headline curves."""
    from negmonitor.callbacks import NegativeDifferentiationMonitor
    from negmonitor.records import RecordStore

    monitors = [c for c in trainer.callbacks if isinstance(c, NegativeDifferentiationMonitor)]
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)
    lines = ["", "negmonitor: training finished", f"  TensorBoard logs: {log_dir}",
             f"  open them with:   tensorboard --logdir {log_dir.parent}"]
    lines += [f"  {what + ':':<18}{path}" for what, path in (saved or {}).items()]
    for monitor in monitors:
        if monitor._store is None:
            continue
        lines.append(f"  records:          {monitor._store.root}")
        store = RecordStore(monitor._store.root)
        lines += headline_lines(store.read_scalars())
        lines += retrospective_lines(store, monitor.run_name)
    return "\n".join(lines)


HEADLINES = [("wd/cohort_mean", "cohort mean WD (all layers)"), ("wd/rest_mean", "rest mean WD (all layers)"),
             ("wd/neg_share", "negative-side share of WD"), ("pairs/nn_share", "NN share of top pairs"),
             ("ablation/ppl_ratio/wasserstein", "ppl ratio, Wasserstein ablation"),
             ("ablation/ppl_ratio/random", "ppl ratio, random ablation"),
             ("ablation/acc_drop/grammar/wasserstein", "minimal-pair acc. drop, Wasserstein"),
             ("ablation/acc_drop/grammar/random", "minimal-pair acc. drop, random"),
             ("ablation/margin_drop/grammar/wasserstein", "minimal-pair margin drop, Wasserstein"),
             ("ablation/margin_drop/grammar/random", "minimal-pair margin drop, random"),
             ("ablation/margin_drop/grammar/random_mean", "  ... mean over the random draws"),
             ("ablation/margin_drop/grammar/random_sd", "  ... sd over the random draws")]


def retrospective_lines(store, run: str | None = None) -> list[str]:
    """The paper's cohort (top 5% WD at the last step, followed back) at the first and last snapshot, read from
    the records one file at a time (the training process still holds the model)."""
    from negmonitor.monitoring.cohort import recorded_cohorts

    cohort = recorded_cohorts(store).get(run)  # this run's only: a folder may hold others'
    curve = cohort.curve if cohort is not None else None
    if curve is None or len(curve) < 2:
        return []
    first, last = curve.iloc[0], curve.iloc[-1]
    return [f"  {'final-step top-5% WD, followed back':<38} step {int(first.step):>5}: {first.cohort:8.4f}   "
            f"step {int(last.step):>5}: {last.cohort:8.4f}",
            f"  {'  ... and the rest':<38} step {int(first.step):>5}: {first.rest:8.4f}   "
            f"step {int(last.step):>5}: {last.rest:8.4f}"]


def headline_lines(scalars) -> list[str]:
    """``metric: first -> last`` lines for the whole-model headline curves that exist."""
    lines = []
    model_wide = scalars[scalars.layer == -1]
    for metric, label in HEADLINES:
        rows = model_wide[model_wide.metric == metric].sort_values("step")
        if len(rows):
            first, last = rows.iloc[0], rows.iloc[-1]
            lines.append(f"  {label:<38} step {int(first.step):>5}: {first.value:8.4f}   "
                         f"step {int(last.step):>5}: {last.value:8.4f}")
    return lines
