"""User-facing errors.

Every error a user can cause (a bad flag, a missing file, an unsupported model) is raised as
:class:`NegmonitorError` with a one-line message that names the problem and the fix. The command line prints it
without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class NegmonitorError(ValueError):
    """A problem with the user's input or environment, with a one-line message saying how to fix it."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`NegmonitorError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise NegmonitorError(message)
