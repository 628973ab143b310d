"""The algorithms that agent files name, in one registry: adding an algorithm is one entry.

Each :class:`Algorithm` says where its class lives, which policies it accepts, whether it is
off-policy (checkpoints then include the replay buffer) and which action spaces it handles;
:meth:`Algorithm.policy_for` turns a policy name of an agent file into what the class takes.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from gymnasium import spaces

__all__ = ["ALGORITHMS", "Algorithm", "algorithm", "cell_arguments"]


@dataclass(frozen=True)
class Algorithm:
    """An SB3 algorithm as agent files use it.

    :param name: its name in agent files (``algo:``)
    :param module: the module of its class
    :param class_name: the class
    :param policies: the policy names it accepts; Dict observations switch an ``Mlp...`` name
        to its ``MultiInput...`` variant
    :param off_policy: learns from a replay buffer (saved with every checkpoint)
    :param continuous_only: needs a Box action space
    """

    name: str
    module: str
    class_name: str
    policies: tuple[str, ...]
    off_policy: bool = False
    continuous_only: bool = False

    @property
    def cls(self) -> type:
        """The algorithm class (imported on first use)."""
        return getattr(importlib.import_module(self.module), self.class_name)

    def policy_for(self, policy: str, observation_space: spaces.Space) -> Any:
        """What the class takes for the agent file's ``policy`` on ``observation_space``: our
        policy classes by name, SB3's by their (Dict-aware) string name."""
        if policy == "RecurrentCellPolicy":
            from cfc_rl.sb3 import RecurrentCellPolicy

            return RecurrentCellPolicy  # it reads Dict observations itself
        if isinstance(observation_space, spaces.Dict):
            return policy.replace("Mlp", "MultiInput")
        return policy

    def policy_class(self, policy: str) -> type:
        """The class behind a policy name (for its constructor's signature)."""
        if policy == "RecurrentCellPolicy":
            from cfc_rl.sb3 import RecurrentCellPolicy

            return RecurrentCellPolicy
        return self.cls.policy_aliases[policy]

    def takes_cell(self, policy: str) -> bool:
        """Whether the policy runs a cell of :mod:`cfc_rl.nn` named by ``policy_kwargs.cell``
        (RecurrentCellPolicy, RecurrentSAC's policy)."""
        return "cell" in _parameters(self.policy_class(policy))

    def policy_kwargs_accepted(self, policy: str, cell: str | None = None) -> tuple[list[str], str]:
        """The keyword arguments a policy takes (with ``cell``: also its cell's), and how to
        name that policy in a message."""
        accepted = _parameters(self.policy_class(policy))
        described = policy
        if cell is not None:
            accepted += cell_arguments(cell)
            described = f"{policy} with cell {cell}"
        # the policy gets these from the algorithm, not from policy_kwargs
        taken = {"observation_space", "action_space", "lr_schedule", "use_sde", "cell_kwargs"}
        return [a for a in accepted if a not in taken], described

    def check_action_space(self, action_space: spaces.Space, agent: str) -> None:
        """Raise a ValueError that says why when the algorithm cannot act in this space."""
        if self.continuous_only and not isinstance(action_space, spaces.Box):
            raise ValueError(
                f"agent {agent} ({self.name}) needs continuous actions, but the task's action "
                f"space is {action_space}"
            )


def _parameters(function: Any) -> list[str]:
    """The named parameters of a function or a class's constructor (no ``self``, no ``*args``
    or ``**kwargs``)."""
    signature = inspect.signature(function.__init__ if isinstance(function, type) else function)
    return [
        name
        for name, p in signature.parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def cell_arguments(cell: str) -> list[str]:
    """The keyword arguments of a cell of :data:`cfc_rl.nn.CELLS` beyond its sizes (and beyond
    those its name fixes, such as ``cfs``'s mode)."""
    from cfc_rl.nn import cell_spec

    spec = cell_spec(cell)
    sizes = set(_parameters(spec.cls)[:2])  # input_size and the units / hidden size
    return [a for a in _parameters(spec.cls) if a not in sizes and a not in spec.fixed]


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("ppo", "stable_baselines3", "PPO", ("MlpPolicy",)),
        Algorithm(
            "recurrent_ppo", "sb3_contrib", "RecurrentPPO", ("RecurrentCellPolicy", "MlpLstmPolicy")
        ),
        Algorithm(
            "sac", "stable_baselines3", "SAC", ("MlpPolicy",), off_policy=True, continuous_only=True
        ),
        Algorithm(
            "recurrent_sac",
            "cfc_rl.sb3",
            "RecurrentSAC",
            ("MlpPolicy",),
            off_policy=True,
            continuous_only=True,
        ),
    )
}


def algorithm(name: str) -> Algorithm:
    """The registry entry called ``name``; a ValueError listing the known names otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None
