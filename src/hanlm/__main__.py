"""`python -m hanlm ...` runs the command line (also what launchers such as torchrun start)."""

import sys

from hanlm.pipeline.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
