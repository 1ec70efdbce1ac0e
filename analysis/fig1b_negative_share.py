"""Fig. 1b: negative-side share of WD.

Per layer at each run's last step, the share of WD contributed by negative pre-activations (all neurons and the
top 5% WD), and over training the whole-model ``wd/neg_share`` and ``wd/neg_share_top``. Reads the tidy
records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig1b_negative_share`` (PNG
and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig1b_negative_share.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig1b_negative_share"))
