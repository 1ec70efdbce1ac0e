"""Where the Lightning callback's output goes: every logger on the Trainer, and a records folder unique to the run.

Scalars go to every logger through ``logger.log_metrics(metrics, step=...)`` (as Lightning's own
``LearningRateMonitor`` does), under the README's tags. Histograms, images and top-pair tables go to the loggers
that can take them: a ``TensorBoardLogger`` (its ``SummaryWriter``, ``logger.experiment``) and a ``WandbLogger``
(``wandb.Histogram`` / ``wandb.Image`` / ``wandb.Table``); any other logger gets the scalars, and one note says so.

The records folder is the first logger's ``log_dir`` (TensorBoard, CSV), else ``save_dir/name/version`` (W&B,
MLflow's local file store), else ``default_root_dir/name/version``; without a logger it is the folder Lightning's
default logger would have used, ``default_root_dir/lightning_logs/version_N``. Never a bare ``.``: two runs into
one ``save_dir`` keep both sets of records.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from negmonitor.monitoring import tensorboard as tb
from negmonitor.monitoring.tensorboard import WriterSink


class LoggerSink:
    """Scalars through ``logger.log_metrics`` (then ``logger.save()``, so e.g. a ``CSVLogger`` writes its file);
    media through ``media_sink`` when the logger can take them."""

    def __init__(self, logger: Any, media_sink: Any = None) -> None:
        self.logger, self.media_sink = logger, media_sink
        self.name = type(logger).__name__
        self.media = media_sink is not None
        self.leaf_names = isinstance(logger, _mlflow_logger_type())

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self.logger.log_metrics(leaf_names(metrics) if self.leaf_names else metrics, step=int(step))

    def log_media(self, measurement: Any, step: int, pairs: bool = True) -> None:
        if self.media_sink is not None:
            self.media_sink.log_media(measurement, step, pairs)

    def flush(self) -> None:
        self.logger.save()
        if self.media_sink is not None:
            self.media_sink.flush()


class WandbMedia:
    """Histograms, images and tables to a ``WandbLogger``, in one ``log_metrics`` call per measurement."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def log_media(self, measurement: Any, step: int, pairs: bool = True) -> None:
        import wandb

        media: dict[str, Any] = {name: wandb.Histogram(values) for name, values in tb.wd_by_layer(measurement.neurons)}
        media.update({name: wandb.Image(tb.figure_rgb(fig)) for name, fig in tb.top_neuron_figures(measurement.samples, step)})
        if pairs:
            media.update({name: wandb.Table(dataframe=table)
                          for name, table in tb.pair_tables(measurement.result.top_pairs)})
        if media:
            self.logger.log_metrics(media, step=int(step))

    def flush(self) -> None:
        pass


def leaf_names(metrics: dict[str, float]) -> dict[str, float]:
    """A name that is also the folder of other names (``negmonitor/wd/max`` beside ``negmonitor/wd/max/layer_00``)
    gets ``/all_layers``: MLflow's file store keeps each metric in a file named by it."""
    folders = {name[:i] for name in metrics for i, char in enumerate(name) if char == "/"}
    return {f"{name}/all_layers" if name in folders else name: value for name, value in metrics.items()}


def _mlflow_logger_type() -> type:
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger


def logger_sinks(loggers: Sequence[Any]) -> tuple[list[LoggerSink], list[str]]:
    """One sink per logger (call on global rank zero, once: capabilities are decided here) and the names of the
    loggers that get scalars only."""
    sinks = [LoggerSink(logger, _media_sink(logger)) for logger in loggers]
    return sinks, [sink.name for sink in sinks if not sink.media]


def _media_sink(logger: Any) -> Any:
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        return WriterSink(logger.experiment, name=type(logger).__name__)
    if isinstance(logger, WandbLogger):
        return WandbMedia(logger)
    experiment = getattr(logger, "experiment", None)
    if all(tb.supports(experiment, m) for m in ("add_scalar", "add_histogram", "add_figure", "add_text")):
        return WriterSink(experiment, name=type(logger).__name__)  # another logger around a SummaryWriter
    return None


def records_log_dir(loggers: Sequence[Any], default_root_dir: str | os.PathLike) -> Path:
    """The folder unique to this run and its version under which the records go (``<it>/negmonitor``)."""
    root = Path(default_root_dir)
    if not loggers:
        return _next_version(root / "lightning_logs")
    logger = loggers[0]
    log_dir = getattr(logger, "log_dir", None)
    if log_dir:
        return Path(log_dir)
    save_dir = getattr(logger, "save_dir", None)
    name = _part(getattr(logger, "name", None)) or "lightning_logs"
    version = getattr(logger, "version", None)
    base = Path(save_dir) / name if save_dir else root / name
    if version is None or _part(version) == "":
        return _next_version(base)
    return base / (f"version_{version}" if isinstance(version, int) else _part(version))


def _part(value: Any) -> str:
    """A logger's name or version as one safe path component ('' for none)."""
    text = re.sub(r"[\\/:]+", "_", str(value)).strip() if value is not None else ""
    return "" if text in ("", ".", "..") else text


def _next_version(base: Path) -> Path:
    """``base/version_N`` with N one more than the largest existing (as Lightning's loggers number their runs)."""
    taken = [int(p.name[8:]) for p in base.glob("version_*") if p.name[8:].isdigit()] if base.is_dir() else []
    return base / f"version_{max(taken, default=-1) + 1}"
