"""The environment part of a task file (``envs/*.yaml``): the id, its wrappers and constructor
arguments.

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
    train: {...}                  # the budget and evaluation protocol: read by
    eval: {...}                   #   cfc_rl.experiment.tasks, passed over here

This module reads the part that builds the environment; the training budget and the evaluation
protocol are experiment concerns (:mod:`cfc_rl.experiment.tasks`).
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
    "EXPERIMENT_SECTIONS",
    "ConfigError",
    "TaskConfig",
    "WrapperSettings",
    "load_task_config",
    "parse_section",
    "read_yaml",
    "setting",
]

EXPERIMENT_SECTIONS = ("train", "eval")
"""Sections of a task file that :mod:`cfc_rl.experiment.tasks` reads and this module skips."""


class ConfigError(ValueError):
    """A task file or dict that does not match the schema (a ValueError, so callers may catch
    either)."""


# Each checker returns the converted value or raises ValueError with what was expected.
def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def checked(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return checked


def setting(default: Any, check: Callable[[str, Any], Any]) -> Any:
    """A field of a settings dataclass read by :func:`parse_section`: its default and the
    checker that converts a value or raises ValueError saying what was expected."""
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class WrapperSettings:
    """Wrapper keyword arguments of a task (see :func:`cfc_rl.envs.registry.wrap_task`).

    :param flicker: probability that a whole observation is zeros
    :param noise: standard deviation of additive Gaussian noise
    :param dropout: probability that one observation entry is zero
    :param irregular: ``(min_repeat, max_repeat)`` base steps per control step, or None
    :param history: number of frames of a HistoryWindow, or None
    """

    flicker: float = setting(0.0, check_probability)
    noise: float = setting(0.0, check_nonnegative)
    dropout: float = setting(0.0, check_probability)
    irregular: tuple[int, int] | None = setting(None, optional(check_repeat_range))
    history: int | None = setting(None, optional(check_positive_int))

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as keyword arguments of ``gym.make`` / ``wrap_task``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


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


@dataclass(frozen=True)
class TaskConfig:
    """The environment of a task: id, wrappers and constructor arguments.

    :param id: a ``cfc_rl/...`` id or any registered Gymnasium id
    :param wrappers: wrapper settings
    :param env_kwargs: keyword arguments for the Gymnasium environment's constructor
    :param source: where the config came from (a file path), used in error messages
    """

    id: str
    wrappers: WrapperSettings = field(default_factory=WrapperSettings)
    env_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<dict>"

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "<dict>", *, skip: tuple[str, ...] = ()
    ) -> TaskConfig:
        """Validate the environment part of a parsed task file.

        :param data: the mapping read from YAML (or written in Python)
        :param source: a name for error messages, usually the file path
        :param skip: top-level sections read elsewhere (:data:`EXPERIMENT_SECTIONS`)
        :return: the validated config
        :raises ConfigError: naming ``source``, the key and what was expected
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
        top = ("id", "wrappers", "env_kwargs", *skip)
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
        values["wrappers"] = parse_section(
            WrapperSettings, data.get("wrappers"), "wrappers", source
        )
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        """The config as plain data in the task-file schema (what a run records)."""
        wrappers = self.wrappers.as_kwargs()
        if wrappers["irregular"] is not None:
            wrappers["irregular"] = list(wrappers["irregular"])
        return {"id": self.id, "wrappers": wrappers, "env_kwargs": dict(self.env_kwargs)}


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


def read_task(task: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The one dispatch from what a user names a task by to task-file data: a path to a
    ``.yaml`` file, a mapping in the task-file schema, or an environment id.

    :return: the data and its source (the file, the id, or ``"<dict>"``) for error messages
    :raises ConfigError: for a file that does not exist or is not valid YAML
    """
    if isinstance(task, Mapping):
        return task, "<dict>"
    if isinstance(task, os.PathLike) or str(task).endswith((".yaml", ".yml")):
        return read_yaml(task), str(task)
    if isinstance(task, str):
        return {"id": task}, task
    raise TypeError(f"task must be an id, a path or a mapping, got {task!r}")


def load_task_config(path: str | os.PathLike[str]) -> TaskConfig:
    """Read and validate the environment part of a task file (its ``train`` and ``eval``
    sections are the experiment layer's).

    :param path: path of an ``envs/*.yaml`` file
    :return: the validated config
    :raises ConfigError: for a file that does not match the schema (the message names the file)
    """
    path = Path(path)
    return TaskConfig.from_dict(read_yaml(path), source=str(path), skip=EXPERIMENT_SECTIONS)


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
