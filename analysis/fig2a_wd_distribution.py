"""Fig. 2a: WD distribution per run.

Histogram of per-neuron WD at each run's last step, the cohort (or current top 5%) outlined. Reads the tidy
records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig2a_wd_distribution`` (PNG
and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig2a_wd_distribution.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig2a_wd_distribution"))
