"""Cells by name: the single place that lists them.

``make_cell("cfc", 17, 64, backbone_units=64)`` builds any cell of the package; scripts, the
Stable-Baselines3 policies and the YAML configs refer to cells by these names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cfc_rl.nn.base import RecurrentModule
from cfc_rl.nn.cfc import CfC
from cfc_rl.nn.ltc import LTC
from cfc_rl.nn.rnn import GRU, LSTM


def _variant(cls: type[RecurrentModule], **fixed: Any) -> Callable[..., RecurrentModule]:
    """A factory of ``cls`` with some keyword arguments fixed by the cell's name."""

    def build(input_size: int, hidden_size: int, **kwargs: Any) -> RecurrentModule:
        for key, value in fixed.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f"this cell fixes {key}={value!r}; got {key}={kwargs[key]!r}")
        return cls(input_size, hidden_size, **{**kwargs, **fixed})

    return build


CELLS: dict[str, Callable[..., RecurrentModule]] = {
    "cfc": _variant(CfC, mode="default"),
    "cfc_nogate": _variant(CfC, mode="no_gate"),
    "cfs": _variant(CfC, mode="pure"),
    "cfc_mm": _variant(CfC, mixed_memory=True),
    "ltc": _variant(LTC),
    "lstm": _variant(LSTM),
    "gru": _variant(GRU),
}


def make_cell(name: str, input_size: int, hidden_size: int, **kwargs: Any) -> RecurrentModule:
    """Build the cell called ``name``.

    :param name: one of ``CELLS``: "cfc", "cfc_nogate", "cfs" (pure CfC), "cfc_mm" (mixed
        memory), "ltc", "lstm", "gru"
    :param input_size: number of input features
    :param hidden_size: number of hidden units (for CfC and LTC also a Wiring)
    :param kwargs: passed to the cell's constructor (e.g. ``backbone_units`` for CfC,
        ``solver`` for LTC)
    :raises ValueError: for an unknown name, listing the known ones
    """
    try:
        factory = CELLS[name]
    except KeyError:
        raise ValueError(f"unknown cell {name!r}; known cells: {', '.join(CELLS)}") from None
    return factory(input_size, hidden_size, **kwargs)
