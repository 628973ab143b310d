"""The compiled CPU loops (cfc_rl.nn.cpu_extensions, csrc/cfc_cpu.cpp): they build, they give
the ATen loops' numbers in float32 too (their exp, tanh and erf are approximations), they
reject bad buffers clearly, and the library falls back with a warning where they cannot be
built (no compiler, no ninja) but raises where the compiler fails. Their float64 equality with
autograd and gradcheck are in test_nn_cells.py; the cache and its locks in
test_nn_cpu_build.py."""

from __future__ import annotations

import copy
import os
import re
import shutil
import sys
import warnings

import pytest
import torch

from cfc_rl.nn import CfC, cfc_fused, cpu_extensions


@pytest.mark.parametrize("mixed_memory", [False, True])
@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
@pytest.mark.parametrize("activation", ["lecun_tanh", "tanh", "relu", "silu", "gelu"])
def test_float32_compiled_loops_match_the_aten_loops(
    cfc_loops, mode: str, activation: str, mixed_memory: bool, monkeypatch
) -> None:
    torch.manual_seed(0)
    # The default 128-unit backbone.
    cell = CfC(5, 16, mode=mode, activation=activation, mixed_memory=mixed_memory)
    generator = torch.Generator().manual_seed(1)
    # Inputs large enough to drive tanh and the sigmoid into saturation, where approximations
    # fail first.
    x = (torch.randn(4, 12, 5, generator=generator) * 4).requires_grad_()
    timespans = (torch.rand(4, 12, generator=generator) * 2 + 0.01).requires_grad_()
    state = torch.randn(4, cell.state_size, generator=generator, requires_grad=True)
    resets = torch.rand(4, 12, generator=generator) < 0.2
    wrt = [x, timespans, state, *cell.parameters()]

    def run() -> list[torch.Tensor]:
        y, final = cell(x, state, timespans=timespans, resets=resets)
        loss = (y * torch.linspace(-1, 1, 16)).sum() + final.square().sum()
        return [y, final, *torch.autograd.grad(loss, wrt)]

    compiled = run()
    monkeypatch.setattr(cfc_fused, "compiled_loops", lambda device, dtype: None)
    aten = run()
    for value, reference in zip(compiled, aten, strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5)


def test_compiled_loops_run_a_one_step_rollout_and_a_single_sample(cfc_loops) -> None:
    torch.manual_seed(0)
    cell = CfC(3, 8).double()
    x = torch.randn(1, 1, 3, dtype=torch.float64)
    with torch.no_grad():
        y, final = cell(x)
    reference, _ = cell.step_sequence(x, cell.initial_state(1), torch.ones(1, 1), None)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, reference[:, -1], rtol=0, atol=1e-12)


def test_compiled_loops_reject_buffers_they_cannot_read(cfc_loops) -> None:
    steps, batch, units, hidden = 4, 2, 8, 3
    xw = torch.randn(steps, batch, units).transpose(0, 1)  # (B, T, U), not contiguous
    empty = torch.empty(0)
    args = (
        torch.zeros(batch, hidden),
        torch.ones(batch, steps),
        empty,
        torch.randn(units, hidden),
        torch.randn(4 * hidden, units),
        torch.zeros(4 * hidden),
        empty,
        empty,
        0,
        0,
        1.0,
        1.0,
        empty,
        empty,
        empty,
        True,
    )
    with pytest.raises(RuntimeError, match=r"xw must be contiguous \(B, T, U\)"):
        cfc_loops.forward(xw, *args)
    with pytest.raises(RuntimeError, match=r"h0 must be \(B, H\)"):
        cfc_loops.forward(xw.contiguous(), torch.zeros(batch + 1, hidden), *args[1:])
    memory = list(args)
    memory[-4] = torch.randn(batch, steps, 3 * hidden)  # the memory cell has four gates
    memory[-3] = torch.zeros(batch, hidden)
    with pytest.raises(RuntimeError, match=r"xm must be contiguous \(B, T, 4H\)"):
        cfc_loops.forward(xw.contiguous(), *memory)


def test_without_a_compiler_the_library_warns_once_and_falls_back(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(cpu_extensions.ENV_SWITCH, "1")
    monkeypatch.setenv("CFC_RL_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning) as caught:
        assert cpu_extensions.load.__wrapped__("cfc_cpu") is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert re.search(r"no C\+\+ compiler .*no-such-compiler.*'cfc_cpu'.*install one", message)
    assert "ATen loops" in message and "CFC_RL_CPU_EXTENSIONS=0" in message
    # without ninja (its wheel missing too)
    monkeypatch.setenv("CXX", sys.executable)  # a program that exists
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cpu_extensions, "_put_ninja_on_path", lambda: None)
    with pytest.warns(RuntimeWarning, match=r"no `ninja` .*pip install ninja"):
        assert cpu_extensions.load.__wrapped__("ltc_cpu") is None


def test_a_built_extension_loads_without_a_compiler(cfc_loops, monkeypatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built again"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = cpu_extensions.load.__wrapped__("cfc_cpu")
    assert module is cfc_loops or module.__file__ == cfc_loops.__file__


def test_a_compiler_error_raises_and_names_its_log(monkeypatch, tmp_path) -> None:
    from torch.utils import cpp_extension

    def fail(**kwargs):
        # what ninja and the compiler write, on file descriptors 1 and 2
        os.write(1, b"[1/2] c++ -c cfc_cpu.cpp -o cfc_cpu.o\nFAILED: cfc_cpu.o\n")
        os.write(2, b"cfc_cpu.cpp:3:1: error: 'x' was not declared in this scope\n")
        os.write(1, b"ninja: build stopped: subcommand failed.\n")
        raise RuntimeError("Error building extension 'cfc_rl_cfc_cpu_0123'")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setenv(cpu_extensions.ENV_SWITCH, "1")
    monkeypatch.setenv("CFC_RL_CACHE_DIR", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exception, not a warning and a fallback
        with pytest.raises(cpu_extensions.ExtensionBuildError) as raised:
            cpu_extensions.load.__wrapped__("cfc_cpu")
    (log,) = tmp_path.glob("cfc_cpu-*/build.log")
    assert str(raised.value) == (
        "cfc_rl: building the C++ loops 'cfc_cpu' failed: cfc_cpu.cpp:3:1: error: 'x' was not "
        f"declared in this scope (full log: {log}); set CFC_RL_CPU_EXTENSIONS=0 to run without "
        "the compiled loops"
    )
    assert "ninja: build stopped" in log.read_text()
    assert "error: 'x' was not declared" in log.read_text()


def test_the_extensions_can_be_switched_off(monkeypatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built"))
    for value in ("0", "off", "False"):
        monkeypatch.setenv(cpu_extensions.ENV_SWITCH, value)
        assert not cpu_extensions.enabled()
        assert cpu_extensions.load.__wrapped__("cfc_cpu") is None
    monkeypatch.setenv(cpu_extensions.ENV_SWITCH, "1")
    assert cpu_extensions.enabled()


def test_the_ninja_of_the_wheel_is_found_without_an_activated_environment(monkeypatch) -> None:
    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_extensions._put_ninja_on_path()
    assert os.environ["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert shutil.which("ninja") is not None


def test_half_precision_takes_the_aten_loops() -> None:
    # The C++ is written for float32 and float64; bfloat16 on the CPU still works, via ATen.
    assert cfc_fused.compiled_loops(torch.device("cpu"), torch.bfloat16) is None
    torch.manual_seed(0)
    cell = CfC(3, 8)
    x = torch.randn(2, 5, 3)
    reference = cell(x)[0]
    half = copy.deepcopy(cell).to(torch.bfloat16)
    y = half(x.to(torch.bfloat16))[0]
    y.float().sum().backward()
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in half.parameters())
