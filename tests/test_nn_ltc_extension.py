"""The compiled LTC loops (cfc_rl/nn/csrc/ltc_cpu.cpp): the synapse sums (over each row's column
range of a wiring) and whole sequences of the fused solver give the same numbers and gradients
as the ATen operations they replace, hand-written backward passes that gradcheck accepts, and a
clear error where a second derivative is asked of them."""

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


KERNELS = ("forward", "backward", "sequence_forward", "sequence_backward")


def spy(extension, monkeypatch) -> dict[str, int]:
    """Route the LTC through ``extension`` and count the calls of its functions."""
    calls = dict.fromkeys(KERNELS, 0)

    def counted(name):
        def call(*args):
            calls[name] += 1
            return getattr(extension, name)(*args)

        return call

    wrapped = SimpleNamespace(**{name: counted(name) for name in KERNELS})
    monkeypatch.setattr(ltc_module, "compiled_loops", lambda device, dtype: wrapped)
    return calls


def expected_calls(solver: str, unfolds: int, mixed_memory: bool = False) -> dict[str, int]:
    """The sensory synapses once; the fused solver's whole sequence in one call, the other
    solvers (and mixed memory) a synapse call per unfold (four per unfold with rk4); as many
    backward calls."""
    if solver == "fused" and not mixed_memory:
        return {"forward": 1, "backward": 1, "sequence_forward": 1, "sequence_backward": 1}
    per_step = T * unfolds * (4 if solver == "rk4" else 1)
    return {
        "forward": 1 + per_step,
        "backward": 1 + per_step,
        "sequence_forward": 0,
        "sequence_backward": 0,
    }


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
    assert calls == expected_calls(solver, cell.ode_unfolds)
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
    assert calls == expected_calls("fused", cell.ode_unfolds, mixed_memory=True)
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
    assert calls == {"forward": 1, "backward": 0, "sequence_forward": 1, "sequence_backward": 0}
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_graph, rtol=0, atol=0)
    torch.testing.assert_close(final, final_graph, rtol=0, atol=0)


def test_fast_false_and_other_dtypes_run_the_aten_operations(extension, monkeypatch) -> None:
    calls = spy(extension, monkeypatch)
    cell = build("fully_connected", "fused", torch.float64, fast=False)
    x, timespans, state, _ = sequence(cell, torch.float64)
    cell(x, state, timespans=timespans)[0].sum().backward()
    assert calls == dict.fromkeys(KERNELS, 0)
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
    kernel = "sequence_backward" if solver == "fused" else "backward"
    assert calls[kernel] > 0


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


NO_RANGES = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


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


def random_ranges(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A column range per row, empty ones and full ones among them."""
    generator = torch.Generator().manual_seed(seed)
    ends = torch.randint(0, n + 1, (m, 2), generator=generator).sort(dim=1).values
    lo, hi = ends[:, 0].contiguous(), ends[:, 1].contiguous()
    lo[0], hi[0] = 0, n
    if m > 1:
        lo[1] = hi[1] = n // 2
    return lo, hi


def in_ranges(m: int, n: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    columns = torch.arange(n)
    return (columns >= lo.unsqueeze(1)) & (columns < hi.unsqueeze(1))


def aten_synapses(v, sigma, offset, w, w_erev):
    activation = torch.sigmoid(sigma * v.unsqueeze(-1) + offset)
    return (activation * w_erev).sum(dim=1), (activation * w).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_ranges", [False, True])
@pytest.mark.parametrize(
    ("batch", "m", "n"),
    # square and rectangular (the sensory synapses); widths below, at and beyond one vector,
    # with remainders; batches below, at and beyond the backward pass's blocks of samples
    [(1, 1, 1), (5, 7, 13), (4, 17, 64), (3, 64, 64), (2, 37, 37), (6, 20, 100), (9, 16, 24)],
)
def test_extension_equals_the_aten_formula(
    extension, batch: int, m: int, n: int, dtype: torch.dtype, with_ranges: bool
) -> None:
    """Synapses outside a row's column range are skipped: they count as absent (w = w_erev =
    0, as a wiring's mask makes them), and their parameters get no gradient."""
    v, sigma, offset, w, w_erev = synapse_operands(batch, m, n, dtype)
    ranges = random_ranges(m, n) if with_ranges else NO_RANGES
    inside = in_ranges(m, n, *ranges) if with_ranges else torch.ones(m, n, dtype=torch.bool)
    w, w_erev = w * inside, w_erev * inside
    operands = (v, sigma, offset, w, w_erev)
    num, den = extension.forward(*operands, *ranges)
    leaves = [t.clone().requires_grad_() for t in operands]
    num_ref, den_ref = aten_synapses(*leaves)
    # The float loops take their sigmoid through tanh: absolute error below 2e-7.
    rel = 1e-5 if dtype == torch.float32 else 1e-13
    assert_close_relative(num, num_ref, rel)
    assert_close_relative(den, den_ref, rel)
    generator = torch.Generator().manual_seed(1)
    grad_num = torch.randn(batch, n, generator=generator, dtype=dtype)
    grad_den = torch.randn(batch, n, generator=generator, dtype=dtype)
    grads = extension.backward(grad_num, grad_den, *operands, *ranges)
    grads_ref = list(torch.autograd.grad((num_ref, den_ref), leaves, (grad_num, grad_den)))
    for k in range(1, 5):  # parameters: the reference's gradients inside the ranges, 0 outside
        grads_ref[k] = grads_ref[k] * inside
    for got, want in zip(grads, grads_ref, strict=True):
        assert torch.isfinite(got).all()
        assert_close_relative(got, want, rel)


def test_wired_cells_skip_the_columns_without_synapses() -> None:
    """Every synapse of a wiring lies inside its row's range; the ranges of an NCP cover about
    a third of the N² pairs (the loops' work), a fully connected cell needs none."""
    cell = LTC(I, AutoNCP(64, 8))
    for mask_name in ("sparsity_mask", "sensory_sparsity_mask"):
        mask = getattr(cell, mask_name)
        lo, hi = ltc_module.column_ranges(mask)
        assert ((mask != 0) <= in_ranges(*mask.shape, lo, hi)).all()
        assert (lo % 8 == 0).all() and ((hi % 8 == 0) | (hi == mask.shape[1])).all()
    lo, hi = ltc_module.column_ranges(cell.sparsity_mask)
    assert int((hi - lo).sum()) < 0.35 * 64 * 64
    dense = LTC(I, 16)
    assert all(t.numel() == 0 for t in ltc_module.column_ranges(dense.sparsity_mask))
    # A changed mask (load_state_dict copies into it) gets new ranges.
    before = cell._ranges("sparsity_mask")
    cell.load_state_dict({**cell.state_dict(), "sparsity_mask": torch.ones(64, 64)})
    assert all(t.numel() == 0 for t in cell._ranges("sparsity_mask"))
    assert before.lo.numel() == 64


def test_extension_gradcheck_and_threads(extension) -> None:
    operands = [t.requires_grad_() for t in synapse_operands(3, 4, 6, torch.float64)]
    operands[0].data[0, 0] = 0.3  # no saturated sigmoid here: finite differences see nothing

    def run(*args):
        return ltc_module._Synapses.apply(extension, ltc_module._Ranges(*NO_RANGES), *args)

    assert torch.autograd.gradcheck(run, tuple(operands))
    # The parallel loops split samples (forward, whole sequences) and presynaptic rows
    # (backward), never a sum: any thread count gives the same bits.
    operands = synapse_operands(256, 64, 64, torch.float32)
    grads_out = torch.randn(2, 256, 64)
    cell = LTC(I, AutoNCP(64, 8))
    x = torch.randn(37, 5, I)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            cell.zero_grad()
            y, _ = cell(x)
            y.square().sum().backward()
            results.append(
                [
                    *extension.forward(*operands, *NO_RANGES),
                    *extension.backward(*grads_out, *operands, *NO_RANGES),
                    y,
                    *(p.grad for p in cell.parameters()),
                ]
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        torch.testing.assert_close(one, two, rtol=0, atol=0)


def test_extension_checks_its_inputs(extension) -> None:
    v, sigma, offset, w, w_erev = synapse_operands(3, 4, 6, torch.float32)
    with pytest.raises(RuntimeError, match="v must be a contiguous"):
        extension.forward(v.t().contiguous().t(), sigma, offset, w, w_erev, *NO_RANGES)
    with pytest.raises(RuntimeError, match=r"sigma must be \(M, N\) with M = 4"):
        extension.forward(v, sigma[:3], offset, w, w_erev, *NO_RANGES)
    with pytest.raises(RuntimeError, match="of one shape"):
        extension.forward(v, sigma, offset[:, :5].contiguous(), w, w_erev, *NO_RANGES)
    with pytest.raises(RuntimeError, match="dtype"):
        extension.forward(v, sigma, offset.double(), w, w_erev, *NO_RANGES)
    with pytest.raises(RuntimeError, match="grad_num and grad_den must be contiguous"):
        extension.backward(
            torch.zeros(3, 5), torch.zeros(3, 6), v, sigma, offset, w, w_erev, *NO_RANGES
        )
    lo, hi = torch.tensor([0, 2, 4, 1]), torch.tensor([6, 3, 4, 7])
    with pytest.raises(RuntimeError, match=r"0 <= lo <= hi <= N = 6, got \[1, 7\) for row 3"):
        extension.forward(v, sigma, offset, w, w_erev, lo, hi)
    with pytest.raises(RuntimeError, match="lo and hi must be contiguous int64"):
        extension.forward(v, sigma, offset, w, w_erev, lo[:3], hi[:3])
    num_s = torch.zeros(3, 5, 6)
    with pytest.raises(RuntimeError, match=r"delta must have shape \[3, 5\]"):
        extension.sequence_forward(
            num_s, num_s, torch.zeros(3, 6), torch.zeros(3, 4), torch.zeros(0),
            torch.zeros(6, 6), torch.zeros(6, 6), torch.zeros(6, 6), torch.zeros(6, 6),
            *NO_RANGES, torch.ones(6), torch.ones(6), torch.zeros(6), 1e-8, 2, False,
        )  # fmt: skip
