"""Discrete recurrent baselines (LSTM, GRU) behind the interface of :mod:`cfc_rl.nn.base`.

Both run ``torch.nn``'s fused implementation (cuDNN on GPU) by default, and also implement the
per-step protocol (:meth:`step` through ``torch.lstm_cell`` / ``torch.gru_cell`` with the same
weights), so that the shared driver runs them too (``fast=False``, and always while a tracer or
exporter records them: :func:`~cfc_rl.nn.base.tracing`).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod

import torch
from torch import Tensor, nn

from cfc_rl.nn.base import MemoryCell, RecurrentModule, tracing

__all__ = ["GRU", "LSTM", "MemoryCell"]  # MemoryCell lives in base.py; importable here too


class _TorchRNN(RecurrentModule):
    """Runs a fused ``torch.nn`` RNN (cuDNN on GPU), split into segments at reset times.

    Discrete cells have no notion of elapsed time: ``timespans`` is accepted for a uniform
    interface and ignored (feed Δt as an input feature to give them the same information),
    though checked as for every cell (negative, infinite or NaN values are errors), so that a
    bad Δt fails the same way whichever cell runs.
    """

    rnn: nn.LSTM | nn.GRU
    uses_timespans = False

    def __init__(self, input_size: int, hidden_size: int, fast: bool) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.fast = fast

    @abstractmethod
    def _pack(self, state: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Our flat state as the hidden-state argument of ``self.rnn``."""

    @abstractmethod
    def _unpack(self, hidden: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """The hidden state returned by ``self.rnn`` as our flat state."""

    def step_constants(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rnn = self.rnn
        return rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0

    def _sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        # Traced, the segment loop would bake this call's reset positions (read with .tolist())
        # into the graph; the driver's per-step masks trace for any resets.
        if not self.fast or tracing():
            return self.step_sequence(x, state, timespans, resets)
        if resets is None:
            starts = [0]
        else:
            # The fused kernel runs a whole segment; a new segment starts wherever some sample
            # resets, and only those samples' states are zeroed there.
            starts = [0, *(resets[:, 1:].any(0).nonzero().flatten() + 1).tolist()]
        outputs = []
        bounds = [*starts, x.shape[1]]
        for start, end in itertools.pairwise(bounds):
            if resets is not None:
                state = state * (~resets[:, start]).unsqueeze(1).to(state.dtype)
            y, hidden = self.rnn(x[:, start:end], self._pack(state))
            state = self._unpack(hidden)
            outputs.append(y)
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], state


class LSTM(_TorchRNN):
    """Single-layer LSTM (``torch.nn.LSTM``, cuDNN on GPU); the state packs ``[h | c]``.

    :param input_size: number of input features
    :param hidden_size: number of hidden units (the output size)
    :param fast: run ``torch.nn.LSTM``'s fused loops (cuDNN on GPU), one call per segment
        between resets; False runs the shared per-step driver over ``torch.lstm_cell`` under
        plain autograd (the same numbers), for second derivatives, which cuDNN's RNN lacks
    """

    def __init__(self, input_size: int, hidden_size: int, *, fast: bool = True) -> None:
        super().__init__(input_size, hidden_size, fast)
        self.rnn = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.configure_state(2 * hidden_size, hidden_size)

    def _pack(self, state: Tensor) -> tuple[Tensor, Tensor]:
        h, c = state.chunk(2, dim=1)
        return h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()

    def _unpack(self, hidden: tuple[Tensor, Tensor]) -> Tensor:
        return torch.cat([hidden[0][0], hidden[1][0]], dim=1)

    def step(self, x_t: Tensor, h: Tensor, dt_t: Tensor, constants: tuple[Tensor, ...]) -> Tensor:
        hidden, cell = torch.lstm_cell(x_t, list(h.chunk(2, dim=1)), *constants)
        return torch.cat([hidden, cell], dim=1)

    def readout(self, hs: Tensor) -> Tensor:
        return hs[..., : self.hidden_size]


class GRU(_TorchRNN):
    """Single-layer GRU (``torch.nn.GRU``, cuDNN on GPU); the state is ``h``.

    :param input_size: number of input features
    :param hidden_size: number of hidden units (the output size)
    :param fast: run ``torch.nn.GRU``'s fused loops (cuDNN on GPU), one call per segment
        between resets; False runs the shared per-step driver over ``torch.gru_cell`` under
        plain autograd (the same numbers), for second derivatives, which cuDNN's RNN lacks
    """

    def __init__(self, input_size: int, hidden_size: int, *, fast: bool = True) -> None:
        super().__init__(input_size, hidden_size, fast)
        self.rnn = nn.GRU(input_size, hidden_size, batch_first=True)
        self.configure_state(hidden_size, hidden_size)

    def _pack(self, state: Tensor) -> Tensor:
        return state.unsqueeze(0).contiguous()

    def _unpack(self, hidden: Tensor) -> Tensor:
        return hidden[0]

    def step(self, x_t: Tensor, h: Tensor, dt_t: Tensor, constants: tuple[Tensor, ...]) -> Tensor:
        return torch.gru_cell(x_t, h, *constants)
