"""Fig. 1c: Pre-activation histograms of top neurons.

Pre-activation histograms of the top neurons with their top pairs marked. Reads the tidy records, probe or
ablate tables of each RUN_DIR (never event files) and writes ``fig1c_preactivations`` (PNG and/or table), its
CSV and an ``index.html`` into ``--out``::

    python analysis/fig1c_preactivations.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig1c_preactivations"))
