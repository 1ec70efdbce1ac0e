"""Checks of user-given settings shared by the library and the commands (one spelling of each error).

They live in the library, not in :mod:`negmonitor.commands`, so that dependencies go one way:
library <- commands <- cli.
"""

from __future__ import annotations

from negmonitor.errors import NegmonitorError

__all__ = ["check_fraction", "check_positive"]


def check_fraction(value: float, name: str = "--fraction") -> float:
    """A fraction of neurons must lie in (0, 1]; returns it as a float."""
    if not 0.0 < float(value) <= 1.0:
        raise NegmonitorError(f"{name} must be in (0, 1], got {value} — e.g. 0.01 for 1%")
    return float(value)


def check_positive(value: int | None, flag: str) -> None:
    """A count given by the user (None: not given) must be at least 1."""
    if value is not None and value < 1:
        raise NegmonitorError(f"{flag} must be a positive integer, got {value}")
