"""The ``negmonitor`` command: sub-commands ``probe``, ``ablate``, ``replay``, ``train`` and ``report``.

Each sub-command lives in ``negmonitor/commands/<name>.py`` with ``register(subparsers)``. Errors the user can fix
(:class:`~negmonitor.errors.NegmonitorError`) print one line and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Iterator, Sequence

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
    with one_line_warnings():
        return _main(argv)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Print warnings as one line each while a command runs (no source line); ``warnings.showwarning`` is restored
    after, so library users keep theirs. (``showwarning``, not ``formatwarning``: Lightning replaces the latter
    globally when it is imported.)"""
    import warnings

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if not text.startswith("negmonitor"):
            ours = Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent)
            text = f"negmonitor: warning: {text}" if ours else \
                f"warning: {text} ({category.__name__}, {Path(filename).name}:{lineno})"
        try:
            (file or sys.stderr).write(text + "\n")
        except OSError:
            pass  # stderr gone: nowhere to warn

    saved = warnings.showwarning
    warnings.showwarning = showwarning
    try:
        yield
    finally:
        warnings.showwarning = saved


def _main(argv: Sequence[str] | None) -> int:
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
    with _no_leftover_folders(args) as outcome:
        outcome.append(run_guarded(lambda: args.func(args), debug))
    return outcome[0]


OUTPUT_FLAGS = ("out", "logdir")


@contextlib.contextmanager
def _no_leftover_folders(args: argparse.Namespace) -> Iterator[list]:
    """Remove the output folders (``--out``, ``--logdir`` and parents) that a failed command created and left empty.

    The body appends its exit code; a non-zero code or an exception counts as failure. Folders that existed before,
    or hold anything, are never touched.
    """
    new: list[Path] = []
    for flag in OUTPUT_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str) and value:
            folder = Path(value).expanduser().absolute()
            new += [f for f in (folder, *folder.parents) if not f.exists()]
    outcome: list = []
    try:
        yield outcome
    finally:
        if not outcome or outcome[0] != 0:
            for folder in sorted(set(new), key=lambda f: len(f.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only succeeds on an empty folder



if __name__ == "__main__":
    sys.exit(main())
