"""Fig. A.5: POS enrichment of top-pair tokens.

log2 of each POS's share among top-pair tokens over its share in the probe text. Reads the tidy records, probe
or ablate tables of each RUN_DIR (never event files) and writes ``figA5_pos_enrichment`` (PNG and/or table),
its CSV and an ``index.html`` into ``--out``::

    python analysis/figA5_pos_enrichment.py RUN_DIR [RUN_DIR ...] --out DIR

The drawing lives in :mod:`negmonitor.report` (``negmonitor report`` draws every figure at once).
"""

import sys

from negmonitor.report.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("figA5_pos_enrichment"))
