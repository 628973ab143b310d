"""Cells by name: the single place that lists them.

``make_cell("cfc", 17, 64, backbone_units=64)`` builds any cell of the package; scripts, the
Stable-Baselines3 policies and the YAML configs refer to cells by these names. A new cell (a
:class:`~cfc_rl.nn.base.RecurrentModule` implementing ``step``, see :mod:`cfc_rl.nn.base`)
needs one line in :data:`CELLS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cfc_rl.nn.base import RecurrentModule
from cfc_rl.nn.cfc import CfC
from cfc_rl.nn.ctrnn import CTRNN
from cfc_rl.nn.ltc import LTC
from cfc_rl.nn.rnn import GRU, LSTM
from cfc_rl.nn.wirings import make_wiring


@dataclass(frozen=True)
class CellSpec:
    """A module class and the keyword arguments its name fixes (``cfs`` is CfC in pure mode)."""

    cls: type[RecurrentModule]
    fixed: dict[str, Any] = field(default_factory=dict)

    def build(self, input_size: int, hidden_size: Any, **kwargs: Any) -> RecurrentModule:
        for key, value in self.fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f"this cell fixes {key}={value!r}; got {key}={kwargs[key]!r}")
        return self.cls(input_size, hidden_size, **{**kwargs, **self.fixed})


CELLS: dict[str, CellSpec] = {
    "cfc": CellSpec(CfC, {"mode": "default"}),
    "cfc_nogate": CellSpec(CfC, {"mode": "no_gate"}),
    "cfs": CellSpec(CfC, {"mode": "pure"}),
    "cfc_mm": CellSpec(CfC, {"mixed_memory": True}),
    "ltc": CellSpec(LTC),
    "lstm": CellSpec(LSTM),
    "gru": CellSpec(GRU),
    "ctrnn": CellSpec(CTRNN),
}


def cell_spec(name: str) -> CellSpec:
    """The :class:`CellSpec` called ``name``; a ValueError listing the known names otherwise."""
    try:
        return CELLS[name]
    except KeyError:
        raise ValueError(f"unknown cell {name!r}; known cells: {', '.join(CELLS)}") from None


def make_cell(name: str, input_size: int, hidden_size: Any, **kwargs: Any) -> RecurrentModule:
    """Build the cell called ``name``.

    :param name: one of ``CELLS``: "cfc", "cfc_nogate", "cfs" (pure CfC), "cfc_mm" (mixed
        memory), "ltc", "lstm", "gru", "ctrnn" (plain continuous-time RNN)
    :param input_size: number of input features
    :param hidden_size: number of hidden units (for CfC and LTC also a Wiring, or a mapping
        that :func:`~cfc_rl.nn.wirings.make_wiring` turns into a new one:
        ``{"wiring": "autoncp", "units": 64, "output_size": 16}``)
    :param kwargs: passed to the cell's constructor (e.g. ``backbone_units`` for CfC,
        ``solver`` for LTC)
    :raises ValueError: for an unknown name, listing the known ones
    """
    if isinstance(hidden_size, Mapping):
        hidden_size = make_wiring(hidden_size)
    return cell_spec(name).build(input_size, hidden_size, **kwargs)
