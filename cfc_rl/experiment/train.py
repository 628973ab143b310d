"""Train one agent on one task with one seed, into a run folder (see :mod:`.runs`).

:func:`train` reads top to bottom: configs -> run folder -> environments -> model -> learn ->
final model and evaluation. Interrupted runs (Ctrl-C, a killed job) continue with
``resume=True`` from their latest checkpoint and end at the same step count as an uninterrupted
run: checkpoints are taken between two rollouts, where the step count is a whole number of
rollouts.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
import pickle
import platform
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import CSVOutputFormat, Logger, TensorBoardOutputFormat
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import (
    VecEnv,
    VecFrameStack,
    VecNormalize,
    sync_envs_normalization,
)

from cfc_rl.envs import OBS_KEY, TaskConfig, make_task
from cfc_rl.experiment.config import (
    ACTIVATIONS,
    AgentConfig,
    algo_class,
    load_agent_config,
    load_task,
    make_schedule,
    resolve_agent,
    task_name,
)
from cfc_rl.experiment.runs import (
    RunFolder,
    atomic_write,
    atomic_write_text,
    dump_yaml,
    load_model,
    load_normalization,
    run_folder,
)

__all__ = ["TrainingInterrupted", "build_model", "make_env", "train"]

logger = logging.getLogger(__name__)

CHECKPOINTS_PER_RUN = 10  # a checkpoint every tenth of the budget (and on Ctrl-C)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving a checkpoint; the message says how to resume."""


def train(
    agent: str | os.PathLike[str] | AgentConfig | None = None,
    task: str | os.PathLike[str] | Mapping[str, Any] | TaskConfig | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    device: str = "auto",
    out: str | os.PathLike[str] = "runs",
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress_bar: bool = False,
) -> RunFolder:
    """Train an agent and leave a complete run folder.

    :param agent: an agent file (``agents/*.yaml``) or a loaded :class:`AgentConfig`; may be
        left out to resume the run in ``run_dir``
    :param task: a task file (``envs/*.yaml``), a task id, a mapping or a :class:`TaskConfig`;
        may be left out to resume the run in ``run_dir``
    :param seed: seed of the model and the environments
    :param steps: budget in environment steps; defaults to the task's ``train.total_timesteps``
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param out: root of the run folders (``<out>/<task>/<agent>/seed_<seed>``)
    :param run_dir: the run folder itself, instead of one under ``out``
    :param resume: continue the run in the folder from its latest checkpoint, with the
        configs it recorded (to ``steps`` if given, else to its recorded budget); without it,
        an existing run is an error
    :param progress_bar: show SB3's progress bar (needs tqdm and rich)
    :return: the run folder; ``result.json`` in it marks the run as complete
    :raises FileExistsError: if the run folder holds a run and ``resume`` is False
    :raises TrainingInterrupted: on Ctrl-C, after saving a checkpoint
    """
    # 1. Configs: the agent with its overrides for this task, and the task as the agent needs
    # it (its wrappers, n_envs, normalize, and the budget). A resumed run uses the configs it
    # recorded, so that editing a YAML file never changes a run half-way.
    if run_dir is not None and RunFolder(Path(run_dir)).config.exists() and resume:
        run = RunFolder(Path(run_dir))
    else:
        if agent is None or task is None:
            raise ValueError("give an agent and a task, or the run_dir of a run to resume")
        task_cfg = load_task(task)
        agent_cfg = agent if isinstance(agent, AgentConfig) else load_agent_config(agent)
        agent_cfg = resolve_agent(agent_cfg, task_cfg)
        if run_dir is not None:
            run = RunFolder(Path(run_dir))
        else:
            run = run_folder(out, task_name(task_cfg), agent_cfg.name, seed)
        task_cfg = _task_for_agent(task_cfg, agent_cfg, steps)

    # 2. Run folder: a new one, or the state of the run to resume.
    checkpoint = None
    if run.config.exists():
        if not resume:
            raise FileExistsError(
                f"{run.root} already holds a run; pass resume=True (--resume) to continue it "
                "or choose another output folder"
            )
        recorded = run.read_config()
        agent_cfg, task_cfg = configs_from_record(recorded)
        seed = recorded["seed"]
        task_cfg = _task_for_agent(task_cfg, agent_cfg, steps)  # a new budget, if given
        checkpoint = _latest_state(run)
    budget = task_cfg.train.total_timesteps
    atomic_write_text(run.config, dump_yaml(_config_record(agent_cfg, task_cfg, seed, device)))
    if checkpoint is not None and run.is_complete(budget):
        logger.info("%s is already complete (%d steps)", run.root, budget)
        return run
    run.result.unlink(missing_ok=True)  # no longer complete: the budget was raised

    # 3. Environments: training envs with Monitor files, and a separate evaluation env.
    n_envs = task_cfg.train.n_envs
    env_seed = seed if checkpoint is None else seed + checkpoint["steps"]
    env = make_env(
        task_cfg,
        agent_cfg,
        n_envs=n_envs,
        seed=env_seed,
        monitor_dir=run.monitor,
        append_monitor=checkpoint is not None,
    )
    if checkpoint is not None and checkpoint.get("vecnormalize"):
        statistics = load_normalization(run.checkpoints / checkpoint["vecnormalize"])
        env = replace_normalization(env, statistics)
    eval_env = make_env(
        task_cfg,
        agent_cfg,
        n_envs=min(4, task_cfg.eval.episodes),
        seed=seed + 10_000,
        training=False,
    )

    # 4. Model: a new one, or the checkpoint's weights, optimiser state and step count.
    if checkpoint is None:
        model = build_model(agent_cfg, env, seed=seed, device=device)
    else:
        model = load_model(
            algo_class(agent_cfg.algo),
            run.checkpoints / checkpoint["model"],
            env=env,
            device=device,
        )
        if checkpoint.get("replay_buffer"):
            model.load_replay_buffer(run.checkpoints / checkpoint["replay_buffer"])
    model.set_logger(_logger(run, append=checkpoint is not None))
    logger.info(
        "training %s on %s (seed %d) for %d steps in %s",
        agent_cfg.name,
        task_cfg.id,
        seed,
        budget,
        run.root,
    )

    # 5. Learn, with periodic evaluations and checkpoints.
    elapsed_before = checkpoint["elapsed_s"] if checkpoint else 0.0
    steps_before = model.num_timesteps
    evaluation = PeriodicEvaluation(
        eval_env,
        run,
        every_steps=task_cfg.eval.every_steps,
        episodes=task_cfg.eval.episodes,
        deterministic=task_cfg.eval.deterministic,
    )
    checkpoints = Checkpoints(run, every_steps=max(1, budget // CHECKPOINTS_PER_RUN))
    checkpoints.elapsed_before = elapsed_before
    start = time.perf_counter()
    try:
        model.learn(
            total_timesteps=max(0, budget - model.num_timesteps),
            callback=CallbackList([checkpoints, evaluation]),
            reset_num_timesteps=checkpoint is None,
            progress_bar=progress_bar,
        )
    except KeyboardInterrupt:
        # The partial rollout is lost anyway: rewind the step count to the rollout's start,
        # so that the resumed run ends where an uninterrupted one does.
        model.num_timesteps = checkpoints.rollout_start_steps
        checkpoints.save(model)
        raise TrainingInterrupted(
            f"interrupted at {model.num_timesteps} of {budget} steps; checkpoint saved. "
            f"Resume with: cfc-rl train --resume --run-dir {run.root}"
        ) from None
    finally:
        env.close()
    session = time.perf_counter() - start
    wall_clock = elapsed_before + session

    # 6. Final model, normalisation statistics and evaluation; result.json marks it done.
    atomic_write(run.model, model.save)
    normalization = model.get_vec_normalize_env()
    if normalization is not None:
        atomic_write(run.vecnormalize, lambda f: pickle.dump(normalization, f))
    sync_envs_normalization(model.get_env(), eval_env)
    returns, lengths = evaluate_policy(
        model,
        eval_env,
        n_eval_episodes=task_cfg.eval.episodes,
        deterministic=task_cfg.eval.deterministic,
        return_episode_rewards=True,
    )
    eval_env.close()
    trained = model.num_timesteps - steps_before
    result = {
        "agent": agent_cfg.name,
        "task": task_name(task_cfg),
        "task_id": task_cfg.id,
        "seed": seed,
        "total_timesteps": budget,
        "num_timesteps": model.num_timesteps,
        "final_mean_return": float(np.mean(returns)),
        "final_std_return": float(np.std(returns)),
        "final_mean_length": float(np.mean(lengths)),
        "eval_episodes": len(returns),
        "wall_clock_s": wall_clock,
        # training throughput: the periodic evaluations' time is left out
        "steps_per_s": trained / max(session - evaluation.seconds, 1e-9),
        "params": count_parameters(model),
        "device": str(model.device),
    }
    atomic_write_text(run.result, json.dumps(result, indent=2) + "\n")
    logger.debug(
        "%s: mean return %.1f ± %.1f after %d steps (%.0f s)",
        run.root,
        result["final_mean_return"],
        result["final_std_return"],
        model.num_timesteps,
        wall_clock,
    )
    return run


def make_env(
    task: TaskConfig,
    agent: AgentConfig,
    *,
    n_envs: int,
    seed: int,
    training: bool = True,
    monitor_dir: Path | None = None,
    append_monitor: bool = False,
    render_mode: str | None = None,
) -> VecEnv:
    """The vector environment an agent sees: task wrappers (already merged into ``task``),
    Monitor, VecNormalize (observations under ``"obs"`` only, so that Δt stays exact) and
    VecFrameStack, in that order.

    :param task: the task, with the agent's wrappers merged in
    :param agent: the resolved agent (for ``frame_stack`` and the discount of VecNormalize)
    :param n_envs: number of environments
    :param seed: seed of the first environment (the others get seed + i)
    :param training: False for an evaluation env: frozen statistics, raw rewards (the
        statistics come from the training env or from ``vecnormalize.pkl``)
    :param monitor_dir: where Monitor writes its CSV files (None: in memory only)
    :param append_monitor: append to existing Monitor files (a resumed run)
    :param render_mode: passed to the environment (``"rgb_array"`` for videos)
    """
    env = make_vec_env(
        lambda: make_task(task, render_mode=render_mode),
        n_envs=n_envs,
        seed=seed,
        monitor_dir=None if monitor_dir is None else str(monitor_dir),
        monitor_kwargs={"override_existing": not append_monitor},
    )
    if task.train.normalize:
        keys = [OBS_KEY] if isinstance(env.observation_space, spaces.Dict) else None
        gamma = agent.hyperparams.get("gamma", 0.99)
        env = VecNormalize(
            env, training=training, norm_reward=training, norm_obs_keys=keys, gamma=gamma
        )
    if agent.frame_stack:
        env = VecFrameStack(env, agent.frame_stack)
    return env


def build_model(agent: AgentConfig, env: VecEnv, *, seed: int, device: str) -> BaseAlgorithm:
    """A new model of the agent's algorithm and policy for ``env``.

    :param agent: the resolved agent
    :param env: the training environment
    :param seed: the model's seed
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    """
    hyperparams = dict(agent.hyperparams)
    for key in ("learning_rate", "clip_range", "clip_range_vf"):
        if key in hyperparams and hyperparams[key] is not None:
            hyperparams[key] = make_schedule(hyperparams[key])
    policy_kwargs = dict(agent.policy_kwargs)
    if "activation_fn" in policy_kwargs:
        policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"]]
    if agent.features_extractor is not None:
        from cfc_rl.sb3 import SequenceExtractor

        policy_kwargs["features_extractor_class"] = SequenceExtractor
        policy_kwargs["features_extractor_kwargs"] = dict(agent.features_extractor)
    policy: Any = agent.policy
    if policy == "RecurrentCellPolicy":
        from cfc_rl.sb3 import RecurrentCellPolicy

        policy = RecurrentCellPolicy  # it reads Dict observations itself
    elif isinstance(env.observation_space, spaces.Dict):
        policy = policy.replace("Mlp", "MultiInput")
    if agent.algo == "sac" and not isinstance(env.action_space, spaces.Box):
        raise ValueError(
            f"agent {agent.name} (SAC) needs continuous actions, but the task's action space "
            f"is {env.action_space}"
        )
    return algo_class(agent.algo)(
        policy,
        env,
        seed=seed,
        device=device,
        policy_kwargs=policy_kwargs,
        verbose=0,
        **hyperparams,
    )


def count_parameters(model: BaseAlgorithm) -> int:
    """Trainable parameters of the policy (SAC's target critic is a copy and not counted)."""
    return sum(
        p.numel() for name, p in model.policy.named_parameters() if "critic_target" not in name
    )


class Checkpoints(BaseCallback):
    """Save a checkpoint between rollouts every ``every_steps`` steps.

    A checkpoint is ``step_<n>.zip`` (+ ``_vecnormalize.pkl``, + ``_replay_buffer.pkl`` for
    off-policy algorithms), then ``latest.json`` naming them, written last: a checkpoint is in
    effect only once complete. Older ones are then deleted.

    :param run: the run folder
    :param every_steps: environment steps between two checkpoints
    """

    def __init__(self, run: RunFolder, every_steps: int) -> None:
        super().__init__()
        self.run = run
        self.every_steps = every_steps
        self.last_saved = 0
        self.rollout_start_steps = 0
        self.elapsed_before = 0.0
        self.started = time.perf_counter()

    def _on_training_start(self) -> None:
        self.last_saved = self.rollout_start_steps = self.num_timesteps
        self.started = time.perf_counter()

    def _on_rollout_start(self) -> None:
        # Between rollouts (after the update on the previous one): a consistent state.
        self.rollout_start_steps = self.num_timesteps
        if self.num_timesteps - self.last_saved >= self.every_steps:
            self.save(self.model)

    def _on_step(self) -> bool:
        return True

    def save(self, model: BaseAlgorithm) -> None:
        """Write a checkpoint of ``model`` at its current step count."""
        folder, n = self.run.checkpoints, model.num_timesteps
        record: dict[str, Any] = {"steps": n, "model": f"step_{n}.zip"}
        atomic_write(folder / record["model"], model.save)
        normalization = model.get_vec_normalize_env()
        if normalization is not None:
            record["vecnormalize"] = f"step_{n}_vecnormalize.pkl"
            atomic_write(folder / record["vecnormalize"], lambda f: pickle.dump(normalization, f))
        if isinstance(model, OffPolicyAlgorithm):
            record["replay_buffer"] = f"step_{n}_replay_buffer.pkl"
            atomic_write(folder / record["replay_buffer"], model.save_replay_buffer)
        record["elapsed_s"] = self.elapsed_before + time.perf_counter() - self.started
        atomic_write_text(self.run.latest_checkpoint, json.dumps(record, indent=2) + "\n")
        keep = {record[k] for k in ("model", "vecnormalize", "replay_buffer") if k in record}
        for path in folder.glob("step_*"):
            if path.name not in keep:
                path.unlink(missing_ok=True)
        self.last_saved = n


class PeriodicEvaluation(BaseCallback):
    """Evaluate every ``every_steps`` environment steps on a separate environment (with the
    training env's normalisation statistics), into ``evaluations.npz`` and ``evaluations.csv``.

    Evaluations fall on the first step count at or after each multiple of ``every_steps``, so
    every seed and a resumed run evaluate at the same step counts (SB3's EvalCallback counts
    calls since the last ``learn``).

    :param eval_env: the evaluation environment
    :param run: the run folder (earlier evaluations are read back from it)
    :param every_steps: environment steps between evaluations
    :param episodes: episodes per evaluation
    :param deterministic: evaluate the mode of the policy
    """

    def __init__(
        self,
        eval_env: VecEnv,
        run: RunFolder,
        every_steps: int,
        episodes: int,
        deterministic: bool,
    ) -> None:
        super().__init__()
        self.eval_env, self.run = eval_env, run
        self.every_steps, self.episodes, self.deterministic = every_steps, episodes, deterministic
        self.seconds = 0.0  # spent evaluating, in this process
        self.timesteps: list[int] = []
        self.returns: list[list[float]] = []
        self.lengths: list[list[int]] = []
        if run.evaluations.exists():
            with np.load(run.evaluations) as data:
                self.timesteps = data["timesteps"].tolist()
                self.returns = data["results"].tolist()
                self.lengths = data["ep_lengths"].tolist()

    def _on_training_start(self) -> None:
        # Forget evaluations past the checkpoint: a resumed run redoes them.
        keep = sum(t <= self.num_timesteps for t in self.timesteps)
        del self.timesteps[keep:], self.returns[keep:], self.lengths[keep:]
        self.next_eval = (self.num_timesteps // self.every_steps + 1) * self.every_steps

    def _on_step(self) -> bool:
        if self.num_timesteps < self.next_eval:
            return True
        self.next_eval = (self.num_timesteps // self.every_steps + 1) * self.every_steps
        start = time.perf_counter()
        sync_envs_normalization(self.training_env, self.eval_env)
        returns, lengths = evaluate_policy(
            self.model,
            self.eval_env,
            n_eval_episodes=self.episodes,
            deterministic=self.deterministic,
            return_episode_rewards=True,
        )
        self.seconds += time.perf_counter() - start
        self.timesteps.append(self.num_timesteps)
        self.returns.append([float(r) for r in returns])
        self.lengths.append([int(n) for n in lengths])
        self.logger.record("eval/mean_reward", float(np.mean(returns)))
        self.logger.record("eval/mean_ep_length", float(np.mean(lengths)))
        self.logger.dump(self.num_timesteps)  # as SB3's EvalCallback: one row per evaluation
        self._write()
        return True

    def _write(self) -> None:
        def npz(f: Any) -> None:
            np.savez(
                f,
                timesteps=np.array(self.timesteps),
                results=np.array(self.returns),
                ep_lengths=np.array(self.lengths),
            )

        atomic_write(self.run.evaluations, npz)
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["timesteps", "mean_return", "std_return", "mean_length", "episodes"])
        for t, r, n in zip(self.timesteps, self.returns, self.lengths, strict=True):
            writer.writerow([t, np.mean(r), np.std(r), np.mean(n), len(r)])
        atomic_write_text(self.run.root / "evaluations.csv", text.getvalue())


class _ResumableCSV(CSVOutputFormat):
    """SB3's CSV log, continuing an existing file instead of truncating it."""

    def __init__(self, filename: Path) -> None:
        if not filename.exists() or filename.stat().st_size == 0:
            super().__init__(str(filename))
            return
        self.file = filename.open("r+")
        self.keys = self.file.readline().strip().split(",")
        self.file.seek(0, os.SEEK_END)
        self.separator, self.quotechar = ",", '"'


def _logger(run: RunFolder, append: bool) -> Logger:
    csv_format = (
        _ResumableCSV(run.root / "progress.csv")
        if append
        else CSVOutputFormat(str(run.root / "progress.csv"))
    )
    return Logger(str(run.root), [csv_format, TensorBoardOutputFormat(str(run.tensorboard))])


def _task_for_agent(task: TaskConfig, agent: AgentConfig, steps: int | None) -> TaskConfig:
    """The task with the agent's wrappers, n_envs and normalize, and the budget ``steps``."""
    data = _task_dict(task)
    data["wrappers"].update(agent.wrappers)
    if agent.n_envs is not None:
        data["train"]["n_envs"] = agent.n_envs
    if agent.normalize is not None:
        data["train"]["normalize"] = agent.normalize
    if steps is not None:
        data["train"]["total_timesteps"] = steps
    return TaskConfig.from_dict(data, source=task.source)


def _task_dict(task: TaskConfig) -> dict[str, Any]:
    data = {
        "id": task.id,
        "wrappers": asdict(task.wrappers),
        "env_kwargs": dict(task.env_kwargs),  # a read-only mapping, which asdict cannot copy
        "train": asdict(task.train),
        "eval": asdict(task.eval),
    }
    if data["wrappers"]["irregular"] is not None:
        data["wrappers"]["irregular"] = list(data["wrappers"]["irregular"])
    return data


def _config_record(agent: AgentConfig, task: TaskConfig, seed: int, device: str) -> dict:
    versions = {"python": platform.python_version()}
    for package in ("cfc-rl", "torch", "stable-baselines3", "sb3-contrib", "gymnasium"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "agent": {"name": agent.name, "source": agent.source, **agent.as_dict()},
        "task": {"name": task_name(task), "source": task.source, **_task_dict(task)},
        "seed": seed,
        "device": device,
        "versions": versions,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def configs_from_record(record: Mapping[str, Any]) -> tuple[AgentConfig, TaskConfig]:
    """The resolved agent and task stored in a run's ``config.yaml``."""
    agent = dict(record["agent"])
    name, agent_source = agent.pop("name"), agent.pop("source")
    task = dict(record["task"])
    task.pop("name")
    task_source = task.pop("source")
    return (
        AgentConfig.from_dict(agent, name=name, source=agent_source),
        TaskConfig.from_dict(task, source=task_source),
    )


def _latest_state(run: RunFolder) -> dict[str, Any] | None:
    """What to resume from: the latest checkpoint, or the final model of a complete run
    (whose budget is being raised), or None to start over (no checkpoint was written)."""
    checkpoint = run.read_checkpoint()
    result = run.read_result()
    if result is not None and (checkpoint is None or checkpoint["steps"] < result["num_timesteps"]):
        # Move the final model into the checkpoint slot, so that one path resumes everything.
        run.checkpoints.mkdir(exist_ok=True)
        n = result["num_timesteps"]
        checkpoint = {"steps": n, "model": f"step_{n}.zip", "elapsed_s": result["wall_clock_s"]}
        shutil.copyfile(run.model, run.checkpoints / checkpoint["model"])
        if run.vecnormalize.exists():
            checkpoint["vecnormalize"] = f"step_{n}_vecnormalize.pkl"
            shutil.copyfile(run.vecnormalize, run.checkpoints / checkpoint["vecnormalize"])
    if checkpoint is None:
        logger.warning("%s has no checkpoint yet: training starts over", run.root)
        for path in (run.monitor, run.tensorboard):
            shutil.rmtree(path, ignore_errors=True)
        for path in (run.evaluations, run.root / "evaluations.csv", run.root / "progress.csv"):
            path.unlink(missing_ok=True)
    return checkpoint


def replace_normalization(env: VecEnv, normalization: VecNormalize) -> VecEnv:
    """``env`` (built by :func:`make_env`) with its fresh VecNormalize replaced by
    ``normalization`` (saved statistics), under the same VecFrameStack if there is one."""
    stack = env if isinstance(env, VecFrameStack) else None
    inner = stack.venv if stack else env
    assert isinstance(inner, VecNormalize), "saved statistics need a task with normalize: true"
    normalization.set_venv(inner.venv)
    normalization.training, normalization.norm_reward = inner.training, inner.norm_reward
    if stack is None:
        return normalization
    stack.venv = normalization  # VecFrameStack keeps no other reference to its inner env
    return stack
