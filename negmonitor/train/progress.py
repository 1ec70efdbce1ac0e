"""Console of ``negmonitor train``: a bar over optimizer steps, or one line per measurement when not a terminal.

Lightning's bars count batches per epoch, so a run bounded by ``max_steps`` reads ``Epoch 1/-2``, and they print
nothing useful for minutes when the output goes to a file. :class:`StepProgressBar` counts optimizer steps up to
``max_steps`` (loss and validation loss beside it) and, when stdout is not a terminal, prints one line per
negmonitor measurement instead (step, elapsed time, losses, the measurement's timings). Placed after the monitors
in the callback list, its hooks run after theirs: each measurement is reported, with its own timings, as soon as it
is taken.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar


class StepProgressBar(ProgressBar):
    """Progress over optimizer steps of a ``max_steps``-bounded run.

    Args:
        lines: ``True``: a line per measurement (and at the start and end) instead of a bar; ``False``: a bar;
            ``None`` (default): a bar when stdout is a terminal, else lines.
    """

    def __init__(self, lines: bool | None = None) -> None:
        super().__init__()
        self._enabled = True
        self._lines = lines
        self._bar: Any = None
        self._start = 0.0
        self._seen: dict[int, int] = {}

    # -- ProgressBar interface -----------------------------------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # -- hooks -----------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        self._seen = {id(m): len(m.measured_steps) for m in _monitors(trainer)}  # before step 0 is measured

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        if not self._enabled or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else None
        if self._line_mode():
            print(f"training from step {trainer.global_step} to {total or '?'}; a line per negmonitor measurement "
                  "follows", flush=True)
            self._report_measurements(trainer, pl_module)
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=trainer.global_step, desc="train", unit="step", dynamic_ncols=True,
                         file=sys.stdout, smoothing=0.1)
        self._report_measurements(trainer, pl_module)  # the start's measurement, taken in the monitor's hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._bar is not None:
            self._bar.update(trainer.global_step - self._bar.n)
            self._bar.set_postfix(self._metrics(trainer, pl_module), refresh=False)
        self._report_measurements(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_description("validate")

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_description("train")
            self._bar.set_postfix(self._metrics(trainer, pl_module))

    def on_train_end(self, trainer, pl_module) -> None:
        self._report_measurements(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._report_measurements(trainer, pl_module)  # the monitors' final measurement runs in their on_train_end
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._enabled and trainer.is_global_zero and self._line_mode():
            print(f"step {trainer.global_step}: training finished after {self._elapsed()}", flush=True)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _line_mode(self) -> bool:
        return self._lines if self._lines is not None else not sys.stdout.isatty()

    def _metrics(self, trainer, pl_module) -> dict[str, str]:
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return {k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in metrics.items()}

    def _elapsed(self) -> str:
        seconds = int(time.monotonic() - self._start)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def _report_measurements(self, trainer, pl_module) -> None:
        """One line per new measurement (line mode), or the last measured step beside the bar."""
        if not self._enabled or not trainer.is_global_zero:
            return
        for monitor in _monitors(trainer):
            steps = monitor.measured_steps
            new = steps[self._seen.get(id(monitor), 0):]
            self._seen[id(monitor)] = len(steps)
            for step in new:
                if self._bar is not None:
                    self._bar.set_postfix({**self._metrics(trainer, pl_module), "measured": step})
                elif self._line_mode():
                    total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
                    metrics = " ".join(f"{k} {v}" for k, v in self._metrics(trainer, pl_module).items())
                    timings = ", ".join(f"{k} {v:.1f} s" for k, v in monitor.timings.items())
                    print(f"step {step}{total} [{self._elapsed()}] {metrics} — negmonitor measured ({timings})",
                          flush=True)


def _monitors(trainer) -> list:
    from negmonitor.callbacks import NegativeDifferentiationMonitor

    return [c for c in trainer.callbacks if isinstance(c, NegativeDifferentiationMonitor)]
