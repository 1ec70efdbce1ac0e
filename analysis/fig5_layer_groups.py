"""Fig. 5: Layer-group ablation heatmaps.

Damage of ablating each group of layers alone and all groups up to it (cumulative). Reads the tidy records,
probe or ablate tables of each RUN_DIR (never event files) and writes ``fig5_layer_groups`` (PNG and/or
table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig5_layer_groups.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig5_layer_groups"))
