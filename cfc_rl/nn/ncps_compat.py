"""Load models built or trained with the ``ncps`` package (``ncps.torch.CfC``/``LTC``).

The converted module computes the same outputs (and, unlike ncps, handles per-sample
timespans). ``ncps`` itself is only needed to call :func:`from_ncps`, not to import this file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cfc_rl.nn.base import MemoryCell
from cfc_rl.nn.cfc import ACTIVATIONS, CfC, CfCLayer, LeCunTanh
from cfc_rl.nn.ltc import LTC
from cfc_rl.nn.wirings import Wiring


def _wiring(ncps_wiring: Any) -> Wiring:
    """A copy of an ``ncps.wirings.Wiring`` (matrices and layers) as our Wiring."""
    layers = [ncps_wiring.get_neurons_of_layer(i) for i in range(ncps_wiring.num_layers)]
    return Wiring.from_matrices(
        ncps_wiring.adjacency_matrix,
        ncps_wiring.sensory_adjacency_matrix,
        ncps_wiring.output_dim,
        [[int(n) for n in layer] for layer in layers],
    )


def _copy_memory(ours: MemoryCell | None, theirs: Any) -> None:
    if ours is not None:
        ours.input_map.load_state_dict(theirs.lstm.input_map.state_dict())
        ours.recurrent_map.load_state_dict(theirs.lstm.recurrent_map.state_dict())


def _copy_cfc_cell(ours: CfCLayer, cell: Any) -> None:
    """Copy an ncps ``CfCCell`` into a layer: backbone, the four heads fused, w_tau and A."""
    if cell.backbone is not None:
        linears = [m for m in cell.backbone if isinstance(m, nn.Linear)]
        for mine, theirs in zip(ours.backbone, linears, strict=True):
            mine.load_state_dict(theirs.state_dict())
    heads = [cell.ff1] if ours.mode == "pure" else [cell.ff1, cell.ff2, cell.time_a, cell.time_b]
    ours.heads.weight.copy_(torch.cat([h.weight for h in heads]))
    ours.heads.bias.copy_(torch.cat([h.bias for h in heads]))
    if ours.mode == "pure":
        ours.w_tau.copy_(cell.w_tau)
        ours.A.copy_(cell.A)


def _activation_name(cell: Any) -> str:
    if cell.backbone is None:
        return "lecun_tanh"
    act = cell.backbone[1]
    if type(act).__name__ == "LeCun":
        return "lecun_tanh"
    for name, cls in ACTIVATIONS.items():
        if cls is not LeCunTanh and isinstance(act, cls):
            return name
    raise ValueError(f"unsupported ncps backbone activation {type(act).__name__}")


@torch.no_grad()
def from_ncps(module: nn.Module, *, fast: bool = True) -> CfC | LTC:
    """Convert an ``ncps.torch.CfC`` or ``ncps.torch.LTC`` into the equivalent module here.

    Every configuration is supported: all CfC modes, backbone depth/width/activation/dropout,
    mixed memory, ``proj_size``, wirings (NCP, AutoNCP, FullyConnected, custom), and LTC's
    input/output mappings, unfolds, epsilon and parameter constraints. The module must be
    batch-first (``batch_first=True``, the ncps default), like every module here; both return
    the whole sequence.

    :param module: the ncps module (its parameters are copied, it is not modified)
    :param fast: the converted module's ``fast`` flag: True runs the hand-written kernels where
        they apply (the same numbers), False autograd over the shared per-step driver, which
        second derivatives need
    :return: a :class:`~cfc_rl.nn.CfC` or :class:`~cfc_rl.nn.LTC` in the same train/eval mode
    :raises TypeError: for anything else
    """
    kind = type(module).__name__
    if kind not in ("CfC", "LTC") or not type(module).__module__.startswith("ncps."):
        raise TypeError(f"from_ncps expects an ncps.torch.CfC or ncps.torch.LTC, got {kind}")
    if not module.batch_first:
        raise ValueError("from_ncps needs an ncps module with batch_first=True")
    converted = _from_ncps_cfc(module, fast) if kind == "CfC" else _from_ncps_ltc(module, fast)
    converted.train(module.training)
    return converted


def _from_ncps_cfc(module: Any, fast: bool) -> CfC:
    wired = getattr(module, "wired_mode", False)
    proj_size = module.proj_size
    if wired:
        cells = list(module.rnn_cell._layers)
        converted = CfC(
            module.input_size,
            _wiring(module.wiring),
            mode=cells[0].mode,
            mixed_memory=module.use_mixed,
            proj_size=proj_size,
            fast=fast,
        )
    else:
        cell = module.rnn_cell
        cells = [cell]
        dropouts = [m for m in (cell.backbone or []) if isinstance(m, nn.Dropout)]
        converted = CfC(
            module.input_size,
            cell.hidden_size,
            mode=cell.mode,
            backbone_units=cell.backbone[0].out_features if cell.backbone is not None else 128,
            backbone_layers=cell.backbone_layers,
            backbone_dropout=dropouts[0].p if dropouts else 0.0,
            activation=_activation_name(cell),
            mixed_memory=module.use_mixed,
            proj_size=proj_size,
            fast=fast,
        )
    for ours, theirs in zip(converted.layers, cells, strict=True):
        _copy_cfc_cell(ours, theirs)
    _copy_memory(converted.memory, module)
    if converted.proj is not None:
        converted.proj.load_state_dict(module.fc.state_dict())
    return converted


def _from_ncps_ltc(module: Any, fast: bool) -> LTC:
    cell = module.rnn_cell
    converted = LTC(
        module.input_size,
        _wiring(module._wiring),
        solver="fused",
        ode_unfolds=cell._ode_unfolds,
        input_mapping=cell._input_mapping
        if cell._input_mapping in ("affine", "linear")
        else "none",
        output_mapping=(
            cell._output_mapping if cell._output_mapping in ("affine", "linear") else "none"
        ),
        mixed_memory=module.use_mixed,
        epsilon=cell._epsilon,
        implicit_param_constraints=cell._implicit_param_constraints,
        fast=fast,
    )
    ours = dict(converted.named_parameters())
    for name, value in cell._params.items():
        if name in ("sparsity_mask", "sensory_sparsity_mask"):
            getattr(converted, name).copy_(value)
        else:
            ours[name].copy_(value)
    _copy_memory(converted.memory, module)
    return converted
