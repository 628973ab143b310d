"""`cfc-rl compare` as a script: `python scripts/compare.py --help` (cfc_rl/experiment/cli.py)."""

import sys

from cfc_rl.experiment.cli import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
