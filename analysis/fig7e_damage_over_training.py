"""Fig. 7c/d over steps: ablation damage over training against the random draws' band and the matched control.

Each damage measure (margin drop, accuracy drop, perplexity ratio) over training steps for the Wasserstein
ablation, the perplexity-matched control and the random draws' mean ± sd. Reads the tidy records of each RUN_DIR
(never event files) and writes ``fig7e_damage_over_training`` (PNG), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig7e_damage_over_training.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig7e_damage_over_training"))
