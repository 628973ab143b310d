"""`cfc-rl train` as a script: `python scripts/train.py --help` (cfc_rl/experiment/cli.py)."""

import sys

from cfc_rl.experiment.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
