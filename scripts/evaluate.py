"""`cfc-rl evaluate` as a script: `python scripts/evaluate.py --help` (cfc_rl/experiment/cli.py)."""

import sys

from cfc_rl.experiment.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
