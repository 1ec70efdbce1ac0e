"""Every figure of the paper for one or more runs, with an HTML index (same as ``negmonitor report``)::

    python analysis/report.py RUN_DIR [RUN_DIR ...] --out DIR [--model PATH] [--probe-text FILE] [--only 2b,7a]
"""

import sys

from negmonitor.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
