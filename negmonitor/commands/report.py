"""``negmonitor report``: the paper's figures and an HTML index from the records of one or more runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` sub-command."""
    from negmonitor.report.cli import USAGE_NOTE, add_arguments, run

    parser = sub.add_parser("report", help="draw the paper's figures and an HTML report from records",
                            description="Draw the paper's figures (PNG + CSV) and a self-contained index.html from "
                                        "the tidy records of runs and replays, and probe/ablate output folders. "
                                        + USAGE_NOTE)
    add_arguments(parser)
    parser.set_defaults(func=run)
