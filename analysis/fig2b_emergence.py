"""Fig. 2b: Emergence of the cohort's WD.

Mean WD of the fixed cohort (solid) vs all other neurons (dashed) over steps, one colour per run. Reads the
tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig2b_emergence`` (PNG
and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig2b_emergence.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig2b_emergence"))
