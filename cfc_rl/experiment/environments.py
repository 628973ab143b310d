"""The vector environment an agent trains and is evaluated on, built the same way everywhere."""

from __future__ import annotations

import pickle
from pathlib import Path

from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack, VecNormalize

from cfc_rl.envs import OBS_KEY, make_task
from cfc_rl.experiment.runs import RunError
from cfc_rl.experiment.settings import AgentConfig
from cfc_rl.experiment.tasks import Task

__all__ = ["make_env"]


def make_env(
    task: Task,
    agent: AgentConfig,
    *,
    n_envs: int,
    seed: int,
    training: bool = True,
    normalization: Path | None = None,
    monitor_dir: Path | None = None,
    append_monitor: bool = False,
    render_mode: str | None = None,
) -> VecEnv:
    """Task wrappers (already merged into ``task``), Monitor, VecNormalize (observations under
    ``"obs"`` only, so that Δt stays exact) and VecFrameStack, in that order.

    :param task: the task, with the agent's wrappers merged in
    :param agent: the resolved agent (for ``frame_stack`` and the discount of VecNormalize)
    :param n_envs: number of environments
    :param seed: seed of the first environment (the others get seed + i)
    :param training: False for an evaluation env: frozen statistics, raw rewards
    :param normalization: saved VecNormalize statistics to start from (``vecnormalize.pkl``)
    :param monitor_dir: where Monitor writes its CSV files (None: in memory only)
    :param append_monitor: append to existing Monitor files (a resumed run)
    :param render_mode: passed to the environment (``"rgb_array"`` for videos)
    :raises RunError: if the saved statistics cannot be read
    """
    env = make_vec_env(
        lambda: make_task(task.env, render_mode=render_mode),
        n_envs=n_envs,
        seed=seed,
        monitor_dir=None if monitor_dir is None else str(monitor_dir),
        monitor_kwargs={"override_existing": not append_monitor},
    )
    if task.train.normalize:
        if normalization is not None:
            try:
                env = VecNormalize.load(str(normalization), env)
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
                raise RunError(
                    f"{normalization} is damaged and cannot be read ({type(e).__name__}: {e})"
                ) from e
            env.training, env.norm_reward = training, training
        else:
            keys = [OBS_KEY] if isinstance(env.observation_space, spaces.Dict) else None
            gamma = agent.hyperparams.get("gamma", 0.99)
            env = VecNormalize(
                env, training=training, norm_reward=training, norm_obs_keys=keys, gamma=gamma
            )
    if agent.frame_stack:
        env = VecFrameStack(env, agent.frame_stack)
    return env
