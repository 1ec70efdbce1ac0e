"""Fig. 7b: NN / PN / PP shares over training.

Shares of the sign classes among the top pairs of the top-MD neurons, mean over layers, per step. Reads the
tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes
``fig7b_pair_signs_over_training`` (PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig7b_pair_signs_over_training.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig7b_pair_signs_over_training"))
