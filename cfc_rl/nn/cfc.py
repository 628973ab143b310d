"""Closed-form continuous-time (CfC) networks, every variant of the CfC paper.

Each neuron's state after an elapsed time Δt is a closed-form expression, no ODE solver::

    default (gated):  h = tanh(ff1) · (1 − σ(t_a·Δt + t_b)) + σ(t_a·Δt + t_b) · tanh(ff2)
    no_gate:          h = tanh(ff1) + σ(t_a·Δt + t_b) · tanh(ff2)
    pure (Cf-S):      h = A − A · exp(−Δt · (|w_τ| + |ff1|)) · ff1

where ff1, ff2, t_a, t_b are linear heads on a backbone (Linear layers and an activation) of
``[input ; h_previous]``. One :class:`CfC` module covers these modes, mixed memory, an output
projection and sparse NCP wirings; it reproduces ``ncps.torch.CfC`` exactly (see
:func:`cfc_rl.nn.from_ncps`) and fixes its per-sample time handling.

Why the code is laid out this way: the part of each layer that reads the input does not
depend on the state, so it is computed for all time steps in one matrix multiply before the
time loop (:meth:`CfC.prepare_inputs`); the loop only does the recurrent half. The fused
kernel of :mod:`cfc_rl.nn.cfc_fused` runs the whole sequence where it applies; everything
else runs through the shared per-step driver of :class:`~cfc_rl.nn.base.RecurrentModule`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfc_rl.nn.base import RecurrentModule, tracing
from cfc_rl.nn.cfc_fused import FUSED_ACTIVATIONS, cfc_sequence, compiled_loops
from cfc_rl.nn.wirings import Wiring

MODES = ("default", "no_gate", "pure")
# Above this many numbers kept per step (batch × per-sample size), training with the kernel's
# ATen loops takes the shared driver instead, which is faster there (see CfC._sequence).
FUSED_MAX_STEP_ELEMENTS = 1 << 16


class LeCunTanh(nn.Module):
    """``1.7159 · tanh(0.666 · x)``, LeCun's scaled tanh, the reference backbone activation."""

    def forward(self, x: Tensor) -> Tensor:
        return 1.7159 * torch.tanh(0.666 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "lecun_tanh": LeCunTanh,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


class CfCLayer(nn.Module):
    """One CfC update ``h_t = F([input_t ; h_{t-1}], Δt)`` of ``hidden_size`` neurons.

    The backbone (``backbone_layers`` Linear + activation) feeds the heads ff1, ff2, t_a, t_b,
    stored as one fused ``heads`` Linear (only ff1 in pure mode). With ``backbone_layers=0``
    the heads read ``[input ; h]`` directly (the wired layers do this).

    :param in_features: size of the input of this layer
    :param hidden_size: number of neurons
    :param mode: "default", "no_gate" or "pure"
    :param backbone_units: width of the backbone layers
    :param backbone_layers: number of backbone layers (0: none)
    :param backbone_dropout: dropout after backbone layers 2..L (as in the reference)
    :param activation: name of the backbone activation, a key of ``ACTIVATIONS``
    :param sparsity_mask: ``(in_features, hidden_size)`` adjacency of a wiring: which inputs
        feed which neuron through ff1 and ff2 (the time heads stay dense, as in the reference)
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int,
        mode: str = "default",
        backbone_units: int = 128,
        backbone_layers: int = 1,
        backbone_dropout: float = 0.0,
        activation: str = "lecun_tanh",
        sparsity_mask: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown CfC mode {mode!r}; known modes: {', '.join(MODES)}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if backbone_layers < 0 or (backbone_layers > 0 and backbone_units < 1):
            raise ValueError(
                f"backbone_layers must be >= 0 and backbone_units >= 1, "
                f"got {backbone_layers} and {backbone_units}"
            )
        if not 0.0 <= backbone_dropout < 1.0:
            raise ValueError(f"backbone_dropout must be in [0, 1), got {backbone_dropout}")
        self.in_features = in_features
        self.hidden_size = hidden_size
        self.mode = mode
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()
        concat = in_features + hidden_size
        self.backbone = nn.ModuleList(
            nn.Linear(concat if i == 0 else backbone_units, backbone_units)
            for i in range(backbone_layers)
        )
        self.dropout = nn.Dropout(backbone_dropout) if backbone_dropout > 0 else nn.Identity()
        heads_in = backbone_units if backbone_layers > 0 else concat
        n_heads = 1 if mode == "pure" else 4
        self.heads = nn.Linear(heads_in, n_heads * hidden_size)
        if mode == "pure":
            self.w_tau = nn.Parameter(torch.zeros(1, hidden_size))
            self.A = nn.Parameter(torch.ones(1, hidden_size))
        if sparsity_mask is None:
            self.register_buffer("heads_mask", None)
        else:
            mask = torch.ones(n_heads * hidden_size, heads_in)
            ff_rows = hidden_size if mode == "pure" else 2 * hidden_size
            recurrent = torch.ones(hidden_size, hidden_size)
            per_head = torch.cat([torch.as_tensor(np.abs(sparsity_mask)).float(), recurrent]).t()
            mask[:ff_rows] = per_head.repeat(ff_rows // hidden_size, 1)
            self.register_buffer("heads_mask", mask)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: Xavier-uniform for every matrix (each head on its
        own, as if unfused; w_tau and A too), PyTorch's default for the biases."""
        for layer in self.backbone:
            nn.init.xavier_uniform_(layer.weight)
        for head in self.heads.weight.split(self.hidden_size):
            nn.init.xavier_uniform_(head)
        if self.mode == "pure":
            nn.init.xavier_uniform_(self.w_tau)
            nn.init.xavier_uniform_(self.A)

    def heads_weight(self) -> Tensor:
        return self.heads.weight if self.heads_mask is None else self.heads.weight * self.heads_mask

    def first_linear(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(W_input, W_recurrent, bias)`` of the linear map that reads ``[input ; h]``."""
        if len(self.backbone) > 0:
            weight, bias = self.backbone[0].weight, self.backbone[0].bias
        else:
            weight, bias = self.heads_weight(), self.heads.bias
        return weight[:, : self.in_features], weight[:, self.in_features :], bias

    def step(self, pre: Tensor, timespan: Tensor, heads_weight: Tensor) -> Tensor:
        """New h from ``pre`` (the first linear map of ``[input ; h]``) and Δt ``(B, 1)``."""
        if len(self.backbone) > 0:
            z = self.activation(pre)
            for layer in self.backbone[1:]:
                z = self.dropout(self.activation(layer(z)))
            pre = F.linear(z, heads_weight, self.heads.bias)
        if self.mode == "pure":
            return -self.A * torch.exp(-timespan * (self.w_tau.abs() + pre.abs())) * pre + self.A
        ff1, ff2, t_a, t_b = pre.chunk(4, dim=1)
        gate = torch.sigmoid(t_a * timespan + t_b)
        if self.mode == "no_gate":
            return torch.tanh(ff1) + gate * torch.tanh(ff2)
        return torch.tanh(ff1) * (1.0 - gate) + gate * torch.tanh(ff2)


class CfC(RecurrentModule):
    """A closed-form continuous-time RNN over batch-first sequences.

    Examples::

        >>> cfc = CfC(17, 64)                              # 64 fully connected neurons
        >>> y, h = cfc(torch.randn(8, 100, 17), timespans=torch.rand(8, 100))
        >>> wired = CfC(17, AutoNCP(32, output_size=6))   # outputs: the 6 motor neurons

    Elapsed time: the closed form has no solver and no step size to be stable for, so any
    finite Δt ≥ 0 gives finite outputs (a large Δt saturates the gate, or the exponential in
    pure mode). Unlike an ODE solver's, the state is not held at Δt = 0: padding steps should
    be masked or followed by a reset, as :class:`~cfc_rl.sb3.SequenceExtractor` does.
    ``forward`` rejects negative, infinite and NaN timespans.

    :param input_size: number of input features
    :param units: number of neurons, or a :class:`~cfc_rl.nn.wirings.Wiring` (then each of its
        layers is a CfC layer without backbone, masked by the wiring, as in ncps)
    :param mode: "default" (gated), "no_gate", or "pure" (the direct solution, Cf-S)
    :param backbone_units: width of the backbone (128 when None; not allowed with a wiring)
    :param backbone_layers: depth of the backbone (1 when None; not allowed with a wiring)
    :param backbone_dropout: dropout after backbone layers 2..L (0 when None)
    :param activation: backbone activation: "lecun_tanh", "silu", "relu", "tanh" or "gelu"
    :param mixed_memory: put an LSTM memory cell before each update (CfC-mmRNN); the state
        is then ``[h | c]``
    :param proj_size: if set, the outputs go through a Linear layer to this size
    :param fast: run the hand-written kernels where they apply (compiled C++ loops on the CPU,
        fused ATen loops elsewhere): same numbers, several times faster; False differentiates
        through autograd over the shared per-step driver, which second derivatives need. The
        kernel covers an unwired CfC with a one-layer backbone (:attr:`kernel_applies`); every
        other configuration runs the driver either way, and so does every configuration while
        a tracer or exporter records it (:func:`~cfc_rl.nn.base.tracing`).
    """

    cpu_kernels = ("cfc_cpu",)

    def __init__(
        self,
        input_size: int,
        units: int | Wiring,
        *,
        mode: str = "default",
        backbone_units: int | None = None,
        backbone_layers: int | None = None,
        backbone_dropout: float | None = None,
        activation: str = "lecun_tanh",
        mixed_memory: bool = False,
        proj_size: int | None = None,
        fast: bool = True,
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {input_size}")
        self.input_size = input_size
        self.mode = mode
        self.fast = fast
        self.wiring: Wiring | None = None
        if isinstance(units, Wiring):
            given = {
                "backbone_units": backbone_units,
                "backbone_layers": backbone_layers,
                "backbone_dropout": backbone_dropout,
            }
            for key, value in given.items():
                if value is not None:
                    raise ValueError(
                        f"{key} cannot be used with a wiring (wired CfC layers have no backbone)"
                    )
            units.build(input_size)
            assert units.sensory_adjacency_matrix is not None
            self.wiring = units
            self.units = units.units
            layers = [units.get_neurons_of_layer(i) for i in range(units.num_layers)]
            self.layer_sizes = [len(neurons) for neurons in layers]
            cells = []
            for i, neurons in enumerate(layers):
                if i == 0:
                    mask = units.sensory_adjacency_matrix[:, neurons]
                else:
                    mask = units.adjacency_matrix[np.ix_(layers[i - 1], neurons)]
                cells.append(
                    CfCLayer(
                        mask.shape[0],
                        len(neurons),
                        mode,
                        backbone_layers=0,
                        activation=activation,
                        sparsity_mask=mask,
                    )
                )
            self.layers = nn.ModuleList(cells)
        else:
            if isinstance(units, bool) or not isinstance(units, int) or units < 1:
                raise ValueError(f"units must be a positive integer or a Wiring, got {units!r}")
            self.units = units
            self.layer_sizes = [units]
            self.layers = nn.ModuleList(
                [
                    CfCLayer(
                        input_size,
                        units,
                        mode,
                        backbone_units=128 if backbone_units is None else backbone_units,
                        backbone_layers=1 if backbone_layers is None else backbone_layers,
                        backbone_dropout=0.0 if backbone_dropout is None else backbone_dropout,
                        activation=activation,
                    )
                ]
            )
        # The outputs are the neurons of the last layer (all of them without a wiring).
        self.configure_state(
            self.units, self.layer_sizes[-1], mixed_memory=mixed_memory, proj_size=proj_size
        )
        only = self.layers[0]
        self._kernel_applies = (
            self.wiring is None
            and len(only.backbone) == 1
            and only.activation_name in FUSED_ACTIVATIONS
        )
        # Numbers the kernel keeps per sample and step (pre-activations, activations, heads,
        # states; the memory cell's gates, output and cell state): see _sequence for why.
        self._fused_step_size = (
            2 * only.heads.in_features
            + only.heads.out_features
            + self.units * (7 if mixed_memory else 1)
        )

    @property
    def kernel_applies(self) -> bool:
        """Whether the fused kernel of :mod:`cfc_rl.nn.cfc_fused` covers this configuration:
        one unwired layer with a one-layer backbone (any mode, activation, mixed memory)."""
        return self._kernel_applies

    # The per-step protocol: the first layer's input half is hoisted out of the loop.

    def prepare_inputs(self, x: Tensor) -> Tensor:
        w_in, _, bias = self.layers[0].first_linear()
        return F.linear(x, w_in, bias)  # (B, T, D): the input half, all steps at once

    def step_constants(self, x: Tensor) -> tuple[list[Tensor], list[Any], list[Tensor]]:
        """Per layer: the recurrent half of the first linear map (transposed), the input half
        and bias (layers after the first; they read the previous layer's new state) and the
        (masked) heads' weight."""
        rec_weights, in_maps = [], []
        for i, layer in enumerate(self.layers):
            w_in, w_rec, bias = layer.first_linear()
            rec_weights.append(w_rec.t())
            in_maps.append(None if i == 0 else (w_in, bias))
        heads_weights = [layer.heads_weight() for layer in self.layers]
        return rec_weights, in_maps, heads_weights

    def step(
        self, x_t: Tensor, h: Tensor, dt_t: Tensor, constants: tuple[list, list, list]
    ) -> Tensor:
        rec_weights, in_maps, heads_weights = constants
        first = self.layers[0]
        if len(self.layers) == 1:
            return first.step(torch.addmm(x_t, h, rec_weights[0]), dt_t, heads_weights[0])
        hs = h.split(self.layer_sizes, dim=1)
        layer_input = first.step(torch.addmm(x_t, hs[0], rec_weights[0]), dt_t, heads_weights[0])
        new_hs = [layer_input]
        for i in range(1, len(self.layers)):
            w_in, bias = in_maps[i]
            pre = torch.addmm(F.linear(layer_input, w_in, bias), hs[i], rec_weights[i])
            layer_input = self.layers[i].step(pre, dt_t, heads_weights[i])
            new_hs.append(layer_input)
        return torch.cat(new_hs, dim=1)

    def readout(self, hs: Tensor) -> Tensor:
        if len(self.layers) == 1:
            return hs
        return hs[..., self.units - self.layer_sizes[-1] :]

    # The fused kernel for whole sequences.

    def _sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        # The kernel saves the per-operation overhead of autograd, which dominates for the
        # batches of RL (dozens of samples). With its ATen loops (CUDA, mixed memory, no C++
        # compiler), large training batches are faster through the shared driver, where the
        # kernel's extra memory traffic costs more than it saves (measured on 2 CPU cores,
        # forward + backward, B256 T64 H128: kernel 150 ms, autograd 123 ms); its compiled CPU
        # loops are the faster at every size measured (B256 T64 H128: 153 ms against 165 ms).
        # A tracer cannot see into the kernel (an autograd Function around compiled loops): it
        # would record their result as a constant. It records the driver's operations instead.
        if not (self.fast and self._kernel_applies) or tracing():
            return self.step_sequence(x, state, timespans, resets)
        per_step = x.shape[0] * self._fused_step_size
        if (
            torch.is_grad_enabled()
            and per_step > FUSED_MAX_STEP_ELEMENTS
            and compiled_loops(x.device, x.dtype) is None
        ):
            return self.step_sequence(x, state, timespans, resets)
        layer = self.layers[0]
        w_in, w_rec, bias = layer.first_linear()
        if self.memory is None:
            h, memory = state, None
        else:
            h, c = state.chunk(2, dim=1)
            memory = (self.memory.project_inputs(x), c, self.memory.recurrent_map.weight)
        y, final_cell = cfc_sequence(
            F.linear(x, w_in, bias),
            h,
            timespans,
            resets,
            w_rec,
            layer.heads.weight,
            layer.heads.bias,
            getattr(layer, "w_tau", None),
            getattr(layer, "A", None),
            layer.mode,
            layer.activation_name,
            memory,
        )
        # The final state is its own tensor, not a view of y: callers edit states in place
        # (episode resets) and outputs (residuals) independently.
        final = y[:, -1].clone() if final_cell is None else torch.cat([y[:, -1], final_cell], 1)
        return (y if self.proj is None else self.proj(y)), final
