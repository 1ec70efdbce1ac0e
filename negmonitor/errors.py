"""User-facing errors.

Every error a user can cause (a bad flag, a missing file, an unsupported model) is raised as
:class:`NegmonitorError` with a one-line message that names the problem and the fix. The command line prints it
without a traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from typing import Callable


class NegmonitorError(ValueError):
    """A problem with the user's input or environment, with a one-line message saying how to fix it."""


class UnreadableWeight(NegmonitorError):
    """A monitored site whose weight the drift cannot read (quantized, a LoRA variant, ...): ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason} — leave 'drift' out of the monitor's families= to keep the other curves")
        self.reason = reason


def require(condition: bool, message: str) -> None:
    """Raise :class:`NegmonitorError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise NegmonitorError(message)


def run_guarded(call: Callable[[], object], debug: bool = False) -> int:
    """Run a command's ``call`` and return its exit code: a :class:`NegmonitorError` prints one line and gives 2
    (``debug`` re-raises it for the traceback); Ctrl-C says that the records so far are kept and gives 130."""
    try:
        code = call()
    except NegmonitorError as exc:
        if debug:
            raise
        print(f"negmonitor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("negmonitor: interrupted — records written so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    return int(code or 0)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type name), at most ``limit`` characters: what a one-line
    error says about its cause."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class AblationBypassed(NegmonitorError):
    """An ablation that changed nothing: the model's MLP never called the activation module it replaces (a fused
    kernel computes the nonlinearity itself)."""
