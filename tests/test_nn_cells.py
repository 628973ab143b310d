"""Behaviour every cell shares: the interface, per-sample time, state hand-over, resets,
gradients; and LTC's solvers."""

from __future__ import annotations

import itertools

import pytest
import torch
from small_cells import small_cell_kwargs

from cfc_rl.nn import CELLS, CTRNN, LTC, AutoNCP, CfC, RecurrentModule, cfc_fused, make_cell

B, T, I, H = 3, 8, 4, 6  # B is neither 1 nor the hidden size on purpose
SMALL = small_cell_kwargs()


def build(name: str, dtype: torch.dtype = torch.float64) -> RecurrentModule:
    torch.manual_seed(0)
    return make_cell(name, I, H, **SMALL.get(name, {})).to(dtype)


# Wired variants join the registry's cells in every behavioural test.
VARIANTS = {
    **{name: (lambda name=name: build(name)) for name in CELLS},
    "cfc_autoncp": lambda: CfC(I, AutoNCP(10, 3), mixed_memory=True, proj_size=2).double(),
    "ltc_autoncp_rk4": lambda: LTC(I, AutoNCP(10, 3), solver="rk4", ode_unfolds=2).double(),
    "cfc_2layers_dropout": lambda: (
        CfC(I, H, backbone_layers=2, backbone_units=8, backbone_dropout=0.3).double().eval()
    ),
    "ctrnn_mm_proj": lambda: CTRNN(I, H, mixed_memory=True, proj_size=2).double(),
}
CONTINUOUS = [name for name, make in VARIANTS.items() if make().uses_timespans]


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=generator, dtype=torch.float64)
    timespans = torch.rand(B, T, generator=generator, dtype=torch.float64) * 1.5 + 0.1
    return x, timespans


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_interface_shapes(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    y, state = cell(x, timespans=timespans)
    assert y.shape == (B, T, cell.output_size)
    assert state.shape == (B, cell.state_size)
    assert cell.input_size == I
    initial = cell.initial_state(B)
    assert initial.shape == (B, cell.state_size) and initial.dtype == torch.float64
    assert not initial.any()
    # The default state is the initial state.
    torch.testing.assert_close(cell(x, initial, timespans=timespans)[0], y, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_per_sample_timespans_equal_running_each_sample_alone(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    state = torch.randn(B, cell.state_size, dtype=torch.float64) * 0.3
    y, final = cell(x, state, timespans=timespans)
    for b in range(B):
        y_b, final_b = cell(x[b : b + 1], state[b : b + 1], timespans=timespans[b : b + 1])
        torch.testing.assert_close(y[b : b + 1], y_b, rtol=0, atol=1e-12)
        torch.testing.assert_close(final[b : b + 1], final_b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_continuous_time_cells_depend_on_elapsed_time(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    y_given = cell(x, timespans=timespans)[0]
    y_default = cell(x)[0]
    assert (y_given - y_default).abs().max() > 1e-4
    # A float means that elapsed time for every step and sample.
    torch.testing.assert_close(
        cell(x, timespans=0.5)[0], cell(x, timespans=torch.full((B, T), 0.5))[0], rtol=0, atol=0
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_splitting_a_sequence_and_passing_the_state_equals_one_call(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    y, final = cell(x, timespans=timespans)
    y1, state = cell(x[:, :3], timespans=timespans[:, :3])
    y2, final_split = cell(x[:, 3:], state, timespans=timespans[:, 3:])
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(final_split, final, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reset_equals_a_fresh_run_and_leaves_earlier_steps_alone(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    state = torch.randn(B, cell.state_size, dtype=torch.float64) * 0.3
    resets = torch.zeros(B, T, dtype=torch.bool)
    reset_at = {0: 3, 1: 5}  # sample 2 never resets
    for b, t in reset_at.items():
        resets[b, t] = True
    y_plain, final_plain = cell(x, state, timespans=timespans)
    y, final = cell(x, state, timespans=timespans, resets=resets)
    for b in range(B):
        t = reset_at.get(b, T)
        torch.testing.assert_close(y[b, :t], y_plain[b, :t], rtol=0, atol=1e-12)
        if t < T:
            y_fresh, final_fresh = cell(x[b : b + 1, t:], timespans=timespans[b : b + 1, t:])
            torch.testing.assert_close(y[b : b + 1, t:], y_fresh, rtol=0, atol=1e-12)
            torch.testing.assert_close(final[b : b + 1], final_fresh, rtol=0, atol=1e-12)
            assert (y[b, t:] - y_plain[b, t:]).abs().max() > 1e-6
        else:
            torch.testing.assert_close(final[b], final_plain[b], rtol=0, atol=1e-12)
    # A reset at step 0 ignores the given state.
    first = torch.zeros(B, T, dtype=torch.bool)
    first[:, 0] = True
    torch.testing.assert_close(
        cell(x, state, timespans=timespans, resets=first)[0],
        cell(x, timespans=timespans)[0],
        rtol=0,
        atol=1e-12,
    )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradcheck_in_float64_with_timespans(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    x, timespans = x[:2, :4].clone(), timespans[:2, :4].clone()
    state = (torch.randn(2, cell.state_size, dtype=torch.float64) * 0.3).requires_grad_()
    resets = torch.tensor([[False, False, True, False], [False, False, False, False]])
    x.requires_grad_()
    timespans.requires_grad_()
    params = [p for p in cell.parameters() if p.requires_grad]
    # Parameters take part as inputs, so their gradients are checked too.
    names = [n for n, p in cell.named_parameters() if p.requires_grad]

    def run(x, state, timespans, *values):
        replaced = dict(zip(names, values, strict=True))
        y, final = torch.func.functional_call(
            cell, replaced, (x, state), {"timespans": timespans, "resets": resets}
        )
        return y, final

    assert torch.autograd.gradcheck(run, (x, state, timespans, *params), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["cfc", "cfs", "cfc_mm"])
def test_gradcheck_of_the_fused_kernels_aten_loops(name: str, monkeypatch) -> None:
    """The ATen loops (CUDA's) on the CPU; the test above checks the compiled loops."""
    monkeypatch.setattr(cfc_fused, "compiled_loops", lambda device, dtype: None)
    test_gradcheck_in_float64_with_timespans(name)


def test_ltc_solvers_agree_as_unfolds_grow() -> None:
    torch.manual_seed(0)
    x, timespans = inputs()
    reference_cell = LTC(I, 8, solver="rk4", ode_unfolds=256).double()
    reference = reference_cell(x, timespans=timespans)[0]
    state = reference_cell.state_dict()
    all_errors = {}
    for solver in ("fused", "euler", "rk4"):
        errors = all_errors[solver] = []
        for unfolds in (2, 8, 32, 128):
            cell = LTC(I, 8, solver=solver, ode_unfolds=unfolds).double()
            cell.load_state_dict(state)
            errors.append((cell(x, timespans=timespans)[0] - reference).abs().max().item())
        assert all(a > b for a, b in itertools.pairwise(errors)), (solver, errors)
        # At least first-order convergence: 4x the unfolds, under a third of the error.
        assert errors[-1] < 0.3 * errors[-2] and errors[-1] < 0.02, (solver, errors)
    # RK4 is fourth order: with 8 unfolds it is already far closer than the first-order
    # solvers with 128.
    assert all_errors["rk4"][1] < all_errors["fused"][-1] / 50
    assert all_errors["rk4"][1] < all_errors["euler"][-1] / 10


def test_make_cell_knows_every_name_and_rejects_unknown_ones() -> None:
    assert set(CELLS) == {"cfc", "cfc_nogate", "cfs", "cfc_mm", "ltc", "lstm", "gru", "ctrnn"}
    assert make_cell("cfs", 3, 5).mode == "pure"
    assert make_cell("cfc_nogate", 3, 5).mode == "no_gate"
    assert make_cell("cfc_mm", 3, 5).state_size == 10
    assert make_cell("lstm", 3, 5).state_size == 10
    assert make_cell("ltc", 3, 5, solver="euler").solver == "euler"
    with pytest.raises(ValueError, match=r"unknown cell 'transformer'.*cfc, cfc_nogate"):
        make_cell("transformer", 3, 5)
    with pytest.raises(ValueError, match="fixes mode='pure'"):
        make_cell("cfs", 3, 5, mode="default")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda c: c(torch.randn(B, I)),
            r"expected x of shape \(batch >= 1, time >= 1, 4\), got \(3, 4\)",
        ),
        (lambda c: c(torch.randn(B, 0, I)), r"time >= 1, 4\), got \(3, 0, 4\)"),
        (lambda c: c(torch.randn(0, T, I)), r"batch >= 1, .* got \(0, 8, 4\)"),
        (lambda c: c(torch.randn(B, T, I), torch.zeros(B, H, dtype=torch.float64)), "dtype"),
        (lambda c: c(torch.randn(B, T, I + 1)), r"expected x of shape .* got \(3, 8, 5\)"),
        (lambda c: c(torch.randn(B, T, I), torch.zeros(B, 2)), r"expected state .*\(3, 6\)"),
        (
            lambda c: c(torch.randn(B, T, I), timespans=torch.ones(B)),
            r"expected timespans of shape \(3, 8\) or a float, got \(3,\)",
        ),
        (
            lambda c: c(torch.randn(B, T, I), resets=torch.zeros(B, T + 1, dtype=torch.bool)),
            r"expected resets of shape \(3, 8\), got \(3, 9\)",
        ),
    ],
)
def test_wrong_shapes_name_the_expected_and_received_shape(call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call(CfC(I, H))


def test_bad_constructor_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="unknown CfC mode 'fast'"):
        CfC(I, H, mode="fast")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        CfC(I, H, activation="swish")
    with pytest.raises(ValueError, match="backbone_units cannot be used with a wiring"):
        CfC(I, AutoNCP(10, 3), backbone_units=64)
    with pytest.raises(ValueError, match="unknown LTC solver 'dopri5'"):
        LTC(I, H, solver="dopri5")
    with pytest.raises(ValueError, match="units must be a positive integer or a Wiring"):
        CfC(I, 0)
    with pytest.raises(ValueError, match="output_size must be less than units - 2"):
        AutoNCP(5, 3)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_state_dict_round_trip_gives_identical_outputs(name: str) -> None:
    x, timespans = inputs()
    source, target = VARIANTS[name](), VARIANTS[name]()
    with torch.no_grad():
        for param in target.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    expected = source(x, timespans=timespans)[0]
    assert (target(x, timespans=timespans)[0] - expected).abs().max() > 1e-6
    target.load_state_dict(source.state_dict())
    torch.testing.assert_close(target(x, timespans=timespans)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_zero_elapsed_time_gives_finite_outputs(name: str) -> None:
    """Padding in RL minibatches has Δt = 0; it must not poison a batch with NaN."""
    cell = VARIANTS[name]()
    x, _ = inputs()
    y, final = cell(x, timespans=0.0)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()


def test_ltc_state_does_not_move_when_no_time_passes() -> None:
    cell = LTC(I, 8).double()
    state = torch.randn(B, 8, dtype=torch.float64)
    _, final = cell(inputs()[0], state, timespans=0.0)
    torch.testing.assert_close(final, state, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loops", ["compiled", "aten"])
@pytest.mark.parametrize("mixed_memory", [False, True])
@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
@pytest.mark.parametrize("activation", ["lecun_tanh", "tanh", "relu", "silu", "gelu"])
def test_fused_cfc_kernel_equals_the_shared_driver(
    mode: str, activation: str, mixed_memory: bool, loops: str, monkeypatch
) -> None:
    """Outputs and every gradient (inputs, Δt, state, parameters) of the hand-written
    backward pass equal autograd's through the shared driver, with the kernel's compiled CPU
    loops and with its ATen loops (what CUDA runs)."""
    if loops == "aten":
        monkeypatch.setattr(cfc_fused, "compiled_loops", lambda device, dtype: None)
    torch.manual_seed(0)
    cell = CfC(
        I, H, mode=mode, backbone_units=8, activation=activation, mixed_memory=mixed_memory
    ).double()
    assert cell.fast and cell.kernel_applies
    x, timespans = inputs()
    x.requires_grad_()
    timespans.requires_grad_()
    state = torch.randn(B, cell.state_size, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, 3] = resets[2, 1] = True
    wrt = [x, timespans, state, *cell.parameters()]
    for given_resets in (None, resets):
        y, final = cell(x, state, timespans=timespans, resets=given_resets)
        y_ref, final_ref = cell.step_sequence(x, state, timespans, given_resets)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(final, final_ref, rtol=0, atol=1e-12)
        loss, loss_ref = (
            v[0].sin().sum() + v[1].square().sum() for v in ((y, final), (y_ref, final_ref))
        )
        for grad, grad_ref in zip(
            torch.autograd.grad(loss, wrt), torch.autograd.grad(loss_ref, wrt), strict=True
        ):
            torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-11)


def test_configurations_outside_the_fused_kernel_use_the_shared_driver(monkeypatch) -> None:
    assert CfC(I, H).kernel_applies and CfC(I, H, mode="pure", activation="gelu").kernel_applies
    assert CfC(I, H, mixed_memory=True).kernel_applies
    assert not CfC(I, H, backbone_layers=2).kernel_applies
    assert not CfC(I, H, backbone_layers=0).kernel_applies
    assert not CfC(I, AutoNCP(10, 3)).kernel_applies
    x, timespans = inputs()
    for cell, driver in (
        (CfC(I, H, backbone_units=8), False),
        (CfC(I, H, backbone_units=8, fast=False), True),
        (CfC(I, H, backbone_layers=2, backbone_units=8), True),
        (CfC(I, AutoNCP(10, 3)), True),
    ):
        calls: list[int] = []
        original = cell.step_sequence
        monkeypatch.setattr(
            cell, "step_sequence", lambda *a, f=original, c=calls: c.append(1) or f(*a)
        )
        cell.double()(x, timespans=timespans)
        assert bool(calls) == driver


def test_large_training_batches_take_the_shared_driver_without_compiled_loops(
    monkeypatch,
) -> None:
    import cfc_rl.nn.cfc as cfc_module

    cell = CfC(I, H, backbone_units=8).double()
    x, timespans = inputs()
    # The compiled loops are the faster at every size: where they are available (made so here,
    # for the dispatch, even with CFC_RL_CPU_EXTENSIONS=0), the kernel keeps large batches.
    monkeypatch.setattr(cfc_module, "compiled_loops", lambda device, dtype: object())
    monkeypatch.setattr(cfc_module, "FUSED_MAX_STEP_ELEMENTS", B * cell._fused_step_size - 1)
    original = cell.step_sequence
    monkeypatch.setattr(cell, "step_sequence", lambda *a: pytest.fail("the shared driver"))
    cell(x, timespans=timespans)
    # Its ATen loops hand them to the shared driver.
    monkeypatch.setattr(cfc_module, "compiled_loops", lambda device, dtype: None)
    monkeypatch.setattr(cfc_fused, "compiled_loops", lambda device, dtype: None)
    monkeypatch.setattr(cfc_module, "FUSED_MAX_STEP_ELEMENTS", 1 << 16)
    calls = []
    monkeypatch.setattr(cell, "step_sequence", lambda *a: calls.append(1) or original(*a))
    y_kernel = cell(x, timespans=timespans)[0]
    assert not calls
    monkeypatch.setattr(cfc_module, "FUSED_MAX_STEP_ELEMENTS", B * cell._fused_step_size - 1)
    torch.testing.assert_close(cell(x, timespans=timespans)[0], y_kernel, rtol=0, atol=1e-12)
    assert calls
    with torch.no_grad():  # rollouts keep nothing per step: always the kernel
        cell(x, timespans=timespans)
    assert len(calls) == 1


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_outputs_and_final_state_can_be_edited_in_place_independently(name: str) -> None:
    cell = VARIANTS[name]()
    x, timespans = inputs()
    with torch.no_grad():
        y, final = cell(x, timespans=timespans)
        last = y[:, -1].clone()
        final[0] = 0.0  # e.g. an episode ended in a rollout
        torch.testing.assert_close(y[:, -1], last, rtol=0, atol=0)
    y, final = cell(x, timespans=timespans)
    y.add_(1.0)  # e.g. a residual connection
    final[0] = 0.0
    (y.sum() + final.sum()).backward()


def test_second_derivatives_need_the_autograd_path() -> None:
    x, timespans = inputs()
    x.requires_grad_()
    for fast in (True, False):
        torch.manual_seed(0)
        cell = CfC(I, H, backbone_units=8, fast=fast).double()
        assert cell.fast == fast
        y, _ = cell(x, timespans=timespans)
        if fast:  # create_graph=True asks for a differentiable gradient: a clear error
            with pytest.raises(RuntimeError, match=r"no second derivative.*fast=False"):
                torch.autograd.grad(y.square().sum(), x, create_graph=True)
            continue
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        second = torch.autograd.grad(grad_x.square().sum(), list(cell.parameters()))
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in second)


def test_a_scalar_tensor_timespan_keeps_its_gradient() -> None:
    cell = VARIANTS["cfc"]()
    x, _ = inputs()
    scalar = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    full = torch.full((B, T), 0.7, dtype=torch.float64, requires_grad=True)
    (grad_scalar,) = torch.autograd.grad(cell(x, timespans=scalar)[0].sum(), scalar)
    (grad_full,) = torch.autograd.grad(cell(x, timespans=full)[0].sum(), full)
    torch.testing.assert_close(grad_scalar, grad_full.sum(), rtol=1e-10, atol=1e-12)
