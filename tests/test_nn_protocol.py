"""The per-step protocol of RecurrentModule: every fast path equals the shared driver, a new
cell needs only a step, the CT-RNN follows its equation, and the Δt helpers decide alike."""

from __future__ import annotations

import math

import pytest
import torch
from small_cells import small_cell_kwargs
from torch import Tensor, nn

from cfc_rl.nn import (
    CELLS,
    CTRNN,
    LTC,
    AutoNCP,
    CfC,
    RecurrentModule,
    cell_input_size,
    make_cell,
    time_input,
)

B, T, I, H = 3, 7, 4, 5
SMALL = small_cell_kwargs(ode_unfolds=2)


def build(name: str) -> RecurrentModule:
    torch.manual_seed(0)
    return make_cell(name, I, H, **SMALL.get(name, {})).double()


# Every cell with a fast path (a `fast` flag), and the wired variants of the two that have one.
FAST = {
    **{name: (lambda name=name: build(name)) for name in CELLS if hasattr(build(name), "fast")},
    "cfc_mm_proj": lambda: CfC(I, H, backbone_units=8, mixed_memory=True, proj_size=2).double(),
    "ltc_autoncp_mm": lambda: LTC(I, AutoNCP(10, 3), ode_unfolds=2, mixed_memory=True).double(),
}


def sequence(state_size: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=generator, dtype=torch.float64, requires_grad=True)
    timespans = torch.rand(B, T, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    state = torch.randn(B, state_size, generator=generator, dtype=torch.float64) * 0.3
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, 2] = resets[2, 5] = resets[1, 0] = True
    return x, timespans.requires_grad_(), state.requires_grad_(), resets


def test_every_cell_has_a_fast_path_or_none() -> None:
    assert set(FAST) >= {"cfc", "cfc_nogate", "cfs", "cfc_mm", "ltc", "lstm", "gru"}
    assert not hasattr(build("ctrnn"), "fast")  # no kernel: the driver is its only path


@pytest.mark.parametrize("name", sorted(FAST))
def test_the_fast_path_equals_the_shared_driver(name: str) -> None:
    """In float64, with resets and per-sample Δt: outputs, final state and the gradients of
    inputs, Δt, initial state and every parameter."""
    cell = FAST[name]()
    assert cell.fast
    x, timespans, state, resets = sequence(cell.state_size)
    wrt = [x, timespans, state, *cell.parameters()]

    def run(forward) -> list[Tensor]:
        y, final = forward()
        loss = y.sin().sum() + final.square().sum()
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        # Discrete cells ignore Δt: no gradient on either path.
        return [
            y,
            final,
            *(g if g is not None else torch.zeros_like(w) for g, w in zip(grads, wrt, strict=True)),
        ]

    fast = run(lambda: cell(x, state, timespans=timespans, resets=resets))
    cell.fast = False  # the driver over plain ATen operations (LTC: no compiled synapses)
    driver = run(lambda: cell.step_sequence(x, state, timespans, resets))
    assert len(fast) == len(driver)
    for got, want in zip(fast, driver, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)
    # fast=False takes the driver through forward as well.
    y_slow = cell(x, state, timespans=timespans, resets=resets)[0]
    torch.testing.assert_close(y_slow, driver[0], rtol=0, atol=0)


class Leaky(RecurrentModule):
    """A new cell in a few lines: h ← h + Δt·(tanh(W x + U h) − h), nothing else."""

    def __init__(self, input_size: int, units: int, **kwargs) -> None:
        super().__init__()
        self.input_size = input_size
        self.w = nn.Linear(input_size, units)
        self.u = nn.Linear(units, units, bias=False)
        self.configure_state(units, units, **kwargs)

    def step(self, x_t: Tensor, h: Tensor, dt_t: Tensor, constants: None) -> Tensor:
        return h + dt_t * (torch.tanh(self.w(x_t) + self.u(h)) - h)


@pytest.mark.parametrize("mixed_memory", [False, True])
@pytest.mark.parametrize("proj_size", [None, 2])
def test_a_cell_with_only_a_step_gets_resets_mixed_memory_and_projection(
    mixed_memory: bool, proj_size: int | None
) -> None:
    torch.manual_seed(0)
    cell = Leaky(I, H, mixed_memory=mixed_memory, proj_size=proj_size).double()
    assert cell.state_size == (2 * H if mixed_memory else H)
    assert cell.output_size == (proj_size or H)
    x, timespans, state, resets = sequence(cell.state_size)
    y, final = cell(x, state, timespans=timespans, resets=resets)
    # The same loop by hand.
    h, c = state.chunk(2, dim=1) if mixed_memory else (state, None)
    outputs = []
    for t in range(T):
        keep = (~resets[:, t : t + 1]).double()
        h = h * keep
        if mixed_memory:
            c = c * keep
            h, c = cell.memory.step(cell.memory.project_inputs(x[:, t]), h, c)
        h = h + timespans[:, t : t + 1] * (torch.tanh(cell.w(x[:, t]) + cell.u(h)) - h)
        outputs.append(h)
    y_ref = torch.stack(outputs, dim=1)
    y_ref = cell.proj(y_ref) if proj_size else y_ref
    final_ref = torch.cat([h, c], dim=1) if mixed_memory else h
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-14)
    # Gradients through the driver, on a shorter piece (parameters included).
    names = [name for name, _ in cell.named_parameters()]
    short_resets = resets[:2, :4]

    def run(x, state, timespans, *values):
        replaced = dict(zip(names, values, strict=True))
        return torch.func.functional_call(
            cell, replaced, (x, state), {"timespans": timespans, "resets": short_resets}
        )

    short = [v.detach().requires_grad_() for v in (x[:2, :4], state[:2], timespans[:2, :4])]
    assert torch.autograd.gradcheck(run, (*short, *cell.parameters()), fast_mode=True)


def test_ctrnn_takes_one_explicit_euler_step_with_tau_one_at_start() -> None:
    torch.manual_seed(0)
    cell = CTRNN(I, H).double()
    tau = torch.nn.functional.softplus(cell.tau_raw)
    torch.testing.assert_close(tau, torch.ones(H, dtype=torch.float64), rtol=0, atol=1e-7)
    with torch.no_grad():
        cell.tau_raw.add_(torch.linspace(-0.5, 0.5, H, dtype=torch.float64))
    x, timespans, state, _ = sequence(H)
    y, final = cell(x[:, :1], state, timespans=timespans[:, :1])
    tau = torch.nn.functional.softplus(cell.tau_raw)
    drive = torch.tanh(cell.linear(torch.cat([x[:, 0], state], dim=1)))
    expected = state + timespans[:, :1] * (-state / tau + drive)
    torch.testing.assert_close(final, expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(y[:, 0], final, rtol=0, atol=0)


def test_ctrnn_is_stable_below_twice_tau_and_not_far_above() -> None:
    """The decay alone (zero weights): |1 − Δt/τ| < 1 exactly when Δt < 2τ."""
    cell = CTRNN(1, 3).double()
    with torch.no_grad():
        cell.linear.weight.zero_()
        cell.linear.bias.zero_()
    x = torch.zeros(1, 50, 1, dtype=torch.float64)
    state = torch.ones(1, 3, dtype=torch.float64)
    for dt, stable in ((0.5, True), (1.9, True), (2.1, False)):
        _, final = cell(x, state, timespans=dt)
        assert (final.abs().max() < 1.0) == stable, dt
    assert math.isclose(cell(x, state, timespans=0.0)[1][0, 0].item(), 1.0)


def test_time_input_and_cell_input_size_decide_alike() -> None:
    x = torch.randn(B, T, I)
    dt = torch.rand(B, T)
    for name in CELLS:
        cell = make_cell(name, cell_input_size(name, I, has_dt=True), H)
        given, timespans = time_input(cell, x, dt)
        assert given.shape[-1] == cell.input_size
        if cell.uses_timespans:
            assert given is x and timespans is dt
        else:
            assert timespans is None
            torch.testing.assert_close(given[..., -1], dt)
        cell(given, timespans=timespans)
        # Without Δt nothing changes, and a class or a cell answers as its name does.
        assert cell_input_size(name, I, has_dt=False) == I
        assert time_input(cell, x, None) == (x, None)
        assert cell_input_size(type(cell), I, True) == cell_input_size(cell, I, True)
    with pytest.raises(ValueError, match="unknown cell 'rnn'"):
        cell_input_size("rnn", I, True)
