"""Recurrent cells for RL policies, all behind one interface (torch only).

Every module takes ``x (B, T, input_size)``, an optional flat state ``(B, state_size)``,
per-sample ``timespans`` and ``resets``, and returns ``(y (B, T, output_size), final_state)``.
A cell is written as one time step (see :mod:`cfc_rl.nn.base`); one shared driver runs the
sequence, resets and mixed memory for all of them.
"""

from cfc_rl.nn.base import MemoryCell, RecurrentModule, cell_input_size, time_input
from cfc_rl.nn.cfc import CfC, CfCLayer
from cfc_rl.nn.ctrnn import CTRNN
from cfc_rl.nn.ltc import LTC
from cfc_rl.nn.ncps_compat import from_ncps
from cfc_rl.nn.registry import CELLS, CellSpec, cell_spec, make_cell
from cfc_rl.nn.rnn import GRU, LSTM
from cfc_rl.nn.wirings import NCP, WIRINGS, AutoNCP, FullyConnected, Wiring, make_wiring

__all__ = [
    "CELLS",
    "CTRNN",
    "GRU",
    "LSTM",
    "LTC",
    "NCP",
    "WIRINGS",
    "AutoNCP",
    "CellSpec",
    "CfC",
    "CfCLayer",
    "FullyConnected",
    "MemoryCell",
    "RecurrentModule",
    "Wiring",
    "cell_input_size",
    "cell_spec",
    "from_ncps",
    "make_cell",
    "make_wiring",
    "time_input",
]
