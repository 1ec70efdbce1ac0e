"""Fig. 3d: POS excess surprisal under ablation.

Mean surprisal increase per POS when the ablation conditions' neurons are ablated, vs the unablated model.
Reads the tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes
``fig3d_pos_surprisal`` (PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig3d_pos_surprisal.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig3d_pos_surprisal"))
