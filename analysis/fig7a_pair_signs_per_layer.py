"""Fig. 7a: NN / PN / PP shares per layer.

Stacked bars per layer of the sign-class shares among top pairs, at each run's last step. Reads the tidy
records, probe or ablate tables of each RUN_DIR (never event files) and writes ``fig7a_pair_signs_per_layer``
(PNG and/or table), its CSV and an ``index.html`` into ``--out``::

    python analysis/fig7a_pair_signs_per_layer.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("fig7a_pair_signs_per_layer"))
