"""The LTC's ode_unfolds trade-off, accuracy against speed; see cfc_rl/experiment/ltc_unfolds.py.

python scripts/bench_ltc_unfolds.py [--unfolds 1 2 3 6] [--rounds 5]
"""

from cfc_rl.experiment.ltc_unfolds import main

if __name__ == "__main__":
    main()
