"""Fig. 6b: Post-activation histograms of top neurons.

Post-activation histograms of the same neurons with their top pairs marked. Reads the tidy records, probe or
ablate tables of each RUN_DIR (never event files) and writes ``fig6b_postactivations`` (PNG and/or table), its
CSV and an ``index.html`` into ``--out``::

    python analysis/fig6b_postactivations.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig6b_postactivations"))
