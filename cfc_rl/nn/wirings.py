"""Wirings: which neuron feeds which, for sparse Neural Circuit Policies (NCPs).

A wiring owns two signed adjacency matrices (+1 excitatory, -1 inhibitory, 0 no synapse):
``adjacency_matrix (units, units)`` between neurons and ``sensory_adjacency_matrix
(input_dim, units)`` from the inputs. CfC uses them as masks of its layers, LTC as masks and as
the initial reversal potentials. The constructors draw the same random matrices as the ``ncps``
package for the same seed, so a model defined with ``ncps.wirings.AutoNCP(32, 4, seed=7)``
gets the same circuit here from ``AutoNCP(32, 4, seed=7)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


class Wiring:
    """A general wiring of ``units`` neurons; the first ``output_dim`` of them are the outputs.

    Subclasses fill the matrices; a plain ``Wiring`` can hold any given matrices (this is how
    wirings loaded from ``ncps`` are represented).

    :param units: number of neurons (the state size of a cell)
    :param output_dim: number of motor (output) neurons, neurons ``0 .. output_dim - 1``
    :param layers: neuron ids of each layer, from the sensory side to the motor layer; one
        layer of all neurons when None
    """

    def __init__(
        self, units: int, output_dim: int | None = None, layers: list[list[int]] | None = None
    ) -> None:
        if units < 1:
            raise ValueError(f"units must be a positive integer, got {units}")
        self.units = units
        self.output_dim = units if output_dim is None else output_dim
        self.input_dim: int | None = None
        self.adjacency_matrix = np.zeros((units, units), dtype=np.int32)
        self.sensory_adjacency_matrix: np.ndarray | None = None
        self._layers = [list(range(units))] if layers is None else [list(ids) for ids in layers]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def get_neurons_of_layer(self, layer_id: int) -> list[int]:
        """Neuron ids of layer ``layer_id`` (0 is the layer the inputs feed)."""
        return self._layers[layer_id]

    def is_built(self) -> bool:
        return self.input_dim is not None

    def build(self, input_dim: int) -> None:
        """Fix the number of inputs and draw the sensory synapses (once)."""
        if self.input_dim is not None:
            if self.input_dim != input_dim:
                raise ValueError(
                    f"this wiring was built for {self.input_dim} inputs, got {input_dim}"
                )
            return
        self.input_dim = input_dim
        self.sensory_adjacency_matrix = np.zeros((input_dim, self.units), dtype=np.int32)
        self._build_sensory()

    def _build_sensory(self) -> None:
        """Draw the sensory synapses; a plain wiring gets them from its creator."""

    @property
    def synapse_count(self) -> int:
        return int(np.abs(self.adjacency_matrix).sum())

    @property
    def sensory_synapse_count(self) -> int:
        if self.sensory_adjacency_matrix is None:
            return 0
        return int(np.abs(self.sensory_adjacency_matrix).sum())

    @classmethod
    def from_matrices(
        cls,
        adjacency_matrix: np.ndarray,
        sensory_adjacency_matrix: np.ndarray,
        output_dim: int,
        layers: list[list[int]] | None = None,
    ) -> Wiring:
        """A built wiring with the given matrices (copied)."""
        adjacency = np.asarray(adjacency_matrix, dtype=np.int32)
        sensory = np.asarray(sensory_adjacency_matrix, dtype=np.int32)
        if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
            raise ValueError(f"adjacency_matrix must be square, got shape {adjacency.shape}")
        if sensory.ndim != 2 or sensory.shape[1] != adjacency.shape[0]:
            raise ValueError(
                f"sensory_adjacency_matrix must have shape (inputs, {adjacency.shape[0]}), "
                f"got {sensory.shape}"
            )
        wiring = cls.__new__(Wiring)
        Wiring.__init__(wiring, adjacency.shape[0], output_dim, layers)
        wiring.adjacency_matrix = adjacency.copy()
        wiring.input_dim = sensory.shape[0]
        wiring.sensory_adjacency_matrix = sensory.copy()
        return wiring

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(units={self.units}, output_dim={self.output_dim}, "
            f"input_dim={self.input_dim}, synapses={self.synapse_count}, "
            f"sensory_synapses={self.sensory_synapse_count})"
        )


class FullyConnected(Wiring):
    """Every neuron and every input feeds every neuron; polarity +1 with probability 2/3.

    :param units: number of neurons
    :param output_dim: number of output neurons (all when None)
    :param erev_init_seed: seed of the polarities
    :param self_connections: whether a neuron feeds itself
    """

    def __init__(
        self,
        units: int,
        output_dim: int | None = None,
        erev_init_seed: int = 1111,
        self_connections: bool = True,
    ) -> None:
        super().__init__(units, output_dim)
        self.self_connections = self_connections
        self._rng = np.random.default_rng(erev_init_seed)
        # One draw per synapse, in ncps's order, so both packages get the same polarities.
        for src in range(units):
            for dest in range(units):
                if src != dest or self_connections:
                    self.adjacency_matrix[src, dest] = self._rng.choice([-1, 1, 1])

    def _build_sensory(self) -> None:
        assert self.sensory_adjacency_matrix is not None and self.input_dim is not None
        for src in range(self.input_dim):
            for dest in range(self.units):
                self.sensory_adjacency_matrix[src, dest] = self._rng.choice([-1, 1, 1])


class NCP(Wiring):
    """Neural Circuit Policy: sensory → inter → command (recurrent) → motor neurons.

    Neuron ids: motor ``0 .. M-1``, then command, then inter neurons. The layers, in the order a
    wired CfC runs them, are inter, command, motor.

    :param inter_neurons: number of inter neurons (fed by the inputs)
    :param command_neurons: number of command neurons (with recurrent synapses among them)
    :param motor_neurons: number of motor neurons (the outputs)
    :param sensory_fanout: synapses from each input to the inter neurons
    :param inter_fanout: synapses from each inter neuron to the command neurons
    :param recurrent_command_synapses: number of synapses among command neurons
    :param motor_fanin: synapses from the command neurons into each motor neuron
    :param seed: seed of the random circuit
    """

    def __init__(
        self,
        inter_neurons: int,
        command_neurons: int,
        motor_neurons: int,
        sensory_fanout: int,
        inter_fanout: int,
        recurrent_command_synapses: int,
        motor_fanin: int,
        seed: int = 22222,
    ) -> None:
        motor = list(range(motor_neurons))
        command = list(range(motor_neurons, motor_neurons + command_neurons))
        inter = list(
            range(motor_neurons + command_neurons, motor_neurons + command_neurons + inter_neurons)
        )
        super().__init__(
            len(motor) + len(command) + len(inter), motor_neurons, [inter, command, motor]
        )
        if motor_fanin > command_neurons:
            raise ValueError(
                f"motor_fanin is {motor_fanin} but there are only {command_neurons} command neurons"
            )
        if sensory_fanout > inter_neurons:
            raise ValueError(
                f"sensory_fanout is {sensory_fanout} but there are only "
                f"{inter_neurons} inter neurons"
            )
        if inter_fanout > command_neurons:
            raise ValueError(
                f"inter_fanout is {inter_fanout} but there are only "
                f"{command_neurons} command neurons"
            )
        self._motor, self._command, self._inter = motor, command, inter
        self.sensory_fanout = sensory_fanout
        self.inter_fanout = inter_fanout
        self.recurrent_command_synapses = recurrent_command_synapses
        self.motor_fanin = motor_fanin
        self.seed = seed
        # ncps draws everything from one RandomState after the inputs are known; same here.
        self._rng = np.random.RandomState(seed)

    def _build_sensory(self) -> None:
        assert self.sensory_adjacency_matrix is not None and self.input_dim is not None
        rng = self._rng
        sensory = list(range(self.input_dim))
        # Each layer: every source gets its fan-out, then targets nobody reached get a fan-in.
        self._connect(
            sensory, self._inter, self.sensory_fanout, len(sensory), self.sensory_adjacency_matrix
        )
        # ncps caps the command fan-in by the number of command (not inter) neurons; kept.
        self._connect(
            self._inter, self._command, self.inter_fanout, len(self._command), self.adjacency_matrix
        )
        for _ in range(self.recurrent_command_synapses):
            src = rng.choice(self._command)
            dest = rng.choice(self._command)
            self.adjacency_matrix[src, dest] = rng.choice([-1, 1])
        self._connect_motor()

    def _connect(
        self,
        sources: list[int],
        targets: list[int],
        fanout: int,
        fanin_cap: int,
        matrix: np.ndarray,
    ) -> None:
        rng = self._rng
        unreached = list(targets)
        for src in sources:
            for dest in rng.choice(targets, size=fanout, replace=False):
                if dest in unreached:
                    unreached.remove(dest)
                matrix[src, dest] = rng.choice([-1, 1])
        fanin = int(np.clip(int(len(sources) * fanout / len(targets)), 1, fanin_cap))
        for dest in unreached:
            for src in rng.choice(sources, size=fanin, replace=False):
                matrix[src, dest] = rng.choice([-1, 1])

    def _connect_motor(self) -> None:
        # Motor neurons pick their sources (fan-in), the mirror image of _connect.
        rng = self._rng
        unreached = list(self._command)
        for dest in self._motor:
            for src in rng.choice(self._command, size=self.motor_fanin, replace=False):
                if src in unreached:
                    unreached.remove(src)
                self.adjacency_matrix[src, dest] = rng.choice([-1, 1])
        fanout = int(
            np.clip(
                int(len(self._motor) * self.motor_fanin / len(self._command)), 1, len(self._motor)
            )
        )
        for src in unreached:
            for dest in rng.choice(self._motor, size=fanout, replace=False):
                self.adjacency_matrix[src, dest] = rng.choice([-1, 1])


class AutoNCP(NCP):
    """An NCP sized from the total number of neurons, the outputs and a sparsity level.

    :param units: total number of neurons (the state size)
    :param output_size: number of motor neurons; must be less than ``units - 2``
    :param sparsity_level: between 0.1 (dense) and 1.0 (sparse)
    :param seed: seed of the random circuit
    """

    def __init__(
        self, units: int, output_size: int, sparsity_level: float = 0.5, seed: int = 22222
    ) -> None:
        if output_size >= units - 2:
            raise ValueError(
                f"output_size must be less than units - 2, got units={units}, "
                f"output_size={output_size}"
            )
        if not 0.1 <= sparsity_level <= 1.0:
            raise ValueError(f"sparsity_level must be in [0.1, 1.0], got {sparsity_level}")
        density = 1.0 - sparsity_level
        inter_and_command = units - output_size
        command = max(int(0.4 * inter_and_command), 1)
        inter = inter_and_command - command
        super().__init__(
            inter_neurons=inter,
            command_neurons=command,
            motor_neurons=output_size,
            sensory_fanout=max(int(inter * density), 1),
            inter_fanout=max(int(command * density), 1),
            recurrent_command_synapses=max(int(command * density * 2), 1),
            motor_fanin=max(int(command * density), 1),
            seed=seed,
        )
        self.sparsity_level = sparsity_level


WIRINGS: dict[str, type[Wiring]] = {
    "fully_connected": FullyConnected,
    "ncp": NCP,
    "autoncp": AutoNCP,
}


def make_wiring(spec: Mapping[str, Any]) -> Wiring:
    """A wiring from plain data, as agent files write it in place of a unit count::

        hidden_size: {wiring: autoncp, units: 64, output_size: 16}

    ``wiring`` names the class (:data:`WIRINGS`), the other keys are its arguments.

    :raises ValueError: for an unknown name or arguments the class does not take
    """
    arguments = dict(spec)
    kind = arguments.pop("wiring", None)
    if kind not in WIRINGS:
        raise ValueError(f"a wiring needs wiring: one of {', '.join(WIRINGS)}; got {dict(spec)!r}")
    try:
        return WIRINGS[kind](**arguments)
    except TypeError as error:  # a missing or unknown argument
        raise ValueError(f"wiring {kind}: {error}") from None
