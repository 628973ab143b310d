"""Liquid time-constant (LTC) networks, with three solvers.

Each neuron i has a membrane potential v_i that follows the ODE::

    cm_i · dv_i/dt = gleak_i · (vleak_i − v_i) + Σ_j w_ji · σ(σ_ji · (v_j − μ_ji)) · (E_ji − v_i)

summed over the neurons j (and, with the sensory parameters, over the inputs) that synapse onto
i; w, cm and gleak are kept positive. ``solver="fused"`` is the reference semi-implicit Euler
step of ``ncps.torch.LTC`` (outputs identical to it)::

    v ← (cm/δ · v + gleak·vleak + Σ w·σ(·)·E) / (cm/δ + gleak + Σ w·σ(·) + ε),  δ = Δt / unfolds

``"euler"`` and ``"rk4"`` are explicit solvers of the same right-hand side, the ODE-based
baselines the CfC speed claims are measured against. The sensory synapses do not depend on the
state, so they are evaluated for all time steps before the time loop
(:meth:`LTC.prepare_inputs`); the time loop itself is the shared per-step driver of
:class:`~cfc_rl.nn.base.RecurrentModule`.

On the CPU the compiled loops of ``csrc/ltc_cpu.cpp`` do most of the work: the synapse sums
in one pass over the parameters per sample instead of several over a (B, N, N) tensor, only
over the synapses a wiring has (an NCP has about an eighth of the N² pairs), and with the
"fused" solver (no mixed memory) the whole sequence in one call with a hand-written backward
pass through time. Elsewhere (CUDA, no C++ compiler, ``fast=False``, and while a tracer
records the module) the same numbers come from ATen operations over the shared driver.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from cfc_rl.nn import cpu_extensions
from cfc_rl.nn.base import RecurrentModule, tracing
from cfc_rl.nn.wirings import FullyConnected, Wiring

# Column ranges are rounded out to multiples of this many columns (one AVX2 vector of float):
# a loop over whole vectors needs no scalar remainder, which costs more than the padding.
_RANGE_ALIGNMENT = 8


class _Ranges(NamedTuple):
    """For each row j of a wiring's ``(M, N)`` synapse matrix, the columns ``[lo_j, hi_j)``
    that hold all its synapses, for the compiled loops to skip the others; both empty for a
    dense matrix."""

    lo: Tensor  # (M,) int64
    hi: Tensor  # (M,) int64


def column_ranges(mask: Tensor, alignment: int = _RANGE_ALIGNMENT) -> _Ranges:
    """The column range of every row of a wiring mask (its synapses are the non-zero entries),
    rounded out to multiples of ``alignment`` columns; empty ranges for a dense mask."""
    present = mask.detach().cpu() != 0
    m, n = present.shape
    if bool(present.all()):
        empty = torch.zeros(0, dtype=torch.long)
        return _Ranges(empty, empty)
    columns = torch.arange(n).expand(m, n)
    lo = torch.where(present, columns, n).amin(dim=1)
    hi = torch.where(present, columns + 1, 0).amax(dim=1)
    lo = torch.minimum(lo, hi)  # a row without synapses: an empty range
    lo = lo // alignment * alignment
    hi = torch.clamp((hi + alignment - 1) // alignment * alignment, max=n)
    return _Ranges(lo.contiguous(), hi.contiguous())


class _Constants(NamedTuple):
    """The state-independent quantities of one forward call (positive where they must be)."""

    sigma: Tensor  # the synapses' slopes
    w: Tensor  # synaptic weights, masked by the wiring
    w_erev: Tensor  # w times the reversal potentials
    offset: Tensor  # -σ·μ, so that σ·(v - μ) is one fused multiply-add
    cm: Tensor  # membrane capacitance
    gleak: Tensor  # leak conductance
    leak: Tensor  # gleak · vleak
    extension: ModuleType | None  # the compiled loops, or None for ATen operations
    ranges: _Ranges | None  # the recurrent synapses' column ranges, for the compiled loops


SOLVERS = ("fused", "euler", "rk4")
MAPPINGS = ("affine", "linear", "none")

# Initial ranges of the reference implementation (ncps.torch.LTC).
_INIT_RANGES = {
    "gleak": (0.001, 1.0),
    "vleak": (-0.2, 0.2),
    "cm": (0.4, 0.6),
    "w": (0.001, 1.0),
    "sigma": (3.0, 8.0),
    "mu": (0.3, 0.8),
    "sensory_w": (0.001, 1.0),
    "sensory_sigma": (3.0, 8.0),
    "sensory_mu": (0.3, 0.8),
}


def compiled_loops(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The compiled synapse loops (``csrc/ltc_cpu.cpp``) where they apply and could be built:
    float32 or float64 CPU tensors. None means the ATen operations run."""
    return cpu_extensions.load_for("ltc_cpu", device, dtype)


_NO_SECOND_DERIVATIVE = (
    "the compiled LTC loops have no second derivative (double backward, gradient penalties); "
    "build the LTC with fast=False (or set {switch}=0 before the first call) to differentiate "
    "through autograd"
)


def _check_first_derivative() -> None:
    if torch.is_grad_enabled():  # create_graph=True: a second derivative is wanted
        raise RuntimeError(_NO_SECOND_DERIVATIVE.format(switch=cpu_extensions.ENV_SWITCH))


class _Synapses(torch.autograd.Function):
    """``(Σ_j a_ji·w_erev_ji, Σ_j a_ji·w_ji)``, ``a_ji = sigmoid(σ_ji·v_j + offset_ji)``, for
    ``v (B, M)`` and ``(M, N)`` parameters, through the compiled loops (over each row's column
    range): nothing of size (B, M, N) is kept, the backward pass recomputes the sigmoid."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        extension: ModuleType,
        ranges: _Ranges,
        v: Tensor,
        sigma: Tensor,
        offset: Tensor,
        w: Tensor,
        w_erev: Tensor,
    ) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(v, sigma, offset, w, w_erev)
        ctx.extension, ctx.ranges = extension, ranges
        num, den = extension.forward(v, sigma, offset, w, w_erev, *ranges)
        return num, den

    @staticmethod
    def backward(ctx: Any, grad_num: Tensor, grad_den: Tensor) -> tuple[Any, ...]:
        _check_first_derivative()
        grads = ctx.extension.backward(
            grad_num.contiguous(), grad_den.contiguous(), *ctx.saved_tensors, *ctx.ranges
        )
        return None, None, *grads


def _compiled_synapses(
    extension: ModuleType,
    ranges: _Ranges,
    v: Tensor,
    sigma: Tensor,
    offset: Tensor,
    w: Tensor,
    w_erev: Tensor,
) -> tuple[Tensor, Tensor]:
    """The sums of :class:`_Synapses`, with a graph only where a gradient can flow."""
    # v may be a view with any strides (the caller's state before the first step).
    args = (v.contiguous(), sigma, offset, w, w_erev)
    if torch.is_grad_enabled() and any(arg.requires_grad for arg in args):
        return _Synapses.apply(extension, ranges, *args)
    num, den = extension.forward(*args, *ranges)
    return num, den  # rollouts: no graph, nothing kept


class _FusedSequence(torch.autograd.Function):
    """The "fused" solver over a whole sequence in the compiled loops: the states after every
    step ``hs (B, T, N)`` from the sensory sums ``num_s, den_s (B, T, N)``, the initial state,
    the unfold lengths ``delta = Δt / unfolds (B, T)``, the keep masks of the resets (0 where
    the state resets before the step; empty for none), the recurrent synapses' parameters and
    column ranges, and the neurons' cm, gleak and leak = gleak · vleak."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        extension: ModuleType,
        ranges: _Ranges,
        unfolds: int,
        epsilon: float,
        *tensors: Tensor,  # num_s den_s v0 delta keep sigma offset w w_erev cm gleak leak
    ) -> Tensor:
        hs, *saved = extension.sequence_forward(
            *_kernel_arguments(tensors, ranges), epsilon, unfolds, True
        )
        ctx.save_for_backward(*saved, *tensors)
        ctx.extension, ctx.ranges, ctx.unfolds, ctx.epsilon = extension, ranges, unfolds, epsilon
        return hs

    @staticmethod
    def backward(ctx: Any, grad_hs: Tensor) -> tuple[Any, ...]:
        _check_first_derivative()
        vs, nums, dens, *tensors = ctx.saved_tensors
        num_s, den_s, _, delta, keep, *parameters = _kernel_arguments(tensors, ctx.ranges)
        grads = ctx.extension.sequence_backward(
            grad_hs.contiguous(), vs, nums, dens, num_s, den_s, delta, keep, *parameters,
            ctx.epsilon, ctx.unfolds,
        )  # fmt: skip
        grad_num_s, grad_den_s, grad_v0, grad_delta, *grad_parameters = grads
        # no gradient for the keep masks
        return (
            None,
            None,
            None,
            None,
            grad_num_s,
            grad_den_s,
            grad_v0,
            grad_delta,
            None,
            *grad_parameters,
        )


def _kernel_arguments(tensors: tuple[Tensor, ...], ranges: _Ranges) -> tuple[Tensor, ...]:
    """The sequence kernels' argument order: the column ranges after the synapse parameters."""
    return (*tensors[:9], *ranges, *tensors[9:])


def _fused_sequence(
    extension: ModuleType,
    unfolds: int,
    epsilon: float,
    num_s: Tensor,
    den_s: Tensor,
    v0: Tensor,
    delta: Tensor,
    keep: Tensor,
    p: _Constants,
) -> Tensor:
    """The states after every step, with a graph only where a gradient can flow."""
    assert p.ranges is not None
    tensors = (
        num_s,
        den_s,
        v0.contiguous(),
        delta,
        keep,
        p.sigma,
        p.offset,
        p.w,
        p.w_erev,
        p.cm,
        p.gleak,
        p.leak,
    )
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedSequence.apply(extension, p.ranges, unfolds, epsilon, *tensors)
    arguments = _kernel_arguments(tensors, p.ranges)
    return extension.sequence_forward(*arguments, epsilon, unfolds, False)[0]  # nothing kept


class LTC(RecurrentModule):
    """A liquid time-constant RNN over batch-first sequences.

    Examples::

        >>> ltc = LTC(17, 32)                                # fully connected
        >>> wired = LTC(17, AutoNCP(32, output_size=6))     # sparse NCP, 6 outputs
        >>> y, v = ltc(torch.randn(8, 100, 17), timespans=0.05)

    Elapsed time and stability (``forward`` rejects negative, infinite and NaN Δt):

    - ``"fused"`` (semi-implicit Euler) is stable for any Δt ≥ 0: with the parameters
      positive, each unfold is a weighted average of v, v_leak and the reversal potentials,
      so v stays bounded however long the step. Its accuracy falls as Δt / ode_unfolds grows
      against the neurons' time constants (below). A zero Δt leaves v as it is.
    - ``"euler"`` and ``"rk4"`` are explicit: stable only while δ = Δt / ode_unfolds is small
      against the neurons' time constants ``τ_i = c_m,i / (g_leak,i + Σ_j w_ji·σ(·))``
      (linearised: Euler needs δ < 2τ, RK4 δ < 2.8τ). Every synapse adds to the
      conductance, so τ shrinks as the network grows (and as training grows w). Measured on
      the default initialisation with 6 unfolds (4 inputs, 100 steps of N(0, 1) inputs, three
      seeds), the states become inf/NaN for Δt above about 1.9 (euler) and 2.5 (rk4) with
      8 neurons, 1.2 and 1.6 with 16, 0.7 and 0.95 with 32, 0.43 and 0.58 with 64, 0.25 and
      0.34 with 128. For longer gaps use "fused", more ``ode_unfolds`` or a rescaled Δt.

    :param input_size: number of input features
    :param units: number of neurons (fully connected wiring) or a
        :class:`~cfc_rl.nn.wirings.Wiring`; the outputs are the first ``output_dim`` neurons
    :param solver: "fused" (reference semi-implicit Euler, stable for any Δt), "euler" or
        "rk4" (explicit: diverge above a Δt that falls with the network's size, see above)
    :param ode_unfolds: solver steps per time step (each covers Δt / ode_unfolds)
    :param input_mapping: "affine" (x·w + b), "linear" (x·w) or "none"
    :param output_mapping: "affine", "linear" or "none", applied to the motor neurons
    :param mixed_memory: put an LSTM memory cell before each update; state ``[v | c]``
    :param epsilon: added to the fused solver's denominator to avoid dividing by zero
    :param implicit_param_constraints: keep w, sensory_w, cm and gleak positive with a
        softplus at run time (True, as ncps's LTC); with False they are used as they are and
        :meth:`apply_weight_constraints` must be called after each optimiser step
    :param fast: run the compiled C++ loops where they apply (``csrc/ltc_cpu.cpp``, float32
        and float64 CPU tensors): whole sequences of the "fused" solver without mixed memory,
        the synapse sums per unfold otherwise (the shared per-step driver runs the steps);
        same numbers, several times faster, and a wiring's absent synapses skipped. False
        (and CUDA) differentiates through autograd over the shared driver's ATen operations,
        which second derivatives need. While a tracer or exporter records the LTC
        (:func:`~cfc_rl.nn.base.tracing`) it runs the ATen driver whatever ``fast`` says.
    """

    cpu_kernels = ("ltc_cpu",)

    def __init__(
        self,
        input_size: int,
        units: int | Wiring,
        *,
        solver: str = "fused",
        ode_unfolds: int = 6,
        input_mapping: str = "affine",
        output_mapping: str = "affine",
        mixed_memory: bool = False,
        epsilon: float = 1e-8,
        implicit_param_constraints: bool = True,
        fast: bool = True,
    ) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {input_size}")
        if solver not in SOLVERS:
            raise ValueError(f"unknown LTC solver {solver!r}; known solvers: {', '.join(SOLVERS)}")
        if ode_unfolds < 1:
            raise ValueError(f"ode_unfolds must be >= 1, got {ode_unfolds}")
        for name, value in (("input_mapping", input_mapping), ("output_mapping", output_mapping)):
            if value not in MAPPINGS:
                raise ValueError(f"unknown {name} {value!r}; known: {', '.join(MAPPINGS)}")
        if isinstance(units, Wiring):
            wiring = units
        elif isinstance(units, int) and not isinstance(units, bool) and units >= 1:
            wiring = FullyConnected(units)
        else:
            raise ValueError(f"units must be a positive integer or a Wiring, got {units!r}")
        wiring.build(input_size)
        assert wiring.sensory_adjacency_matrix is not None
        self.wiring = wiring
        self.input_size = input_size
        self.units = wiring.units
        self.motor_size = wiring.output_dim
        self.solver = solver
        self.ode_unfolds = ode_unfolds
        self.input_mapping = input_mapping
        self.output_mapping = output_mapping
        self.epsilon = epsilon
        self.implicit_param_constraints = implicit_param_constraints
        self.fast = fast

        n, m = self.units, input_size
        for name, shape in (
            ("gleak", (n,)),
            ("vleak", (n,)),
            ("cm", (n,)),
            ("sigma", (n, n)),
            ("mu", (n, n)),
            ("w", (n, n)),
            ("sensory_sigma", (m, n)),
            ("sensory_mu", (m, n)),
            ("sensory_w", (m, n)),
        ):
            low, high = _INIT_RANGES[name]
            self.register_parameter(name, nn.Parameter(torch.empty(shape).uniform_(low, high)))
        adjacency = torch.as_tensor(wiring.adjacency_matrix, dtype=torch.float32)
        sensory = torch.as_tensor(wiring.sensory_adjacency_matrix, dtype=torch.float32)
        # Reversal potentials start at the synapses' polarity (+1 excitatory, -1 inhibitory).
        self.erev = nn.Parameter(adjacency.clone())
        self.sensory_erev = nn.Parameter(sensory.clone())
        self.register_buffer("sparsity_mask", adjacency.abs())
        self.register_buffer("sensory_sparsity_mask", sensory.abs())
        self.input_w = nn.Parameter(torch.ones(m)) if input_mapping != "none" else None
        self.input_b = nn.Parameter(torch.zeros(m)) if input_mapping == "affine" else None
        self.output_w = (
            nn.Parameter(torch.ones(self.motor_size)) if output_mapping != "none" else None
        )
        self.output_b = (
            nn.Parameter(torch.zeros(self.motor_size)) if output_mapping == "affine" else None
        )
        self.configure_state(self.units, self.motor_size, mixed_memory=mixed_memory)
        self._column_ranges: dict[str, tuple[tuple[int, int], _Ranges]] = {}

    def _positive(self, param: Tensor) -> Tensor:
        return F.softplus(param) if self.implicit_param_constraints else param

    @torch.no_grad()
    def apply_weight_constraints(self) -> None:
        """Clip w, sensory_w, cm and gleak at zero (only with implicit_param_constraints=False)."""
        if not self.implicit_param_constraints:
            for param in (self.w, self.sensory_w, self.cm, self.gleak):
                param.clamp_(min=0.0)

    def _synapses(
        self, v: Tensor, num_s: Tensor, den_s: Tensor, p: _Constants
    ) -> tuple[Tensor, Tensor]:
        """``Σ_j a_ji E_ji`` and ``Σ_j a_ji`` plus the sensory terms, a = w·σ(σ(v_j − μ))."""
        if p.extension is not None and p.ranges is not None:
            num, den = _compiled_synapses(
                p.extension, p.ranges, v, p.sigma, p.offset, p.w, p.w_erev
            )
            return num + num_s, den + den_s
        # σ·(v_j − μ_ji) as one fused multiply-add and an in-place sigmoid: two passes over the
        # (B, N, N) tensor instead of three, the largest cost of an LTC step.
        activation = torch.addcmul(p.offset, self.sigma, v.unsqueeze(-1)).sigmoid_()
        return (activation * p.w_erev).sum(dim=1) + num_s, (activation * p.w).sum(dim=1) + den_s

    def _rhs(self, v: Tensor, num_s: Tensor, den_s: Tensor, p: _Constants) -> Tensor:
        """dv/dt of the LTC ODE."""
        num, den = self._synapses(v, num_s, den_s, p)
        return (p.leak + num - (p.gleak + den) * v) / p.cm

    def _solve(
        self, v: Tensor, delta: Tensor, num_s: Tensor, den_s: Tensor, p: _Constants
    ) -> Tensor:
        """Advance v by one time step: ``ode_unfolds`` solver steps of length ``delta``."""
        if self.solver == "fused":
            # The reference update (cm/Δ·v + leak + num) / (cm/Δ + gleak + den + ε), multiplied
            # through by Δ: the same number, and a zero Δt (padding) leaves v as it is instead
            # of dividing by zero.
            for _ in range(self.ode_unfolds):
                num, den = self._synapses(v, num_s, den_s, p)
                v = (p.cm * v + delta * (p.leak + num)) / (
                    p.cm + delta * (p.gleak + den + self.epsilon)
                )
        elif self.solver == "euler":
            for _ in range(self.ode_unfolds):
                v = v + delta * self._rhs(v, num_s, den_s, p)
        else:
            for _ in range(self.ode_unfolds):
                k1 = self._rhs(v, num_s, den_s, p)
                k2 = self._rhs(v + 0.5 * delta * k1, num_s, den_s, p)
                k3 = self._rhs(v + 0.5 * delta * k2, num_s, den_s, p)
                k4 = self._rhs(v + delta * k3, num_s, den_s, p)
                v = v + delta / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return v

    def _extension(self, x: Tensor) -> ModuleType | None:
        """The compiled synapse loops for this call, or None for the ATen operations (mixed
        dtypes are left to ATen's type promotion; a tracer records ATen operations, as it
        cannot see into the compiled loops)."""
        if self.fast and x.dtype == self.sigma.dtype and not tracing():
            return compiled_loops(x.device, x.dtype)
        return None

    # The per-step protocol: sensory synapses hoisted out of the loop, the solver per step.

    def prepare_inputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The sensory synapses' sums ``(Σ_j a_ji·E_ji, Σ_j a_ji)``, ``(B, T, N)`` each, for
        all steps at once (the input mapping applied first)."""
        inputs = x
        if self.input_w is not None:
            inputs = inputs * self.input_w
        if self.input_b is not None:
            inputs = inputs + self.input_b
        extension = self._extension(x)
        sensory = self._positive(self.sensory_w) * self.sensory_sparsity_mask
        if extension is not None:  # the B·T steps as one batch of the synapse loops
            batch, steps = x.shape[:2]
            sensory_num, sensory_den = _compiled_synapses(
                extension,
                self._ranges("sensory_sparsity_mask"),
                inputs.reshape(batch * steps, -1),
                self.sensory_sigma,
                -(self.sensory_sigma * self.sensory_mu),
                sensory,
                sensory * self.sensory_erev,
            )
            return sensory_num.view(batch, steps, -1), sensory_den.view(batch, steps, -1)
        # (B, T, I, N) reduced over the inputs.
        sensory = sensory * torch.sigmoid(
            self.sensory_sigma * (inputs.unsqueeze(-1) - self.sensory_mu)
        )
        return (sensory * self.sensory_erev).sum(dim=2), sensory.sum(dim=2)

    def step_constants(self, x: Tensor) -> _Constants:
        w = self._positive(self.w) * self.sparsity_mask
        gleak = self._positive(self.gleak)
        w_erev = w * self.erev
        offset = -(self.sigma * self.mu)
        extension = self._extension(x)
        return _Constants(
            sigma=self.sigma,
            w=w,
            w_erev=w_erev,
            offset=offset,
            cm=self._positive(self.cm),
            gleak=gleak,
            leak=gleak * self.vleak,
            extension=extension,
            ranges=None if extension is None else self._ranges("sparsity_mask"),
        )

    def _ranges(self, mask_name: str) -> _Ranges:
        """The column ranges of a wiring mask, recomputed only when the mask changes (a
        ``load_state_dict`` copies into it, which bumps its version counter)."""
        mask = getattr(self, mask_name)
        key = (mask.data_ptr(), mask._version)
        cached = self._column_ranges.get(mask_name)
        if cached is None or cached[0] != key:
            cached = (key, column_ranges(mask))
            self._column_ranges[mask_name] = cached
        return cached[1]

    def _sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        # The "fused" solver runs whole sequences in the compiled loops (the same numbers as
        # the driver, without ode_unfolds · T steps of autograd bookkeeping); the explicit
        # solvers and mixed memory take the driver, whose synapse sums are compiled too.
        extension = self._extension(x)
        if extension is None or self.solver != "fused" or self.memory is not None:
            return self.step_sequence(x, state, timespans, resets)
        num_s, den_s = self.prepare_inputs(x)
        constants = self.step_constants(x)
        keep = x.new_empty(0) if resets is None else (~resets).to(x.dtype)
        delta = timespans / self.ode_unfolds
        hs = _fused_sequence(
            extension, self.ode_unfolds, self.epsilon, num_s, den_s, state, delta, keep, constants
        )
        y = self.readout(hs)
        if self.proj is not None:
            y = self.proj(y)
        return y, hs[:, -1].clone()  # not a view: the caller may edit either in place

    def step(
        self, x_t: tuple[Tensor, Tensor], h: Tensor, dt_t: Tensor, constants: _Constants
    ) -> Tensor:
        num_s, den_s = x_t
        return self._solve(h, dt_t / self.ode_unfolds, num_s, den_s, constants)

    def readout(self, hs: Tensor) -> Tensor:
        """The motor neurons (the first ``output_dim``) through the output mapping."""
        y = hs[:, :, : self.motor_size]
        if self.output_w is not None:
            y = y * self.output_w
        if self.output_b is not None:
            y = y + self.output_b
        return y
