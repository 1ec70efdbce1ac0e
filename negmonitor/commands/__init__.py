"""Sub-commands of the ``negmonitor`` command line, one module each."""

