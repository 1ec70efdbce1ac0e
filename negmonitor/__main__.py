"""``python -m negmonitor`` runs the command line."""

import sys

from negmonitor.cli import main

sys.exit(main())
