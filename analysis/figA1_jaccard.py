"""Fig. A1: Jaccard overlap of top-5% sets.

Per layer, the Jaccard index of the top-5% neuron sets by WD, MD, |skewness| and kurtosis. Reads the tidy
records, probe or ablate tables of each RUN_DIR (never event files) and writes ``figA1_jaccard`` (PNG and/or
table), its CSV and an ``index.html`` into ``--out``::

    python analysis/figA1_jaccard.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("figA1_jaccard"))
