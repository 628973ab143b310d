"""The one interface every recurrent module of :mod:`cfc_rl.nn` shares, and the one time loop.

Every module maps a batch-first sequence ``x (B, T, input_size)`` and a flat state
``(B, state_size)`` to outputs ``(B, T, output_size)`` and the final state. One flat state tensor
(an LSTM packs ``[h | c]``) keeps Stable-Baselines3 buffers, checkpoints and resets uniform;
``resets`` lets a padded minibatch of many episodes run in one call.

Writing a cell
--------------

A cell says what ONE time step does; :class:`RecurrentModule` runs the sequence (the *shared
driver*, :meth:`RecurrentModule.step_sequence`): it checks the inputs, zeroes the state of the
samples that reset, runs the optional mixed-memory LSTM cell before each update, stacks the
states, reads them out and applies the optional output projection. A cell implements:

``step(x_t, h, dt_t, constants) -> h_new`` (required)
    One update of the cell's own state ``h (B, cell_state_size)`` over an elapsed time
    ``dt_t (B, 1)``. ``x_t`` is step t of what :meth:`prepare_inputs` returned (a ``(B, ...)``
    tensor, or a tuple of them), ``constants`` what :meth:`step_constants` returned. It must
    not modify ``h`` in place (autograd keeps it).

``prepare_inputs(x) -> Tensor | tuple[Tensor, ...]`` (optional; default: ``x`` itself)
    The part of the update that does not depend on the state, for all ``T`` steps at once:
    one large operation instead of ``T`` small ones (CfC: the input half of its first linear
    map; LTC: its sensory synapses). Each returned tensor has time on dimension 1.

``step_constants(x) -> Any`` (optional; default: None)
    What every step reads but that depends on neither the state nor the step, computed once
    per call: transposed or masked weights, parameters made positive. ``x`` is the checked
    input, for its device and dtype.

``readout(hs) -> y`` (optional; default: ``hs``)
    The outputs ``(B, T, readout_size)`` from the states after every step ``hs (B, T,
    cell_state_size)`` (LTC: its motor neurons and output mapping; a wired CfC: the neurons
    of its last layer).

In ``__init__`` the cell sets ``input_size`` and calls :meth:`RecurrentModule.configure_state`
with its state size and readout size (and ``mixed_memory``/``proj_size`` if it offers them),
which sets ``state_size``, ``output_size``, ``memory`` and ``proj``. Continuous-time cells
keep ``uses_timespans = True``; discrete ones set it False (they get Δt as an input, see
:func:`time_input`). Then one line in :data:`cfc_rl.nn.registry.CELLS` names it, and the
test-suite's parametrised checks (shapes, gradcheck, resets, per-sample Δt, SB3 round trips)
cover it. :class:`cfc_rl.nn.ctrnn.CTRNN` is a complete example in about 40 lines::

    class CTRNN(RecurrentModule):              # dh/dt = -h/τ + tanh(W·[x ; h] + b)
        def __init__(self, input_size, units, *, mixed_memory=False, proj_size=None):
            super().__init__()
            self.input_size = input_size
            self.linear = nn.Linear(input_size + units, units)
            self.tau_raw = nn.Parameter(torch.full((units,), math.log(math.expm1(1.0))))
            self.configure_state(units, units, mixed_memory=mixed_memory, proj_size=proj_size)

        def prepare_inputs(self, x):           # W_x·x + b, all steps at once
            return F.linear(x, self.linear.weight[:, : self.input_size], self.linear.bias)

        def step_constants(self, x):           # W_h transposed, 1/τ
            w_rec = self.linear.weight[:, self.input_size :]
            return w_rec.t(), F.softplus(self.tau_raw).reciprocal()

        def step(self, x_t, h, dt_t, constants):   # one explicit Euler step over Δt
            w_rec_t, rate = constants
            return h + dt_t * (torch.tanh(torch.addmm(x_t, h, w_rec_t)) - h * rate)

Fast paths: a cell with a hand-written kernel for whole sequences overrides
:meth:`RecurrentModule._sequence` and calls ``self.step_sequence(...)`` wherever the kernel
does not apply, and takes a ``fast: bool = True`` flag (False: always the driver, which
second derivatives need). The kernel must give the driver's numbers: the tests compare the
two, outputs and gradients, in float64 with resets and per-sample Δt.

Tracing and export: a fast path is opaque to a tracer (a compiled loop is a call it cannot see
into, a reset position read with ``.tolist()`` is baked into the graph), so that it would
record wrong operations, silently. Whenever :func:`tracing` is true (``torch.jit.trace``,
``torch.compile``, ``torch.export``, both ONNX exporters, fx tracing) every fast path must
take the shared driver instead, which records ordinary ATen operations and gives the eager
numbers; a cell with a fast path tests ``tracing()`` where it tests ``fast``. The cells cannot
be compiled with ``torch.jit.script`` (the driver is Python over a protocol TorchScript does
not type): it refuses with an error that points to trace and export.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx import _symbolic_trace

if TYPE_CHECKING:
    from cfc_rl.nn.registry import CellSpec

Timespans = Tensor | float | None
StepInputs = Tensor | tuple[Tensor, ...]


def tracing() -> bool:
    """Whether a tracer or exporter is recording this call rather than running it: then every
    fast path of :mod:`cfc_rl.nn` (compiled C++ loops, the fused CfC kernel, the LTC's compiled
    synapses, the segment loop of LSTM/GRU) takes the shared per-step driver, whose ordinary
    ATen operations trace correctly and give the eager numbers.

    True under ``torch.jit.trace`` (so under the TorchScript-based ONNX exporter,
    ``torch.onnx.export(..., dynamo=False)``, which traces), under ``torch.compile`` and
    ``torch.export`` (so under the ONNX exporter built on it, ``dynamo=True``; dynamo folds
    this to a constant) and under fx tracing (``torch.fx.symbolic_trace``, ``make_fx``). It
    costs about a microsecond a call; ``torch.onnx.is_in_onnx_export()`` costs several and
    adds nothing (both exporters trace with the tools above), so it is not asked.
    """
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or getattr(_symbolic_trace, "_is_fx_tracing_flag", False)
    )


class MemoryCell(nn.Module):
    """The LSTM cell of mixed-memory models (ncps's ``LSTMCell``): gates ordered
    (input, input gate, forget gate, output gate), forget-gate bias +1, orthogonal recurrent
    weights. Split into an input projection, done for all steps at once, and a step.

    :param input_size: number of input features
    :param hidden_size: number of units of h and c
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_map = nn.Linear(input_size, 4 * hidden_size, bias=True)
        self.recurrent_map = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        # The reference adds 1 to the forget gate's pre-activation; folded into the projection.
        offset = torch.zeros(4 * hidden_size)
        offset[2 * hidden_size : 3 * hidden_size] = 1.0
        self.register_buffer("gate_offset", offset, persistent=False)
        nn.init.xavier_uniform_(self.input_map.weight)
        nn.init.uniform_(self.input_map.bias, -0.1, 0.1)
        nn.init.orthogonal_(self.recurrent_map.weight)

    def project_inputs(self, x: Tensor) -> Tensor:
        """The input half of the gates (forget-gate offset included), for any leading shape."""
        return F.linear(x, self.input_map.weight, self.input_map.bias + self.gate_offset)

    def step(self, x_projected: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """One update of ``(h, c)`` from the projected input of this step."""
        z = torch.addmm(x_projected, h, self.recurrent_map.weight.t())
        i, ig, fg, og = z.chunk(4, dim=1)
        c = c * torch.sigmoid(fg) + torch.tanh(i) * torch.sigmoid(ig)
        return torch.tanh(c) * torch.sigmoid(og), c


class RecurrentModule(nn.Module, ABC):
    """Base class of every cell: validates inputs once, then runs the sequence.

    See the module docstring for the per-step protocol (:meth:`step`, :meth:`prepare_inputs`,
    :meth:`step_constants`, :meth:`readout`) and how to add a cell.
    """

    input_size: int
    output_size: int
    state_size: int
    memory: MemoryCell | None
    """The mixed-memory LSTM cell run before each update (state ``[h | c]``), or None."""
    proj: nn.Linear | None
    """The output projection (``proj_size``), or None."""
    uses_timespans: bool = True
    """False for discrete cells (LSTM, GRU), which ignore ``timespans``: callers that want to
    give them the elapsed time feed it as an input feature instead (see :func:`time_input`)."""
    cpu_kernels: tuple[str, ...] = ()
    """The compiled CPU loops the cell's fast path uses (names of
    :data:`cfc_rl.nn.cpu_extensions.EXTENSIONS`), so that they can be built ahead of time."""

    def configure_state(
        self,
        cell_state_size: int,
        readout_size: int,
        *,
        mixed_memory: bool = False,
        proj_size: int | None = None,
    ) -> None:
        """Set ``state_size``, ``output_size``, ``memory`` and ``proj``; call it in ``__init__``
        once ``input_size`` is set. The memory cell and the projection are created (and
        randomly initialised) here, in that order.

        :param cell_state_size: width of the state :meth:`step` updates
        :param readout_size: width of what :meth:`readout` returns
        :param mixed_memory: run an LSTM memory cell of ``cell_state_size`` units before each
            update; the flat state is then ``[h | c]``
        :param proj_size: if set, the outputs go through a Linear layer to this size
        """
        if proj_size is not None and proj_size < 1:
            raise ValueError(f"proj_size must be a positive integer or None, got {proj_size}")
        self.memory = MemoryCell(self.input_size, cell_state_size) if mixed_memory else None
        self.state_size = 2 * cell_state_size if mixed_memory else cell_state_size
        self.proj = None if proj_size is None else nn.Linear(readout_size, proj_size)
        self.output_size = readout_size if proj_size is None else proj_size

    @property
    def mixed_memory(self) -> bool:
        return self.memory is not None

    def __prepare_scriptable__(self) -> RecurrentModule:
        # torch.jit.script calls this on every module it compiles (submodules included).
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled with torch.jit.script (its time loop is "
            "Python over a per-step protocol); use torch.jit.trace, torch.export.export or "
            "torch.onnx.export instead, which record the plain ATen path (see "
            "cfc_rl.nn.base.tracing), or cfc_rl.experiment.export for a trained policy"
        )

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The state at the start of an episode: zeros of shape ``(batch_size, state_size)``.

        :param batch_size: number of sequences
        :param device: defaults to the device of the module's parameters
        :param dtype: defaults to the dtype of the module's parameters
        """
        reference = next(self.parameters())
        return torch.zeros(
            batch_size,
            self.state_size,
            device=reference.device if device is None else device,
            dtype=reference.dtype if dtype is None else dtype,
        )

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        *,
        timespans: Timespans = None,
        resets: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the module over a batch of sequences.

        :param x: inputs of shape ``(B, T, input_size)``
        :param state: state before the first step, ``(B, state_size)``; zeros when None
        :param timespans: elapsed time of each step, a float for all steps or a ``(B, T)``
            tensor of per-sample values; 1.0 when None. Every value must be finite and
            ``>= 0`` (zero is allowed, as for padding); the Δt for which a cell's solver is
            stable is stated in the cell's docstring
        :param resets: ``(B, T)`` boolean tensor (or 0/1 numbers); True zeroes the state
            before step t
        :return: outputs ``(B, T, output_size)`` and the final state ``(B, state_size)``
        :raises ValueError: for inputs of the wrong shape or dtype, and for a negative,
            infinite or NaN timespan (naming the value and where it is)
        """
        if torch.jit.is_tracing():
            # Sizes are traced values there, and each comparison of the checks below warns that
            # it becomes a constant of the trace: true of every shape check, so not worth a
            # warning (a trace is valid for the shapes it was recorded with).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                checked = self._checked_inputs(x, state, timespans, resets)
        else:
            checked = self._checked_inputs(x, state, timespans, resets)
        return self._sequence(*checked)

    def _checked_inputs(
        self, x: Tensor, state: Tensor | None, timespans: Timespans, resets: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """The inputs of :meth:`forward` checked and in the form of :meth:`_sequence`: a state
        (zeros when None), ``(B, T)`` timespans of x's dtype, boolean resets or None."""
        name = type(self).__name__
        if x.dim() != 3 or x.shape[2] != self.input_size or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"{name} expected x of shape (batch >= 1, time >= 1, {self.input_size}), "
                f"got {tuple(x.shape)}"
            )
        batch, steps = x.shape[0], x.shape[1]
        if state is None:
            state = self.initial_state(batch, device=x.device, dtype=x.dtype)
        elif state.shape != (batch, self.state_size):
            raise ValueError(
                f"{name} expected state of shape ({batch}, {self.state_size}), "
                f"got {tuple(state.shape)}"
            )
        elif state.dtype != x.dtype:
            raise ValueError(f"{name} got a state of dtype {state.dtype} for x of {x.dtype}")
        # Tensors (and arrays) keep their autograd history; a number means every step.
        given = timespans
        if not isinstance(given, Tensor):  # (as_tensor of a tensor would warn under jit.trace)
            timespans = torch.as_tensor(1.0 if given is None else given)
        timespans = timespans.to(device=x.device, dtype=x.dtype)
        if timespans.dim() != 0 and timespans.shape != (batch, steps):
            raise ValueError(
                f"{name} expected timespans of shape ({batch}, {steps}) or a float, "
                f"got {tuple(timespans.shape)}"
            )
        if given is not None:  # a Python number is checked without a tensor operation
            check_timespans(name, given if isinstance(given, (int, float)) else timespans)
        if timespans.dim() == 0:
            timespans = timespans.expand(batch, steps)
        if resets is not None:
            if isinstance(resets, Tensor):
                resets = resets.to(device=x.device)
            else:
                resets = torch.as_tensor(resets, device=x.device)
            if resets.shape != (batch, steps):
                raise ValueError(
                    f"{name} expected resets of shape ({batch}, {steps}), got {tuple(resets.shape)}"
                )
            # Episode-start flags often come as 0./1. floats (SB3): above one half is a reset.
            resets = resets if resets.dtype == torch.bool else resets > 0.5
        return x, state, timespans, resets

    # The per-step protocol -------------------------------------------------------------------

    @abstractmethod
    def step(self, x_t: StepInputs, h: Tensor, dt_t: Tensor, constants: Any) -> Tensor:
        """One update of the cell's own state.

        :param x_t: step t of :meth:`prepare_inputs` (a ``(B, ...)`` tensor or a tuple)
        :param h: the cell's state before the step, ``(B, cell_state_size)`` (with mixed
            memory, the memory cell's output); never modify it in place
        :param dt_t: the elapsed time of the step, ``(B, 1)``
        :param constants: what :meth:`step_constants` returned
        :return: the state after the step, ``(B, cell_state_size)``
        """

    def prepare_inputs(self, x: Tensor) -> StepInputs:
        """The state-independent part of every step, for all steps at once: a tensor, or a
        tuple of tensors, with time on dimension 1. Default: ``x`` as it is."""
        return x

    def step_constants(self, x: Tensor) -> Any:
        """Values every step reads that depend on neither state nor step (weights transposed,
        masked or made positive), computed once per call. Default: None."""
        return None

    def readout(self, hs: Tensor) -> Tensor:
        """The outputs ``(B, T, readout_size)`` from the states after every step
        ``(B, T, cell_state_size)``. Default: the states themselves."""
        return hs

    # Running a sequence --------------------------------------------------------------------

    def _sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Run over checked inputs: x (B,T,I), state (B,S), timespans (B,T), resets (B,T)|None.

        The shared driver by default; cells with a kernel for whole sequences override this
        and call :meth:`step_sequence` where the kernel does not apply, and always while
        :func:`tracing`."""
        return self.step_sequence(x, state, timespans, resets)

    def step_sequence(
        self, x: Tensor, state: Tensor, timespans: Tensor, resets: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """The shared driver: a time loop over :meth:`step` under autograd, for checked inputs
        (as :meth:`_sequence`). Every cell runs through it; fast paths must equal it.

        Per step t: the state of the samples with ``resets[:, t]`` is zeroed (``h`` and, with
        mixed memory, ``c``); with mixed memory the LSTM memory cell updates ``(h, c)``; then
        :meth:`step` updates ``h``. The outputs are ``proj(readout(stack of h))``, the final
        state ``h`` (or ``[h | c]``)."""
        steps = x.shape[1]
        prepared = self.prepare_inputs(x)
        constants = self.step_constants(x)
        # Steps are unbound once: indexing [:, t] inside the loop would make autograd build a
        # full-size gradient for every step.
        if isinstance(prepared, Tensor):
            input_steps: list[Any] | tuple[Tensor, ...] = prepared.unbind(1)
        else:
            input_steps = list(zip(*(part.unbind(1) for part in prepared), strict=True))
        dt_steps = timespans.unsqueeze(-1).unbind(1)
        keeps = keep_masks(resets, steps, x.dtype)
        memory = self.memory
        if memory is not None:
            memory_steps = memory.project_inputs(x).unbind(1)
            h, c = state.chunk(2, dim=1)
        else:
            h, c = state, None
        hs = []
        for t in range(steps):
            keep = keeps[t]
            if keep is not None:
                h = h * keep
                if c is not None:
                    c = c * keep
            if memory is not None:
                h, c = memory.step(memory_steps[t], h, c)
            h = self.step(input_steps[t], h, dt_steps[t], constants)
            hs.append(h)
        y = self.readout(torch.stack(hs, dim=1))
        if self.proj is not None:
            y = self.proj(y)
        final = torch.cat([h, c], dim=1) if c is not None else h
        return y, final


def check_timespans(name: str, timespans: Tensor | float) -> None:
    """Raise a one-line ValueError naming ``name``, the first elapsed time that is negative,
    infinite or NaN, and where it is; do nothing for valid ones (finite and ``>= 0``).

    The check costs one reduction (``aminmax``, about 10 µs on a CPU) and reading its two
    numbers per call, before the time loop, on a detached tensor: autograd is left alone. It
    is skipped while a tracer records the module (:func:`tracing`: ``torch.jit.trace``,
    ``torch.compile``, ``torch.export``, the ONNX exporters, fx): reading a tensor's value
    there bakes one branch into the trace and warns (jit), breaks the graph in two (dynamo),
    fails on a data-dependent branch (``fullgraph=True``, export) or on a value that does not
    exist (fake tensors, fx proxies). The traced graph then holds no check: validate Δt where
    the exported module is run. A Python number is checked in every case (it is a constant of
    the trace, not an input).

    :param name: the cell's name, for the message
    :param timespans: a number, or a tensor of elapsed times (any shape; ``(B, T)`` in the
        cells)
    :raises ValueError: for a negative, infinite or NaN value
    """
    if isinstance(timespans, Tensor):
        if tracing():
            return
        # aminmax propagates NaN, which then fails both comparisons; -inf fails the first and
        # +inf the second. (Element-wise comparisons and .all() cost several times as much.)
        low, high = torch.aminmax(timespans.detach())
        if low.item() >= 0 and high.item() < math.inf:
            return
        invalid = ~((timespans >= 0) & (timespans < math.inf))
        where = tuple(int(i) for i in invalid.nonzero()[0])
        value = float(timespans.detach()[where])
        position = f" at sample {where[0]}, step {where[1]}" if len(where) == 2 else ""
    else:
        if timespans >= 0 and math.isfinite(timespans):
            return
        value, position = float(timespans), ""
    if math.isnan(value):
        kind = "a NaN value"
    elif math.isinf(value):
        kind = "an infinite value"
    else:
        kind = "a negative value"
    raise ValueError(
        f"{name} got timespans with {kind} ({value}){position}; elapsed times must be finite "
        "and >= 0"
    )


def keep_masks(resets: Tensor | None, steps: int, dtype: torch.dtype) -> list[Tensor | None]:
    """Per step, the ``(B, 1)`` factor that zeroes the state of the samples that reset before
    it (None for every step when there are no resets).

    Steps are unbound once: indexing ``[:, t]`` inside a time loop would make autograd build
    a full-size gradient for every step."""
    if resets is None:
        return [None] * steps
    return list((~resets).to(dtype).unsqueeze(-1).unbind(1))


# Elapsed time as timespans or as an input -------------------------------------------------------


def _cell_class(cell: str | type[RecurrentModule] | RecurrentModule) -> type[RecurrentModule]:
    if isinstance(cell, str):
        from cfc_rl.nn.registry import cell_spec  # the registry imports this module

        spec: CellSpec = cell_spec(cell)
        return spec.cls
    return cell if isinstance(cell, type) else type(cell)


def cell_input_size(
    cell: str | type[RecurrentModule] | RecurrentModule, features: int, has_dt: bool
) -> int:
    """The ``input_size`` to build ``cell`` with for ``features`` input features, when the
    elapsed time Δt of each step is (``has_dt``) or is not known: continuous-time cells take
    Δt as ``timespans``, discrete ones (``uses_timespans = False``) as one more input feature.

    :param cell: a name of :data:`cfc_rl.nn.CELLS`, a cell class or a cell
    :raises ValueError: for an unknown name, listing the known ones
    """
    return features + int(has_dt and not _cell_class(cell).uses_timespans)


def time_input(cell: RecurrentModule, x: Tensor, dt: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """What to give ``cell`` for inputs ``x (B, T, features)`` and elapsed times ``dt (B, T)``
    (or None): ``(x, dt)`` for continuous-time cells, ``(x with dt as its last feature, None)``
    for discrete ones. Build the cell with :func:`cell_input_size` to match."""
    if dt is None or cell.uses_timespans:
        return x, dt
    return torch.cat([x, dt.unsqueeze(-1).to(x.dtype)], dim=-1), None
