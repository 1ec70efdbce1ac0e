"""Command line of the report: ``negmonitor report`` and the one-figure scripts in ``analysis/``.

Both parse the same arguments (:func:`add_arguments`) and call :func:`run`, so there is one implementation.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

USAGE_NOTE = ("RUN_DIR may be a log folder (with negmonitor/ inside), a records folder, a `negmonitor probe --out` "
              "or `negmonitor ablate --out` folder, or a folder above several of them; give several to overlay them.")


def add_arguments(parser: argparse.ArgumentParser, figures: bool = True) -> None:
    """The report's arguments (``--only`` left out for a one-figure script)."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="runs to report on (overlaid in each figure)")
    parser.add_argument("--out", required=True, help="folder for the PNGs, CSVs and index.html")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="model folder, id or Lightning .ckpt for recomputed activations (Fig. 1c/6b) and POS "
                             "surprisal (3d); "
                             "repeat to match the RUN_DIRs in order (one --model goes with the first RUN_DIR); "
                             "default: the local model an ablate/probe folder names, or a replay's local checkpoint")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer folder or id for a --model without one beside it")
    parser.add_argument("--probe-text", default=None, metavar="FILE",
                        help="text for recomputed activations, POS surprisal and POS base rates, or 'grammar' (the "
                             "built-in grammar corpus's held-out text, as ablate --probe-text grammar); default: the "
                             "run's own probe text when it is a local file, else the contexts stored with the top "
                             "pairs")
    parser.add_argument("--top-neurons", type=int, default=4, help="neurons per run in the activation histograms")
    parser.add_argument("--hist-tokens", type=int, default=16_384, help="probe tokens for recomputed histograms")
    parser.add_argument("--pos-unit", choices=("token", "word"), default="token",
                        help="unit of the POS surprisal (3d): token = the paper's, per model token over consecutive "
                             "windows of one token stream; word = per spaCy word, short pieces scored alone")
    parser.add_argument("--pos-tokens", type=int, default=32_768,
                        help="model tokens of the text for the POS surprisal with --pos-unit token")
    parser.add_argument("--pos-window", type=int, default=None,
                        help="window in tokens for --pos-unit token (default min(2048, the model's positions))")
    parser.add_argument("--pos-texts", type=int, default=200,
                        help="pieces of 5-60 words for the POS surprisal with --pos-unit word")
    parser.add_argument("--device", default=None, help="device for recomputation (default cpu)")
    parser.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                        help="dtype of a reloaded model (default: fp32 on CPU, as saved on a GPU); pass the one the "
                             "ablate run measured in to recompute at its precision")
    parser.add_argument("--title", default=None, help="title of index.html")
    if figures:
        parser.add_argument("--only", default=None, metavar="KEYS",
                            help="comma-separated figure keys or paper numbers (e.g. 2b,7a,A.2); default all")


def check(args: argparse.Namespace) -> None:
    """Argument checks that need no data."""
    from negmonitor.errors import NegmonitorError

    for flag in ("top_neurons", "hist_tokens", "pos_texts", "pos_tokens", "pos_window"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise NegmonitorError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")


def run(args: argparse.Namespace, only: Sequence[str] | None = None) -> int:
    """Make the report and print where it is."""
    from negmonitor.report.base import ReportOptions
    from negmonitor.report.build import build_report

    check(args)
    options = ReportOptions(models=list(args.model), probe_text=args.probe_text, hist_tokens=args.hist_tokens,
                            top_neurons=args.top_neurons, pos_texts=args.pos_texts, pos_unit=args.pos_unit,
                            pos_tokens=args.pos_tokens, pos_window=args.pos_window, device=args.device,
                            dtype=args.dtype, tokenizer=args.tokenizer)
    chosen = only or ([k for k in args.only.split(",") if k.strip()] if getattr(args, "only", None) else None)
    result = build_report(args.run_dirs, args.out, options, only=chosen, title=args.title)
    print(f"report written to {result.index} ({len(result.figures)} figure(s), {len(result.skipped)} skipped)")
    failures = list(result.failed)
    if chosen:  # figures asked for by name must be drawn
        failures += [f"{key} ({paper}) not drawn: {why}" for key, paper, why in result.skipped
                     if not why.startswith("failed:")]
    for line in failures:
        print(f"negmonitor: error: {line}", file=sys.stderr)
    return 1 if failures else 0


def script_main(key: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``analysis/<key>.py``: the report's arguments, drawing only figure ``key``."""
    from negmonitor.errors import run_guarded
    from negmonitor.report.build import figure_keys

    if key not in figure_keys():
        raise SystemExit(f"unknown figure {key!r}")
    parser = argparse.ArgumentParser(prog=f"analysis/{key}.py", description=f"Draw {key} from negmonitor records. "
                                     + USAGE_NOTE)
    add_arguments(parser, figures=False)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    return run_guarded(lambda: run(args, only=[key]), args.debug)
