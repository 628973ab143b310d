"""Sizes that keep each cell small in the tests: a narrow backbone for the CfC variants, few
ODE unfolds for LTC; the other cells take their defaults."""

from __future__ import annotations

from typing import Any

from cfc_rl.nn import CELLS


def small_cell_kwargs(backbone_units: int = 8, ode_unfolds: int = 3) -> dict[str, dict[str, Any]]:
    """Cell keyword arguments by cell name, for the cells that have these sizes."""
    sizes: dict[str, dict[str, Any]] = {
        name: {"backbone_units": backbone_units}
        for name in CELLS
        if name.startswith(("cfc", "cfs"))
    }
    sizes["ltc"] = {"ode_unfolds": ode_unfolds}
    return sizes
