"""When to measure: every N optimizer steps, log-spaced early steps, and the end of training."""

from __future__ import annotations

from dataclasses import dataclass

from negmonitor.errors import NegmonitorError


def log_spaced_steps(until: int) -> list[int]:
    """``0, 1, 2, 4, …`` up to ``until`` (Pythia's early checkpoint schedule)."""
    steps, step = [0], 1
    while step <= until:
        steps.append(step)
        step *= 2
    return steps


@dataclass(frozen=True)
class Schedule:
    """Measurement schedule on ``trainer.global_step`` (optimizer steps).

    Args:
        every_n_steps: measure every N steps (0 disables the regular cadence).
        log_spaced_until: also measure at 0, 1, 2, 4, … up to this step (0 disables them).
        at_start: measure at step 0, before the first update.
        at_end: measure when training ends.
    """

    every_n_steps: int = 500
    log_spaced_until: int = 0
    at_start: bool = True
    at_end: bool = True

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.log_spaced_until < 0:
            raise NegmonitorError(
                f"every_n_steps and log_spaced_until must be >= 0 (got {self.every_n_steps}, {self.log_spaced_until})"
                " — use 0 to disable"
            )

    def due(self, step: int) -> bool:
        """Whether ``step`` is a scheduled measurement step (plain integer arithmetic: no device sync)."""
        if step == 0:
            return self.at_start
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        return bool(self.log_spaced_until) and step <= self.log_spaced_until and step & (step - 1) == 0
