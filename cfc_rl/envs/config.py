"""Task files (``envs/*.yaml``): one task, its wrappers, training budget and evaluation protocol.

A task file is data, validated on load: an unknown key, a wrong type or a bad value raises
:class:`ConfigError` naming the file, the key and what was expected. Schema (every section but
``id`` is optional and defaults as below)::

    id: cfc_rl/Pendulum-P-v1      # a cfc_rl/... id or any registered Gymnasium id
    wrappers:                     # see cfc_rl.envs.registry.wrap_task
      flicker: 0.0                # probability that a whole observation is zeros
      noise: 0.0                  # Gaussian noise standard deviation
      dropout: 0.0                # probability that one entry is zero
      irregular: null             # [min_repeat, max_repeat] base steps per control step
      history: null               # frames in a HistoryWindow
    env_kwargs: {}                # passed to the Gymnasium constructor
    train:
      total_timesteps: 1000000    # environment steps (control steps, all envs together)
      n_envs: 1                   # parallel environments
      normalize: false            # VecNormalize (observations under "obs" only)
    eval:
      episodes: 10                # episodes per evaluation
      every_steps: 10000          # environment steps between evaluations
      deterministic: true         # evaluate the policy's mode
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import gymnasium as gym
import yaml

from cfc_rl.envs.wrappers import (
    check_nonnegative,
    check_positive_int,
    check_probability,
    check_repeat_range,
)

__all__ = [
    "ConfigError",
    "EvalSettings",
    "TaskConfig",
    "TrainSettings",
    "WrapperSettings",
    "load_task_config",
]


class ConfigError(ValueError):
    """A task file or dict that does not match the schema (a ValueError, so callers may catch
    either)."""


# Each checker returns the converted value or raises ValueError with what was expected.
def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return checked


def _meta(check: Callable[[str, Any], Any]) -> dict[str, Any]:
    return {"check": check}


@dataclass(frozen=True)
class WrapperSettings:
    """Wrapper keyword arguments of a task (see :func:`cfc_rl.envs.registry.wrap_task`).

    :param flicker: probability that a whole observation is zeros
    :param noise: standard deviation of additive Gaussian noise
    :param dropout: probability that one observation entry is zero
    :param irregular: ``(min_repeat, max_repeat)`` base steps per control step, or None
    :param history: number of frames of a HistoryWindow, or None
    """

    flicker: float = field(default=0.0, metadata=_meta(check_probability))
    noise: float = field(default=0.0, metadata=_meta(check_nonnegative))
    dropout: float = field(default=0.0, metadata=_meta(check_probability))
    irregular: tuple[int, int] | None = field(
        default=None, metadata=_meta(_optional(check_repeat_range))
    )
    history: int | None = field(default=None, metadata=_meta(_optional(check_positive_int)))

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of ``gym.make`` / ``wrap_task``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TrainSettings:
    """Training budget.

    :param total_timesteps: environment (control) steps over all parallel environments
    :param n_envs: number of parallel environments
    :param normalize: whether to wrap the vector env in VecNormalize (observation part only)
    """

    total_timesteps: int = field(default=1_000_000, metadata=_meta(check_positive_int))
    n_envs: int = field(default=1, metadata=_meta(check_positive_int))
    normalize: bool = field(default=False, metadata=_meta(_bool))


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation protocol.

    :param episodes: episodes per evaluation
    :param every_steps: training steps between two evaluations
    :param deterministic: evaluate the mode of the policy rather than samples
    """

    episodes: int = field(default=10, metadata=_meta(check_positive_int))
    every_steps: int = field(default=10_000, metadata=_meta(check_positive_int))
    deterministic: bool = field(default=True, metadata=_meta(_bool))


def _id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be an environment id (a string), got {value!r}")
    # "module:Name-v0" ids register themselves when gym.make imports the module.
    if ":" not in value and value not in gym.registry:
        known = sorted(i for i in gym.registry if i.startswith("cfc_rl/"))
        raise ValueError(
            f"{name} {value!r} is not a registered environment; cfc_rl ids: {', '.join(known)}"
        )
    return value


def _env_kwargs(name: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a mapping of argument names to values, got {value!r}")
    return MappingProxyType(dict(value))


_SECTIONS: dict[str, type] = {
    "wrappers": WrapperSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
}


@dataclass(frozen=True)
class TaskConfig:
    """One task: environment id, wrappers, constructor arguments, budget and evaluation.

    :param id: a ``cfc_rl/...`` id or any registered Gymnasium id
    :param wrappers: wrapper settings
    :param env_kwargs: keyword arguments for the Gymnasium environment's constructor
    :param train: training budget
    :param eval: evaluation protocol
    :param source: where the config came from (a file path), used in error messages
    """

    id: str
    wrappers: WrapperSettings = field(default_factory=WrapperSettings)
    env_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> TaskConfig:
        """Validate a parsed task file.

        :param data: the mapping read from YAML (or written in Python)
        :param source: a name for error messages, usually the file path
        :return: the validated config
        :raises ConfigError: naming ``source``, the key and what was expected
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
        top = ("id", "env_kwargs", *_SECTIONS)
        for key in data:
            if key not in top:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; expected one of {', '.join(top)}"
                )
        if "id" not in data:
            raise ConfigError(f"{source}: missing key 'id' (the environment id)")
        values: dict[str, Any] = {"source": source}
        try:
            values["id"] = _id("id", data["id"])
            values["env_kwargs"] = _env_kwargs("env_kwargs", data.get("env_kwargs") or {})
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        for section, section_cls in _SECTIONS.items():
            values[section] = parse_section(section_cls, data.get(section), section, source)
        return cls(**values)


def parse_section(section_cls: type, data: Any, section: str, source: str) -> Any:
    """Build the dataclass ``section_cls`` from the mapping ``data`` of a YAML file, checking
    every key and type; shared with the agent files of :mod:`cfc_rl.experiment`.

    :param section_cls: a dataclass whose fields are the allowed keys
    :param data: the mapping read from the file (None: all defaults)
    :param section: the section's name, for messages (``wrappers``, ``train``, ...)
    :param source: the file, for messages
    :raises ConfigError: naming the file, the key and what was expected
    """
    if data is None:
        return section_cls()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {section} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(section_cls)}
    values = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key {section}.{key!s}; expected one of {', '.join(known)}"
            )
        try:
            values[key] = known[key].metadata["check"](f"{section}.{key}", value)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
    return section_cls(**values)


def load_task_config(path: str | os.PathLike[str]) -> TaskConfig:
    """Read and validate a task file.

    :param path: path of an ``envs/*.yaml`` file
    :return: the validated config
    :raises ConfigError: for a file that does not match the schema (the message names the file)
    """
    path = Path(path)
    return TaskConfig.from_dict(read_yaml(path), source=str(path))


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The contents of a YAML config file; shared with the agent files of
    :mod:`cfc_rl.experiment`.

    :param path: the file
    :raises ConfigError: if the file does not exist or is not valid YAML (naming the file)
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
