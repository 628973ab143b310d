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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from cfc_rl.envs import ConfigError, make_task
from cfc_rl.experiment.algorithms import algorithm
from cfc_rl.experiment.environments import make_env
from cfc_rl.experiment.runs import RunError, RunFolder, atomic_write, atomic_write_text, load_model
from cfc_rl.experiment.settings import AgentConfig
from cfc_rl.experiment.tasks import Task
from cfc_rl.experiment.train import check_device, configs_from_record

__all__ = ["VideoUnavailable", "evaluate_run", "load_run"]


# The final evaluation's episodes, written by training; `cfc-rl evaluate` writes its own
# beside them, so that a later evaluation (other conditions, seed, model) never replaces them.
EPISODES_CSV = "evaluation_episodes.csv"
EVALUATE_CSV = "evaluate_episodes.csv"
VIDEO_FILE = "video.mp4"


class VideoUnavailable(RuntimeError):
    """The environment cannot render here, or MP4 writing is not installed; the message says
    what to install or set."""


def load_run(
    run_dir: str | os.PathLike[str],
    *,
    model: str = "final",
    n_envs: int = 1,
    seed: int | None = None,
    device: str = "auto",
    render_mode: str | None = None,
) -> tuple[BaseAlgorithm, VecEnv]:
    """A model of a run and an evaluation environment with its normalisation statistics.

    :param run_dir: a run folder written by :func:`~cfc_rl.experiment.train.train`
    :param model: ``"final"``, ``"best"`` (the best periodic evaluation's) or the path of a
        checkpoint (``checkpoints/step_<n>.zip``, with its ``_vecnormalize.pkl`` beside it)
    :param n_envs: parallel evaluation environments
    :param seed: seed of the evaluation environments (default: the run's evaluation seed)
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param render_mode: passed to the environment (``"rgb_array"`` for videos)
    :return: the model and the environment
    :raises FileNotFoundError: if the run has no such model (yet)
    """
    run = RunFolder(Path(run_dir))
    agent, task = configs_from_record(run.read_config())
    model_path, statistics = model_files(run, model, task.train.normalize)
    loaded = load_model(algorithm(agent.algo).cls, model_path, device=device)
    seed = default_seed(run) if seed is None else seed
    return loaded, _run_env(agent, task, statistics, n_envs, seed, render_mode)


def model_files(run: RunFolder, model: str, normalized: bool) -> tuple[Path, Path | None]:
    """The model file and its normalisation statistics (None without normalisation) of
    ``model``: ``"final"``, ``"best"`` or the path of a model saved in the run.

    :raises FileNotFoundError: saying what to do when the file is not there
    """
    if model == "final":
        path, statistics = run.model, run.vecnormalize
        if not path.exists():
            trained = run.latest_checkpoint.exists()
            raise FileNotFoundError(
                f"{path} does not exist: the run has not finished; "
                + (
                    f"resume it with `cfc-rl train --resume --run-dir {run.root}`, or "
                    f"evaluate a checkpoint (--model {run.checkpoints}/step_<n>.zip)"
                    if trained
                    else "it has no checkpoint either: train it again"
                )
            )
    elif model == "best":
        path, statistics = run.best_model, run.best_vecnormalize
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: the run has made no periodic evaluation yet"
            )
    else:
        path = Path(model)
        statistics = path.with_name(f"{path.stem}_vecnormalize.pkl")
        if not path.is_file():
            raise FileNotFoundError(f"--model {model}: no such file (final, best or a path)")
    if not normalized:
        return path, None
    if not statistics.is_file():
        raise FileNotFoundError(
            f"{statistics} does not exist: the model {path} needs the normalisation "
            "statistics saved with it"
        )
    return path, statistics


def default_seed(run: RunFolder) -> int:
    """The seed the run's own final evaluation used (so that evaluating again reproduces
    ``result.json``), or 0 for runs that did not record it."""
    result = run.read_result()
    return int(result["eval_seed"]) if result and "eval_seed" in result else 0


def _run_env(
    agent: AgentConfig,
    task: Task,
    statistics: Path | None,
    n_envs: int,
    seed: int,
    render_mode: str | None,
) -> VecEnv:
    """The run's environment with its normalisation statistics, frozen, and raw rewards."""
    return make_env(
        task,
        agent,
        n_envs=n_envs,
        seed=seed,
        training=False,
        normalization=statistics,
        render_mode=render_mode,
    )


CONDITIONS = ("noise", "dropout", "flicker", "irregular", "period")
"""What evaluation can change: the task's wrapper settings, and ``period``: a fixed control
period of k base steps (``irregular=[k, k]``)."""


def conditions_task(task: Task, conditions: Mapping[str, Any]) -> Task:
    """The task with its wrapper settings replaced by ``conditions`` (validated like a task
    file); ``period=k`` is ``irregular=[k, k]``.

    :raises ConfigError: for an unknown setting or a bad value, naming it
    """
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown:
        raise ConfigError(
            f"--set {unknown[0]}: not a condition evaluation can change; choose from "
            f"{', '.join(CONDITIONS)}"
        )
    wrappers = dict(conditions)
    if "period" in wrappers:
        if "irregular" in wrappers:
            raise ConfigError("--set period and --set irregular both set the control period")
        period = wrappers.pop("period")
        wrappers["irregular"] = [period, period]
    try:
        return task.replace(wrappers=wrappers)
    except ConfigError as e:
        raise ConfigError(f"--set: {str(e).split(': ', 1)[-1]}") from None


def shifted_task(task: Task, conditions: Mapping[str, Any]) -> Task:
    """:func:`conditions_task`, checked against the run's task: the observations must keep the
    layout its policy was trained on.

    :param task: the run's task
    :param conditions: the conditions to change (see :data:`CONDITIONS`)
    :raises ConfigError: for an unknown condition, a bad value, or a layout the policy cannot
        take, naming it
    """
    shifted = conditions_task(task, conditions)
    _check_layout(task, shifted, conditions)
    return shifted


def _check_layout(trained: Task, shifted: Task, conditions: Mapping[str, Any]) -> None:
    """The changed conditions must give the observations the policy was trained on: Δt, for
    one, exists only where the run was trained with irregular time."""
    with make_task(trained.env) as env:
        before = env.observation_space
    with make_task(shifted.env) as env:
        after = env.observation_space
    if _layout(before) == _layout(after):  # bounds may change (noise widens them), not shapes
        return
    why = ""
    if isinstance(after, spaces.Dict) and not isinstance(before, spaces.Dict):
        why = (
            ": irregular time adds the elapsed time Δt to the observation, and this policy was "
            "trained without it (train on a task with irregular time to evaluate other periods)"
        )
    raise ConfigError(
        f"--set {', '.join(f'{k}={v}' for k, v in conditions.items())}: the policy was trained "
        f"on observations {before}, these conditions give {after}{why}"
    )


def _layout(space: spaces.Space) -> Any:
    if isinstance(space, spaces.Dict):
        return {key: _layout(sub) for key, sub in space.spaces.items()}
    return (type(space).__name__, space.shape)


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    model: str = "final",
    conditions: Mapping[str, Any] | None = None,
    episodes: int | None = None,
    deterministic: bool | None = None,
    seed: int | None = None,
    device: str = "auto",
    video: bool = False,
    episodes_csv: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Run episodes with a trained run's model. With the defaults it computes exactly the run's
    final evaluation.

    :param run_dir: a run folder written by :func:`~cfc_rl.experiment.train.train`
    :param model: ``"final"``, ``"best"`` or the path of a checkpoint (see :func:`load_run`)
    :param conditions: task wrapper settings to replace at evaluation (see
        :data:`CONDITIONS`), e.g. ``{"noise": 0.1, "period": 3}``; recorded in the result and
        in ``evaluation_episodes.csv``
    :param episodes: number of episodes; defaults to the task's ``eval.episodes``
    :param deterministic: take the policy's mode; defaults to the task's ``eval.deterministic``
    :param seed: seed of the evaluation environments; defaults to the seed of the run's own
        final evaluation
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param video: also record the first episode to ``video.mp4`` in the run folder
    :param episodes_csv: where to write one row per episode, with the conditions (training
        writes the final evaluation's to the run's ``evaluation_episodes.csv``, ``cfc-rl
        evaluate`` to its ``evaluate_episodes.csv``); by default nothing is written
    :return: ``episodes``, ``mean_return``, ``std_return``, ``mean_length``, ``std_length``,
        ``returns`` and ``lengths`` (per episode), ``deterministic``, ``seed``, ``model``,
        ``conditions`` (the wrapper settings applied), ``run`` and, with ``video``, ``video``
    :raises VideoUnavailable: if ``video`` and the environment cannot render here
    :raises ConfigError: for conditions the run's policy cannot take
    """
    if episodes is not None and (isinstance(episodes, bool) or episodes < 1):
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
    check_device(device)
    run = RunFolder(Path(run_dir))
    agent, task = configs_from_record(run.read_config())
    if conditions:
        task = shifted_task(task, conditions)
    episodes = task.eval.episodes if episodes is None else episodes
    deterministic = task.eval.deterministic if deterministic is None else deterministic
    seed = default_seed(run) if seed is None else seed
    # One environment for a video (frames of one episode); a few otherwise, for speed.
    n_envs = 1 if video else min(4, episodes)
    model_path, statistics = model_files(run, model, task.train.normalize)
    policy = load_model(algorithm(agent.algo).cls, model_path, device=device)
    # Before the episodes: a missing writer must not cost an evaluation, nor replace its CSV.
    mp4 = _mp4_writer() if video else None
    try:
        env = _run_env(agent, task, statistics, n_envs, seed, "rgb_array" if video else None)
    except RunError:
        raise
    except Exception as e:
        if video:  # building an environment that renders failed: a rendering problem
            raise VideoUnavailable(_video_hint(task.id, e)) from e
        raise
    applied = task.env.wrappers.as_kwargs()

    recorder = _FirstEpisodeFrames(env, task.id) if video else None
    returns, lengths = evaluate_policy(
        policy,
        env,
        n_eval_episodes=episodes,
        deterministic=deterministic,
        return_episode_rewards=True,
        callback=recorder,
    )
    fps = int(env.get_attr("metadata")[0].get("render_fps") or 30)
    env.close()

    if episodes_csv is not None:
        _write_episodes(Path(episodes_csv), returns, lengths, applied)
    result: dict[str, Any] = {
        "run": str(run.root),
        "episodes": len(returns),
        "mean_return": float(np.mean(returns)),
        "std_return": float(np.std(returns)),
        "mean_length": float(np.mean(lengths)),
        "std_length": float(np.std(lengths)),
        "returns": [float(r) for r in returns],
        "lengths": [int(n) for n in lengths],
        "deterministic": deterministic,
        "seed": seed,
        "model": model,
        "conditions": applied,
    }
    if recorder is not None:
        result["video"] = str(_write_video(mp4, run.root / VIDEO_FILE, recorder.frames, fps))
    return result


class _FirstEpisodeFrames:
    """An ``evaluate_policy`` callback that keeps the frames of the first episode."""

    def __init__(self, env: VecEnv, task_id: str) -> None:
        self.env, self.task_id = env, task_id
        self.frames: list[np.ndarray] = []
        self.recording = True

    def __call__(self, local_vars: dict[str, Any], _: dict[str, Any]) -> None:
        if not self.recording:
            return
        try:
            self.frames.append(self.env.render())
        except Exception as e:
            raise VideoUnavailable(_video_hint(self.task_id, e)) from e
        if local_vars["done"]:
            self.recording = False


def _write_episodes(
    path: Path, returns: list[float], lengths: list[int], conditions: Mapping[str, Any]
) -> None:
    """One row per episode, with the conditions it ran under (one column per setting)."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["episode", "return", "length", *conditions])
    values = [
        "-".join(map(str, v)) if isinstance(v, (list, tuple)) else v for v in conditions.values()
    ]
    for i, (r, n) in enumerate(zip(returns, lengths, strict=True)):
        writer.writerow([i, float(r), int(n), *values])
    atomic_write_text(path, text.getvalue())


def _mp4_writer() -> Any:
    """``imageio.v2``, with the MP4 writer it needs (imageio-ffmpeg).

    :raises VideoUnavailable: saying what to install
    """
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the MP4 writer imageio needs)
    except ImportError as e:
        raise VideoUnavailable(
            f"writing MP4 needs imageio and imageio-ffmpeg ({e}); install them with "
            "pip install -e '.[video]'"
        ) from e
    return imageio


def _write_video(imageio: Any, path: Path, frames: list[np.ndarray], fps: int) -> Path:
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
