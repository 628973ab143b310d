"""The ``cfc_rl/...`` task ids, the wrapper chain every task shares, and :func:`make_task`.

Each id maps to a Gymnasium base id, the constructor arguments its layout depends on, and the
indices it keeps (see :mod:`cfc_rl.envs.masks`). ``gym.make(id, **kwargs)`` builds::

    gym.make(base_id, **env_kwargs)      # with the base env's own TimeLimit (in base steps)
    -> MaskObservation(indices)          # positions (P) or velocities (V) only
    -> TimeInfo                          # info["dt"] = seconds per step
    -> IrregularTime(*irregular)         # if irregular: Dict {"obs", "dt"}, summed rewards
    -> SensorNoise(noise)                # if noise > 0
    -> SensorDropout(dropout)            # if dropout > 0 (dropped entries read exactly 0)
    -> Flicker(flicker)                  # if flicker > 0 (blanked frames read exactly 0)
    -> HistoryWindow(history)            # if history: Dict {"obs", "dt", "valid"}, k frames

Noise comes before drop-out and flicker because a dead sensor reads zero, not zero plus noise.
The ids are registered without a ``max_episode_steps`` of their own: the base env's limit
counts base steps, so an episode lasts the same simulated time with or without irregular
repeats.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import gymnasium as gym

from cfc_rl.envs.config import EXPERIMENT_SECTIONS, TaskConfig, read_task
from cfc_rl.envs.masks import SPLITS
from cfc_rl.envs.wrappers import (
    Flicker,
    HistoryWindow,
    IrregularTime,
    MaskObservation,
    SensorDropout,
    SensorNoise,
    TimeInfo,
    check_nonnegative,
    check_positive_int,
    check_probability,
    check_repeat_range,
)

__all__ = [
    "NAMESPACE",
    "TASKS",
    "TaskSpec",
    "make_masked_env",
    "make_task",
    "register_tasks",
    "task_spec",
    "wrap_task",
]

NAMESPACE = "cfc_rl"
_WRAPPER_KWARGS = ("flicker", "noise", "dropout", "irregular", "history")


@dataclass(frozen=True)
class TaskSpec:
    """What a ``cfc_rl/...`` id is made of.

    :param id: the registered id, e.g. ``"cfc_rl/Hopper-P-v5"``
    :param base_id: the Gymnasium id it wraps, e.g. ``"Hopper-v5"``
    :param part: ``"P"`` (positions and angles) or ``"V"`` (velocities)
    :param indices: indices of the base observation that are kept
    :param env_kwargs: base constructor arguments the layout depends on (always passed)
    """

    id: str
    base_id: str
    part: str
    indices: tuple[int, ...]
    env_kwargs: Mapping[str, Any]


def _task_id(base_id: str, part: str) -> str:
    name, version = base_id.rsplit("-v", 1)
    return f"{NAMESPACE}/{name}-{part}-v{version}"


TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        _task_id(split.base_id, part): TaskSpec(
            id=_task_id(split.base_id, part),
            base_id=split.base_id,
            part=part,
            indices=split.indices(part),
            env_kwargs=split.env_kwargs,
        )
        for split in SPLITS.values()
        for part in split.parts
    }
)
"""Every registered task, by id."""


def task_spec(task_id: str) -> TaskSpec:
    """Look up a task.

    :param task_id: a registered id such as ``"cfc_rl/Pendulum-P-v1"``
    :return: its :class:`TaskSpec`
    :raises ValueError: for an unknown id; the message lists the known ones
    """
    try:
        return TASKS[task_id]
    except KeyError:
        raise ValueError(
            f"unknown task {task_id!r} (no position/velocity split is defined for it); "
            f"known tasks: {', '.join(TASKS)}"
        ) from None


def wrap_task(
    env: gym.Env,
    *,
    flicker: float = 0.0,
    noise: float = 0.0,
    dropout: float = 0.0,
    irregular: tuple[int, int] | None = None,
    history: int | None = None,
) -> gym.Env:
    """Add the task wrappers to any environment, in the order of the module docstring.

    :param env: the environment to wrap (a Box observation)
    :param flicker: probability that a whole observation is zeros (:class:`Flicker`)
    :param noise: standard deviation of Gaussian observation noise (:class:`SensorNoise`)
    :param dropout: probability that one entry is zero (:class:`SensorDropout`)
    :param irregular: ``(min_repeat, max_repeat)`` base steps per control step
        (:class:`IrregularTime`), or None for one base step per control step
    :param history: number of frames of a :class:`HistoryWindow`, or None for none
    :return: the wrapped environment; ``info["dt"]`` holds the seconds each step lasted
    :raises ValueError: naming the argument, for a value out of range
    """
    # Check everything before building anything, so that the error names the kwarg.
    flicker = check_probability("flicker", flicker)
    noise = check_nonnegative("noise", noise)
    dropout = check_probability("dropout", dropout)
    irregular = None if irregular is None else check_repeat_range("irregular", irregular)
    history = None if history is None else check_positive_int("history", history)

    env = TimeInfo(env)
    if irregular is not None:
        env = IrregularTime(env, *irregular)
    if noise > 0.0:
        env = SensorNoise(env, noise)
    if dropout > 0.0:
        env = SensorDropout(env, dropout)
    if flicker > 0.0:
        env = Flicker(env, flicker)
    if history is not None:
        env = HistoryWindow(env, history)
    return env


def make_masked_env(
    task: str,
    *,
    env_kwargs: Mapping[str, Any] | None = None,
    render_mode: str | None = None,
    **kwargs: Any,
) -> gym.Env:
    """Entry point of every ``cfc_rl/...`` id; use ``gym.make(id, **kwargs)`` rather than this.

    :param task: the task id
    :param env_kwargs: keyword arguments for the base Gymnasium constructor (for example
        ``{"ctrl_cost_weight": 0.2}``); arguments that the kept indices depend on are fixed
    :param render_mode: passed to the base environment
    :param kwargs: the wrapper settings of :func:`wrap_task` (flicker, noise, dropout,
        irregular, history)
    :return: the masked, wrapped environment
    :raises ValueError: for an unknown keyword argument or a bad value, naming it
    """
    spec = task_spec(task)
    unknown = sorted(set(kwargs) - set(_WRAPPER_KWARGS))
    if unknown:
        raise ValueError(
            f"unknown keyword argument(s) {', '.join(unknown)} for {task}; expected "
            f"{', '.join(_WRAPPER_KWARGS)}, env_kwargs (a dict for {spec.base_id}) or render_mode"
        )
    base_kwargs = dict(env_kwargs or {})
    for key, value in spec.env_kwargs.items():
        if key in base_kwargs and base_kwargs[key] != value:
            raise ValueError(
                f"env_kwargs[{key!r}] must stay {value!r} for {task}: the kept indices assume it"
            )
        base_kwargs[key] = value
    env = gym.make(spec.base_id, render_mode=render_mode, **base_kwargs)
    env = MaskObservation(env, spec.indices)
    return wrap_task(env, **kwargs)


def register_tasks() -> None:
    """Register every id of :data:`TASKS` with Gymnasium; calling it again does nothing."""
    for task_id in TASKS:
        if task_id in gym.registry:
            continue
        gym.register(
            id=task_id,
            entry_point=f"{__name__}:make_masked_env",
            kwargs={"task": task_id},
            # No limit of our own: the base env's TimeLimit counts base steps (see module doc).
            max_episode_steps=None,
        )


def make_task(
    task: str | os.PathLike[str] | Mapping[str, Any] | TaskConfig, **overrides: Any
) -> gym.Env:
    """Build a task from an id, a task file, a dict in the task-file schema, or a TaskConfig.

    ``make_task("cfc_rl/Pendulum-P-v1", noise=0.1)`` is ``gym.make`` with validation;
    ``make_task("envs/pendulum_p_irregular.yaml")`` reads the file's id, wrappers and
    env_kwargs. A plain Gymnasium id (``"Pendulum-v1"``) gets the wrappers without masking.

    :param task: a task id, a path to a ``.yaml`` file, a mapping, or a :class:`TaskConfig`
    :param overrides: wrapper settings (flicker, noise, dropout, irregular, history) that
        replace the config's, ``env_kwargs`` (merged into the config's) and ``render_mode``
    :return: the environment
    :raises ValueError: for an unknown task id or override, or a bad value (naming it)
    """
    if isinstance(task, TaskConfig):
        config = task
    else:
        data, source = read_task(task)
        config = TaskConfig.from_dict(data, source, skip=EXPERIMENT_SECTIONS)

    allowed = (*_WRAPPER_KWARGS, "env_kwargs", "render_mode")
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown keyword argument(s) {', '.join(unknown)}; expected {', '.join(allowed)}"
        )
    wrapper_kwargs = config.wrappers.as_kwargs()
    wrapper_kwargs.update({k: v for k, v in overrides.items() if k in _WRAPPER_KWARGS})
    env_kwargs = {**config.env_kwargs, **(overrides.get("env_kwargs") or {})}
    render_mode = overrides.get("render_mode")

    if config.id in TASKS:
        return gym.make(config.id, env_kwargs=env_kwargs, render_mode=render_mode, **wrapper_kwargs)
    env = gym.make(config.id, render_mode=render_mode, **env_kwargs)
    return wrap_task(env, **wrapper_kwargs)
