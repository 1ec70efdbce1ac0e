"""Offline analysis: the paper's figures and an HTML report from a run's tidy records.

``negmonitor report RUN_DIR [RUN_DIR ...] --out DIR`` (and the scripts in ``analysis/``, one per figure) read the
records of live runs and replays, ``probe --out`` and ``ablate --out`` folders — never TensorBoard event files —
and write one PNG per figure, the numbers behind it as CSV, and a self-contained ``index.html`` with captions and
a list of the figures that were skipped and why.

Modules: :mod:`~negmonitor.report.sources` (what a folder holds), :mod:`~negmonitor.report.base` (registry and
shared helpers), ``figures_*`` (one module per group of figures), :mod:`~negmonitor.report.activations`
(recomputed or stored activations), :mod:`~negmonitor.report.html` (the index), :mod:`~negmonitor.report.build`
(the loop) and :mod:`~negmonitor.report.cli` (command line and scripts).

Example::

    >>> from negmonitor.report import build_report
    >>> result = build_report(["runs/my-run/version_0"], "report/")  # doctest: +SKIP
    >>> print(result.index)                                          # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"build_report": "build", "figure_keys": "build", "ReportResult": "build", "ReportOptions": "base",
            "Figure": "base", "Skip": "base", "load_runs": "sources", "detect": "sources", "RunData": "sources"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import public names on first use (matplotlib and the figure modules load only when a report is made)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"negmonitor.report.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'negmonitor.report' has no attribute {name!r}")
