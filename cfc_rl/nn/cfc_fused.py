"""A fused CfC sequence kernel: one forward loop and a hand-written backward through time.

Autograd over a Python time loop records a graph of T × ~15 tiny operations and replays it
backwards, and at RL sizes (a few dozen samples, 64 units) the per-operation overhead, not
arithmetic, is the cost. This kernel runs the same equations with the fewest operations per
step (seven forward) and computes the backward pass by hand: per step only what the
recurrence needs (four operations); the derivatives of the activations and gates are computed
for chunks of steps at once, and the weight gradients and the gradient of the elapsed times
as one large operation each after the loop.

It covers the common configuration: an unwired CfC with one backbone layer, in any mode and
with any backbone activation, without mixed memory; :class:`~cfc_rl.nn.CfC` uses the
autograd loop for the rest, and for training batches so large that arithmetic, not overhead,
dominates. Both give the same numbers (tests compare them, and gradcheck checks this backward
pass in float64).

Notation (one backbone layer, ``a`` and ``c`` the activation's inner and outer scale, ``g`` its
base function, so LeCun's tanh is ``1.7159·tanh(0.666·x)``)::

    p_t = a · (xw_t + h_{t-1} W_rec^T)        xw: the input half, hoisted out of the loop
    z_t = g(p_t)
    heads_t = b + z_t (c·W_heads)^T           ff1, ff2, t_a, t_b (ff1 only in pure mode)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

# name -> (inner scale a, outer scale c, base function g)
_ACTIVATIONS: dict[str, tuple[float, float, str]] = {
    "lecun_tanh": (0.666, 1.7159, "tanh"),
    "tanh": (1.0, 1.0, "tanh"),
    "relu": (1.0, 1.0, "relu"),
    "silu": (1.0, 1.0, "silu"),
    "gelu": (1.0, 1.0, "gelu"),
}
FUSED_ACTIVATIONS = tuple(_ACTIVATIONS)


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


def _run(
    xw: Tensor,
    h0: Tensor,
    timespans: Tensor,
    keep: Tensor | None,
    w_rec: Tensor,
    w_heads: Tensor,
    b_heads: Tensor,
    w_tau: Tensor | None,
    big_a: Tensor | None,
    mode: str,
    activation: str,
    record: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The forward loop, time major: the states ``(T + 1, B, H)`` from h0 on and, with
    ``record``, the backbone pre-activations, activations and heads of every step (what the
    backward pass needs)."""
    a, c, base = _ACTIVATIONS[activation]
    hidden = h0.shape[1]
    w_rec_t, w_heads_t = w_rec.t(), w_heads.t()
    abs_tau = w_tau.abs() if w_tau is not None else None
    # Time-major buffers, written step by step through per-step views made once in C++
    # (unbind) rather than by indexing in the loop; each view is contiguous, so `out=` writes
    # in place.
    steps, batch, units = xw.shape
    options = {"device": xw.device, "dtype": xw.dtype}
    states = torch.empty(steps + 1, batch, hidden, **options)
    states[0] = h0
    state_s = states.unbind(0)
    if record:
        pres = torch.empty(steps, batch, units, **options)
        acts = torch.empty_like(pres)
        heads = torch.empty(steps, batch, w_heads.shape[0], **options)
        pre_s, act_s, head_s = pres.unbind(0), acts.unbind(0), heads.unbind(0)
    else:
        pres = acts = heads = None
    xw_s, ts_s = xw.unbind(0), timespans.unsqueeze(-1).unbind(0)
    keep_s = keep.unbind(0) if keep is not None else None
    h = h0
    for t in range(steps):
        if keep_s is not None:
            h = h * keep_s[t]
        pre = torch.addmm(xw_s[t], h, w_rec_t, beta=a, alpha=a, out=pre_s[t] if record else None)
        act = _apply(base, pre, act_s[t] if record else None)
        head = torch.addmm(b_heads, act, w_heads_t, alpha=c, out=head_s[t] if record else None)
        if mode == "pure":  # h = A - A·f·exp(-Δt·(|w_tau| + |f|))
            decay = torch.exp(-ts_s[t] * (abs_tau + head.abs()))
            h = torch.addcmul(big_a, big_a, head * decay, value=-1.0, out=state_s[t + 1])
        else:
            ff = torch.tanh(head[:, : 2 * hidden])
            gate = torch.sigmoid(
                torch.addcmul(head[:, 3 * hidden :], head[:, 2 * hidden : 3 * hidden], ts_s[t])
            )
            if mode == "default":
                h = torch.lerp(ff[:, :hidden], ff[:, hidden:], gate, out=state_s[t + 1])
            else:
                h = torch.addcmul(ff[:, :hidden], gate, ff[:, hidden:], out=state_s[t + 1])
    return states, pres, acts, heads


# Elements of the per-chunk buffers of the backward pass: 64 Ki floats, 256 KiB in float32.
_CHUNK_ELEMENTS = 1 << 16


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


class _CfCSequence(torch.autograd.Function):
    """The states after every step, for ``xw (T, B, U)`` and ``h0 (B, H)``; time major."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        xw: Tensor,
        h0: Tensor,
        timespans: Tensor,
        keep: Tensor | None,
        w_rec: Tensor,
        w_heads: Tensor,
        b_heads: Tensor,
        w_tau: Tensor | None,
        big_a: Tensor | None,
        mode: str,
        activation: str,
    ) -> Tensor:
        states, pres, acts, heads = _run(
            xw, h0, timespans, keep, w_rec, w_heads, b_heads, w_tau, big_a, mode, activation, True
        )
        saved = [timespans, w_rec, w_heads, pres, acts, heads, states]
        if mode == "pure":
            saved += [w_tau, big_a]
        if keep is not None:
            saved.append(keep)
        ctx.save_for_backward(*saved)
        ctx.mode, ctx.activation, ctx.has_keep = mode, activation, keep is not None
        return states[1:]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        mode, (a, c, base) = ctx.mode, _ACTIVATIONS[ctx.activation]
        saved = list(ctx.saved_tensors)
        keep = saved.pop() if ctx.has_keep else None
        timespans, w_rec, w_heads, pre, act, heads, states = saved[:7]
        steps, batch, _ = pre.shape
        hidden = states.shape[2]
        ts = timespans.unsqueeze(-1)
        n_heads = heads.shape[2] // hidden
        grad_y_s = grad_y.unbind(0)
        keep_s = keep.unbind(0) if keep is not None else None
        grad_heads = torch.empty_like(heads).view(steps, batch, n_heads, hidden)
        grad_pres = torch.empty_like(pre)
        grad_head_s, grad_pre_s = grad_heads.unbind(0), grad_pres.unbind(0)
        grad_states = torch.empty_like(states[1:]) if mode == "pure" else None
        big_a = saved[8] if mode == "pure" else None
        abs_tau = saved[7].abs() if mode == "pure" else None

        # Steps are taken in chunks: what does not depend on dL/dh (the coefficients below and
        # the activation's derivative) is computed for a whole chunk at once, few operations
        # for small batches, while a chunk stays small enough to remain in cache for large ones.
        chunk = max(1, _CHUNK_ELEMENTS // (batch * heads.shape[2]))
        grad_h = grad_y_s[steps - 1]
        for end in range(steps, 0, -chunk):
            begin = max(0, end - chunk)
            coefficient_s = _coefficients(
                heads[begin:end], ts[begin:end], mode, hidden, abs_tau, big_a
            ).unbind(0)
            # c·g'(p): the outer scale of the activation folded into its derivative.
            act_grad_s = _derivative(base, pre[begin:end], act[begin:end]).mul_(c).unbind(0)
            for t in range(end - 1, begin - 1, -1):
                if grad_states is not None:
                    grad_states[t] = grad_h
                grad_head = torch.mul(
                    coefficient_s[t - begin], grad_h.unsqueeze(1), out=grad_head_s[t]
                )
                grad_pre = torch.mm(grad_head.view(batch, -1), w_heads, out=grad_pre_s[t])
                grad_pre.mul_(act_grad_s[t - begin])
                if keep_s is None:
                    grad_h = (
                        torch.addmm(grad_y_s[t - 1], grad_pre, w_rec, alpha=a)
                        if t > 0
                        else torch.mm(grad_pre, w_rec).mul_(a)
                    )
                else:
                    grad_h = torch.mm(grad_pre, w_rec).mul_(keep_s[t] * a)
                    if t > 0:
                        grad_h = grad_h + grad_y_s[t - 1]
        grad_h0 = grad_h

        # Parameter gradients: one large multiply each, over all steps and samples.
        grad_heads_all = grad_heads.view(steps, batch, -1)
        grad_xw = grad_pres.mul_(a)
        flat = (steps * batch, -1)
        inputs_h = states[:-1] if keep is None else states[:-1] * keep
        grad_w_rec = grad_xw.reshape(flat).t() @ inputs_h.reshape(flat)
        grad_w_heads = grad_heads_all.reshape(flat).t() @ act.reshape(flat)
        if c != 1.0:
            grad_w_heads.mul_(c)
        grad_b_heads = grad_heads_all.sum(dim=(0, 1))
        grad_w_tau = grad_big_a = None
        if mode == "pure":
            w_tau = saved[7]
            decay = torch.exp(-ts * (abs_tau + heads.abs()))
            grad_hs = grad_states
            fe = heads * decay
            grad_big_a = (grad_hs * (1.0 - fe)).sum(dim=(0, 1)).unsqueeze(0)
            common = grad_hs * big_a * fe
            grad_w_tau = ((common * ts).sum(dim=(0, 1)) * torch.sign(w_tau[0])).unsqueeze(0)
            grad_timespans = (common * (w_tau.abs() + heads.abs())).sum(-1)
        else:
            # gate pre-activation = t_a·Δt + t_b: dL/dΔt = dL/dt_b · t_a
            grad_t_b = grad_heads_all[..., 3 * hidden :]
            grad_timespans = (grad_t_b * heads[..., 2 * hidden : 3 * hidden]).sum(-1)
        return (
            grad_xw,
            grad_h0,
            grad_timespans,
            None,
            grad_w_rec,
            grad_w_heads,
            grad_b_heads,
            grad_w_tau,
            grad_big_a,
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
) -> Tensor:
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
    :return: the state after every step, ``(B, T, H)``
    """
    keep = (~resets).t().unsqueeze(-1).to(xw.dtype) if resets is not None else None
    args = (xw.transpose(0, 1).contiguous(), h0, timespans.t().contiguous(), keep, w_rec)
    args += (w_heads, b_heads, w_tau, big_a, mode, activation)
    if torch.is_grad_enabled() and any(
        isinstance(arg, Tensor) and arg.requires_grad for arg in args
    ):
        states = _CfCSequence.apply(*args)
    else:  # rollouts: no graph, nothing kept for a backward pass
        states = _run(*args, record=False)[0][1:]
    return states.transpose(0, 1)
