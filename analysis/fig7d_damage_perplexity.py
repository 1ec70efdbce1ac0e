"""Fig. 7d: Perplexity damage vs cohort WD.

Perplexity ratio of each ablation condition against the cohort's mean WD. Reads the tidy records, probe or
ablate tables of each RUN_DIR (never event files) and writes ``fig7d_damage_perplexity`` (PNG and/or table),
its CSV and an ``index.html`` into ``--out``::

    python analysis/fig7d_damage_perplexity.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig7d_damage_perplexity"))
