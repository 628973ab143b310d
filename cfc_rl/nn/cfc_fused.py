"""A fused CfC sequence kernel: one forward loop and a hand-written backward through time.

Autograd over a Python time loop records a graph of T × ~15 tiny operations and replays it
backwards, and at RL sizes (a few dozen samples, 64 units) the per-operation overhead, not
arithmetic, is the cost. This kernel runs the same equations forward and computes the backward
pass by hand: per step only what the recurrence needs; the weight gradients and the gradient
of the elapsed times are one large operation each after the loop.

The time loops come in two kinds with the same numbers:

- compiled, on the CPU (``csrc/cfc_cpu.cpp``, built on first use by
  :mod:`cfc_rl.nn.cpu_extensions`): per step two matrix multiplies and fused, vectorised
  elementwise passes, forward and backward (three multiplies with mixed memory);
- ATen, on CUDA and wherever the compiled loops could not be built: seven operations per step
  forward and six backward (more with mixed memory), the derivatives of the activations and
  gates computed for chunks of steps at once.

It covers an unwired CfC with one backbone layer, in any mode, with any backbone activation,
with or without mixed memory; :class:`~cfc_rl.nn.CfC` runs the rest through the shared per-step
driver under autograd (:meth:`~cfc_rl.nn.base.RecurrentModule.step_sequence`), and so, with the
ATen loops, training batches so large that arithmetic, not overhead, dominates. Tests compare all
three in float64, and gradcheck checks both backward loops.

Notation (one backbone layer, ``a`` and ``c`` the activation's inner and outer scale, ``g`` its
base function, so LeCun's tanh is ``1.7159·tanh(0.666·x)``)::

    r_t = h_{t-1}, or with mixed memory the output of the LSTM memory cell on (h_{t-1}, c_{t-1})
    p_t = a · (xw_t + r_t W_rec^T)            xw: the input half, hoisted out of the loop
    z_t = g(p_t)
    heads_t = b + z_t (c·W_heads)^T           ff1, ff2, t_a, t_b (ff1 only in pure mode)
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from cfc_rl.nn import cpu_extensions
from cfc_rl.nn.base import tracing

# name -> (inner scale a, outer scale c, base function g)
_ACTIVATIONS: dict[str, tuple[float, float, str]] = {
    "lecun_tanh": (0.666, 1.7159, "tanh"),
    "tanh": (1.0, 1.0, "tanh"),
    "relu": (1.0, 1.0, "relu"),
    "silu": (1.0, 1.0, "silu"),
    "gelu": (1.0, 1.0, "gelu"),
}
FUSED_ACTIVATIONS = tuple(_ACTIVATIONS)
# The compiled loops' numbering of modes and base functions (csrc/cfc_cpu.cpp).
_MODES = ("default", "no_gate", "pure")
_BASES = ("tanh", "relu", "silu", "gelu")

# Elements of the per-chunk buffers of the backward pass: 64 Ki floats, 256 KiB in float32.
_CHUNK_ELEMENTS = 1 << 16


def _apply(base: str, p: Tensor, out: Tensor | None) -> Tensor:
    """g(p), written into ``out`` when given."""
    if base == "tanh":
        return torch.tanh(p, out=out)
    if base == "relu":
        return torch.clamp_min(p, 0.0, out=out)
    value = torch.nn.functional.silu(p) if base == "silu" else torch.nn.functional.gelu(p)
    return value if out is None else out.copy_(value)


def _derivative(base: str, p: Tensor, z: Tensor) -> Tensor:
    """g'(p), given p and z = g(p), for whole buffers at once."""
    if base == "tanh":
        return 1.0 - z * z
    if base == "relu":
        return (p > 0).to(p.dtype)
    if base == "silu":
        s = torch.sigmoid(p)
        return s * (1.0 + p * (1.0 - s))
    cdf = 0.5 * (1.0 + torch.erf(p / math.sqrt(2.0)))
    return cdf + p * torch.exp(-0.5 * p * p) / math.sqrt(2.0 * math.pi)


class _Weights(NamedTuple):
    """The parameters the kernel reads (see the notation of the module docstring)."""

    w_rec: Tensor  # (U, H)
    w_heads: Tensor  # (n_heads·H, U)
    b_heads: Tensor  # (n_heads·H,)
    w_tau: Tensor | None  # (1, H), pure mode
    big_a: Tensor | None  # (1, H), pure mode
    w_memory: Tensor | None  # (4H, H), the memory cell's recurrent weight (mixed memory)


class _Trace(NamedTuple):
    """What the forward loop returns: the outputs, batch major, and what the backward pass
    reads, time major: the states always; the rest when recording."""

    outputs: Tensor  # (B, T, H): h1, ..., hT, a tensor of its own (the caller may edit it)
    states: Tensor  # (T + 1, B, H): h0, h1, ..., hT
    cells: Tensor | None  # (T + 1, B, H): c0, ..., cT (mixed memory)
    memory_out: Tensor | None  # (T, B, H): r_t, the memory cell's output (mixed memory)
    memory_pre: Tensor | None  # (T, B, 4H): the memory cell's gate pre-activations
    pres: Tensor | None  # (T, B, U); not kept by the compiled loops for a tanh activation
    acts: Tensor | None  # (T, B, U)
    heads: Tensor | None  # (T, B, n_heads·H)


def compiled_loops(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The compiled loops (``csrc/cfc_cpu.cpp``) where they apply and could be built: float32
    or float64 CPU tensors. None means the ATen loops run."""
    return cpu_extensions.load_for("cfc_cpu", device, dtype)


def _extension_args(
    keep: Tensor | None, w: _Weights, mode: str, activation: str
) -> tuple[Any, ...]:
    """The arguments the compiled loops share, after the per-call tensors."""
    a, c, base = _ACTIVATIONS[activation]
    empty = w.w_rec.new_empty(0)
    return (
        keep.contiguous() if keep is not None else empty,
        w.w_rec,
        w.w_heads,
        w.b_heads,
        w.w_tau.abs() if w.w_tau is not None else empty,
        w.big_a if w.big_a is not None else empty,
        _MODES.index(mode),
        _BASES.index(base),
        a,
        c,
    )


def _run(
    xw: Tensor,
    xm: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    timespans: Tensor,
    keep: Tensor | None,
    weights: _Weights,
    mode: str,
    activation: str,
    record: bool,
) -> _Trace:
    """The forward loop over batch-major inputs: ``xw`` (B, T, U), ``timespans`` and ``keep``
    (B, T); with mixed memory ``xm`` (B, T, 4H), the memory cell's input projection
    (forget-gate offset included), and ``c0`` its initial cell state."""
    w = weights
    extension = compiled_loops(xw.device, xw.dtype)
    if extension is None:
        return _run_aten(
            xw.transpose(0, 1).contiguous(),
            xm.transpose(0, 1).contiguous() if xm is not None else None,
            h0,
            c0,
            timespans.t().contiguous(),
            keep.t().unsqueeze(-1) if keep is not None else None,
            weights,
            mode,
            activation,
            record,
        )
    empty = xw.new_empty(0)
    y, states, pres, acts, heads, cells, memory_out, memory_pre = extension.forward(
        xw,
        h0,
        timespans,
        *_extension_args(keep, w, mode, activation),
        xm if xm is not None else empty,
        c0 if c0 is not None else empty,
        w.w_memory if w.w_memory is not None else empty,
        record,
    )
    if xm is None:
        cells = memory_out = memory_pre = None
    if _ACTIVATIONS[activation][2] == "tanh":
        pres = None  # one step of scratch: tanh's derivative is read from acts
    if not record:  # one step of scratch each
        pres = acts = heads = memory_out = memory_pre = None
    return _Trace(y, states, cells, memory_out, memory_pre, pres, acts, heads)


def _run_aten(
    xw: Tensor,
    xm: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    timespans: Tensor,
    keep: Tensor | None,
    weights: _Weights,
    mode: str,
    activation: str,
    record: bool,
) -> _Trace:
    """The forward loop as ATen operations, over time-major inputs: ``xw`` (T, B, U),
    ``timespans`` (T, B), ``keep`` (T, B, 1), ``xm`` (T, B, 4H)."""
    a, c, base = _ACTIVATIONS[activation]
    w = weights
    hidden = h0.shape[1]
    w_rec_t, w_heads_t = w.w_rec.t(), w.w_heads.t()
    abs_tau = w.w_tau.abs() if w.w_tau is not None else None
    memory = xm is not None
    # Time-major buffers, written step by step through per-step views made once in C++
    # (unbind) rather than by indexing in the loop; each view is contiguous, so `out=` writes
    # in place.
    steps, batch, units = xw.shape
    options = {"device": xw.device, "dtype": xw.dtype}

    def buffer(*shape: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        tensor = torch.empty(*shape, **options)
        return tensor, tensor.unbind(0)

    states, state_s = buffer(steps + 1, batch, hidden)
    states[0] = h0
    cells = memory_out = memory_pre = pres = acts = heads = None
    if memory:
        cells, cell_s = buffer(steps + 1, batch, hidden)
        cells[0] = c0
        w_memory_t = w.w_memory.t()
        xm_s = xm.unbind(0)
    if record:
        pres, pre_s = buffer(steps, batch, units)
        acts, act_s = buffer(steps, batch, units)
        heads, head_s = buffer(steps, batch, w.w_heads.shape[0])
        if memory:
            memory_out, memory_out_s = buffer(steps, batch, hidden)
            memory_pre, memory_pre_s = buffer(steps, batch, 4 * hidden)
    xw_s, ts_s = xw.unbind(0), timespans.unsqueeze(-1).unbind(0)
    keep_s = keep.unbind(0) if keep is not None else None
    h, cell = h0, c0
    for t in range(steps):
        if keep_s is not None:
            h = h * keep_s[t]
            cell = cell * keep_s[t] if memory else None
        if memory:  # the LSTM memory cell: gates (input, input gate, forget gate, output gate)
            z = torch.addmm(xm_s[t], h, w_memory_t, out=memory_pre_s[t] if record else None)
            gates = torch.sigmoid(z[:, hidden:])
            cell = torch.addcmul(
                cell * gates[:, hidden : 2 * hidden],
                torch.tanh(z[:, :hidden]),
                gates[:, :hidden],
                out=cell_s[t + 1],
            )
            h = torch.mul(
                torch.tanh(cell), gates[:, 2 * hidden :], out=memory_out_s[t] if record else None
            )
        pre = torch.addmm(xw_s[t], h, w_rec_t, beta=a, alpha=a, out=pre_s[t] if record else None)
        act = _apply(base, pre, act_s[t] if record else None)
        head = torch.addmm(w.b_heads, act, w_heads_t, alpha=c, out=head_s[t] if record else None)
        if mode == "pure":  # h = A - A·f·exp(-Δt·(|w_tau| + |f|))
            decay = torch.exp(-ts_s[t] * (abs_tau + head.abs()))
            h = torch.addcmul(w.big_a, w.big_a, head * decay, value=-1.0, out=state_s[t + 1])
        else:
            ff = torch.tanh(head[:, : 2 * hidden])
            gate = torch.sigmoid(
                torch.addcmul(head[:, 3 * hidden :], head[:, 2 * hidden : 3 * hidden], ts_s[t])
            )
            if mode == "default":
                h = torch.lerp(ff[:, :hidden], ff[:, hidden:], gate, out=state_s[t + 1])
            else:
                h = torch.addcmul(ff[:, :hidden], gate, ff[:, hidden:], out=state_s[t + 1])
    outputs = states[1:].transpose(0, 1).clone()
    return _Trace(outputs, states, cells, memory_out, memory_pre, pres, acts, heads)


def _coefficients(
    heads: Tensor,
    ts: Tensor,
    mode: str,
    hidden: int,
    abs_tau: Tensor | None,
    big_a: Tensor | None,
) -> Tensor:
    """dh/dheads for a chunk of steps, ``(steps, B, n_heads, H)``: dL/dheads_t is dL/dh_t
    times this, which does not depend on dL/dh_t, so the backward loop needs one multiply."""
    if mode == "pure":  # h = A - A·f·e, e = exp(-Δt·(|w_tau| + |f|)): dh/df = -A·e·(1 - Δt·|f|)
        magnitude = heads.abs()
        decay = torch.exp(-ts * (abs_tau + magnitude))
        return (-big_a * decay * (1.0 - ts * magnitude)).unsqueeze(2)
    # The gates, recomputed here rather than kept from the forward loop.
    ff = torch.tanh(heads[..., : 2 * hidden])
    gate = torch.sigmoid(
        torch.addcmul(heads[..., 3 * hidden :], heads[..., 2 * hidden : 3 * hidden], ts)
    )
    ff1, ff2 = ff[..., :hidden], ff[..., hidden:]
    tanh_grad = 1.0 - ff * ff
    gate_slope = gate * (1.0 - gate)
    if mode == "default":  # h = ff1 + gate·(ff2 - ff1)
        coef_ff1 = (1.0 - gate) * tanh_grad[..., :hidden]
        coef_gate = (ff2 - ff1) * gate_slope
    else:  # h = ff1 + gate·ff2
        coef_ff1 = tanh_grad[..., :hidden]
        coef_gate = ff2 * gate_slope
    coef_ff2 = gate * tanh_grad[..., hidden:]
    return torch.stack([coef_ff1, coef_ff2, coef_gate * ts, coef_gate], dim=2)


def _memory_coefficients(
    memory_pre: Tensor, cell_in: Tensor, cell: Tensor, hidden: int
) -> tuple[Tensor, Tensor, Tensor]:
    """For a chunk of steps of the memory cell (c = c_in·f + tanh(i)·s_i, r = tanh(c)·s_o):
    dr/dc, the gate pre-activations' derivatives (dc/d(i, i_gate, f_gate) and dr/d(o_gate),
    stacked as (steps, B, 4, H)), and f, the factor of c_in."""
    candidate = torch.tanh(memory_pre[..., :hidden])
    gates = torch.sigmoid(memory_pre[..., hidden:])
    input_gate, forget_gate = gates[..., :hidden], gates[..., hidden : 2 * hidden]
    output_gate = gates[..., 2 * hidden :]
    cell_tanh = torch.tanh(cell)
    slopes = gates * (1.0 - gates)
    coefficients = torch.stack(
        [
            input_gate * (1.0 - candidate * candidate),
            candidate * slopes[..., :hidden],
            cell_in * slopes[..., hidden : 2 * hidden],
            cell_tanh * slopes[..., 2 * hidden :],
        ],
        dim=2,
    )
    return output_gate * (1.0 - cell_tanh * cell_tanh), coefficients, forget_gate


def _backward_loop(
    grad_y: Tensor,
    grad_cell: Tensor | None,
    trace: _Trace,
    timespans: Tensor,
    keep: Tensor | None,
    w: _Weights,
    mode: str,
    activation: str,
    grad_heads: Tensor,
    grad_pres: Tensor,
    grad_states: Tensor | None,
    grad_memory_pre: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """The backward loop through time with ATen operations (the compiled loops' counterpart,
    and the only one on CUDA), over time-major ``grad_y`` (T, B, H), ``timespans`` (T, B) and
    ``keep`` (T, B, 1). Fills ``grad_heads``, ``grad_pres`` (dL/dp), ``grad_states`` (pure
    mode) and ``grad_memory_pre`` (mixed memory); returns dL/dh0 and dL/dc0 (mixed memory,
    else None)."""
    a, c, base = _ACTIVATIONS[activation]
    pre, act, heads = trace.pres, trace.acts, trace.heads
    memory = trace.cells is not None
    steps, batch, _ = pre.shape
    hidden = trace.states.shape[2]
    ts = timespans.unsqueeze(-1)
    abs_tau = w.w_tau.abs() if mode == "pure" else None
    grad_y_s = grad_y.unbind(0)
    keep_s = keep.unbind(0) if keep is not None else None
    grad_head_s = grad_heads.view(steps, batch, -1, hidden).unbind(0)
    grad_pre_s = grad_pres.unbind(0)
    if memory:
        cells_in = trace.cells[:-1] if keep is None else trace.cells[:-1] * keep
        grad_memory_pre_s = grad_memory_pre.view(steps, batch, 4, hidden).unbind(0)
    # Steps are taken in chunks: what does not depend on the incoming gradients (the
    # coefficients and the activation's derivative) is computed for a whole chunk at
    # once, few operations for small batches, while a chunk stays small enough to remain
    # in cache for large ones.
    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads.shape[2]))
    grad_h = grad_y_s[steps - 1]
    for end in range(steps, 0, -chunk):
        begin = max(0, end - chunk)
        coefficient_s = _coefficients(
            heads[begin:end], ts[begin:end], mode, hidden, abs_tau, w.big_a
        ).unbind(0)
        # c·g'(p): the outer scale of the activation folded into its derivative.
        act_grad_s = _derivative(base, pre[begin:end], act[begin:end]).mul_(c).unbind(0)
        if memory:
            output_slope, memory_coefficients, forget = _memory_coefficients(
                trace.memory_pre[begin:end],
                cells_in[begin:end],
                trace.cells[begin + 1 : end + 1],
                hidden,
            )
            output_slope_s = output_slope.unbind(0)
            memory_coefficient_s = memory_coefficients.unbind(0)
            forget_s = forget.unbind(0)
        for t in range(end - 1, begin - 1, -1):
            k = t - begin
            if grad_states is not None:
                grad_states[t] = grad_h
            grad_head = torch.mul(coefficient_s[k], grad_h.unsqueeze(1), out=grad_head_s[t])
            grad_pre = torch.mm(grad_head.view(batch, -1), w.w_heads, out=grad_pre_s[t])
            grad_pre.mul_(act_grad_s[k])
            if memory:
                # Through the memory cell: dL/dr_t, then its cell state and gates.
                grad_r = torch.mm(grad_pre, w.w_rec).mul_(a)
                grad_cell = torch.addcmul(grad_cell, grad_r, output_slope_s[k])
                grad_gates = torch.mul(
                    memory_coefficient_s[k],
                    torch.stack([grad_cell, grad_cell, grad_cell, grad_r], dim=1),
                    out=grad_memory_pre_s[t],
                )
                grad_h = torch.mm(grad_gates.view(batch, -1), w.w_memory)
                grad_cell = grad_cell * forget_s[k]
            else:
                grad_h = torch.mm(grad_pre, w.w_rec).mul_(a)
            if keep_s is not None:
                grad_h = grad_h.mul_(keep_s[t])
                grad_cell = grad_cell * keep_s[t] if memory else None
            if t > 0:
                grad_h = grad_h + grad_y_s[t - 1]
    return grad_h, grad_cell


def _timespans_gradient(
    grad_heads: Tensor,
    grad_states: Tensor | None,
    heads: Tensor,
    ts: Tensor,
    w: _Weights,
    mode: str,
    hidden: int,
) -> Tensor:
    """dL/dΔt ``(T, B)`` for the ATen loops (the compiled loops sum it as they go)."""
    if mode == "pure":  # dh/dΔt = A·f·e·(|w_tau| + |f|)
        rate = w.w_tau.abs() + heads.abs()
        return (grad_states * w.big_a * heads * torch.exp(-ts * rate) * rate).sum(-1)
    # gate pre-activation = t_a·Δt + t_b: dL/dΔt = dL/dt_b · t_a
    grad_t_b = grad_heads[..., 3 * hidden :]
    return (grad_t_b * heads[..., 2 * hidden : 3 * hidden]).sum(-1)


class _CfCSequence(torch.autograd.Function):
    """The states after every step (B, T, H) and the final cell state (mixed memory; else
    empty), for the batch-major inputs of :func:`_run`."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        xw: Tensor,
        xm: Tensor | None,
        h0: Tensor,
        c0: Tensor | None,
        timespans: Tensor,
        keep: Tensor | None,
        w_rec: Tensor,
        w_heads: Tensor,
        b_heads: Tensor,
        w_tau: Tensor | None,
        big_a: Tensor | None,
        w_memory: Tensor | None,
        mode: str,
        activation: str,
    ) -> tuple[Tensor, Tensor]:
        weights = _Weights(w_rec, w_heads, b_heads, w_tau, big_a, w_memory)
        trace = _run(xw, xm, h0, c0, timespans, keep, weights, mode, activation, True)
        ctx.save_for_backward(timespans, keep, *weights, *trace[1:])
        ctx.mode, ctx.activation = mode, activation
        if trace.cells is None:
            final_cell = h0.new_empty(0)
            ctx.mark_non_differentiable(final_cell)
        else:  # a copy, not a view of a buffer the backward pass reads: the caller may edit it
            final_cell = trace.cells[-1].clone()
        return trace.outputs, final_cell

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, grad_final_cell: Tensor | None) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is wanted
            raise RuntimeError(
                "the fused CfC kernel has no second derivative (double backward, gradient "
                "penalties); build the CfC with fast=False (or set cfc.fast = False) to "
                "differentiate through autograd"
            )
        with torch.no_grad():
            return _CfCSequence._backward(ctx, grad_y, grad_final_cell)

    @staticmethod
    def _backward(ctx: Any, grad_y: Tensor, grad_final_cell: Tensor | None) -> tuple[Any, ...]:
        mode, (a, c, _) = ctx.mode, _ACTIVATIONS[ctx.activation]
        timespans, keep, *rest = ctx.saved_tensors
        w = _Weights(*rest[:6])
        trace = _Trace(None, *rest[6:])
        act, heads, states = trace.acts, trace.heads, trace.states
        memory = trace.cells is not None
        steps, batch, _ = act.shape
        hidden = states.shape[2]
        # The buffers are time major, the inputs batch major.
        ts = timespans.t().unsqueeze(-1)
        keep_steps = keep.t().unsqueeze(-1) if keep is not None else None
        # Filled by the loop through time: dL/dheads, dL/dp and, in pure mode, dL/dh_t.
        grad_heads = torch.empty_like(heads)
        grad_pres = torch.empty_like(act)
        grad_states = torch.empty_like(states[1:]) if mode == "pure" else None
        grad_memory_pre = torch.empty_like(trace.memory_pre) if memory else None
        grad_cell = None
        if memory:
            grad_cell = grad_final_cell
            if grad_cell is None:
                grad_cell = torch.zeros_like(trace.cells[-1])
        extension = compiled_loops(act.device, act.dtype)
        if extension is not None:
            # The compiled loop also returns dL/dΔt and dL/db_heads, summed while in cache,
            # and leaves dL/dxw (a·dL/dp) in grad_pres.
            empty = act.new_empty(0)
            grad_h, grad_cell, grad_timespans, grad_b_heads = extension.backward(
                grad_y.contiguous(),
                heads,
                trace.pres if trace.pres is not None else empty,
                act,
                timespans,
                *_extension_args(keep, w, mode, ctx.activation),
                trace.memory_pre if memory else empty,
                trace.cells if memory else empty,
                w.w_memory if memory else empty,
                grad_cell.contiguous() if memory else empty,
                grad_heads,
                grad_pres,
                grad_states if grad_states is not None else empty,
                grad_memory_pre if memory else empty,
            )
            grad_xw = grad_pres
        else:
            grad_h, grad_cell = _backward_loop(
                grad_y.transpose(0, 1).contiguous(),
                grad_cell,
                trace,
                ts[..., 0],
                keep_steps,
                w,
                mode,
                ctx.activation,
                grad_heads,
                grad_pres,
                grad_states,
                grad_memory_pre,
            )
            grad_xw = grad_pres.mul_(a)
            grad_b_heads = grad_heads.sum(dim=(0, 1))
            grad_timespans = _timespans_gradient(
                grad_heads, grad_states, heads, ts, w, mode, hidden
            ).t()

        # Parameter gradients: one large multiply each, over all steps and samples.
        flat = (steps * batch, -1)
        inputs_h = states[:-1] if keep is None else states[:-1] * keep_steps
        rec_inputs = trace.memory_out if memory else inputs_h
        grad_w_rec = grad_xw.reshape(flat).t() @ rec_inputs.reshape(flat)
        grad_w_heads = grad_heads.reshape(flat).t() @ act.reshape(flat)
        if c != 1.0:
            grad_w_heads.mul_(c)
        grad_w_tau = grad_big_a = grad_xm = grad_c0 = grad_w_memory = None
        if memory:
            grad_w_memory = grad_memory_pre.reshape(flat).t() @ inputs_h.reshape(flat)
            grad_xm = grad_memory_pre.transpose(0, 1)
            grad_c0 = grad_cell
        if mode == "pure":  # h = A - A·f·e, e = exp(-Δt·(|w_tau| + |f|))
            abs_tau = w.w_tau.abs()
            fe = heads * torch.exp(-ts * (abs_tau + heads.abs()))
            grad_big_a = (grad_states * (1.0 - fe)).sum(dim=(0, 1)).unsqueeze(0)
            common = grad_states * w.big_a * fe
            grad_w_tau = ((common * ts).sum(dim=(0, 1)) * torch.sign(w.w_tau[0])).unsqueeze(0)
        return (
            grad_xw.transpose(0, 1),
            grad_xm,
            grad_h,
            grad_c0,
            grad_timespans,
            None,
            grad_w_rec,
            grad_w_heads,
            grad_b_heads,
            grad_w_tau,
            grad_big_a,
            grad_w_memory,
            None,
            None,
        )


def cfc_sequence(
    xw: Tensor,
    h0: Tensor,
    timespans: Tensor,
    resets: Tensor | None,
    w_rec: Tensor,
    w_heads: Tensor,
    b_heads: Tensor,
    w_tau: Tensor | None,
    big_a: Tensor | None,
    mode: str,
    activation: str,
    memory: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run an unwired one-backbone-layer CfC over a batch-first sequence with the fused kernel.

    :param xw: ``(B, T, U)`` the input half of the backbone's pre-activation, bias included
    :param h0: ``(B, H)`` the state before the first step
    :param timespans: ``(B, T)`` elapsed time of each step
    :param resets: ``(B, T)`` bool, True zeroes the state before that step, or None
    :param w_rec: ``(U, H)`` the recurrent half of the backbone's weight
    :param w_heads: ``(nH, U)`` the fused heads' weight; ``b_heads`` its bias
    :param w_tau: ``(1, H)`` pure mode's w_tau (None otherwise); ``big_a`` its A
    :param mode: "default", "no_gate" or "pure"
    :param activation: a name of ``FUSED_ACTIVATIONS``
    :param memory: mixed memory: ``(xm (B, T, 4H), c0 (B, H), w_memory (4H, H))``, the memory
        cell's input projection (forget-gate offset included), initial cell state and
        recurrent weight
    :return: the state after every step ``(B, T, H)`` and the final cell state (or None)
    :raises RuntimeError: while a tracer or exporter records the call
        (:func:`~cfc_rl.nn.base.tracing`): it cannot see into the kernel and would record its
        result as a constant; :class:`~cfc_rl.nn.CfC` takes the shared driver then
    """
    if tracing():
        raise RuntimeError(
            "the fused CfC kernel cannot be traced or exported (the tracer would record its "
            "result as a constant); call the CfC module, which records its per-step driver "
            "while tracing"
        )
    keep = (~resets).to(xw.dtype) if resets is not None else None
    xm, c0, w_memory = memory if memory is not None else (None, None, None)
    tensors = (
        xw.contiguous(),
        xm.contiguous() if xm is not None else None,
        h0,
        c0,
        timespans.contiguous(),  # a scalar Δt arrives expanded, with stride 0
        keep,
    )
    weights = _Weights(w_rec, w_heads, b_heads, w_tau, big_a, w_memory)
    if torch.is_grad_enabled() and any(
        arg is not None and arg.requires_grad for arg in (*tensors, *weights)
    ):
        y, final_cell = _CfCSequence.apply(*tensors, *weights, mode, activation)
        final_cell = final_cell if memory is not None else None
    else:  # rollouts: no graph, nothing kept for a backward pass
        trace = _run(*tensors, weights, mode, activation, record=False)
        y = trace.outputs
        final_cell = trace.cells[-1] if trace.cells is not None else None
    return y, final_cell
