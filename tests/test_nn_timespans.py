"""Elapsed times (timespans): every cell rejects negative, infinite and NaN values with a
message that names the cell and the value; zero and large finite values pass where the solver
allows them; the check leaves gradients to the timespans alone."""

from __future__ import annotations

import math

import pytest
import torch
from small_cells import small_cell_kwargs

from cfc_rl.nn import CELLS, LTC, make_cell

B, T, I, H = 2, 5, 3, 4
SMALL = small_cell_kwargs()
CFC_CELLS = [name for name, spec in CELLS.items() if spec.cls.__name__ == "CfC"]
CONTINUOUS = [name for name, spec in CELLS.items() if spec.cls.uses_timespans]
BAD = {"negative": -1.0, "infinite": math.inf, "minus infinite": -math.inf, "NaN": math.nan}
KIND = {"negative": "a negative", "infinite": "an infinite", "minus infinite": "an infinite"}


def build(name: str, **kwargs):
    torch.manual_seed(0)
    return make_cell(name, I, H, **{**SMALL.get(name, {}), **kwargs})


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("name", sorted(CELLS))
def test_every_cell_rejects_invalid_timespans_as_a_number_and_as_a_tensor(
    name: str, bad: str
) -> None:
    cell = build(name)
    x = torch.randn(B, T, I)
    value = BAD[bad]
    cls = type(cell).__name__
    expected = f"{cls} got timespans with {KIND.get(bad, 'a NaN')} value \\({value}\\)"
    with pytest.raises(ValueError, match=expected + ".*must be finite and >= 0"):
        cell(x, timespans=value)
    per_sample = torch.rand(B, T) + 0.1
    per_sample[1, 3] = value
    with pytest.raises(ValueError, match=expected + " at sample 1, step 3;"):
        cell(x, timespans=per_sample)
    with pytest.raises(ValueError, match=expected):
        cell(x, timespans=torch.tensor(value))  # a 0-dim tensor for every step


@pytest.mark.parametrize("name", sorted(CFC_CELLS))
@pytest.mark.parametrize("fast", [True, False])
def test_cfc_takes_zero_and_large_finite_timespans(name: str, fast: bool) -> None:
    """The closed form has no stability limit: any Δt >= 0 gives finite outputs."""
    cell = build(name, fast=fast)
    x = torch.randn(B, T, I)
    for value in (0.0, 1e3, 1e6, 1e30):
        y, state = cell(x, timespans=value)
        assert torch.isfinite(y).all() and torch.isfinite(state).all(), value
    mixed = torch.tensor([[0.0, 1e6, 0.0, 1e-6, 1e30], [1.0, 0.0, 1e4, 0.0, 0.0]])
    y, _ = cell(x, timespans=mixed)
    assert torch.isfinite(y).all()


def test_ltc_fused_solver_stays_finite_for_large_timespans() -> None:
    """The semi-implicit solver is stable for any Δt (only its accuracy falls)."""
    cell = build("ltc", solver="fused", ode_unfolds=6)
    x = torch.randn(B, T, I)
    for value in (0.0, 1e3, 1e6):
        y, state = cell(x, timespans=value)
        assert torch.isfinite(y).all() and torch.isfinite(state).all(), value


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_ltc_explicit_solvers_are_finite_below_their_stated_bound(solver: str) -> None:
    """The bound the LTC docstring states for the default initialisation (32 neurons, 6
    unfolds): well below it the explicit solvers stay finite."""
    torch.manual_seed(0)
    cell = LTC(I, 32, solver=solver, ode_unfolds=6)
    y, _ = cell(torch.randn(B, 50, I), timespans=0.25)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_the_check_leaves_gradients_to_the_timespans(name: str) -> None:
    cell = build(name).double()
    x = torch.randn(B, T, I, dtype=torch.float64)
    timespans = (torch.rand(B, T, dtype=torch.float64) + 0.1).requires_grad_()
    y, _ = cell(x, timespans=timespans)
    (grad,) = torch.autograd.grad(y.square().sum(), timespans)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # A zero Δt (padding) is allowed and differentiable too.
    zeros = torch.zeros(B, T, dtype=torch.float64, requires_grad=True)
    y, _ = cell(x, timespans=zeros)
    (grad,) = torch.autograd.grad(y.square().sum(), zeros)
    assert torch.isfinite(grad).all()
