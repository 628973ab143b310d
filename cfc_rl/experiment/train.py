"""Train one agent on one task with one seed, into a run folder (see :mod:`.runs`).

Two entry points over the same steps: :func:`train` (:func:`start_run` for resolved configs)
starts a run from an agent and a task; :func:`resume_run` continues the run in a folder from
its latest checkpoint, with the configuration the run recorded (editing a YAML file never
changes a run half-way). Either way the session reads top to bottom: environments -> model ->
learn -> final model, evaluation and ``result.json``. Interrupted runs end at the same step
count as uninterrupted ones: checkpoints are taken between two rollouts, where the step count
is a whole number of rollouts.
"""

from __future__ import annotations

import datetime
import inspect
import json
import logging
import os
import pickle
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from cfc_rl.envs import ConfigError, make_task
from cfc_rl.experiment.algorithms import algorithm
from cfc_rl.experiment.callbacks import (
    Checkpoints,
    PeriodicEvaluation,
    ProgressBar,
    make_logger,
    merge_progress,
)
from cfc_rl.experiment.environments import make_env
from cfc_rl.experiment.runs import (
    RunFolder,
    atomic_write,
    atomic_write_text,
    dump_yaml,
    load_model,
    load_replay_buffer,
    machine_description,
)
from cfc_rl.experiment.settings import (
    ACTIVATIONS,
    AgentConfig,
    load_agent_config,
    make_schedule,
    resolve_agent,
)
from cfc_rl.experiment.tasks import Task, load_task

__all__ = [
    "TrainingInterrupted",
    "build_model",
    "compile_cells",
    "configs_from_record",
    "resolve",
    "resume_run",
    "start_run",
    "train",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_PER_RUN = 10  # a checkpoint every tenth of the budget (and on Ctrl-C)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C after saving a checkpoint; the message says how to resume."""


def resolve(
    agent: str | os.PathLike[str] | AgentConfig,
    task: str | os.PathLike[str] | Mapping[str, Any] | Task,
    steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[AgentConfig, Task]:
    """The agent for the task (its settings and overrides merged in) and the task as the agent
    needs it: the agent's wrappers, n_envs and normalize, and the budget ``steps`` if given.

    :param overrides: agent-file keys merged in last (the command line's ``--set``)
    :raises ConfigError: naming the file and key of anything that does not validate
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    task_cfg = load_task(task)
    agent_cfg = agent if isinstance(agent, AgentConfig) else load_agent_config(agent)
    algo = algorithm(agent_cfg.algo)
    if algo.continuous_only:  # the real reason, before "no settings for this task"
        with make_task(task_cfg.env) as env:
            try:
                algo.check_action_space(env.action_space, agent_cfg.name)
            except ValueError as e:
                raise ConfigError(f"{agent_cfg.source}: {e}") from None
    agent_cfg = resolve_agent(agent_cfg, task_cfg)
    if overrides:
        agent_cfg = agent_cfg.with_values(overrides, source="--set")
    task_cfg = task_cfg.replace(
        wrappers=agent_cfg.wrappers,
        n_envs=agent_cfg.n_envs,
        normalize=agent_cfg.normalize,
        total_timesteps=steps,
    )
    return agent_cfg, task_cfg


def train(
    agent: str | os.PathLike[str] | AgentConfig | None = None,
    task: str | os.PathLike[str] | Mapping[str, Any] | Task | None = None,
    *,
    seed: int = 0,
    steps: int | None = None,
    device: str = "auto",
    out: str | os.PathLike[str] = "runs",
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress_bar: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> RunFolder:
    """Train an agent and leave a complete run folder.

    Everything that can be checked (the files, the agent against the task, the seed, the
    device) is checked before the run folder is made; a run that fails before its first
    checkpoint leaves nothing behind that would block a corrected rerun.

    :param agent: an agent file (``agents/*.yaml``) or a loaded :class:`AgentConfig`; may be
        left out with ``resume`` and the ``run_dir`` of a run
    :param task: a task file (``envs/*.yaml``), a task id, task-file data or a :class:`Task`;
        may be left out likewise
    :param seed: seed of the model and the environments, 0 <= seed < 2**31
    :param steps: budget in environment steps; defaults to the task's ``train.total_timesteps``
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (an error where CUDA is not available)
    :param out: root of the run folders (``<out>/<task>/<agent>/seed_<seed>``)
    :param run_dir: the run folder itself, instead of one under ``out``
    :param resume: if the folder holds a run, continue it (see :func:`resume_run`); without it,
        an existing run is an error. Given with ``agent`` / ``task``, they must be the ones
        the run recorded
    :param progress_bar: show a progress bar of the run's steps (needs tqdm and rich)
    :param overrides: agent-file keys merged in last (the command line's ``--set``)
    :return: the run folder; ``result.json`` in it marks the run as complete
    :raises FileExistsError: if the run folder holds a run and ``resume`` is False
    :raises ConfigError: for a bad file or value, or a resume whose agent or task differ
    :raises TrainingInterrupted: on Ctrl-C, after saving a checkpoint
    """
    check_seed(seed)
    check_device(device)
    existing = RunFolder(Path(run_dir)) if run_dir is not None else None
    if resume and existing is not None and existing.config.exists() and agent is None:
        if task is not None or overrides:
            raise ConfigError("resuming a run takes no task or --set without its agent")
        return resume_run(existing.root, steps=steps, device=device, progress_bar=progress_bar)
    if agent is None or task is None:
        raise ValueError("give an agent and a task, or the run_dir of a run to resume")
    agent_cfg, task_cfg = resolve(agent, task, steps, overrides)
    run = existing or RunFolder(Path(out) / task_cfg.name / agent_cfg.name / f"seed_{seed}")
    if run.config.exists():
        if not resume:
            raise FileExistsError(
                f"{run.root} already holds a run: continue it with `cfc-rl train --resume "
                f"--run-dir {run.root}` (resume=True), or choose another output folder"
            )
        _check_same_run(run, agent_cfg, task_cfg, seed)
        return resume_run(run.root, steps=steps, device=device, progress_bar=progress_bar)
    return start_run(
        agent_cfg, task_cfg, seed=seed, run=run, device=device, progress_bar=progress_bar
    )


def check_seed(seed: int) -> None:
    """A seed that numpy, torch and Gymnasium all take (with the offsets of the environments)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ConfigError(f"seed must be an integer from 0 to 2**31 - 1, got {seed!r}")


def check_device(device: str) -> None:
    """An error, not a quiet fallback to the CPU, for a device that is not there."""
    import torch

    if device in ("auto", "cpu"):
        return
    if not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r}: CUDA is not available here (torch {torch.__version__}); "
            "use --device cpu, or install a CUDA build of torch"
        )


def _check_same_run(run: RunFolder, agent: AgentConfig, task: Task, seed: int) -> None:
    """A resume given an agent and a task continues the run only if they are the ones it
    recorded (the budget may differ: resuming to a new budget is allowed)."""
    record = run.read_config()
    recorded_agent, recorded_task = configs_from_record(record)
    given = config_record(agent, task.replace(total_timesteps=1), seed, "auto")
    recorded = config_record(recorded_agent, recorded_task.replace(total_timesteps=1), 0, "")
    for part in ("agent", "task"):
        for key in sorted(set(given[part]) | set(recorded[part])):
            if key != "source" and given[part].get(key) != recorded[part].get(key):
                raise ConfigError(
                    f"{run.root} holds a run of {recorded_agent.name} on {recorded_task.name} "
                    f"whose {part}.{key} differs from the {part} given; resume it without "
                    "--agent/--task (its recorded configuration), or choose another folder"
                )
    if record["seed"] != seed:
        raise ConfigError(f"{run.root} holds the run of seed {record['seed']}, not {seed}")


def start_run(
    agent: AgentConfig,
    task: Task,
    *,
    seed: int,
    run: RunFolder,
    device: str = "auto",
    progress_bar: bool = False,
    on_evaluation: Callable[[int, float], None] | None = None,
) -> RunFolder:
    """Train a resolved agent on a resolved task (see :func:`resolve`) in a new run folder.

    :param on_evaluation: called with the step count and mean return of every periodic
        evaluation (e.g. to report them to a hyperparameter search)
    """
    compile_cells(agent)
    made = not run.root.exists()
    try:
        atomic_write_text(run.config, dump_yaml(config_record(agent, task, seed, device)))
        env = _training_env(agent, task, seed, run)
        model = build_model(agent, env, seed=seed, device=device, budget=task.train.total_timesteps)
        return _session(
            run,
            agent,
            task,
            seed,
            model,
            elapsed_before=0.0,
            training_before=0.0,
            progress_bar=progress_bar,
            on_evaluation=on_evaluation,
        )
    except BaseException:
        if not run.latest_checkpoint.exists():  # it never trained: leave nothing that blocks
            _remove_run_files(run, remove_folder=made)
        raise


def _remove_run_files(run: RunFolder, remove_folder: bool) -> None:
    """Remove what a run writes (only that: ``run_dir`` may be a folder of the user's)."""
    if remove_folder:
        shutil.rmtree(run.root, ignore_errors=True)
        return
    for path in (run.monitor, run.tensorboard, run.checkpoints):
        shutil.rmtree(path, ignore_errors=True)
    for path in (run.config, *run.logs):
        path.unlink(missing_ok=True)


def resume_run(
    run_dir: str | os.PathLike[str],
    *,
    steps: int | None = None,
    device: str = "auto",
    progress_bar: bool = False,
    on_evaluation: Callable[[int, float], None] | None = None,
) -> RunFolder:
    """Continue the run in ``run_dir`` from its latest checkpoint, with the configuration it
    recorded, to ``steps`` if given (raising a complete run's budget), else to its budget.
    ``on_evaluation`` as for :func:`start_run`.

    :raises RunError: if the folder holds no run, or one of its files is damaged
    :raises TrainingInterrupted: on Ctrl-C, after saving a checkpoint
    """
    run = RunFolder(Path(run_dir))
    record = run.read_config()
    agent, task = configs_from_record(record)
    seed = record["seed"]
    if steps is not None:
        _check_budget_not_below_trained(run, steps)
    task = task.replace(total_timesteps=steps)
    if run.is_complete(task.train.total_timesteps):
        logger.info("%s is already complete (%d steps)", run.root, task.train.total_timesteps)
        return run
    checkpoint = _latest_state(run)
    if checkpoint is None:  # nothing to continue from: start over in the same folder
        return start_run(
            agent,
            task,
            seed=seed,
            run=run,
            device=device,
            progress_bar=progress_bar,
            on_evaluation=on_evaluation,
        )
    compile_cells(agent)
    atomic_write_text(run.config, dump_yaml(config_record(agent, task, seed, device)))
    run.result.unlink(missing_ok=True)  # no longer complete: the budget was raised
    merge_progress(run, until=checkpoint["steps"])  # rows of a session that died unmerged
    env = _training_env(agent, task, seed + checkpoint["steps"], run, checkpoint)
    model = load_model(
        algorithm(agent.algo).cls, run.checkpoints / checkpoint["model"], env=env, device=device
    )
    # SB3's load seeds torch, numpy and the environments with the run's seed again: the
    # resumed session would replay the first session's random numbers and starting states.
    model.set_random_seed(seed + checkpoint["steps"])
    if checkpoint.get("replay_buffer"):
        load_replay_buffer(model, run.checkpoints / checkpoint["replay_buffer"])
    return _session(
        run,
        agent,
        task,
        seed,
        model,
        elapsed_before=checkpoint["elapsed_s"],
        training_before=checkpoint.get("training_s"),
        progress_bar=progress_bar,
        resumed_at=checkpoint["steps"],
        on_evaluation=on_evaluation,
    )


def compile_cells(agent: AgentConfig) -> None:
    """Build (or load) the compiled CPU loops of the agent's cells before any clock starts: a
    first build takes about a minute, which must not count in a run's wall clock or steps/s.
    Where they cannot be built (no compiler), the cells warn once and run their ATen loops."""
    from cfc_rl.nn import cell_spec, cpu_extensions

    for cell in agent.cells:
        for name in cell_spec(cell).cls.cpu_kernels:
            cpu_extensions.load(name)


def _training_env(
    agent: AgentConfig,
    task: Task,
    seed: int,
    run: RunFolder,
    checkpoint: Mapping[str, Any] | None = None,
) -> VecEnv:
    """The training environments, with Monitor files; a resumed run appends to its Monitor
    files and starts from its checkpoint's normalisation statistics."""
    statistics = None
    if checkpoint is not None and checkpoint.get("vecnormalize"):
        statistics = run.checkpoints / checkpoint["vecnormalize"]
    return make_env(
        task,
        agent,
        n_envs=task.train.n_envs,
        seed=seed,
        normalization=statistics,
        monitor_dir=run.monitor,
        append_monitor=checkpoint is not None,
    )


def _session(
    run: RunFolder,
    agent: AgentConfig,
    task: Task,
    seed: int,
    model: BaseAlgorithm,
    *,
    elapsed_before: float,
    training_before: float | None,
    progress_bar: bool,
    resumed_at: int | None = None,
    on_evaluation: Callable[[int, float], None] | None = None,
) -> RunFolder:
    """Learn to the budget with periodic evaluations and checkpoints, then :func:`_finish`.

    ``training_before``: the training time of the steps already made (None where a checkpoint
    written before it was recorded: the speed is then timed over this session's steps)."""
    budget = task.train.total_timesteps
    eval_env = make_env(
        task, agent, n_envs=min(4, task.eval.episodes), seed=evaluation_seed(seed), training=False
    )
    model.set_logger(make_logger(run, resumed_at))
    logger.info(
        "training %s on %s (seed %d) for %d steps in %s",
        agent.name,
        task.id,
        seed,
        budget,
        run.root,
    )
    evaluation = PeriodicEvaluation(
        eval_env,
        run,
        every_steps=task.eval.every_steps,
        episodes=task.eval.episodes,
        deterministic=task.eval.deterministic,
        on_evaluation=on_evaluation,
    )
    checkpoints = Checkpoints(
        run,
        every_steps=max(1, budget // CHECKPOINTS_PER_RUN),
        steps=model.num_timesteps,
        elapsed_before=elapsed_before,
        training_before=training_before,
        evaluation=evaluation,
    )
    callbacks = [checkpoints, evaluation]
    if progress_bar:
        callbacks.append(ProgressBar(final_step_count(model, budget)))
    steps_before = model.num_timesteps
    start_time = time.perf_counter()
    try:
        model.learn(
            total_timesteps=max(0, budget - model.num_timesteps),
            callback=CallbackList(callbacks),
            reset_num_timesteps=resumed_at is None,
        )
    except KeyboardInterrupt:
        checkpoints.save_at_rollout_start(model)
        raise TrainingInterrupted(
            f"interrupted at {model.num_timesteps} of {budget} steps; checkpoint saved. "
            f"Resume with: cfc-rl train --resume --run-dir {run.root}"
        ) from None
    finally:
        model.get_env().close()
        model.logger.close()
        if resumed_at is not None:
            merge_progress(run)
    session = time.perf_counter() - start_time
    training_s = checkpoints.training_s()
    if model.num_timesteps > checkpoints.last_saved:
        # The final state as a checkpoint (with its replay buffer): a raised budget continues
        # from it as from any other. Saved after the clocks stop, as the final model is.
        checkpoints.save(model, training_s=training_s)
    # where the steps before this session were not timed, the speed is this session's
    timed_steps = model.num_timesteps - (steps_before if training_before is None else 0)
    eval_env.close()
    _finish(run, agent, task, seed, model, elapsed_before + session, timed_steps, training_s)
    return run


def evaluation_seed(seed: int) -> int:
    """The seed of a run's evaluation environments (periodic and final), away from the
    training environments' seed, seed + 1, ...; ``cfc-rl evaluate`` uses it by default, so
    that it reproduces ``result.json``'s final return."""
    return seed + 10_000


def final_step_count(model: BaseAlgorithm, budget: int) -> int:
    """Where training to ``budget`` steps ends: on-policy algorithms collect whole rollouts of
    ``n_steps × n_envs``, so they stop at the first multiple at or past the budget."""
    if isinstance(model, OnPolicyAlgorithm):
        rollout = model.n_steps * model.n_envs
        return -(-budget // rollout) * rollout
    return budget


def _finish(
    run: RunFolder,
    agent: AgentConfig,
    task: Task,
    seed: int,
    model: BaseAlgorithm,
    wall_clock: float,
    timed_steps: int,
    training_s: float,
) -> None:
    """The final model and its statistics, the final evaluation (exactly what
    ``cfc-rl evaluate`` computes by default), and ``result.json`` (written last: it marks the
    run complete). ``steps_per_s``: ``timed_steps`` (the run's, or where its first sessions
    were not timed, the last session's) over their ``training_s`` (evaluations excluded)."""
    from cfc_rl.experiment.evaluate import EPISODES_CSV, evaluate_run

    atomic_write(run.model, model.save)
    normalization = model.get_vec_normalize_env()
    if normalization is not None:
        atomic_write(run.vecnormalize, lambda f: pickle.dump(normalization, f))
    final = evaluate_run(
        run.root,
        seed=evaluation_seed(seed),
        device=str(model.device),
        episodes_csv=run.root / EPISODES_CSV,
    )
    result = {
        "agent": agent.name,
        "task": task.name,
        "task_id": task.id,
        "seed": seed,
        "total_timesteps": task.train.total_timesteps,
        "num_timesteps": model.num_timesteps,
        "final_mean_return": final["mean_return"],
        "final_std_return": final["std_return"],
        "final_mean_length": final["mean_length"],
        "eval_episodes": final["episodes"],
        "eval_seed": evaluation_seed(seed),
        "eval_deterministic": final["deterministic"],
        "wall_clock_s": wall_clock,
        "steps_per_s": timed_steps / max(training_s, 1e-9),
        "timed_steps": timed_steps,
        "training_s": training_s,
        "params": count_parameters(model),
        "device": str(model.device),
    }
    atomic_write_text(run.result, json.dumps(result, indent=2) + "\n")


def build_model(
    agent: AgentConfig, env: VecEnv, *, seed: int, device: str, budget: int | None = None
) -> BaseAlgorithm:
    """A new model of the agent's algorithm and policy for ``env``.

    :param agent: the resolved agent
    :param env: the training environment
    :param seed: the model's seed
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param budget: the run's steps: an off-policy agent that sets no ``buffer_size`` gets a
        replay buffer of at most this many transitions (SB3 allocates and checkpoints the
        whole buffer: 1M entries for a 400-step run is hundreds of MB on disk)
    :raises ValueError: if the algorithm cannot act in the task's action space
    """
    algo = algorithm(agent.algo)
    algo.check_action_space(env.action_space, agent.name)
    hyperparams = dict(agent.hyperparams)
    if algo.off_policy and budget is not None and "buffer_size" not in hyperparams:
        default = inspect.signature(algo.cls.__init__).parameters["buffer_size"].default
        hyperparams["buffer_size"] = min(default, budget)
    for key in ("learning_rate", "clip_range", "clip_range_vf"):
        if hyperparams.get(key) is not None:
            hyperparams[key] = make_schedule(hyperparams[key])
    policy_kwargs = dict(agent.policy_kwargs)
    if "activation_fn" in policy_kwargs:
        policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"]]
    if agent.features_extractor is not None:
        from cfc_rl.sb3 import SequenceExtractor

        policy_kwargs["features_extractor_class"] = SequenceExtractor
        policy_kwargs["features_extractor_kwargs"] = dict(agent.features_extractor)
    return algo.cls(
        algo.policy_for(agent.policy, env.observation_space),
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


def config_record(agent: AgentConfig, task: Task, seed: int, device: str) -> dict[str, Any]:
    """What ``config.yaml`` holds: the resolved agent and task, the seed, the machine (its CPU
    and torch's threads, which its speed depends on) and package versions."""
    versions = {"python": platform.python_version()}
    for package in ("cfc-rl", "torch", "stable-baselines3", "sb3-contrib", "gymnasium"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "agent": {"name": agent.name, "source": agent.source, **agent.as_dict()},
        "task": {"name": task.name, "source": task.source, **task.as_dict()},
        "seed": seed,
        "device": device,
        "machine": ", ".join(
            [
                machine_description("cpu"),
                f"torch threads {torch.get_num_threads()}",
                *([machine_description("cuda")] if device == "cuda" else []),
            ]
        ),
        "versions": versions,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def configs_from_record(record: Mapping[str, Any]) -> tuple[AgentConfig, Task]:
    """The resolved agent and task of a ``config.yaml`` (or a job's plain data)."""
    agent = dict(record["agent"])
    name, agent_source = agent.pop("name"), agent.pop("source")
    task = dict(record["task"])
    task.pop("name", None)
    return (
        AgentConfig.from_dict(agent, name=name, source=agent_source),
        Task.from_dict(task, source=task.pop("source")),
    )


def _check_budget_not_below_trained(run: RunFolder, steps: int) -> None:
    """A budget below the steps a run has made cannot be trained to.

    :raises ConfigError: naming both
    """
    result, checkpoint = run.read_result(), run.read_checkpoint()
    trained = max(
        result["total_timesteps"] if result is not None else 0,
        checkpoint["steps"] if checkpoint is not None else 0,
    )
    if steps < trained:
        raise ConfigError(
            f"--steps {steps}: {run.root} has trained {trained} steps already; give at least that"
        )


def _latest_state(run: RunFolder) -> dict[str, Any] | None:
    """What to resume from: the latest checkpoint, or the final model of a complete run that
    has no checkpoint of it (finished before runs saved their final state as a checkpoint),
    or None to start over (no checkpoint was written)."""
    checkpoint = run.read_checkpoint()
    result = run.read_result()
    if result is not None and (checkpoint is None or checkpoint["steps"] < result["num_timesteps"]):
        # Move the final model into the checkpoint slot, so that one path resumes everything.
        run.checkpoints.mkdir(exist_ok=True)
        n = result["num_timesteps"]
        checkpoint = {"steps": n, "model": f"step_{n}.zip", "elapsed_s": result["wall_clock_s"]}
        if result.get("timed_steps") == n:  # timed over all its steps: the raise adds to it
            checkpoint["training_s"] = result["training_s"]
        shutil.copyfile(run.model, run.checkpoints / checkpoint["model"])
        if run.vecnormalize.exists():
            checkpoint["vecnormalize"] = f"step_{n}_vecnormalize.pkl"
            shutil.copyfile(run.vecnormalize, run.checkpoints / checkpoint["vecnormalize"])
        # recorded before result.json goes: a crash then still resumes from the final model
        atomic_write_text(run.latest_checkpoint, json.dumps(checkpoint, indent=2) + "\n")
    if checkpoint is None:
        logger.warning("%s has no checkpoint yet: training starts over", run.root)
        for path in (run.monitor, run.tensorboard):
            shutil.rmtree(path, ignore_errors=True)
        for path in run.logs:
            path.unlink(missing_ok=True)
    return checkpoint
