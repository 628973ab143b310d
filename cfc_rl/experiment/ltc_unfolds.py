"""The LTC's ``ode_unfolds`` trade-off: accuracy of its state against time per call.

The LTC's solver ("fused", semi-implicit Euler, as ncps) takes ``ode_unfolds`` steps of
``Δt / ode_unfolds`` per time step; its cost grows in proportion. This measures, for each unfold
count:

- **error**: the cell's states over a sequence against a fine reference solution of the same
  ODE with the same parameters (classic RK4 with many steps per time step, checked to have
  converged by halving its step), as the RMS error over all samples, steps and neurons relative
  to the RMS of the reference states, and the largest absolute error; for a short Δt (0.05, a
  control period of the suite's tasks) and for Δt = 1 (what a policy without reported elapsed
  time uses);
- **speed**: one training call (forward and backward) on the S1 shape of
  ``scripts/bench_cells.py`` (B64 T128 I17 H64), as a ratio to ``torch.nn.LSTM`` timed in the
  same process, interleaved round by round, and to the default 6 unfolds.

    python scripts/bench_ltc_unfolds.py [--unfolds 1 2 3 6] [--rounds 5]

Writes ``results/ltc_unfolds_cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cfc_rl.experiment.runs import atomic_write_text, machine_description
from cfc_rl.nn import LTC

DT_VALUES = (0.05, 1.0)
ACCURACY = {"batch": 8, "steps": 50, "inputs": 4, "units": 64, "seeds": (0, 1, 2)}
SPEED = {"batch": 64, "steps": 128, "inputs": 17, "units": 64}
# RK4 steps per time step of the reference, per Δt: far below the neurons' time constants
# (about 0.02 at the initial parameters of 64 fully connected neurons).
REFERENCE_UNFOLDS = {0.05: 100, 1.0: 2000}


def states(cell: LTC, x: torch.Tensor, dt: float) -> torch.Tensor:
    """The states after every step ``(B, T, N)`` (the readout skipped: the state is what the
    solver computes)."""
    with torch.no_grad():
        hs = []
        state = None
        for t in range(x.shape[1]):
            _, state = cell(x[:, t : t + 1], state, timespans=dt)
            hs.append(state)
        return torch.stack(hs, dim=1)


def reference_cell(cell: LTC, unfolds: int) -> LTC:
    """The same parameters with the RK4 solver at ``unfolds`` steps per time step."""
    reference = LTC(cell.input_size, cell.wiring, solver="rk4", ode_unfolds=unfolds).double()
    reference.load_state_dict(cell.state_dict())
    return reference


def accuracy(unfold_counts: list[int]) -> tuple[list[list[str]], list[str]]:
    """Rows of relative RMS and max errors per unfold count and Δt; notes on the reference."""
    errors: dict[tuple[int, float], list[tuple[float, float]]] = {}
    notes = []
    for dt in DT_VALUES:
        fine = REFERENCE_UNFOLDS[dt]
        convergence = []
        for seed in ACCURACY["seeds"]:
            torch.manual_seed(seed)
            cell = LTC(ACCURACY["inputs"], ACCURACY["units"]).double()
            x = torch.randn(ACCURACY["batch"], ACCURACY["steps"], ACCURACY["inputs"]).double()
            reference = states(reference_cell(cell, fine), x, dt)
            half = states(reference_cell(cell, fine // 2), x, dt)
            scale = reference.square().mean().sqrt().item()
            convergence.append((half - reference).abs().max().item())
            for unfolds in unfold_counts:
                cell.ode_unfolds = unfolds
                got = states(cell, x, dt)
                rms = (got - reference).square().mean().sqrt().item() / scale
                errors.setdefault((unfolds, dt), []).append(
                    (rms, (got - reference).abs().max().item())
                )
        notes.append(
            f"Δt = {dt}: reference RK4 with {fine} steps per time step; with half as many its "
            f"states differ by at most {max(convergence):.1e}"
        )
    rows = []
    for unfolds in unfold_counts:
        row = [str(unfolds)]
        for dt in DT_VALUES:
            values = errors[(unfolds, dt)]
            row.append(f"{statistics.mean(v[0] for v in values):.2e}")
            row.append(f"{max(v[1] for v in values):.2e}")
        rows.append(row)
    return rows, notes


def speed(unfold_counts: list[int], rounds: int) -> tuple[dict[int, float], float, float]:
    """Median time per training call of each unfold count and of torch.nn.LSTM, and of one
    forward call without gradients at 6 unfolds (or the most given)."""
    torch.manual_seed(0)
    x = torch.randn(SPEED["batch"], SPEED["steps"], SPEED["inputs"])
    lstm = nn.LSTM(SPEED["inputs"], SPEED["units"], batch_first=True)
    cells = {u: LTC(SPEED["inputs"], SPEED["units"], ode_unfolds=u) for u in unfold_counts}

    def call(module: nn.Module) -> float:
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        module(x)[0].sum().backward()
        return time.perf_counter() - start

    def forward(module: nn.Module) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            module(x)
        return time.perf_counter() - start

    for module in (lstm, *cells.values()):
        call(module)  # warm-up (and the compiled loops' first load)
    times: dict[object, list[float]] = {"lstm": [], "forward": [], **{u: [] for u in unfold_counts}}
    most = cells[6 if 6 in cells else max(unfold_counts)]
    for _ in range(rounds):
        times["lstm"].append(min(call(lstm) for _ in range(5)))
        for unfolds, cell in cells.items():
            times[unfolds].append(call(cell))
        times["forward"].append(forward(most))
    lstm_time = statistics.median(times["lstm"])
    forward_time = statistics.median(times["forward"])
    return {u: statistics.median(times[u]) for u in unfold_counts}, lstm_time, forward_time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unfolds", type=int, nargs="+", default=[1, 2, 3, 6])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--out", type=Path, default=Path("results") / "ltc_unfolds_cpu.md")
    args = parser.parse_args(argv)
    if any(u < 1 for u in args.unfolds) or args.rounds < 1:
        parser.error("--unfolds and --rounds must be >= 1")
    torch.set_num_threads(1)
    started = time.perf_counter()
    accuracy_rows, notes = accuracy(args.unfolds)
    times, lstm_time, forward_time = speed(args.unfolds, args.rounds)
    default = times.get(6)
    unfolds = 6 if 6 in times else max(args.unfolds)
    # The work: every synapse of the (dense) cell, every unfold, step and sample; the LSTM's:
    # its multiply-adds, 2·4H·(I + H) flops a step forward and about twice that backward.
    synapses = SPEED["batch"] * SPEED["steps"] * unfolds * SPEED["units"] ** 2
    lstm_flops = (
        3
        * 2
        * SPEED["batch"]
        * SPEED["steps"]
        * 4
        * SPEED["units"]
        * (SPEED["inputs"] + SPEED["units"])
    )
    floor = (
        f"- per synapse and unfold ({unfolds} unfolds, S1, {synapses / 1e6:.0f} M synapse "
        f"evaluations a call): forward {1e9 * forward_time / synapses:.2f} ns, forward + "
        f"backward {1e9 * times[unfolds] / synapses:.2f} ns; the LSTM does its "
        f"{lstm_flops / 1e9:.2f} GFLOP of multiply-adds (forward and backward) at "
        f"{lstm_flops / lstm_time / 1e9:.0f} GFLOP/s"
    )
    header = ["ode_unfolds"]
    for dt in DT_VALUES:
        header += [f"rel. RMS error, Δt = {dt}", f"max abs error, Δt = {dt}"]
    header += ["fwd+bwd S1 / LSTM", "time / 6 unfolds"]
    rows = []
    for row, unfolds in zip(accuracy_rows, args.unfolds, strict=True):
        row += [f"{times[unfolds] / lstm_time:.1f}x"]
        row += ["-" if default is None else f"{times[unfolds] / default:.2f}"]
        rows.append(row)
    table = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(row) + " |" for row in rows]
    )
    command = shlex.join(["python", "scripts/bench_ltc_unfolds.py", *(argv or sys.argv[1:])])
    report = "\n".join(
        [
            "# LTC: ode_unfolds, accuracy against speed (cpu)",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- torch {torch.__version__}, Python {platform.python_version()}",
            f"- device: cpu, {machine_description('cpu')}; threads: 1",
            f"- accuracy: LTC({ACCURACY['inputs']}, {ACCURACY['units']}) fully connected, "
            f"initial parameters of seeds {list(ACCURACY['seeds'])}, {ACCURACY['batch']} "
            f"sequences of {ACCURACY['steps']} steps of N(0, 1) inputs, float64; errors of the "
            "states after every step against the reference (mean over seeds of the relative "
            "RMS error, largest absolute error)",
            *(f"- {note}" for note in notes),
            f"- speed: S1 (B{SPEED['batch']} T{SPEED['steps']} I{SPEED['inputs']} "
            f"H{SPEED['units']}), forward + backward, float32, median of {args.rounds} rounds; "
            f"torch.nn.LSTM {1000 * lstm_time:.1f} ms per call",
            floor,
            f"- took {time.perf_counter() - started:.0f} s; reproduce with: `{command}`",
            "",
            table,
        ]
    )
    print(report)
    atomic_write_text(args.out, report + "\n")
    print(f"wrote {args.out}")
