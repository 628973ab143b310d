"""Tracers and exporters record the plain ATen path of every cell and give the eager numbers.

Each traced or exported program is recorded on one set of inputs (state, per-sample Δt,
resets) and checked on another, against the eager cell on its fast path: a compiled loop
recorded as a constant, or reset positions baked into the graph, would pass on the recording
inputs and fail here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from small_cells import small_cell_kwargs
from torch import Tensor, nn

from cfc_rl.nn import CELLS, RecurrentModule, make_cell
from cfc_rl.nn import cfc as cfc_module
from cfc_rl.nn import ltc as ltc_module
from cfc_rl.nn.base import tracing

B, T, I, H = 3, 3, 4, 5
SMALL = small_cell_kwargs()
# Where a reset happens differs between the recording inputs and the checked ones, and each
# has one at the first step and one in the middle.
RESETS = {
    1: [[False, False, False], [False, True, False], [True, False, False]],
    2: [[False, True, False], [True, False, True], [False, False, False]],
}
ATOL = 1e-5


class Step(nn.Module):
    """A cell with positional inputs, as tracers and exporters take them."""

    def __init__(self, cell: RecurrentModule) -> None:
        super().__init__()
        self.cell = cell

    def forward(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.cell(x, state, timespans=timespans, resets=resets)


def build(name: str) -> Step:
    torch.manual_seed(0)
    return Step(make_cell(name, I, H, **SMALL.get(name, {}))).eval()


def inputs(model: Step, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, I, generator=generator)
    state = torch.randn(B, model.cell.state_size, generator=generator) * 0.3
    timespans = torch.rand(B, T, generator=generator) * 1.5 + 0.1
    return x, state, timespans, torch.tensor(RESETS[seed])


def assert_eager(model: Step, outputs: tuple[Tensor, Tensor], checked: tuple) -> None:
    """``outputs`` (of the traced program on ``checked``) equal the eager cell's."""
    with torch.no_grad():
        expected = model(*checked)
    for got, want in zip(outputs, expected, strict=True):
        got = torch.as_tensor(got)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_tracing_is_true_only_while_a_tracer_records() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            seen.append(tracing())
            return x + 1

    x = torch.ones(2)
    Probe()(x)
    assert seen == [False]
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(Probe(), (x,), check_trace=False)
    torch.export.export(Probe(), (x,), strict=False)
    torch.fx.experimental.proxy_tensor.make_fx(Probe())(x)
    torch._dynamo.reset()
    torch.compile(Probe(), backend="aot_eager", fullgraph=True)(x)  # the append is replayed
    assert seen == [True, True, True, True] and not tracing()


@pytest.mark.parametrize("name", list(CELLS))
def test_jit_trace_records_the_aten_path(name: str) -> None:
    model = build(name)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace is deprecated
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing data-dependent
        traced = torch.jit.trace(model, inputs(model, 1))
        assert "PythonOp" not in str(traced.inlined_graph)  # no opaque kernel call
        checked = inputs(model, 2)
        assert_eager(model, traced(*checked), checked)


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_export_records_the_aten_path(name: str) -> None:
    model = build(name)
    with torch.no_grad():
        program = torch.export.export(model, inputs(model, 1), strict=False)
        checked = inputs(model, 2)
        assert_eager(model, program.module()(*checked), checked)


@pytest.mark.parametrize("name", list(CELLS))
def test_torch_compile_gives_the_eager_numbers(name: str) -> None:
    model = build(name)
    torch._dynamo.reset()
    # fullgraph: the whole cell is one graph, so the compiled program is the driver's. Dynamo
    # refuses to look into torch.nn.LSTM/GRU modules unless allow_rnn (LSTM/GRU read their
    # weights there); without it they break the graph and run that part eagerly.
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        compiled(*inputs(model, 1))
        checked = inputs(model, 2)
        assert_eager(model, compiled(*checked), checked)


def _onnx_session(model: Step, path: Path, dynamo: bool):  # -> onnxruntime.InferenceSession
    pytest.importorskip("onnx", reason="ONNX export needs pip install -e '.[export]'")
    ort = pytest.importorskip("onnxruntime", reason="needs pip install -e '.[export]'")
    if dynamo:
        pytest.importorskip("onnxscript", reason="needs pip install -e '.[export]'")
    names = ["x", "state", "timespans", "resets"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter is deprecated
        torch.onnx.export(
            model,
            inputs(model, 1),
            str(path),
            input_names=names,
            output_names=["y", "final_state"],
            dynamo=dynamo,
            verbose=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # The legacy exporter leaves out the inputs the graph does not read (Δt of LSTM/GRU).
    read = [n for n in names if n != "timespans" or model.cell.uses_timespans or dynamo]
    assert [i.name for i in session.get_inputs()] == read
    return session


def _feeds(session, checked: tuple) -> dict[str, np.ndarray]:
    names = ["x", "state", "timespans", "resets"]
    given = dict(zip(names, (t.numpy() for t in checked), strict=True))
    return {i.name: given[i.name] for i in session.get_inputs()}


@pytest.mark.parametrize("name", ["cfc", "ltc", "lstm", "gru", "ctrnn"])
def test_onnx_export_runs_in_onnxruntime_with_the_eager_numbers(name: str, tmp_path) -> None:
    model = build(name)
    session = _onnx_session(model, tmp_path / f"{name}.onnx", dynamo=True)
    checked = inputs(model, 2)
    assert_eager(model, tuple(session.run(None, _feeds(session, checked))), checked)


@pytest.mark.parametrize("name", ["cfc", "cfc_mm", "ltc", "lstm"])
def test_the_legacy_onnx_exporter_records_the_inputs(name: str, tmp_path) -> None:
    # The TorchScript-based exporter (dynamo=False) traces: with the compiled loops recorded
    # as constants it used to write a CfC graph with no inputs at all.
    model = build(name)
    session = _onnx_session(model, tmp_path / f"{name}.onnx", dynamo=False)
    checked = inputs(model, 2)
    outputs = session.run(None, _feeds(session, checked))
    assert all(np.isfinite(out).all() for out in outputs)
    assert_eager(model, tuple(outputs), checked)


def test_the_kernels_run_eagerly_and_are_left_out_while_tracing(monkeypatch) -> None:
    calls = {"cfc": 0, "ltc": 0}

    def counting(key, function):
        def wrapper(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(cfc_module, "cfc_sequence", counting("cfc", cfc_module.cfc_sequence))
    for kernel in ("_compiled_synapses", "_fused_sequence"):
        monkeypatch.setattr(ltc_module, kernel, counting("ltc", getattr(ltc_module, kernel)))
    cfc, ltc = build("cfc"), build("ltc")
    with torch.no_grad():
        cfc(*inputs(cfc, 1))
        ltc(*inputs(ltc, 1))
        eager = dict(calls)
        torch.export.export(cfc, inputs(cfc, 1), strict=False)
        torch.export.export(ltc, inputs(ltc, 1), strict=False)
    assert eager["cfc"] == 1
    # the sensory synapses, then the whole sequence of the fused solver
    assert eager["ltc"] == (0 if ltc_module.compiled_loops(torch.device("cpu"), torch.float32)
                            is None else 2)  # fmt: skip
    assert calls == eager  # nothing more while exporting


def test_the_kernel_itself_refuses_a_tracer() -> None:
    cfc = build("cfc").cell
    x, state, timespans, _ = inputs(build("cfc"), 1)  # called directly: only CfC may
    layer = cfc.layers[0]

    def kernel(x: Tensor) -> Tensor:
        w_in, w_rec, bias = layer.first_linear()
        args = (w_rec, layer.heads.weight, layer.heads.bias, None, None, "default", "lecun_tanh")
        return cfc_module.cfc_sequence(x @ w_in.t() + bias, state, timespans, None, *args)[0]

    with torch.no_grad():
        kernel(x)  # runs eagerly
        with pytest.raises(RuntimeError, match="cannot be traced"):
            torch.fx.experimental.proxy_tensor.make_fx(kernel)(x)


def test_elapsed_times_are_checked_eagerly_and_numbers_while_tracing() -> None:
    model = build("cfc")
    x, state, timespans, resets = inputs(model, 1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(model, (x, state, timespans, resets))
        with pytest.raises(ValueError, match="negative value"):
            model(x, state, -timespans, resets)  # still checked once the trace is done
        with pytest.raises(ValueError, match="NaN"):
            torch.jit.trace(lambda x: model.cell(x, timespans=float("nan")), (x,))


@pytest.mark.parametrize("name", list(CELLS))
def test_jit_script_refuses_and_points_to_trace_and_export(name: str) -> None:
    model = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for target in (model.cell, model):  # the cell itself, or inside another module
            with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.jit\.trace"):
                torch.jit.script(target)
