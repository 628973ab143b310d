"""Evaluate a trained run: load its model and normalisation, run N episodes, record them.

SB3's ``evaluate_policy`` carries a recurrent policy's state across steps and resets it at
episode starts (RecurrentPPO's ``predict(obs, state, episode_start)``); features-extractor and
MLP agents need no state. Observations are normalised with the run's saved statistics, frozen
(``training=False``), and returns are the environment's own (``norm_reward=False``).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from cfc_rl.experiment.algorithms import algorithm
from cfc_rl.experiment.environments import make_env
from cfc_rl.experiment.runs import RunError, RunFolder, atomic_write, atomic_write_text, load_model
from cfc_rl.experiment.settings import AgentConfig
from cfc_rl.experiment.tasks import Task
from cfc_rl.experiment.train import configs_from_record

__all__ = ["VideoUnavailable", "evaluate_run", "load_run"]


EPISODES_CSV = "evaluation_episodes.csv"
VIDEO_FILE = "video.mp4"


class VideoUnavailable(RuntimeError):
    """The environment cannot render here, or MP4 writing is not installed; the message says
    what to install or set."""


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    n_envs: int = 1,
    seed: int = 0,
    device: str = "auto",
    render_mode: str | None = None,
) -> tuple[BaseAlgorithm, VecEnv]:
    """The final model of a run and an evaluation environment with its normalisation.

    :param run_dir: a run folder written by :func:`~cfc_rl.experiment.train.train`
    :param n_envs: parallel evaluation environments
    :param seed: seed of the evaluation environments
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param render_mode: passed to the environment (``"rgb_array"`` for videos)
    :return: the model and the environment
    :raises FileNotFoundError: if the run has no final model yet (resume it first)
    """
    run = RunFolder(Path(run_dir))
    agent, task = configs_from_record(run.read_config())
    model = _final_model(run, agent.algo, device)
    return model, _run_env(run, agent, task, n_envs, seed, render_mode)


def _final_model(run: RunFolder, algo: str, device: str) -> BaseAlgorithm:
    if not run.model.exists():
        raise FileNotFoundError(
            f"{run.model} does not exist: the run has not finished; resume it with "
            f"`cfc-rl train --resume --run-dir {run.root}`"
        )
    return load_model(algorithm(algo).cls, run.model, device=device)


def _run_env(
    run: RunFolder,
    agent: AgentConfig,
    task: Task,
    n_envs: int,
    seed: int,
    render_mode: str | None,
) -> VecEnv:
    """The run's environment with its normalisation statistics, frozen, and raw rewards."""
    statistics = run.vecnormalize if run.vecnormalize.exists() else None
    return make_env(
        task,
        agent,
        n_envs=n_envs,
        seed=seed,
        training=False,
        normalization=statistics,
        render_mode=render_mode,
    )


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    episodes: int | None = None,
    deterministic: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    video: bool = False,
) -> dict[str, Any]:
    """Run episodes with a trained run's final model and write them to
    ``evaluation_episodes.csv`` in the run folder.

    :param run_dir: a run folder written by :func:`~cfc_rl.experiment.train.train`
    :param episodes: number of episodes; defaults to the task's ``eval.episodes``
    :param deterministic: take the policy's mode; defaults to the task's ``eval.deterministic``
    :param seed: seed of the evaluation environments
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param video: also record the first episode to ``video.mp4`` in the run folder
    :return: ``episodes``, ``mean_return``, ``std_return``, ``mean_length``, ``std_length``,
        ``deterministic``, ``run`` and, with ``video``, ``video`` (the file's path)
    :raises VideoUnavailable: if ``video`` and the environment cannot render here
    """
    run = RunFolder(Path(run_dir))
    agent, task = configs_from_record(run.read_config())
    episodes = task.eval.episodes if episodes is None else episodes
    deterministic = task.eval.deterministic if deterministic is None else deterministic
    # One environment for a video (frames of one episode); a few otherwise, for speed.
    n_envs = 1 if video else min(4, episodes)
    model = _final_model(run, agent.algo, device)
    try:
        env = _run_env(run, agent, task, n_envs, seed, "rgb_array" if video else None)
    except RunError:
        raise
    except Exception as e:
        if video:  # building an environment that renders failed: a rendering problem
            raise VideoUnavailable(_video_hint(task.id, e)) from e
        raise

    frames: list[np.ndarray] = []
    recording = [video]

    def grab_frame(local_vars: dict[str, Any], _: dict[str, Any]) -> None:
        if not recording[0]:
            return
        try:
            frames.append(env.render())
        except Exception as e:
            raise VideoUnavailable(_video_hint(task.id, e)) from e
        if local_vars["done"]:
            recording[0] = False  # the first episode only

    returns, lengths = evaluate_policy(
        model,
        env,
        n_eval_episodes=episodes,
        deterministic=deterministic,
        return_episode_rewards=True,
        callback=grab_frame if video else None,
    )
    fps = int(env.get_attr("metadata")[0].get("render_fps") or 30)
    env.close()

    _write_episodes(run.root / EPISODES_CSV, returns, lengths)
    result: dict[str, Any] = {
        "run": str(run.root),
        "episodes": len(returns),
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "mean_length": float(np.mean(lengths)),
        "std_length": float(np.std(lengths)),
        "deterministic": deterministic,
    }
    if video:
        result["video"] = str(_write_video(run.root / VIDEO_FILE, frames, fps))
    return result


def _write_episodes(path: Path, returns: list[float], lengths: list[int]) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["episode", "return", "length"])
    for i, (r, n) in enumerate(zip(returns, lengths, strict=True)):
        writer.writerow([i, float(r), int(n)])
    atomic_write_text(path, text.getvalue())


def _write_video(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the MP4 writer imageio needs)
    except ImportError as e:
        raise VideoUnavailable(
            f"writing MP4 needs imageio and imageio-ffmpeg ({e}); install them with "
            "pip install -e '.[video]'"
        ) from e
    if not frames:
        raise VideoUnavailable("the environment returned no frames to record")
    atomic_write(path, lambda f: imageio.mimwrite(f, frames, format="mp4", fps=fps))
    return path


def _video_hint(task_id: str, error: Exception) -> str:
    """What to do when rendering fails: MuJoCo needs an offscreen OpenGL, classic control
    needs pygame."""
    return (
        f"cannot render {task_id}: {type(error).__name__}: {error}. MuJoCo tasks render "
        "offscreen only with MUJOCO_GL=egl (a GPU with EGL) or MUJOCO_GL=osmesa (software, "
        "needs the OSMesa library), set before Python starts; classic-control tasks need pygame "
        "(pip install -e '.[video]')"
    )
