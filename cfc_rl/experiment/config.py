"""Agent files (``agents/*.yaml``): one algorithm, its policy and its hyperparameters.

An agent file is data, validated on load like a task file (it reuses the checks and the
:class:`~cfc_rl.envs.ConfigError` of :mod:`cfc_rl.envs.config`): an unknown key, a wrong type or
a bad value raises ``ConfigError`` naming the file, the key and what was expected. Schema::

    algo: recurrent_ppo            # ppo | recurrent_ppo | sac
    policy: RecurrentCellPolicy    # RecurrentCellPolicy | MlpLstmPolicy | MlpPolicy
                                   # (Dict observations switch to the MultiInput... variant)
    hyperparams:                   # keyword arguments of the algorithm's constructor
      n_steps: 128                 # checked against its signature; "lin_0.001" is a linear
      learning_rate: lin_0.001     #   schedule from 0.001 down to 0
    policy_kwargs:                 # keyword arguments of the policy
      cell: cfc                    # RecurrentCellPolicy: any name of cfc_rl.nn.CELLS
      hidden_size: 64
      activation_fn: relu          # relu | tanh | elu | leaky_relu | gelu | silu
      net_arch: {pi: [], vf: [64]}
    features_extractor: null       # {cell: cfc, hidden_size: 64, ...}: SequenceExtractor
    frame_stack: null              # stack k frames with VecFrameStack
    wrappers: {}                   # task wrappers this agent needs (e.g. history: 8)
    n_envs: null                   # replaces the task file's train.n_envs
    normalize: null                # replaces the task file's train.normalize
    overrides:                     # per task: any of the keys above, merged into them
      cfc_rl/Pendulum-P-v1:        # a task id, or a task file's name without .yaml
        hyperparams: {n_steps: 1024}

:func:`resolve_agent` applies the overrides for one task; the result is what a run records in
its ``config.yaml`` and what :mod:`cfc_rl.experiment.train` builds.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from cfc_rl.envs import ConfigError, TaskConfig, WrapperSettings, load_task_config
from cfc_rl.envs.config import parse_section, read_yaml
from cfc_rl.nn import CELLS

__all__ = [
    "ACTIVATIONS",
    "ALGOS",
    "AgentConfig",
    "load_agent_config",
    "load_task",
    "make_schedule",
    "resolve_agent",
    "task_name",
]

ALGOS: dict[str, tuple[str, str]] = {
    "ppo": ("stable_baselines3", "PPO"),
    "recurrent_ppo": ("sb3_contrib", "RecurrentPPO"),
    "sac": ("stable_baselines3", "SAC"),
}
"""Algorithm names of agent files -> (module, class)."""

POLICIES: dict[str, tuple[str, ...]] = {
    "ppo": ("MlpPolicy",),
    "recurrent_ppo": ("RecurrentCellPolicy", "MlpLstmPolicy"),
    "sac": ("MlpPolicy",),
}
"""The policies each algorithm accepts (Dict observations use the MultiInput variants)."""

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

_KEYS = (
    "algo",
    "policy",
    "hyperparams",
    "policy_kwargs",
    "features_extractor",
    "frame_stack",
    "wrappers",
    "n_envs",
    "normalize",
    "overrides",
)
# Set by the run itself (train.py), never by an agent file.
_RESERVED_HYPERPARAMS = ("policy", "env", "seed", "device", "verbose", "tensorboard_log")


def algo_class(name: str) -> type:
    """The algorithm class called ``name`` in agent files (imported on demand)."""
    module, cls = ALGOS[name]
    return getattr(__import__(module, fromlist=[cls]), cls)


def make_schedule(value: float | str) -> float | Callable[[float], float]:
    """A constant, or ``"lin_<x>"``: a schedule going linearly from x to 0 over training.

    :param value: a number or a string ``"lin_<number>"``
    :return: the number, or a function of SB3's ``progress_remaining`` (1 at the start, 0 at
        the end)
    """
    if isinstance(value, str):
        start = float(value.removeprefix("lin_"))
        return lambda progress_remaining: progress_remaining * start
    return value


def _schedule(name: str, value: Any) -> float | str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number or 'lin_<number>', got {value!r}")
    if isinstance(value, str):
        try:
            if not value.startswith("lin_"):
                raise ValueError
            float(value.removeprefix("lin_"))
        except ValueError:
            raise ValueError(f"{name} must be a number or 'lin_<number>', got {value!r}") from None
    return value


def _check_hyperparams(algo: str, data: Any, where: str) -> dict[str, Any]:
    """Check names against the algorithm's constructor and types against its defaults."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {data!r}")
    params = inspect.signature(algo_class(algo).__init__).parameters
    known = [n for n in params if n not in ("self", *_RESERVED_HYPERPARAMS, "policy_kwargs")]
    checked = {}
    for key, value in data.items():
        name = f"{where}.{key}"
        if key not in known:
            raise ValueError(f"unknown key {name}; {algo} accepts {', '.join(known)}")
        default = params[key].default
        if key in ("learning_rate", "clip_range", "clip_range_vf"):
            checked[key] = value if value is None else _schedule(name, value)
            continue
        if isinstance(default, bool):
            ok = isinstance(value, bool)
            expected = "true or false"
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            expected = "a number"
        else:  # None, tuples, strings like ent_coef="auto": leave to the algorithm
            ok, expected = True, ""
        if not ok:
            raise ValueError(f"{name} must be {expected}, got {value!r}")
        checked[key] = value
    return checked


def _check_net_arch(name: str, value: Any) -> Any:
    def int_list(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(i, int) and i > 0 for i in v)

    if value is None or int_list(value):
        return value
    if isinstance(value, Mapping) and all(int_list(v) for v in value.values()):
        unknown = set(value) - {"pi", "vf", "qf"}
        if not unknown:
            return dict(value)
    raise ValueError(
        f"{name} must be a list of layer sizes or a mapping with pi/vf (PPO) or pi/qf (SAC) "
        f"lists, got {value!r}"
    )


def _check_cell_kwargs(name: str, value: Any, with_cell: bool = True) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a mapping of argument names to values, got {value!r}")
    value = dict(value)
    if with_cell and "cell" in value and value["cell"] not in CELLS:
        raise ValueError(f"{name}.cell must be one of {', '.join(CELLS)}, got {value['cell']!r}")
    return value


def _check_policy_kwargs(data: Any, where: str) -> dict[str, Any]:
    checked = _check_cell_kwargs(where, data)
    if "activation_fn" in checked and checked["activation_fn"] not in ACTIVATIONS:
        raise ValueError(
            f"{where}.activation_fn must be one of {', '.join(ACTIVATIONS)}, "
            f"got {checked['activation_fn']!r}"
        )
    if "net_arch" in checked:
        checked["net_arch"] = _check_net_arch(f"{where}.net_arch", checked["net_arch"])
    for key in ("hidden_size", "lstm_hidden_size"):
        value = checked.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{where}.{key} must be an integer, got {value!r}")
    for key in ("ortho_init", "use_sde", "enable_critic_cell", "enable_critic_lstm"):
        if key in checked and not isinstance(checked[key], bool):
            raise ValueError(f"{where}.{key} must be true or false, got {checked[key]!r}")
    return checked


def _optional_positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _optional_bool(name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class AgentConfig:
    """One agent: algorithm, policy, hyperparameters, and what it needs from the environment.

    :param name: the agent's name (the file name without ``.yaml``)
    :param algo: ``"ppo"``, ``"recurrent_ppo"`` or ``"sac"``
    :param policy: the policy class name (see the module docstring)
    :param hyperparams: keyword arguments of the algorithm (schedules as ``"lin_<x>"``)
    :param policy_kwargs: keyword arguments of the policy (``activation_fn`` by name)
    :param features_extractor: keyword arguments of a
        :class:`~cfc_rl.sb3.SequenceExtractor`, or None for SB3's default extractor
    :param frame_stack: stack this many frames with ``VecFrameStack``, or None
    :param wrappers: task wrapper settings that replace the task file's (e.g. ``history``)
    :param n_envs: replaces the task file's ``train.n_envs`` when set
    :param normalize: replaces the task file's ``train.normalize`` when set
    :param overrides: per task id or task file name, a partial agent config merged in by
        :func:`resolve_agent`
    :param source: where the config came from, for error messages
    """

    name: str
    algo: str
    policy: str
    hyperparams: dict[str, Any] = field(default_factory=dict)
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    features_extractor: dict[str, Any] | None = None
    frame_stack: int | None = None
    wrappers: dict[str, Any] = field(default_factory=dict)
    n_envs: int | None = None
    normalize: bool | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, name: str, source: str = "<dict>") -> AgentConfig:
        """Validate a parsed agent file, including each of its per-task overrides.

        :param data: the mapping read from YAML (or written in Python)
        :param name: the agent's name
        :param source: a name for error messages, usually the file path
        :return: the validated config
        :raises ConfigError: naming ``source``, the key and what was expected
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
        values = _validate(data, source, where="")
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{source}: overrides must be a mapping of task to settings")
        for task, partial in overrides.items():
            where = f"overrides.{task}."
            if not isinstance(partial, Mapping):
                raise ConfigError(f"{source}: {where[:-1]} must be a mapping, got {partial!r}")
            if "overrides" in partial:
                raise ConfigError(f"{source}: {where}overrides: overrides do not nest")
            _validate(_merge(data, partial), source, where=where)
        return cls(
            name=name,
            overrides={str(k): dict(v) for k, v in overrides.items()},
            source=source,
            **values,
        )

    def as_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``config.yaml`` stores), without name and source."""
        data = asdict(self)
        for key in ("name", "source"):
            data.pop(key)
        return data


def _merge(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``partial`` merged in: mappings key by key, other values replaced."""
    merged = dict(base)
    for key, value in partial.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _validate(data: Mapping[str, Any], source: str, where: str) -> dict[str, Any]:
    """Check every key but ``overrides``; return the constructor values of AgentConfig."""
    for key in data:
        if key not in _KEYS:
            raise ConfigError(
                f"{source}: unknown key {where}{key!s}; expected one of {', '.join(_KEYS)}"
            )
    for key in ("algo", "policy"):
        if key not in data:
            raise ConfigError(f"{source}: missing key {where}{key}")
    algo, policy = data["algo"], data["policy"]
    if algo not in ALGOS:
        raise ConfigError(f"{source}: {where}algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if policy not in POLICIES[algo]:
        raise ConfigError(
            f"{source}: {where}policy must be one of {', '.join(POLICIES[algo])} for {algo}, "
            f"got {policy!r}"
        )
    try:
        values: dict[str, Any] = {
            "algo": algo,
            "policy": policy,
            "hyperparams": _check_hyperparams(
                algo, data.get("hyperparams") or {}, f"{where}hyperparams"
            ),
            "policy_kwargs": _check_policy_kwargs(
                data.get("policy_kwargs") or {}, f"{where}policy_kwargs"
            ),
            "frame_stack": _optional_positive_int(f"{where}frame_stack", data.get("frame_stack")),
            "n_envs": _optional_positive_int(f"{where}n_envs", data.get("n_envs")),
            "normalize": _optional_bool(f"{where}normalize", data.get("normalize")),
        }
        extractor = data.get("features_extractor")
        if extractor is not None:
            extractor = _check_cell_kwargs(f"{where}features_extractor", extractor)
        values["features_extractor"] = extractor
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    if policy == "RecurrentCellPolicy" and "cell" not in values["policy_kwargs"]:
        raise ConfigError(f"{source}: missing key {where}policy_kwargs.cell (a cell name)")
    wrappers = data.get("wrappers") or {}
    # Same checks as a task file's wrappers section; only the keys given are kept, so that
    # the task's other settings stay.
    parse_section(WrapperSettings, wrappers, f"{where}wrappers", source)
    values["wrappers"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in wrappers.items()}
    return values


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent file.

    :param path: path of an ``agents/*.yaml`` file
    :return: the validated config, named after the file
    :raises ConfigError: for a file that does not match the schema (the message names the file)
    """
    path = Path(path)
    return AgentConfig.from_dict(read_yaml(path), name=path.stem, source=str(path))


def load_task(task: str | os.PathLike[str] | Mapping[str, Any] | TaskConfig) -> TaskConfig:
    """A task config from a task file, a task id, a mapping or a TaskConfig."""
    if isinstance(task, TaskConfig):
        return task
    if isinstance(task, Mapping):
        return TaskConfig.from_dict(task)
    if str(task).endswith((".yaml", ".yml")):
        return load_task_config(task)
    return TaskConfig.from_dict({"id": str(task)}, source=str(task))


def task_name(task: TaskConfig) -> str:
    """A short name for folders: the task file's name, or the id with ``/`` replaced."""
    if task.source.endswith((".yaml", ".yml")):
        return Path(task.source).stem
    return task.id.replace("/", "_")


def resolve_agent(agent: AgentConfig, task: TaskConfig) -> AgentConfig:
    """The agent for one task: its overrides for the task id, then for the task file's name.

    :param agent: the agent as loaded
    :param task: the task it will run on
    :return: the agent with the matching overrides merged in and ``overrides`` emptied
    """
    data = agent.as_dict()
    overrides = data.pop("overrides")
    for key in (task.id, task_name(task)):
        if key in overrides:
            data = _merge(data, overrides[key])
    values = _validate(data, agent.source, where="")
    return AgentConfig(name=agent.name, source=agent.source, **values)
