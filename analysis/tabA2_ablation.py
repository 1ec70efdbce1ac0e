"""Table A.2: Ablation: baseline / Wasserstein / perplexity-matched / random.

The protocol's condition table per run (ablate folders, and monitored runs at their last ablation step). Reads
the tidy records, probe or ablate tables of each RUN_DIR (never event files) and writes ``tabA2_ablation``
(PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/tabA2_ablation.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("tabA2_ablation"))
