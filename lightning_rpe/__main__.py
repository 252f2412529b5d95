"""``python -m lightning_rpe``: the same command as ``lightning-rpe``."""

import sys

from lightning_rpe.cli import main

if __name__ == "__main__":
    sys.exit(main())
