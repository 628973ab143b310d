"""The compiled LTC synapse loops (cfc_rl/nn/csrc/ltc_cpu.cpp): the same numbers and gradients
as the ATen operations they replace, a hand-written backward pass that gradcheck accepts, and a
clear error where a second derivative is asked of it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cfc_rl.nn import LTC, AutoNCP
from cfc_rl.nn import ltc as ltc_module

B, T, I = 3, 6, 5


@pytest.fixture
def extension(ltc_loops):
    return ltc_loops


def spy(extension, monkeypatch) -> dict[str, int]:
    """Route the LTC through ``extension`` and count the calls of its two functions."""
    calls = {"forward": 0, "backward": 0}

    def counted(name):
        def call(*args):
            calls[name] += 1
            return getattr(extension, name)(*args)

        return call

    wrapped = SimpleNamespace(forward=counted("forward"), backward=counted("backward"))
    monkeypatch.setattr(ltc_module, "compiled_loops", lambda device, dtype: wrapped)
    return calls


def build(wiring: str, solver: str, dtype: torch.dtype, **kwargs) -> LTC:
    torch.manual_seed(0)
    units = AutoNCP(16, 4) if wiring == "autoncp" else 12
    cell = LTC(I, units, solver=solver, ode_unfolds=3, **kwargs).to(dtype)
    # Away from the initial values, so that no parameter's gradient is special.
    with torch.no_grad():
        for param in cell.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return cell


def sequence(cell: LTC, dtype: torch.dtype, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=generator, dtype=dtype)
    # Short steps: the explicit solvers are unstable on long ones, and an unstable solver
    # amplifies rounding differences instead of comparing the two paths.
    timespans = torch.rand(B, T, generator=generator, dtype=dtype) * 0.2 + 0.05
    state = torch.randn(B, cell.state_size, generator=generator, dtype=dtype) * 0.5
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, 2] = resets[2, 4] = True
    return x.requires_grad_(), timespans.requires_grad_(), state.requires_grad_(), resets


def outputs_and_gradients(cell: LTC, x, timespans, state, resets) -> list[torch.Tensor]:
    y, final = cell(x, state, timespans=timespans, resets=resets)
    loss = y.sin().sum() + final.square().sum()
    wrt = [x, timespans, state, *cell.parameters()]
    return [y, final, *torch.autograd.grad(loss, wrt)]


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """Equal to ``rel`` of the expected tensor's largest entry (gradients have entries near
    zero whose relative error says nothing)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("wiring", ["fully_connected", "autoncp"])
@pytest.mark.parametrize("solver", ["fused", "euler", "rk4"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_compiled_loops_equal_the_aten_operations(
    extension, monkeypatch, solver: str, wiring: str, dtype: torch.dtype, with_resets: bool
) -> None:
    """Outputs and every gradient (inputs, Δt, initial state, all parameters)."""
    cell = build(wiring, solver, dtype)
    x, timespans, state, resets = sequence(cell, dtype)
    resets = resets if with_resets else None
    calls = spy(extension, monkeypatch)
    compiled = outputs_and_gradients(cell, x, timespans, state, resets)
    # Sensory synapses once, recurrent ones per unfold (four per unfold with rk4); as many
    # backward calls.
    expected_calls = 1 + T * cell.ode_unfolds * (4 if solver == "rk4" else 1)
    assert calls == {"forward": expected_calls, "backward": expected_calls}
    monkeypatch.setattr(ltc_module, "compiled_loops", lambda device, dtype: None)
    aten = outputs_and_gradients(cell, x, timespans, state, resets)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    for got, want in zip(compiled, aten, strict=True):
        assert_close_relative(got, want, rel)


def test_mixed_memory_and_explicit_constraints_equal_the_aten_operations(
    extension, monkeypatch
) -> None:
    cell = build(
        "fully_connected",
        "fused",
        torch.float64,
        mixed_memory=True,
        input_mapping="linear",
        implicit_param_constraints=False,
    )
    x, timespans, state, resets = sequence(cell, torch.float64)
    calls = spy(extension, monkeypatch)
    compiled = outputs_and_gradients(cell, x, timespans, state, resets)
    assert calls["backward"] > 0
    monkeypatch.setattr(ltc_module, "compiled_loops", lambda device, dtype: None)
    aten = outputs_and_gradients(cell, x, timespans, state, resets)
    for got, want in zip(compiled, aten, strict=True):
        assert_close_relative(got, want, 1e-12)


def test_rollouts_run_the_compiled_forward_pass_without_a_graph(extension, monkeypatch) -> None:
    cell = build("autoncp", "fused", torch.float32)
    x, timespans, state, _ = sequence(cell, torch.float32)
    y_graph, final_graph = cell(x, state, timespans=timespans)
    calls = spy(extension, monkeypatch)
    with torch.no_grad():
        y, final = cell(x, state, timespans=timespans)
    assert calls["forward"] == 1 + T * cell.ode_unfolds
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_graph, rtol=0, atol=0)
    torch.testing.assert_close(final, final_graph, rtol=0, atol=0)


def test_fast_false_and_other_dtypes_run_the_aten_operations(extension, monkeypatch) -> None:
    calls = spy(extension, monkeypatch)
    cell = build("fully_connected", "fused", torch.float64, fast=False)
    x, timespans, state, _ = sequence(cell, torch.float64)
    cell(x, state, timespans=timespans)[0].sum().backward()
    assert calls == {"forward": 0, "backward": 0}
    # The real selector: the loops cover float32 and float64 CPU tensors only.
    monkeypatch.undo()
    assert ltc_module.compiled_loops(torch.device("cpu"), torch.float32) is extension
    assert ltc_module.compiled_loops(torch.device("cpu"), torch.bfloat16) is None
    assert ltc_module.compiled_loops(torch.device("meta"), torch.float32) is None


@pytest.mark.parametrize("solver", ["fused", "euler", "rk4"])
def test_gradcheck_through_the_compiled_loops(extension, monkeypatch, solver: str) -> None:
    torch.manual_seed(0)
    cell = LTC(3, AutoNCP(6, 2), solver=solver, ode_unfolds=2).double()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    timespans = torch.rand(2, 3, generator=generator, dtype=torch.float64) * 0.3 + 0.05
    timespans.requires_grad_()
    state = torch.randn(2, cell.state_size, generator=generator, dtype=torch.float64) * 0.5
    state.requires_grad_()
    resets = torch.tensor([[False, True, False], [False, False, False]])
    names = [name for name, _ in cell.named_parameters()]
    calls = spy(extension, monkeypatch)

    def run(x, state, timespans, *values):
        replaced = dict(zip(names, values, strict=True))
        return torch.func.functional_call(
            cell, replaced, (x, state), {"timespans": timespans, "resets": resets}
        )

    inputs = (x, state, timespans, *cell.parameters())
    assert torch.autograd.gradcheck(run, inputs, atol=1e-7, rtol=1e-5)
    assert calls["backward"] > 0


def test_a_second_derivative_raises_with_the_way_out(extension) -> None:
    cell = build("fully_connected", "fused", torch.float64)
    x, timespans, state, _ = sequence(cell, torch.float64)
    y = cell(x, state, timespans=timespans)[0]
    with pytest.raises(RuntimeError, match=r"no second derivative.*fast=False"):
        torch.autograd.grad(y.square().sum(), list(cell.parameters()), create_graph=True)
    # The way out: autograd through the ATen operations.
    cell.fast = False
    y = cell(x, state, timespans=timespans)[0]
    (grad_sigma,) = torch.autograd.grad(y.square().sum(), [cell.sigma], create_graph=True)
    grad_sigma.square().sum().backward()
    assert cell.sigma.grad is not None and cell.sigma.grad.abs().sum() > 0


def synapse_operands(batch: int, m: int, n: int, dtype: torch.dtype, seed: int = 0):
    """v (B, M) and the (M, N) parameters, in the ranges of an LTC (and beyond, for v)."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(*shape, low, high):
        return torch.rand(*shape, generator=generator, dtype=dtype) * (high - low) + low

    v = torch.randn(batch, m, generator=generator, dtype=dtype)
    v[0, 0], v[-1, -1] = 40.0, -40.0  # saturated sigmoids: 0 and 1, not NaN
    sigma = uniform(m, n, low=3.0, high=8.0)
    offset = -sigma * uniform(m, n, low=0.3, high=0.8)
    w = uniform(m, n, low=0.0, high=1.0)
    w_erev = w * torch.randn(m, n, generator=generator, dtype=dtype).sign()
    return v, sigma, offset, w, w_erev


def aten_synapses(v, sigma, offset, w, w_erev):
    activation = torch.sigmoid(sigma * v.unsqueeze(-1) + offset)
    return (activation * w_erev).sum(dim=1), (activation * w).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("batch", "m", "n"),
    # square and rectangular (the sensory synapses); widths below, at and beyond one vector,
    # with remainders
    [(1, 1, 1), (5, 7, 13), (4, 17, 64), (3, 64, 64), (2, 37, 37), (6, 20, 100)],
)
def test_extension_equals_the_aten_formula(
    extension, batch: int, m: int, n: int, dtype: torch.dtype
) -> None:
    operands = synapse_operands(batch, m, n, dtype)
    num, den = extension.forward(*operands)
    leaves = [t.clone().requires_grad_() for t in operands]
    num_ref, den_ref = aten_synapses(*leaves)
    rel = 1e-5 if dtype == torch.float32 else 1e-13
    assert_close_relative(num, num_ref, rel)
    assert_close_relative(den, den_ref, rel)
    generator = torch.Generator().manual_seed(1)
    grad_num = torch.randn(batch, n, generator=generator, dtype=dtype)
    grad_den = torch.randn(batch, n, generator=generator, dtype=dtype)
    grads = extension.backward(grad_num, grad_den, *operands)
    grads_ref = torch.autograd.grad((num_ref, den_ref), leaves, (grad_num, grad_den))
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(got).all()
        assert_close_relative(got, want, rel)


def test_extension_gradcheck_and_threads(extension) -> None:
    operands = [t.requires_grad_() for t in synapse_operands(3, 4, 6, torch.float64)]
    operands[0].data[0, 0] = 0.3  # no saturated sigmoid here: finite differences see nothing

    def run(*args):
        return ltc_module._Synapses.apply(extension, *args)

    assert torch.autograd.gradcheck(run, tuple(operands))
    # The parallel loops split samples (forward) and presynaptic rows (backward), never a
    # sum: any thread count gives the same bits.
    operands = synapse_operands(256, 64, 64, torch.float32)
    grads_out = torch.randn(2, 256, 64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(
                [*extension.forward(*operands), *extension.backward(*grads_out, *operands)]
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_extension_checks_its_inputs(extension) -> None:
    v, sigma, offset, w, w_erev = synapse_operands(3, 4, 6, torch.float32)
    with pytest.raises(RuntimeError, match="v must be a contiguous"):
        extension.forward(v.t().contiguous().t(), sigma, offset, w, w_erev)
    with pytest.raises(RuntimeError, match=r"sigma must be \(M, N\) with M = 4"):
        extension.forward(v, sigma[:3], offset, w, w_erev)
    with pytest.raises(RuntimeError, match="of one shape"):
        extension.forward(v, sigma, offset[:, :5], w, w_erev)
    with pytest.raises(RuntimeError, match="dtype"):
        extension.forward(v, sigma, offset.double(), w, w_erev)
    with pytest.raises(RuntimeError, match="grad_num and grad_den must be contiguous"):
        extension.backward(torch.zeros(3, 5), torch.zeros(3, 6), v, sigma, offset, w, w_erev)
