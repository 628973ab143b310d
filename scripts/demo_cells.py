"""Demo: the cells learn a partially observed system sampled at irregular times.

A damped oscillator is observed through its position only, at irregular intervals Δt. Each
model must output the hidden velocity at every observation, which needs memory (a position
alone does not reveal it) and, with irregular gaps, a sense of elapsed time. CfC and LTC get Δt
as ``timespans``; LSTM and GRU have no notion of time, so they get Δt as an extra input feature.

    python scripts/demo_cells.py [--steps 300] [--cells cfc ltc lstm] [--seed 0]

Prints, per cell, the validation error before and after training, the parameter count and the
training time; the MSE of always predicting zero is the baseline to beat.
"""

from __future__ import annotations

import argparse
import time

import torch

from cfc_rl.nn import CELLS, cell_input_size, make_cell, time_input


def oscillator_batch(batch: int, steps: int, generator: torch.Generator):
    """Positions (B, T, 1), elapsed times (B, T) and velocities (B, T, 1) of damped oscillators
    with random frequency, damping, amplitude and phase, sampled at irregular times."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * (high - low) + low

    dt = uniform(0.05, 0.5, batch, steps)
    t = dt.cumsum(dim=1)
    omega, gamma = uniform(1.0, 3.0, batch, 1), uniform(0.05, 0.3, batch, 1)
    amplitude, phase = uniform(0.5, 1.5, batch, 1), uniform(0.0, 6.283, batch, 1)
    decay = amplitude * torch.exp(-gamma * t)
    position = decay * torch.cos(omega * t + phase)
    velocity = -gamma * position - decay * omega * torch.sin(omega * t + phase)
    return position.unsqueeze(-1), dt, velocity.unsqueeze(-1)


class Regressor(torch.nn.Module):
    """A cell followed by a linear read-out of the velocity."""

    def __init__(self, cell_name: str, hidden: int) -> None:
        super().__init__()
        self.cell = make_cell(cell_name, cell_input_size(cell_name, 1, has_dt=True), hidden)
        self.readout = torch.nn.Linear(self.cell.output_size, 1)

    def forward(self, position: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        # Δt as timespans for continuous-time cells, as one more input for LSTM/GRU
        x, timespans = time_input(self.cell, position, dt)
        y, _ = self.cell(x, timespans=timespans)
        return self.readout(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=["cfc", "ltc", "lstm"], choices=list(CELLS))
    parser.add_argument("--steps", type=int, default=300, help="training steps per cell")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(args.seed + 1)
    val_position, val_dt, val_velocity = oscillator_batch(256, 40, generator)
    zero_mse = val_velocity.square().mean().item()
    print(f"Velocity from irregularly sampled positions; predicting zero: MSE {zero_mse:.3f}")
    print(f"{'cell':<12}{'params':>8}{'MSE before':>12}{'MSE after':>12}{'seconds':>9}")
    for name in args.cells:
        torch.manual_seed(args.seed)
        model = Regressor(name, args.hidden)
        optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
        train_generator = torch.Generator().manual_seed(args.seed)

        def validation_mse(model: Regressor = model) -> float:
            with torch.no_grad():
                prediction = model(val_position, val_dt)
                return (prediction - val_velocity).square().mean().item()

        before = validation_mse()
        start = time.perf_counter()
        for _ in range(args.steps):
            position, dt, velocity = oscillator_batch(32, 40, train_generator)
            loss = (model(position, dt) - velocity).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<12}{params:>8}{before:>12.3f}{validation_mse():>12.3f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
