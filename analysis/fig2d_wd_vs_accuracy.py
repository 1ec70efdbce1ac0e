"""Fig. 2d: Cohort WD vs minimal-pair accuracy.

Cohort mean WD against baseline minimal-pair accuracy across steps, with Pearson and Spearman r. Reads the
tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig2d_wd_vs_accuracy``
(PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig2d_wd_vs_accuracy.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig2d_wd_vs_accuracy"))
