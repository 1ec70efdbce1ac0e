"""The report's ``index.html``: one self-contained page (PNGs embedded as base64) with a caption under every
figure, tables as HTML, the runs it was made from, and a section listing each skipped figure and why.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from negmonitor.atomic import write_text_atomic
from negmonitor.report.base import Figure
from negmonitor.report.sources import RunData

MAX_TABLE_ROWS = 200
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
figure { margin: 2em 0; border-top: 1px solid #ddd; padding-top: 1em; }
figure img { max-width: 100%; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.4em; }
table { border-collapse: collapse; font-size: 0.75em; margin-top: 0.5em; }
td, th { border: 1px solid #ccc; padding: 2px 6px; }
.paper { color: #888; font-weight: normal; }
.skipped li { margin-bottom: 0.3em; }
"""


def write_index(out: Path, figures: Sequence[Figure], skipped: Sequence[tuple[str, str, str]],
                runs: Sequence[RunData], title: str = "negmonitor report") -> Path:
    """Write ``out/index.html`` atomically and return its path.

    Args:
        figures: the rendered figures, in report order.
        skipped: ``(key, paper figure, reason)`` of every figure not drawn.
        runs: the runs the report was made from.
    """
    parts = [f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>{_e(title)}</h1>",
             f"<p>Made {_e(time.strftime('%Y-%m-%d %H:%M'))} from {len(runs)} run(s):</p>", _runs_list(runs),
             _contents(figures, skipped)]
    parts += [_figure(item) for item in figures]
    parts.append(_skipped(skipped))
    parts.append("</body></html>\n")
    return write_text_atomic("\n".join(parts), out / "index.html")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _runs_list(runs: Sequence[RunData]) -> str:
    items = []
    for run in runs:
        snapshots = run.neuron_steps if run.neuron_steps is not None else run.neurons.get("step", pd.Series(dtype=int))
        steps = sorted(set(run.scalars.step.astype(int).unique()) | {int(s) for s in pd.unique(pd.Series(snapshots))})
        span = f"steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else (f"step {steps[0]}" if steps else "no steps")
        model = f", model {run.meta['model']}" if run.meta.get("model") else ""
        model += f", checkpoint series {run.meta['series']}" if run.meta.get("series") else ""
        items.append(f"<li><b>{_e(run.label)}</b>: {_e(', '.join(run.kinds))} from <code>{_e(run.path)}</code> "
                     f"({_e(span)}{_e(model)})</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _contents(figures: Sequence[Figure], skipped: Sequence[tuple[str, str, str]]) -> str:
    items = [f"<li><a href='#{_e(f.key)}'>{_e(f.paper)} — {_e(f.title)}</a></li>" for f in figures]
    if skipped:
        items.append(f"<li><a href='#skipped'>Skipped ({len(skipped)})</a></li>")
    return "<h2>Contents</h2><ol>" + "".join(items) + "</ol>"


def _figure(item: Figure) -> str:
    body = [f"<figure id='{_e(item.key)}'>",
            f"<h2>{_e(item.title)} <span class='paper'>({_e(item.paper)})</span></h2>"]
    if item.png is not None:
        encoded = base64.b64encode(Path(item.png).read_bytes()).decode("ascii")
        body.append(f"<img src='data:image/png;base64,{encoded}' alt='{_e(item.title)}' "
                    f"data-file='{_e(Path(item.png).name)}'>")
    body.append(f"<figcaption>{_e(item.caption)}")
    links = [p for p in (item.png, item.csv) if p is not None]
    if links:
        body.append(" Files: " + ", ".join(f"<a href='{_e(Path(p).name)}'>{_e(Path(p).name)}</a>" for p in links) + ".")
    body.append("</figcaption>")
    if item.table is not None and not item.table.empty:
        shown = item.table.head(MAX_TABLE_ROWS)
        body.append(shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0))
        if len(item.table) > MAX_TABLE_ROWS:
            body.append(f"<p>(first {MAX_TABLE_ROWS} of {len(item.table)} rows; all in the CSV)</p>")
    body.append("</figure>")
    return "\n".join(body)


def _skipped(skipped: Sequence[tuple[str, str, str]]) -> str:
    if not skipped:
        return "<h2 id='skipped'>Skipped</h2><p>None: every figure had its data.</p>"
    items = [f"<li><b>{_e(paper)}</b> <code>{_e(key)}</code>: {_e(reason)}</li>" for key, paper, reason in skipped]
    return "<h2 id='skipped'>Skipped</h2><ul class='skipped'>" + "".join(items) + "</ul>"
