"""Pairs table: Top differentiated token pairs.

Tables of the top pairs of each layer's top-MD neurons with tokens, sign and context (last step). Reads the
tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes ``tab_top_pairs`` (PNG
and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/tab_top_pairs.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("tab_top_pairs"))
