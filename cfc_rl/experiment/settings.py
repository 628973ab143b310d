"""Agent files (``agents/*.yaml``) and the per-task algorithm settings they share.

Settings are written once, RL Baselines3 Zoo style: ``agents/settings/<algo>.yaml`` holds one
entry per task for an algorithm (``hyperparams``, ``policy_kwargs``, ``n_envs``,
``normalize``), keyed by the Gymnasium id the task wraps (``Pendulum-v1`` serves
``cfc_rl/Pendulum-P-v1``), the task id, or a task file's name (later keys win). An agent file
says only what differs: its algorithm, policy, cell, and what it changes on every task.
An agent run on a task that has no settings entry (and no ``overrides`` for it) is an error
that says so, never another task's settings. Schema of an agent file::

    algo: recurrent_ppo            # ppo | recurrent_ppo | sac | recurrent_sac
                                   # (cfc_rl.experiment.algorithms)
    policy: RecurrentCellPolicy    # RecurrentCellPolicy | MlpLstmPolicy | MlpPolicy
                                   # (Dict observations switch to the MultiInput... variant)
    hyperparams: {}                # keyword arguments of the algorithm, on top of the settings
    policy_kwargs:                 # keyword arguments of the policy, on top of the settings
      cell: cfc                    # RecurrentCellPolicy, recurrent_sac: any name of CELLS
      hidden_size: 64              # or a wiring: {wiring: autoncp, units: 64, output_size: 16}
      activation_fn: relu          # relu | tanh | elu | leaky_relu | gelu | silu
      net_arch: {pi: [], vf: [64]}
    features_extractor: null       # {cell: cfc, hidden_size: 64, ...}: SequenceExtractor
    frame_stack: null              # stack k frames with VecFrameStack
    wrappers: {}                   # task wrappers this agent needs (e.g. history: 8)
    n_envs: null                   # replaces the settings' / task file's n_envs
    normalize: null                # replaces the settings' / task file's normalize
    overrides:                     # per task id or task file name: any of the keys above,
      cfc_rl/Pendulum-P-v1:        #   merged in last
        hyperparams: {learning_rate: 0.0003}

Hyperparameters are checked against the algorithm's constructor, ``"lin_<x>"`` is a linear
schedule from x to 0. Every file is validated on load: an unknown key, a wrong type or a bad
value raises :class:`~cfc_rl.envs.ConfigError` naming the file, the key and what was expected.
:func:`resolve_agent` gives the agent for one task; the result is what a run records in its
``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from cfc_rl.envs import TASKS, ConfigError, WrapperSettings
from cfc_rl.envs.config import parse_section, read_yaml
from cfc_rl.experiment.algorithms import ALGORITHMS, algorithm, cell_arguments
from cfc_rl.experiment.tasks import Task
from cfc_rl.nn import CELLS, make_wiring

__all__ = [
    "ACTIVATIONS",
    "SETTINGS_FOLDER",
    "AgentConfig",
    "TaskSettings",
    "load_agent_config",
    "load_settings",
    "make_schedule",
    "resolve_agent",
]

SETTINGS_FOLDER = "settings"
"""Where an agent file's per-task settings are, relative to the agent file's folder."""

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
    params = inspect.signature(algorithm(algo).cls.__init__).parameters
    known = [
        n
        for n in params
        if n not in ("self", *_RESERVED_HYPERPARAMS, "policy_kwargs") and not n.startswith("_")
    ]
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
    units = value.get("hidden_size")
    if isinstance(units, Mapping):  # a wiring, {wiring: autoncp, units: 64, output_size: 16}
        try:
            make_wiring(units)
        except ValueError as error:
            raise ValueError(f"{name}.hidden_size: {error}") from None
        value["hidden_size"] = dict(units)
    elif units is not None and (not isinstance(units, int) or isinstance(units, bool)):
        raise ValueError(
            f"{name}.hidden_size must be an integer or a wiring ({{wiring: autoncp, units: 64, "
            f"output_size: 16}}), got {units!r}"
        )
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
    value = checked.get("lstm_hidden_size")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{where}.lstm_hidden_size must be an integer, got {value!r}")
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
    :param settings: the per-task settings of its algorithm (None once resolved, or when
        there is no settings file: then every task needs an entry in ``overrides``)
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
    settings: TaskSettings | None = field(default=None, compare=False)

    @classmethod
    def from_dict(
        cls,
        data: Any,
        name: str,
        source: str = "<dict>",
        settings: TaskSettings | None = None,
    ) -> AgentConfig:
        """Validate a parsed agent file, including each of its per-task overrides.

        :param data: the mapping read from YAML (or written in Python)
        :param name: the agent's name
        :param source: a name for error messages, usually the file path
        :param settings: the per-task settings of its algorithm (see :func:`load_settings`)
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
        if settings is not None and settings.algo != values["algo"]:
            raise ConfigError(f"{source}: settings {settings.source} are for {settings.algo}")
        return cls(
            name=name,
            overrides={str(k): dict(v) for k, v in overrides.items()},
            source=source,
            settings=settings,
            **values,
        )

    def with_values(self, partial: Mapping[str, Any], source: str) -> AgentConfig:
        """This agent with ``partial`` (agent-file keys) merged in last and validated again,
        errors naming ``source`` (e.g. the command line's ``--set``)."""
        data = _merge(self.as_dict(), partial)
        checked = AgentConfig.from_dict(data, self.name, source=source, settings=self.settings)
        return dataclasses.replace(checked, source=self.source)

    @property
    def cells(self) -> list[str]:
        """The names of the cells of :mod:`cfc_rl.nn` the agent runs (its policy's, its
        features extractor's)."""
        names = []
        if ALGORITHMS[self.algo].takes_cell(self.policy):
            names.append(self.policy_kwargs["cell"])
        if self.features_extractor is not None:
            names.append(self.features_extractor.get("cell", "cfc"))  # SequenceExtractor's
        return names

    def as_dict(self) -> dict[str, Any]:
        """The config as plain data (what ``config.yaml`` stores), without name, source and
        settings."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("name", "source", "settings"):
            data.pop(key)
        return copy.deepcopy(data)


_SETTINGS_KEYS = ("hyperparams", "policy_kwargs", "n_envs", "normalize")


@dataclass(frozen=True)
class TaskSettings:
    """One algorithm's per-task settings (``agents/settings/<algo>.yaml``).

    :param algo: the algorithm they are for
    :param entries: per key (a Gymnasium id, a task id or a task file's name), the settings
        (``hyperparams``, ``policy_kwargs``, ``n_envs``, ``normalize``)
    :param source: the settings file
    """

    algo: str
    entries: dict[str, dict[str, Any]]
    source: str

    def for_task(self, task: Task) -> dict[str, Any] | None:
        """The settings for ``task``: the entries for the Gymnasium id it wraps, its id and its
        file's name, merged in that order; None if there is none."""
        keys = [task.id, task.name]
        if task.id in TASKS:
            keys.insert(0, TASKS[task.id].base_id)
        found = [self.entries[k] for k in dict.fromkeys(keys) if k in self.entries]
        if not found:
            return None
        merged: dict[str, Any] = {}
        for entry in found:
            merged = _merge(merged, entry)
        return merged


def load_settings(path: str | os.PathLike[str], algo: str) -> TaskSettings:
    """Read and validate a settings file of algorithm ``algo``.

    :raises ConfigError: naming the file, the entry and the key
    """
    path = Path(path)
    source = str(path)
    data = read_yaml(path) or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of task to settings, got {data!r}")
    entries = {}
    for key, entry in data.items():
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {entry!r}")
        for name in entry:
            if name not in _SETTINGS_KEYS:
                raise ConfigError(
                    f"{source}: unknown key {key}.{name}; expected one of "
                    f"{', '.join(_SETTINGS_KEYS)}"
                )
        try:
            checked = {
                "hyperparams": _check_hyperparams(
                    algo, entry.get("hyperparams") or {}, f"{key}.hyperparams"
                ),
                "policy_kwargs": _check_policy_kwargs(
                    entry.get("policy_kwargs") or {}, f"{key}.policy_kwargs"
                ),
            }
            for name, check in (("n_envs", _optional_positive_int), ("normalize", _optional_bool)):
                if entry.get(name) is not None:
                    checked[name] = check(f"{key}.{name}", entry[name])
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        entries[str(key)] = checked
    return TaskSettings(algo, entries, source)


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
    if algo not in ALGORITHMS:
        raise ConfigError(
            f"{source}: {where}algo must be one of {', '.join(ALGORITHMS)}, got {algo!r}"
        )
    policies = ALGORITHMS[algo].policies
    if policy not in policies:
        raise ConfigError(
            f"{source}: {where}policy must be one of {', '.join(policies)} for {algo}, "
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
    if ALGORITHMS[algo].takes_cell(policy) and "cell" not in values["policy_kwargs"]:
        raise ConfigError(f"{source}: missing key {where}policy_kwargs.cell (a cell name)")
    _check_known_arguments(values, source, where)
    wrappers = data.get("wrappers") or {}
    # Same checks as a task file's wrappers section; only the keys given are kept, so that
    # the task's other settings stay.
    parse_section(WrapperSettings, wrappers, f"{where}wrappers", source)
    values["wrappers"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in wrappers.items()}
    return values


def _check_known_arguments(values: Mapping[str, Any], source: str, where: str) -> None:
    """Every key of policy_kwargs and features_extractor is an argument of the policy, the
    extractor or the cell: a typo fails here, before any run folder exists, not in the
    constructor of a half-made run."""
    algo = algorithm(values["algo"])
    policy_kwargs = values["policy_kwargs"]
    cell = policy_kwargs.get("cell") if algo.takes_cell(values["policy"]) else None
    accepted, described = algo.policy_kwargs_accepted(values["policy"], cell)
    unknown = [k for k in policy_kwargs if k not in accepted]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {where}policy_kwargs.{unknown[0]}; {described} accepts "
            f"{', '.join(accepted)}"
        )
    extractor = values["features_extractor"]
    if extractor is not None:
        cell = extractor.get("cell", "cfc")
        accepted = ["cell", "hidden_size", "n_stack", *cell_arguments(cell)]
        unknown = [k for k in extractor if k not in accepted]
        if unknown:
            raise ConfigError(
                f"{source}: unknown key {where}features_extractor.{unknown[0]}; "
                f"SequenceExtractor with cell {cell} accepts {', '.join(accepted)}"
            )


def load_agent_config(
    path: str | os.PathLike[str], settings_dir: str | os.PathLike[str] | None = None
) -> AgentConfig:
    """Read and validate an agent file and its algorithm's settings file.

    :param path: path of an ``agents/*.yaml`` file
    :param settings_dir: the folder of the settings files (default: ``settings/`` beside the
        agent file); without a ``<algo>.yaml`` there, only the agent's ``overrides`` hold
        per-task settings
    :return: the validated config, named after the file
    :raises ConfigError: for a file that does not match the schema (the message names the file)
    """
    path = Path(path)
    data = read_yaml(path)
    agent = AgentConfig.from_dict(data, name=path.stem, source=str(path))
    folder = Path(settings_dir) if settings_dir is not None else path.parent / SETTINGS_FOLDER
    settings_file = folder / f"{agent.algo}.yaml"
    if not settings_file.is_file():
        return agent
    settings = load_settings(settings_file, agent.algo)
    return AgentConfig.from_dict(data, name=path.stem, source=str(path), settings=settings)


def resolve_agent(agent: AgentConfig, task: Task) -> AgentConfig:
    """The agent for one task: its algorithm's settings for the task, then the agent file's own
    keys, then its ``overrides`` for the task id and for the task file's name.

    :param agent: the agent as loaded
    :param task: the task it will run on
    :return: the agent with everything merged in, ``overrides`` emptied and no settings
    :raises ConfigError: if neither the settings nor the agent's overrides know the task
    """
    data = agent.as_dict()
    overrides = data.pop("overrides")
    task_overrides = [overrides[k] for k in dict.fromkeys((task.id, task.name)) if k in overrides]
    settings = agent.settings.for_task(task) if agent.settings is not None else None
    if settings is None and not task_overrides:
        keys = (
            ", ".join(repr(k) for k in dict.fromkeys((TASKS[task.id].base_id, task.id, task.name)))
            if task.id in TASKS
            else repr(task.id)
        )
        where = (
            agent.settings.source
            if agent.settings is not None
            else f"{Path(agent.source).parent / SETTINGS_FOLDER / agent.algo}.yaml"
        )
        raise ConfigError(
            f"{agent.source}: no {agent.algo} settings for task {task.name} ({task.id}): add "
            f"an entry keyed {keys} to {where}, or an overrides.{task.id} section to the "
            "agent file"
        )
    if settings is not None:  # the agent's own keys over the settings; None means "not set"
        data = _merge(settings, {k: v for k, v in data.items() if v is not None})
    for partial in task_overrides:
        data = _merge(data, partial)
    values = _validate(data, agent.source, where="")
    return AgentConfig(name=agent.name, source=agent.source, **values)
