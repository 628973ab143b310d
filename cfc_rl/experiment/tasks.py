"""Task files (``envs/*.yaml``) as the experiment layer reads them: the environment (read by
:mod:`cfc_rl.envs`), the training budget and the evaluation protocol.

Schema of the two sections read here (both optional, defaults as below)::

    train:
      total_timesteps: 1000000    # environment steps (control steps, all envs together)
      n_envs: 1                   # parallel environments (the per-task settings may replace it)
      normalize: false            # VecNormalize, observations under "obs" only (likewise)
    eval:
      episodes: 10                # episodes per evaluation
      every_steps: 10000          # environment steps between evaluations
      deterministic: true         # evaluate the policy's mode
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cfc_rl.envs import EXPERIMENT_SECTIONS, ConfigError, TaskConfig, read_task
from cfc_rl.envs.config import check_bool, parse_section, setting
from cfc_rl.envs.wrappers import check_positive_int

__all__ = ["EvalSettings", "Task", "TrainSettings", "load_task"]


@dataclass(frozen=True)
class TrainSettings:
    """Training budget.

    :param total_timesteps: environment (control) steps over all parallel environments
    :param n_envs: number of parallel environments
    :param normalize: whether to wrap the vector env in VecNormalize (observation part only)
    """

    total_timesteps: int = setting(1_000_000, check_positive_int)
    n_envs: int = setting(1, check_positive_int)
    normalize: bool = setting(False, check_bool)


@dataclass(frozen=True)
class EvalSettings:
    """Evaluation protocol.

    :param episodes: episodes per evaluation
    :param every_steps: training steps between two evaluations
    :param deterministic: evaluate the mode of the policy rather than samples
    """

    episodes: int = setting(10, check_positive_int)
    every_steps: int = setting(10_000, check_positive_int)
    deterministic: bool = setting(True, check_bool)


@dataclass(frozen=True)
class Task:
    """One task of an experiment: its environment, budget and evaluation protocol.

    :param env: the environment (id, wrappers, constructor arguments)
    :param train: training budget
    :param eval: evaluation protocol
    :param source: the task file (or the id) it came from, for messages and folder names
    """

    env: TaskConfig
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    source: str = "<dict>"

    @property
    def id(self) -> str:
        return self.env.id

    @property
    def name(self) -> str:
        """A short name for folders: the task file's name, or the id with ``/`` replaced."""
        if self.source.endswith((".yaml", ".yml")):
            return Path(self.source).stem
        return self.id.replace("/", "_")

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> Task:
        """Validate parsed task-file data (every section, named in errors with ``source``)."""
        env = TaskConfig.from_dict(data, source, skip=EXPERIMENT_SECTIONS)
        return cls(
            env=env,
            train=parse_section(TrainSettings, data.get("train"), "train", source),
            eval=parse_section(EvalSettings, data.get("eval"), "eval", source),
            source=source,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data in the task-file schema (what a run records in ``config.yaml``)."""
        return {**self.env.as_dict(), "train": asdict(self.train), "eval": asdict(self.eval)}

    def replace(self, *, wrappers: Mapping[str, Any] | None = None, **train: Any) -> Task:
        """This task with some wrapper settings and training settings replaced (validated)."""
        data = self.as_dict()
        data["wrappers"].update(wrappers or {})
        data["train"].update({k: v for k, v in train.items() if v is not None})
        return Task.from_dict(data, self.source)


def load_task(task: str | os.PathLike[str] | Mapping[str, Any] | Task) -> Task:
    """A task from a task file, an environment id, task-file data, or a :class:`Task`.

    :raises ConfigError: naming the file and the key, for anything that does not validate
    """
    if isinstance(task, Task):
        return task
    data, source = read_task(task)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
    return Task.from_dict(data, source)
