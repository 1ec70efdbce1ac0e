"""The ``negmonitor`` command: sub-commands ``probe``, ``ablate``, ``replay``, ``train`` and ``report``.

Each sub-command lives in ``negmonitor/commands/<name>.py`` with ``register(subparsers)``. Errors the user can fix
(:class:`~negmonitor.errors.NegmonitorError`) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from negmonitor import __version__
from negmonitor.errors import run_guarded

COMMANDS = ("probe", "ablate", "replay", "train", "report")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="negmonitor",
        description="Monitor the negative pre-activations (Wasserstein neurons) of language-model MLPs.",
    )
    parser.add_argument("--version", action="version", version=f"negmonitor {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"negmonitor.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"negmonitor.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    if argv and argv[0] == "train":  # LightningCLI parses its own arguments
        from negmonitor.commands.train import run_train

        return run_guarded(lambda: run_train(argv[1:]), debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return run_guarded(lambda: args.func(args), debug)


if __name__ == "__main__":
    sys.exit(main())
