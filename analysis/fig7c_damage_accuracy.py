"""Fig. 7c: Accuracy damage vs cohort WD.

Minimal-pair accuracy drop of each ablation condition against the cohort's mean WD. Reads the tidy records,
probe or ablate tables of each RUN_DIR (never event files) and writes ``fig7c_damage_accuracy`` (PNG and/or
table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig7c_damage_accuracy.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig7c_damage_accuracy"))
