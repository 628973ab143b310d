"""Speed of every recurrent cell as a ratio to torch.nn.LSTM; see cfc_rl/experiment/bench.py.

python scripts/bench_cells.py [--quick] [--shapes S1 S2] [--device cuda]
"""

from cfc_rl.experiment.bench import main

if __name__ == "__main__":
    main()
