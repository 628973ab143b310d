"""Partially observable Gymnasium tasks: P/V-masked classic-control and MuJoCo environments,
flicker, sensor noise, sensor drop-out, irregular time and history windows.

Importing this package registers every ``cfc_rl/...`` id (see :data:`TASKS`), so that
``gym.make("cfc_rl/Pendulum-P-v1", noise=0.1)`` works; ``gym.make`` can also import it itself
with ``gym.make("cfc_rl.envs:cfc_rl/Pendulum-P-v1")``.
"""

from cfc_rl.envs.config import (
    EXPERIMENT_SECTIONS,
    ConfigError,
    TaskConfig,
    WrapperSettings,
    load_task_config,
    read_task,
)
from cfc_rl.envs.masks import SPLITS, ObservationSplit, observation_split
from cfc_rl.envs.registry import (
    NAMESPACE,
    TASKS,
    TaskSpec,
    make_task,
    register_tasks,
    task_spec,
    wrap_task,
)
from cfc_rl.envs.wrappers import (
    DT_KEY,
    OBS_KEY,
    VALID_KEY,
    Flicker,
    HistoryWindow,
    IrregularTime,
    MaskObservation,
    ObservationPartWrapper,
    SensorDropout,
    SensorNoise,
    TimeInfo,
    base_dt,
)

register_tasks()

__all__ = [
    "DT_KEY",
    "EXPERIMENT_SECTIONS",
    "NAMESPACE",
    "OBS_KEY",
    "SPLITS",
    "TASKS",
    "VALID_KEY",
    "ConfigError",
    "Flicker",
    "HistoryWindow",
    "IrregularTime",
    "MaskObservation",
    "ObservationPartWrapper",
    "ObservationSplit",
    "SensorDropout",
    "SensorNoise",
    "TaskConfig",
    "TaskSpec",
    "TimeInfo",
    "WrapperSettings",
    "base_dt",
    "load_task_config",
    "make_task",
    "observation_split",
    "read_task",
    "register_tasks",
    "task_spec",
    "wrap_task",
]
