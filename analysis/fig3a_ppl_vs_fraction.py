"""Fig. 3a: Perplexity vs fraction of neurons perturbed.

Perplexity under ablation of the top / random / bottom fraction of neurons per layer, per fraction. Reads the
tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig3a_ppl_vs_fraction``
(PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig3a_ppl_vs_fraction.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig3a_ppl_vs_fraction"))
