"""Make a report: load the runs, draw every registered figure (or the chosen ones), write ``index.html``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from negmonitor.atomic import ensure_writable_dir, write_text_atomic
from negmonitor.errors import NegmonitorError, first_line
from negmonitor.report import (figures_ablation, figures_activations, figures_layers,  # noqa: F401 (registers)
                               figures_negative, figures_pos, figures_training)
from negmonitor.report.base import REGISTRY, Figure, ReportContext, ReportOptions, Skip
from negmonitor.report.html import write_index
from negmonitor.report.sources import RunData, load_runs


@dataclass
class ReportResult:
    """What a report wrote: the drawn figures, the skipped ones with reasons, and the index page."""

    out: Path
    index: Path
    runs: list[RunData]
    figures: list[Figure] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # one line per figure that raised


def figure_keys() -> list[str]:
    """Keys of every registered figure, in report order."""
    return [spec.key for spec in REGISTRY]


def build_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, options: ReportOptions | None = None,
                 only: Sequence[str] | None = None, title: str | None = None,
                 echo: Callable[[str], None] = print) -> ReportResult:
    """Draw the paper's figures for the runs in ``run_dirs`` into ``out`` and write ``out/index.html``.

    Args:
        run_dirs: log folders, records folders, probe or ablate ``--out`` folders (or folders above them).
        out: output folder (created).
        options: :class:`ReportOptions` (models, probe text, ...).
        only: keys or paper numbers of the figures to draw (default: all), e.g. ``["fig2b_emergence", "7a"]``.
        echo: where the one-line progress messages go.

    Raises:
        NegmonitorError: no run dir given, one holds nothing readable, the output is not writable, or ``only``
            names an unknown figure.
    """
    if not run_dirs:
        raise NegmonitorError("no RUN_DIR given — pass at least one log, records, probe or ablate folder")
    options = options or ReportOptions()
    specs = select_specs(only)
    runs = load_runs(run_dirs)
    target = ensure_writable_dir(out, "report folder")
    ctx = ReportContext(runs, target, options)
    result = ReportResult(target, target / "index.html", runs)
    echo(f"report: {len(runs)} run(s): " + ", ".join(f"{r.label} [{'+'.join(r.kinds)}]" for r in runs))
    for spec in specs:
        try:
            item = spec.draw(ctx)
        except Skip as why:
            result.skipped.append((spec.key, spec.paper, str(why)))
            echo(f"  skipped {spec.paper:<12} {spec.key}: {why}")
            continue
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the rest of the report
            if options.strict:
                raise
            result.skipped.append((spec.key, spec.paper, f"failed: {type(exc).__name__}: {exc}"))
            result.failed.append(f"{spec.key} ({spec.paper}) failed: {type(exc).__name__}: {first_line(exc, 300)}")
            echo(f"  FAILED  {spec.paper:<12} {spec.key}: {type(exc).__name__}: {exc} (rerun with --debug)")
            continue
        if item.data is not None and not item.data.empty:
            item.csv = write_text_atomic(item.data.to_csv(index=False, float_format="%.7g"), target / f"{item.key}.csv")
        result.figures.append(item)
        echo(f"  drew    {spec.paper:<12} {item.png or item.csv}")
    write_index(target, result.figures, result.skipped, runs, title or _title(runs))
    return result


def select_specs(only: Sequence[str] | None) -> list:
    """The registered figures named in ``only`` (keys, key prefixes or paper numbers such as ``2b``, ``A.2``)."""
    if not only:
        return list(REGISTRY)
    chosen = []
    for name in only:
        wanted = [s for s in REGISTRY if _matches(s, name)]
        if not wanted:
            raise NegmonitorError(f"unknown figure {name!r} — choose from {', '.join(figure_keys())}")
        chosen += [s for s in wanted if s not in chosen]
    return [s for s in REGISTRY if s in chosen]


def _matches(spec, name: str) -> bool:
    name = name.strip()
    number = spec.paper.split(" ", 1)[-1].split("/")[0].strip().lower().replace(".", "")
    return spec.key == name or spec.key.startswith(name + "_") or number == name.lower().replace(".", "")


def _title(runs: Sequence[RunData]) -> str:
    return "negmonitor report: " + ", ".join(r.label for r in runs)
