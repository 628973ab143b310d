"""Discrete recurrent baselines (LSTM, GRU) behind the interface of :mod:`cfc_rl.nn.base`,
and the LSTM memory cell that mixed-memory CfC/LTC models put in front of their update."""

from __future__ import annotations

import itertools
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfc_rl.nn.base import RecurrentModule


class _TorchRNN(RecurrentModule):
    """Runs a fused ``torch.nn`` RNN (cuDNN on GPU), split into segments at reset times.

    Discrete cells have no notion of elapsed time: ``timespans`` is accepted for a uniform
    interface and ignored (feed Δt as an input feature to give them the same information).
    """

    rnn: nn.LSTM | nn.GRU
    uses_timespans = False

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = hidden_size

    @abstractmethod
    def _pack(self, state: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Our flat state as the hidden-state argument of ``self.rnn``."""

    @abstractmethod
    def _unpack(self, hidden: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """The hidden state returned by ``self.rnn`` as our flat state."""

    def _sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
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
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.state_size = 2 * hidden_size
        self.rnn = nn.LSTM(input_size, hidden_size, batch_first=True)

    def _pack(self, state: Tensor) -> tuple[Tensor, Tensor]:
        h, c = state.chunk(2, dim=1)
        return h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()

    def _unpack(self, hidden: tuple[Tensor, Tensor]) -> Tensor:
        return torch.cat([hidden[0][0], hidden[1][0]], dim=1)


class GRU(_TorchRNN):
    """Single-layer GRU (``torch.nn.GRU``, cuDNN on GPU); the state is ``h``.

    :param input_size: number of input features
    :param hidden_size: number of hidden units (the output size)
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        self.state_size = hidden_size
        self.rnn = nn.GRU(input_size, hidden_size, batch_first=True)

    def _pack(self, state: Tensor) -> Tensor:
        return state.unsqueeze(0).contiguous()

    def _unpack(self, hidden: Tensor) -> Tensor:
        return hidden[0]


class MemoryCell(nn.Module):
    """The LSTM cell of mixed-memory models (ncps's ``LSTMCell``): gates ordered
    (input, input gate, forget gate, output gate), forget-gate bias +1, orthogonal recurrent
    weights. Split into an input projection, done for all steps at once, and a step.

    :param input_size: number of input features
    :param hidden_size: number of units of h and c
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_map = nn.Linear(input_size, 4 * hidden_size, bias=True)
        self.recurrent_map = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        # The reference adds 1 to the forget gate's pre-activation; folded into the projection.
        offset = torch.zeros(4 * hidden_size)
        offset[2 * hidden_size : 3 * hidden_size] = 1.0
        self.register_buffer("gate_offset", offset, persistent=False)
        nn.init.xavier_uniform_(self.input_map.weight)
        nn.init.uniform_(self.input_map.bias, -0.1, 0.1)
        nn.init.orthogonal_(self.recurrent_map.weight)

    def project_inputs(self, x: Tensor) -> Tensor:
        """The input half of the gates (forget-gate offset included), for any leading shape."""
        return F.linear(x, self.input_map.weight, self.input_map.bias + self.gate_offset)

    def step(self, x_projected: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One update of ``(h, c)`` from the projected input of this step."""
        z = torch.addmm(x_projected, h, self.recurrent_map.weight.t())
        i, ig, fg, og = z.chunk(4, dim=1)
        c = c * torch.sigmoid(fg) + torch.tanh(i) * torch.sigmoid(ig)
        return torch.tanh(c) * torch.sigmoid(og), c
