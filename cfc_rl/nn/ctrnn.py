"""A plain continuous-time RNN (CT-RNN), the simplest ODE baseline; also the worked example of
the per-step protocol of :class:`~cfc_rl.nn.base.RecurrentModule`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfc_rl.nn.base import RecurrentModule


class CTRNN(RecurrentModule):
    """``dh/dt = −h/τ + tanh(W·[x ; h] + b)``, one explicit Euler step per time step::

        h ← h + Δt · (−h/τ + tanh(W·[x ; h] + b))

    with a learned time constant per unit, ``τ = softplus(τ_raw)`` (always positive;
    initialised so that τ = 1). W and b are one ``nn.Linear`` with PyTorch's default
    initialisation.

    Stability: explicit Euler on the decay −h/τ is stable for Δt < 2τ (roughly: the recurrent
    term shifts the bound a little), and only follows the ODE closely for Δt well below τ; a
    larger Δt makes the state oscillate or diverge. Scale Δt, or initialise τ larger, when the
    elapsed times are long. A zero Δt leaves the state as it is; ``forward`` rejects negative,
    infinite and NaN timespans.

    :param input_size: number of input features
    :param units: number of neurons (the output size without ``proj_size``)
    :param mixed_memory: put an LSTM memory cell before each update; the state is ``[h | c]``
    :param proj_size: if set, the outputs go through a Linear layer to this size
    """

    def __init__(
        self,
        input_size: int,
        units: int,
        *,
        mixed_memory: bool = False,
        proj_size: int | None = None,
    ) -> None:
        super().__init__()
        if input_size < 1 or isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"input_size and units must be positive, got {input_size}, {units!r}")
        self.input_size = input_size
        self.units = units
        self.linear = nn.Linear(input_size + units, units)
        self.tau_raw = nn.Parameter(torch.full((units,), math.log(math.expm1(1.0))))
        self.configure_state(units, units, mixed_memory=mixed_memory, proj_size=proj_size)

    def prepare_inputs(self, x: Tensor) -> Tensor:
        """``W_x·x + b`` for all steps at once."""
        return F.linear(x, self.linear.weight[:, : self.input_size], self.linear.bias)

    def step_constants(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrent half of W, transposed, and the decay rates 1/τ."""
        return self.linear.weight[:, self.input_size :].t(), F.softplus(self.tau_raw).reciprocal()

    def step(
        self, x_t: Tensor, h: Tensor, dt_t: Tensor, constants: tuple[Tensor, Tensor]
    ) -> Tensor:
        w_rec_t, rate = constants
        drive = torch.tanh(torch.addmm(x_t, h, w_rec_t))
        return h + dt_t * (drive - h * rate)
