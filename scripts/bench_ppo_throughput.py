"""RecurrentPPO env steps/s per policy, as a ratio to sb3-contrib's MlpLstmPolicy; see
cfc_rl/experiment/throughput.py.

    python scripts/bench_ppo_throughput.py [--rounds 3] [--steps 4096] [--policies cfc mlp]
"""

from cfc_rl.experiment.throughput import main

if __name__ == "__main__":
    main()
