"""Fig. 2c: Weight drift of the cohort vs the rest.

Layer-normalised weight drift (1 = the layer's average) of the cohort and the rest, and their ratio. Reads the
tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig2c_weight_drift``
(PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig2c_weight_drift.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig2c_weight_drift"))
