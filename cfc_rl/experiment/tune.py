"""Hyperparameter search: ``cfc-rl tune``, with Ray Tune, an Optuna (TPE) searcher and an ASHA
scheduler on the periodic evaluations.

The search space is a small YAML file of dotted paths into the agent file, one kind each::

    hyperparams.learning_rate: {loguniform: [1.0e-4, 3.0e-3]}   # low <= x <= high, log scale
    hyperparams.gae_lambda: {uniform: [0.9, 0.99]}               # low <= x <= high
    hyperparams.n_epochs: {randint: [5, 20]}                     # low <= x < high, as tune.randint
    policy_kwargs.hidden_size: {choice: [32, 64]}                # one of the values

A path is ``<section>.<key>`` for a mapping of the agent file (``hyperparams``,
``policy_kwargs``, ``features_extractor``, ``wrappers``) or one of its top-level values
(``n_envs``, ``normalize``, ``frame_stack``). A trial's values go into the agent's
``overrides`` for the task, so they win over the settings and the agent's own keys, as they
will in the agent file the search writes. Every value the space can give is checked against the
agent's schema before any trial starts (an unknown hyperparameter, a wrong type, an empty range,
an agent that cannot run the task are errors that name the file): the agent is resolved for the
task with each bound and each choice, and its model is built once with the lower bounds and
first choices.

A trial trains ``seeds`` seeds (1000, 1001, ...: seeds the benchmarks do not use), each in a
process of its own, side by side; each periodic evaluation's mean return, averaged over the
seeds once all of them have reached it, is reported to ASHA, which stops the trials that are
behind at its rungs; a trial's score is the mean over seeds of the final returns.

Trial 0 comes first and is not sampled: the agent as its files give it before the search (for
the benchmark's agents, RL Zoo's settings for the task), trained in full on the same seeds,
beside the first sampled trials where the CPUs allow; neither TPE nor ASHA takes its results. A
space need not contain those settings (RL Zoo trains CartPole with ``n_steps: 32`` and a
learning rate that decays to zero), and a search that could only choose among other settings
might end below them; a sampled trial replaces them only by scoring higher. The output folder gets:

- ``<agent>_tuned_<task>.yaml``: the agent file with the best complete trial's values in
  ``overrides.<task id>`` (trial 0's: the space's keys as the agent had them), beside
  ``settings/<algo>.yaml``, a copy of the settings it was tuned with, so that
  ``cfc-rl train --agent`` trains it as it was tuned;
- ``trials.csv`` and ``trials.md``: trial (0 first), values, score, steps reached, status
  (complete, pruned by ASHA, error);
- ``scores.png``: score against trial, and the best so far;
- ``trials/<trial id>/seed_<n>``: the trials' run folders (on this machine, or with
  ``--storage``; without it a Ray worker trains in a temporary folder and keeps only the numbers),
  and ``ray_results/``: Ray Tune's own records.

A search that stops before its end (Ctrl-C, a machine that goes away) leaves
``search_state.yaml`` in the output folder: what it trains. Run the same search into the same
folder and it resumes: Ray Tune restores its trials, TPE and ASHA; finished trials keep their
results, unfinished ones start again, their runs resuming from their last checkpoint. A search
of anything else there starts afresh.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import logging
import math
import multiprocessing
import os
import queue as queue_module
import shutil
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cfc_rl.envs import ConfigError
from cfc_rl.envs.config import read_yaml
from cfc_rl.experiment.arguments import positive_int
from cfc_rl.experiment.ray_executor import (
    add_executor_arguments,
    build_on_nodes,
    check_executor_args,
    check_inside_storage,
    connect,
    executor_options,
    extensions_for,
    import_ray,
    make_scratch,
)

if TYPE_CHECKING:  # torch and SB3 load with them: imported where used (cfc-rl --help stays quick)
    from cfc_rl.experiment.jobs import Job
    from cfc_rl.experiment.settings import AgentConfig, TaskSettings
    from cfc_rl.experiment.tasks import Task

__all__ = [
    "Dimension",
    "SearchOutcome",
    "SearchSpace",
    "TrialPlan",
    "add_tune_arguments",
    "load_space",
    "make_plan",
    "search",
    "tune_command",
]

logger = logging.getLogger(__name__)

KINDS = ("loguniform", "uniform", "choice", "randint")
SECTIONS = ("hyperparams", "policy_kwargs", "features_extractor", "wrappers")
VALUES = ("n_envs", "normalize", "frame_stack")
SEED_START = 1000  # trial seeds: 1000, 1001, ... (the benchmarks use 0, 1, 2, ...)
METRIC = "score"  # what trials report: mean return over seeds
REFERENCE = "reference"  # trial 0's config: the agent as it is, no values from the space
SEARCH_STATE = "search_state.yaml"  # in the output folder while a search is unfinished
TRIAL_ORDER = "trial_order.txt"  # in the output folder: the sampled trials' ids as they start
RAY_SIGINT_VARIABLE = "TUNE_DISABLE_SIGINT_HANDLER"
TIME_ATTR = "steps"  # ASHA's clock: environment steps
ASHA_REDUCTION = 3  # ASHA keeps the best third at each rung
ASHA_RUNGS = 3  # rungs at about budget/9, budget/3 (and the budget)

# Choices that Optuna can take as they are; others (lists, mappings) are chosen by index.
_SCALARS = (bool, int, float, str, type(None))


# The search space.


@dataclass(frozen=True)
class Dimension:
    """One dimension of a search space.

    :param key: dotted path into the agent file (``hyperparams.learning_rate``)
    :param kind: ``loguniform``, ``uniform``, ``randint`` or ``choice``
    :param values: ``(low, high)``, or the choices
    """

    key: str
    kind: str
    values: tuple[Any, ...]

    @property
    def by_index(self) -> bool:
        """Whether the searcher picks an index (choices that are lists or mappings)."""
        return self.kind == "choice" and not all(isinstance(v, _SCALARS) for v in self.values)

    @property
    def first(self) -> Any:
        """The lower bound, or the first choice."""
        return self.values[0]

    def corners(self) -> list[Any]:
        """Every value to check: both bounds (``randint``: the largest integer below ``high``),
        or every choice."""
        if self.kind == "choice":
            return list(self.values)
        low, high = self.values
        return [low, high - 1 if self.kind == "randint" else high]

    def domain(self) -> Any:
        """The Ray Tune search domain."""
        from ray import tune as ray_tune

        if self.kind == "choice":
            return ray_tune.choice(
                list(range(len(self.values))) if self.by_index else list(self.values)
            )
        low, high = self.values
        return getattr(ray_tune, self.kind)(low, high)

    def decode(self, sampled: Any) -> Any:
        """The agent-file value of a sampled one (Python types, choices by index resolved)."""
        if hasattr(sampled, "item"):  # numpy scalars
            sampled = sampled.item()
        if self.by_index:
            return copy.deepcopy(self.values[int(sampled)])
        if self.kind == "randint":
            return int(sampled)
        if self.kind in ("uniform", "loguniform"):
            return float(sampled)
        return sampled


@dataclass(frozen=True)
class SearchSpace:
    """A search space: dimensions in file order.

    :param dimensions: the dimensions
    :param source: the space file, for messages
    """

    dimensions: tuple[Dimension, ...]
    source: str = "<dict>"

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> SearchSpace:
        """Validate a parsed space file (its form; values are checked against an agent by
        :func:`make_plan`).

        :param data: the mapping read from YAML
        :param source: the file, for messages
        :raises ConfigError: naming the file and the key
        """
        if not isinstance(data, Mapping) or not data:
            raise ConfigError(
                f"{source}: expected a mapping of dotted agent-file paths to "
                f"{{kind: values}} (kinds: {', '.join(KINDS)}), got {data!r}"
            )
        dimensions = []
        for key, spec in data.items():
            _check_path(key, source)
            if not isinstance(spec, Mapping) or len(spec) != 1:
                raise ConfigError(
                    f"{source}: {key} must be one {{kind: values}} with a kind of "
                    f"{', '.join(KINDS)}, got {spec!r}"
                )
            ((kind, values),) = spec.items()
            if kind not in KINDS:
                raise ConfigError(
                    f"{source}: {key}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}"
                )
            dimensions.append(Dimension(key, kind, _check_values(key, kind, values, source)))
        return cls(tuple(dimensions), source)

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def first(self) -> dict[str, Any]:
        """The lower bounds and first choices."""
        return {d.key: d.first for d in self.dimensions}

    def corners(self) -> Iterator[tuple[str | None, dict[str, Any]]]:
        """Every value of every dimension, one dimension at a time, the others at their first
        value: ``(None, first())`` first, then ``(key, values)`` for each other value."""
        first = self.first()
        yield None, first
        for d in self.dimensions:
            for value in d.corners():
                if value != d.first:
                    yield d.key, {**first, d.key: value}

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's ``param_space``: one domain per dotted key."""
        return {d.key: d.domain() for d in self.dimensions}

    def decode(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's values by dotted key, from its Ray Tune config."""
        return {d.key: d.decode(config[d.key]) for d in self.dimensions}


def _check_path(key: Any, source: str) -> None:
    parts = key.split(".") if isinstance(key, str) else []
    ok = (len(parts) == 2 and parts[0] in SECTIONS and parts[1]) or (
        len(parts) == 1 and parts[0] in VALUES
    )
    if not ok:
        raise ConfigError(
            f"{source}: {key!r} is not a path into an agent file: expected <section>.<key> with "
            f"a section of {', '.join(SECTIONS)}, or one of {', '.join(VALUES)}"
        )


def _check_values(key: str, kind: str, values: Any, source: str) -> tuple[Any, ...]:
    where = f"{source}: {key}: {kind}"
    if not isinstance(values, list):
        raise ConfigError(f"{where} takes a list, got {values!r}")
    if kind == "choice":
        if not values:
            raise ConfigError(f"{where}: the list of choices is empty")
        return tuple(values)
    if len(values) != 2:
        raise ConfigError(f"{where} takes [low, high], got {values!r}")
    low, high = values
    number = int if kind == "randint" else (int, float)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, number):
            expected = "integers" if kind == "randint" else "numbers"
            raise ConfigError(f"{where} takes [low, high] as {expected}, got {values!r}")
    if low >= high:
        raise ConfigError(f"{where}: the range [{low}, {high}] is empty (low must be < high)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: the range [{low}, {high}] must be positive (log scale)")
    return (low, high) if kind == "randint" else (float(low), float(high))


def load_space(path: str | os.PathLike[str]) -> SearchSpace:
    """Read and validate a search-space file.

    :param path: the YAML file
    :raises ConfigError: naming the file and the key
    """
    return SearchSpace.from_dict(read_yaml(path), source=str(path))


def nested(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys as agent-file data: ``{"hyperparams.gamma": 0.9}`` -> ``{"hyperparams":
    {"gamma": 0.9}}``.

    :param values: values by dotted key
    """
    data: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return data


def _merge(base: Mapping[str, Any], partial: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``partial`` merged in, mappings key by key (as the agent files merge)."""
    merged = copy.deepcopy(dict(base))
    for key, value in partial.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **copy.deepcopy(dict(value))}
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# What a trial needs.


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs, as data: the agent file, the task, the space and the protocol.

    :param agent_data: the agent file as read
    :param agent_name: the agent's name
    :param agent_source: the agent file
    :param settings: its algorithm's per-task settings (None without a settings file)
    :param task: the task as loaded
    :param steps: the budget (None: the task file's)
    :param space: the search space
    :param seeds: the seeds every trial trains
    :param device: device of the runs
    :param threads: torch threads of each run
    :param runs: where the trials' run folders are kept (None: a temporary folder per trial)
    :param override_key: the key of ``overrides`` that the values go to
    """

    agent_data: dict[str, Any]
    agent_name: str
    agent_source: str
    settings: TaskSettings | None
    task: Task
    steps: int | None
    space: SearchSpace
    seeds: tuple[int, ...]
    device: str = "cpu"
    threads: int = 1
    runs: str | None = None
    override_key: str = ""

    def agent_file(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The agent file's data with ``values`` (by dotted key) in its overrides for the task.

        :param values: a trial's values
        """
        data = copy.deepcopy(self.agent_data)
        overrides = dict(data.get("overrides") or {})
        overrides[self.override_key] = _merge(
            overrides.get(self.override_key) or {}, nested(values)
        )
        data["overrides"] = overrides
        return data

    def agent(self, values: Mapping[str, Any]) -> AgentConfig:
        """The agent with ``values``, validated (:class:`ConfigError` otherwise).

        :param values: a trial's values
        """
        from cfc_rl.experiment.settings import AgentConfig

        return AgentConfig.from_dict(
            self.agent_file(values),
            name=self.agent_name,
            source=self.agent_source,
            settings=self.settings,
        )

    def resolve(self, values: Mapping[str, Any]) -> tuple[AgentConfig, Task]:
        """The agent with ``values`` and the task, resolved as a run resolves them.

        :param values: a trial's values
        """
        from cfc_rl.experiment.train import resolve

        return resolve(self.agent(values), self.task, self.steps)

    @property
    def budget(self) -> int:
        return self.steps if self.steps is not None else self.task.train.total_timesteps

    def reference_values(self) -> dict[str, Any]:
        """Trial 0's values: each key of the space as the agent has it for the task before the
        search (None where it leaves the key to the library's default)."""
        agent, _ = self.resolve({})
        values = {}
        for key in self.space.keys:
            section, _, name = key.partition(".")
            if name:
                values[key] = copy.deepcopy((getattr(agent, section) or {}).get(name))
            else:
                values[key] = getattr(agent, section)
        return values


def make_plan(
    agent: str | os.PathLike[str],
    task: str | os.PathLike[str],
    space: str | os.PathLike[str] | SearchSpace,
    *,
    seeds: int = 2,
    steps: int | None = None,
    device: str = "cpu",
    threads: int = 1,
    runs: str | os.PathLike[str] | None = None,
    check_model: bool = True,
    before_search: bool = False,
    eval_every: int | None = None,
) -> TrialPlan:
    """Read the agent, the task and the space, and check every value the space can give before
    any trial starts.

    :param agent: the agent file
    :param task: the task file (or a task id)
    :param space: the space file, or a loaded space
    :param seeds: seeds per trial (1000, 1001, ...)
    :param steps: budget of every run (None: the task file's)
    :param device: device of the runs
    :param threads: torch threads of each run
    :param runs: where the trials' run folders are kept (None: temporary folders)
    :param check_model: also build the model with each of these values (it catches policy
        arguments that no schema lists)
    :param before_search: leave out the agent file's overrides for the task, where a finished
        search's choice went (the agent as it was before that search)
    :param eval_every: the trials' evaluation interval (None: the task file's ``eval.every_steps``)
    :raises ConfigError: naming the file and the key or value at fault
    """
    from cfc_rl.experiment.settings import load_agent_config
    from cfc_rl.experiment.tasks import load_task
    from cfc_rl.experiment.train import resolve

    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}")
    space = space if isinstance(space, SearchSpace) else load_space(space)
    loaded = load_agent_config(agent)
    task_cfg = load_task(task)
    if eval_every is not None:
        data = task_cfg.as_dict()
        data["eval"]["every_steps"] = eval_every
        task_cfg = type(task_cfg).from_dict(data, task_cfg.source)
    resolve(loaded, task_cfg, steps)  # the agent as it is runs the task (algorithm, settings)
    data = read_yaml(agent)
    overrides = data.get("overrides") or {}
    key = (
        task_cfg.name
        if task_cfg.name != task_cfg.id and task_cfg.name in overrides
        else task_cfg.id
    )
    if before_search:
        data = {**data, "overrides": {k: v for k, v in overrides.items() if k != key}}
    plan = TrialPlan(
        agent_data=dict(data),
        agent_name=loaded.name,
        agent_source=loaded.source,
        settings=loaded.settings,
        task=task_cfg,
        steps=steps,
        space=space,
        seeds=tuple(range(SEED_START, SEED_START + seeds)),
        device=device,
        threads=threads,
        runs=None if runs is None else str(runs),
        override_key=key,
    )
    # Each value on its own first, so that an error names its key; then the combinations the
    # model is built with (each value with the others' lower bounds and first choices).
    for dimension in space.dimensions:
        for value in dimension.corners():
            _check_values_fit(plan, {dimension.key: value}, f"{dimension.key}: {value!r}")
    for changed, values in space.corners():
        what = (
            "the lower bounds and first choices together"
            if changed is None
            else f"{changed}: {values[changed]!r} with the other lower bounds and first choices"
        )
        _check_values_fit(plan, values, what)
        if check_model:
            _check_model(plan, values, what)
    return plan


def _check_values_fit(plan: TrialPlan, values: Mapping[str, Any], what: str) -> None:
    """Resolve the agent with ``values`` for the task; a :class:`ConfigError` naming the space
    file and ``what`` otherwise."""
    try:
        plan.resolve(values)
    except (ConfigError, ValueError) as e:
        message = str(e).removeprefix(f"{plan.agent_source}: ")
        raise ConfigError(
            f"{plan.space.source}: {what}: not valid in {plan.agent_source}: {message}"
        ) from None


def _check_model(plan: TrialPlan, values: Mapping[str, Any], what: str) -> None:
    """Build the model with ``values`` on the task's environments: the policy takes arguments
    (a cell's) that only its constructor checks."""
    from cfc_rl.experiment.environments import make_env
    from cfc_rl.experiment.train import build_model

    agent, task = plan.resolve(values)
    env = make_env(task, agent, n_envs=task.train.n_envs, seed=0)
    try:
        build_model(agent, env, seed=0, device="cpu", budget=task.train.total_timesteps)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(
            f"{plan.space.source}: {what}: the model of {plan.agent_source} does not build: "
            f"{type(e).__name__}: {e}"
        ) from None
    finally:
        env.close()


# A trial: its seeds side by side, evaluations averaged over seeds.


def run_trial(config: Mapping[str, Any], plan: TrialPlan) -> None:
    """The Ray Tune function trainable: train the plan's seeds with the trial's values and
    report the mean evaluation return over seeds at each periodic evaluation, then the score.

    :param config: the trial's sampled values (Ray Tune's config), or for trial 0 (the agent
        as it is) ``REFERENCE: True``
    :param plan: everything else (:func:`make_plan`)
    """
    from ray import tune as ray_tune

    from cfc_rl.experiment.jobs import Job

    values = {} if _is_trial_0(config) else plan.space.decode(config)
    agent, task = plan.resolve(values)
    trial_id = ray_tune.get_context().get_trial_id() or "trial"
    if plan.runs is not None:
        root, temporary = Path(plan.runs) / trial_id, False
    else:
        root, temporary = make_scratch("trial"), True
    jobs = [
        Job.create(agent, task, seed, root / f"seed_{seed}", plan.device, plan.threads)
        for seed in plan.seeds
    ]
    try:
        final = train_seeds(jobs, ray_tune.report, budget=task.train.total_timesteps)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    # Last: a trial ASHA stops at this report ends here (nothing after it would run).
    ray_tune.report(final)


def train_seeds(
    jobs: Sequence[Job],
    report: Callable[[dict[str, Any]], None],
    budget: int,
    poll_s: float = 1.0,
    processes: bool | None = None,
) -> dict[str, Any]:
    """Train the jobs (one seed each) in processes of their own, side by side; report the
    mean return over seeds of each periodic evaluation before the budget once every seed has
    reached it.

    :param jobs: the trial's jobs
    :param report: called with ``{"score", "steps", "final": False}`` per evaluation
    :param budget: the runs' budget (the evaluation at it is left to the final result)
    :param poll_s: how long to wait for a message before checking that the processes live
    :param processes: train each seed in a process of its own (None: when there are several)
    :return: ``{"score": mean final return, "steps": least steps reached, "final": True,
        "returns": per-seed final returns}``
    :raises RuntimeError: if a seed's run fails (with its traceback) or its process dies
    """
    from cfc_rl.experiment.jobs import run_job

    if not (len(jobs) > 1 if processes is None else processes):
        records = {}
        for job in jobs:  # one after the other, here: nothing to average while they run

            def evaluated(steps: int, mean_return: float) -> None:
                if len(jobs) == 1 and steps < budget:
                    report({METRIC: mean_return, TIME_ATTR: steps, "final": False})

            records[job.seed] = run_job(job, on_evaluation=evaluated)
        return _final(jobs, records)
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    children = {
        job.seed: context.Process(
            target=_train_seed, args=(job, messages), daemon=True, name=f"seed_{job.seed}"
        )
        for job in jobs
    }
    for process in children.values():
        process.start()
    evaluations: dict[int, dict[int, float]] = {}
    records: dict[int, dict[str, Any]] = {}
    last_reported = -1
    silent_with_dead = 0
    try:
        while len(records) < len(jobs):
            try:
                kind, seed, *payload = messages.get(timeout=poll_s)
            except queue_module.Empty:
                dead = [
                    (s, p.exitcode)
                    for s, p in children.items()
                    if s not in records and p.exitcode is not None
                ]
                # Once more after seeing one dead: what it sent before exiting may be on its way.
                silent_with_dead = silent_with_dead + 1 if dead else 0
                if silent_with_dead >= 2:
                    seed, code = dead[0]
                    raise RuntimeError(
                        f"the process of seed {seed} died (exit code {code})"
                    ) from None
                continue
            silent_with_dead = 0
            if kind == "failed":
                raise RuntimeError(f"seed {seed} failed:\n{payload[0]}")
            if kind == "done":
                records[seed] = payload[0]
                continue
            steps, value = payload
            evaluations.setdefault(steps, {})[seed] = value
            for step in sorted(evaluations):
                if step <= last_reported or len(evaluations[step]) < len(jobs):
                    continue
                if step >= budget:
                    break
                mean = sum(evaluations[step].values()) / len(jobs)
                report({METRIC: mean, TIME_ATTR: step, "final": False})
                last_reported = step
    finally:
        for process in children.values():
            if process.is_alive():
                process.terminate()
        for process in children.values():
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        messages.close()
    return _final(jobs, records)


def _final(jobs: Sequence[Job], records: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """The trial's last report: the mean final return over seeds."""
    returns = [records[job.seed]["final_mean_return"] for job in jobs]
    return {
        METRIC: sum(returns) / len(returns),
        TIME_ATTR: min(records[job.seed]["num_timesteps"] for job in jobs),
        "final": True,
        "returns": returns,
    }


def _train_seed(job: Job, messages: Any) -> None:
    """A seed's process: :func:`~.jobs.run_job`, its evaluations and its end sent to the trial."""
    from cfc_rl.experiment.jobs import run_job

    _exit_with_parent()

    def evaluated(steps: int, mean_return: float) -> None:
        messages.put(("evaluation", job.seed, steps, mean_return))

    try:
        record = run_job(job, on_evaluation=evaluated)
    except BaseException:
        messages.put(("failed", job.seed, traceback.format_exc()))
        return
    messages.put(("done", job.seed, record))


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process when its parent dies (a trial's actor killed by Ray)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


# The search.


@dataclass
class SearchOutcome:
    """What a search found and wrote.

    :param rows: one per trial: ``trial``, the values by dotted key, ``score``, ``steps``,
        ``status`` ("complete", "pruned" or "error"), ``trial_id``, ``error``
    :param best: the best complete trial's row (None if no trial completed)
    :param agent_file: the agent file with the best values (None if no trial completed)
    :param files: every file written
    """

    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    agent_file: Path | None
    files: list[Path] = field(default_factory=list)


def search(
    agent: str | os.PathLike[str],
    task: str | os.PathLike[str],
    space: str | os.PathLike[str],
    *,
    trials: int = 50,
    seeds: int = 2,
    steps: int | None = None,
    out: str | os.PathLike[str] = "runs/tune",
    executor: str = "local",
    address: str | None = None,
    cpus_per_job: float = 1.0,
    max_retries: int = 2,
    storage: str | os.PathLike[str] | None = None,
    device: str = "cpu",
    search_seed: int = 0,
    grace_steps: int | None = None,
    eval_every: int | None = None,
    verbose: int = 0,
    init_kwargs: Mapping[str, Any] | None = None,
    only_trial_0: bool = False,
    before_search: bool = False,
) -> SearchOutcome:
    """Search the space with Ray Tune: Optuna's TPE proposes, ASHA stops trials that are behind.

    :param agent: the agent file
    :param task: the task file (or a task id)
    :param space: the search-space file (see the module docstring)
    :param trials: number of sampled trials (trial 0, the agent as it is, comes on top)
    :param seeds: seeds each trial trains (1000, 1001, ...), side by side
    :param steps: budget of every run (None: the task file's ``train.total_timesteps``)
    :param out: the output folder (see the module docstring)
    :param executor: ``"local"`` (a private Ray on this machine) or ``"ray"`` (the cluster at
        ``address``)
    :param address: the Ray cluster (see :func:`~.ray_executor.connect`)
    :param cpus_per_job: CPUs per run; a trial reserves ``seeds`` times as many (each run
        keeps one torch thread)
    :param max_retries: times a trial that fails (its process died, a run raised) starts again
    :param storage: a folder all nodes share, holding ``out``: the trials' run folders are kept
        there
    :param device: device of the runs
    :param search_seed: seed of the TPE sampler
    :param grace_steps: ASHA's first rung (default :func:`first_rung`)
    :param eval_every: the trials' evaluation interval, where ASHA compares them (default: the
        task file's ``eval.every_steps``)
    :param verbose: Ray Tune's console output (0 silent, 1 a status table now and then)
    :param init_kwargs: more arguments of ``ray.init`` when this call starts Ray
    :param only_trial_0: add trial 0 to the search in ``out``, made before searches began with
        it, instead of searching: its sampled trials stay, and its choice changes only if trial
        0 scores higher. Trial 0 is then the agent as it was before that search, without its
        overrides for the task (where the search's choice went).
    :param before_search: search from the agent without its overrides for the task (trial 0
        and the values every trial starts from), where an earlier search's choice went
    :raises ConfigError: for bad input (with ``only_trial_0``: ``out`` holds no search of this
        space, or one with trial 0), before any trial starts
    :raises RayUnavailable: without Ray
    """
    if trials < 1:
        raise ConfigError(f"trials must be at least 1, got {trials}")
    check_executor_args(
        argparse.Namespace(
            executor=executor,
            address=address,
            storage=storage,
            cpus_per_job=cpus_per_job,
            max_retries=max_retries,
        )
    )
    out = Path(out).absolute()
    if storage is not None:
        out = check_inside_storage(out, storage)
    keep_runs = executor == "local" or storage is not None
    plan = make_plan(
        agent,
        task,
        space,
        seeds=seeds,
        steps=steps,
        device=device,
        runs=str(out / "trials") if keep_runs else None,
        before_search=only_trial_0 or before_search,
        eval_every=eval_every,
    )
    sampled: list[dict[str, Any]] = []
    if only_trial_0:
        if not (out / "trials.csv").exists():
            raise ConfigError(f"{out}: no trials.csv: search without only_trial_0")
        sampled = read_rows(out / "trials.csv", plan)
        if any(row["trial"] == 0 for row in sampled):
            raise ConfigError(f"{out / 'trials.csv'} already has trial 0")
    import_ray()
    out.mkdir(parents=True, exist_ok=True)
    resume = _start_or_resume(plan, out, trials, search_seed, grace_steps, only_trial_0)
    connected_here = connect("local" if executor == "local" else address, **(init_kwargs or {}))
    # Ray Tune's own Ctrl-C handler would end the search quietly, as if its unfinished trials
    # were complete, and stay installed after it: Ctrl-C is KeyboardInterrupt here instead.
    ray_sigint_setting = os.environ.get(RAY_SIGINT_VARIABLE)
    os.environ[RAY_SIGINT_VARIABLE] = "1"
    try:
        resolved, _ = plan.resolve(plan.space.first())
        build_on_nodes(extensions_for([{"name": resolved.name, **resolved.as_dict()}]))
        reference, results = _fit(
            plan,
            0 if only_trial_0 else trials,
            out,
            cpus_per_job,
            max_retries,
            search_seed,
            grace_steps,
            verbose,
            resume,
        )
        if not only_trial_0:
            sampled = _rows(plan, results, _started_order(out))
    except KeyboardInterrupt:
        raise SearchInterrupted(
            f"search stopped: {out} keeps its finished trials, and the same search resumes them"
        ) from None
    finally:
        if ray_sigint_setting is None:
            os.environ.pop(RAY_SIGINT_VARIABLE, None)
        else:
            os.environ[RAY_SIGINT_VARIABLE] = ray_sigint_setting
        if connected_here:
            import_ray().shutdown()
    outcome = _write_outcome(plan, [_reference_row(plan, reference), *sampled], out, len(sampled))
    (out / SEARCH_STATE).unlink()
    (out / TRIAL_ORDER).unlink(missing_ok=True)
    return outcome


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a search; its output folder keeps what it needs to resume."""


def _search_state(
    plan: TrialPlan,
    trials: int,
    search_seed: int,
    grace_steps: int | None,
    only_trial_0: bool,
) -> str:
    """What a search trains, as text: a search left unfinished in the same folder is resumed
    only if it trained exactly this."""
    from cfc_rl.experiment.runs import dump_yaml

    agent, task = plan.resolve({})
    # the agent as it trains on this task: the agent file's overrides for other tasks, which
    # their searches write, change nothing here
    return dump_yaml(
        {
            "agent": agent.as_dict(),
            "task": task.as_dict(),
            "space": [[d.key, d.kind, list(d.values)] for d in plan.space.dimensions],
            "seeds": list(plan.seeds),
            "device": plan.device,
            "trials": trials,
            "search_seed": search_seed,
            "grace_steps": grace_steps,
            "only_trial_0": only_trial_0,
        }
    )


def _start_or_resume(
    plan: TrialPlan,
    out: Path,
    trials: int,
    search_seed: int,
    grace_steps: int | None,
    only_trial_0: bool,
) -> bool:
    """Whether ``out`` holds an unfinished search of exactly this plan (its ``SEARCH_STATE``
    file, removed when a search completes), to resume; otherwise note this one as started
    (:func:`_fit` clears Ray Tune's records of an earlier search)."""
    from cfc_rl.experiment.runs import atomic_write_text

    state = _search_state(plan, trials, search_seed, grace_steps, only_trial_0)
    path = out / SEARCH_STATE
    if path.exists():
        saved = path.read_text()
        if saved == state:
            logger.info(
                "tune: resuming the unfinished search in %s: finished trials are kept, and it "
                "runs as many trials at once as when it began",
                out,
            )
            return True
        before, now = yaml.safe_load(saved) or {}, yaml.safe_load(state)
        differ = [k for k in {**before, **now} if before.get(k) != now.get(k)] or ["its records"]
        logger.warning(
            "tune: %s holds an unfinished search of other settings (what differs: %s); "
            "starting afresh",
            out,
            ", ".join(differ),
        )
    atomic_write_text(path, state)
    return False


def first_rung(budget: int, eval_every: int) -> int:
    """ASHA's first rung by default: a ninth of the budget (the rungs then fall at a ninth and
    a third of it), or one evaluation interval where that is longer (trials are compared at
    their evaluations)."""
    return max(eval_every, budget // ASHA_REDUCTION ** (ASHA_RUNGS - 1))


def _experiment_path(plan: TrialPlan, out: Path) -> Path:
    """Ray Tune's folder of the search."""
    return out / "ray_results" / f"{plan.agent_name}_{plan.task.name}"


def _trainable(plan: TrialPlan, cpus_per_job: float) -> Any:
    """:func:`run_trial` for Ray Tune, with the plan and the resources of a trial (a CPU per
    seed, the GPU for CUDA runs)."""
    from ray import tune as ray_tune

    resources = {"cpu": len(plan.seeds) * cpus_per_job, "gpu": 1 if plan.device == "cuda" else 0}
    return ray_tune.with_resources(ray_tune.with_parameters(run_trial, plan=plan), resources)


def _fit(
    plan: TrialPlan,
    trials: int,
    out: Path,
    cpus_per_job: float,
    max_retries: int,
    search_seed: int,
    grace_steps: int | None,
    verbose: int,
    resume: bool,
) -> tuple[Any, list[Any]]:
    """Ray Tune's run of trial 0 and ``trials`` sampled trials: the Tuner, its searcher and
    scheduler (restored with them when resuming).

    Trial 0 is the searcher's first suggestion and trains side by side with the first sampled
    ones (one seed uses one CPU: it would leave the others idle); neither TPE nor ASHA sees it.

    :return: trial 0's result and the sampled trials' results
    """
    import optuna
    import ray
    from ray import tune as ray_tune
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial otherwise
    budget = plan.budget
    grace = grace_steps or first_rung(budget, plan.task.eval.every_steps)
    cpus = len(plan.seeds) * cpus_per_job
    slots = max(1, int(ray.cluster_resources().get("CPU", 0.0) // cpus))
    path = _experiment_path(plan, out)
    restored = resume and ray_tune.Tuner.can_restore(str(path))
    if restored:
        # finished trials keep their results; unfinished ones start again, their runs resuming
        # from their checkpoints; errored ones too: Ctrl-C reaches the trials' processes, which
        # can fail before Ray saves
        tuner = ray_tune.Tuner.restore(
            str(path),
            trainable=_trainable(plan, cpus_per_job),
            resume_unfinished=True,
            resume_errored=True,
        )
    else:
        shutil.rmtree(path, ignore_errors=True)
        (out / TRIAL_ORDER).unlink(missing_ok=True)
        reference = {REFERENCE: True, **dict.fromkeys(plan.space.keys)}
        scheduler = _asha_without_trial_0(
            time_attr=TIME_ATTR,
            max_t=budget,
            grace_period=min(grace, budget),
            reduction_factor=ASHA_REDUCTION,
        )
        tuner = ray_tune.Tuner(
            _trainable(plan, cpus_per_job),
            param_space=plan.space.param_space(),
            tune_config=ray_tune.TuneConfig(
                metric=METRIC,
                mode="max",
                search_alg=_trial_0_first(
                    reference,
                    OptunaSearch(sampler=optuna.samplers.TPESampler(seed=search_seed)),
                ),
                scheduler=scheduler,
                num_samples=trials + 1,
                max_concurrent_trials=slots,  # TPE proposes from more finished trials
            ),
            run_config=ray_tune.RunConfig(
                name=path.name,
                storage_path=str(path.parent),
                failure_config=ray_tune.FailureConfig(max_failures=max_retries),
                callbacks=[_progress_callback(trials, out), _saved_rungs(scheduler)],
                verbose=verbose,
            ),
        )
    logger.info(
        "tune: trial 0 (the agent as it is) and %d sampled trials of %s on %s, %d seed(s) "
        "each, %d steps%s",
        trials,
        plan.agent_name,
        plan.task.name,
        len(plan.seeds),
        budget,
        "" if restored else f", about {slots} at once",
    )
    with warnings.catch_warnings():
        # A resumed trial counts Ray's iterations from 1 again, so Optuna hears of steps it has
        # recorded and warns once per step; it keeps the first value, and no intermediate value
        # steers this search (ASHA stops trials on env steps; TPE reads the final scores of
        # complete trials, pruned ones reach it as pruned).
        warnings.filterwarnings("ignore", "The reported value is ignored", UserWarning)
        results = list(tuner.fit())
    (first,) = [r for r in results if _is_trial_0(r.config or {})]
    return first, [r for r in results if r is not first]


def _is_trial_0(config: Mapping[str, Any]) -> bool:
    """Whether a trial's Ray Tune config is trial 0's (the agent as it is)."""
    return bool(config.get(REFERENCE))


def _trial_0_first(reference: dict[str, Any], searcher: Any) -> Any:
    """A Ray Tune searcher that suggests ``reference`` (trial 0) first, then ``searcher``'s
    trials; trial 0's results never reach ``searcher``."""
    from ray.tune.search import Searcher

    class TrialZeroFirst(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.searcher = searcher
            self.reference_id: str | None = None

        def set_search_properties(self, metric: Any, mode: Any, config: Any, **spec: Any) -> bool:
            self._metric, self._mode = metric, mode
            return self.searcher.set_search_properties(metric, mode, config, **spec)

        def set_max_concurrency(self, max_concurrent: int) -> bool:
            return self.searcher.set_max_concurrency(max_concurrent)

        def suggest(self, trial_id: str) -> Any:
            if self.reference_id is None:
                self.reference_id = trial_id
                return dict(reference)
            return self.searcher.suggest(trial_id)

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id != self.reference_id:
                self.searcher.on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: Any = None, error: bool = False) -> None:
            if trial_id == self.reference_id:
                return
            if not error and not (result or {}).get("final"):
                # Stopped by ASHA at a rung: its last result is an early evaluation, which
                # Optuna would record as a final score; without a result it records the
                # trial as pruned, and TPE learns from complete trials only.
                result = None
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

        # Ray Tune saves a wrapper's state with these and the searcher it wraps on its own
        def get_state(self) -> dict[str, Any]:
            return {"reference_id": self.reference_id}

        def set_state(self, state: dict[str, Any]) -> None:
            self.reference_id = state["reference_id"]

    return TrialZeroFirst()


def _asha_without_trial_0(**asha: Any) -> Any:
    """Ray Tune's ASHA scheduler, except for trial 0: it trains in full, and its results
    take no place in the rungs."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class ASHAWithoutTrial0(ASHAScheduler):
        def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
            if not _is_trial_0(trial.config):
                super().on_trial_add(tune_controller, trial)

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            if _is_trial_0(trial.config):
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            if not _is_trial_0(trial.config):
                super().on_trial_complete(tune_controller, trial, result)

        def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
            if not _is_trial_0(trial.config):
                super().on_trial_remove(tune_controller, trial)

    return ASHAWithoutTrial0(**asha)


def _saved_rungs(scheduler: Any) -> Any:
    """A Ray Tune callback that saves the scores ``scheduler`` (ASHA) recorded at its rungs with
    the search's state, and puts them back when the search resumes. Ray Tune saves the
    searcher's state and the callbacks', not the scheduler's: its rungs would start empty and
    stop fewer trials than in a search that was never stopped. Both are in the same snapshot,
    so a trial still running in it has the rungs it had passed, and passes them again."""
    from ray.tune import Callback

    class SavedRungs(Callback):
        def get_state(self) -> dict[str, Any]:
            return {"rungs": [[dict(r) for _, r in b._rungs] for b in scheduler._brackets]}

        def set_state(self, state: dict[str, Any]) -> None:
            for bracket, saved in zip(scheduler._brackets, state["rungs"], strict=True):
                for (_, recorded), scores in zip(bracket._rungs, saved, strict=True):
                    recorded.clear()
                    recorded.update(scores)

    return SavedRungs()


def _started_order(out: Path) -> dict[str, int]:
    """The sampled trials' ids in the order they first started (``TRIAL_ORDER``)."""
    path = out / TRIAL_ORDER
    ids = path.read_text().split() if path.exists() else []
    return {trial_id: n for n, trial_id in enumerate(dict.fromkeys(ids))}


def _progress_callback(sampled: int, out: Path) -> Any:
    """A Ray Tune callback that logs one line per finished trial and appends each sampled
    trial's id to ``out/TRIAL_ORDER`` when it starts (their ids are random; the file outlives
    a search that is stopped and resumed, the callback's memory does not)."""
    from ray.tune import Callback

    order = out / TRIAL_ORDER

    def number(trial: Any) -> int:
        if _is_trial_0(trial.config):
            return 0
        return _started_order(out).get(trial.trial_id, -1) + 1

    class Progress(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if not _is_trial_0(trial.config):
                with order.open("a") as f:
                    f.write(f"{trial.trial_id}\n")

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            how = "complete" if result.get("final") else "pruned"
            self._line(trials, trial, f"{how} at {result.get(TIME_ATTR, 0):,} steps, score "
                       f"{result.get(METRIC, float('nan')):.1f}")  # fmt: skip

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trials, trial, "failed")

        def _line(self, trials: list, trial: Any, what: str) -> None:
            others = [t for t in trials if t is not trial]
            finished = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in others)
            running = sum(t.status == "RUNNING" for t in others)
            logger.info(
                "tune: %d/%d finished, %d running; trial %d (%s) %s",
                finished,
                sampled + 1,
                running,
                number(trial),
                trial.trial_id,
                what,
            )

    return Progress()


def _entry(plan: TrialPlan, result: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's row (without its number) from its Ray Tune result."""
    metrics = result.metrics or {}
    if result.error is not None:
        status = "error"
    elif metrics.get("final"):
        status = "complete"
    else:
        status = "pruned"
    return {
        "trial_id": metrics.get("trial_id") or Path(result.path).name,
        **{key: values.get(key) for key in plan.space.keys},
        "score": metrics.get(METRIC),
        "steps": metrics.get(TIME_ATTR),
        "status": status,
        "error": "" if result.error is None else str(result.error).splitlines()[0],
    }


def _reference_row(plan: TrialPlan, result: Any) -> dict[str, Any]:
    """Trial 0's row: the space's keys as the agent has them."""
    return {"trial": 0, **_entry(plan, result, plan.reference_values())}


def _rows(plan: TrialPlan, results: Any, order: Mapping[str, int]) -> list[dict[str, Any]]:
    """One row per sampled trial, numbered from 1 in the order the trials started."""
    entries = []
    for result in results:
        config = result.config or {}
        values = plan.space.decode(config) if all(k in config for k in plan.space.keys) else {}
        entries.append(_entry(plan, result, values))

    def started(entry: dict[str, Any]) -> tuple[int, str]:
        return (order.get(entry["trial_id"], sys.maxsize), str(entry["trial_id"]))

    return [{"trial": n, **entry} for n, entry in enumerate(sorted(entries, key=started), 1)]


def read_rows(path: str | os.PathLike[str], plan: TrialPlan) -> list[dict[str, Any]]:
    """The rows of a ``trials.csv`` as :func:`search` wrote them (values parsed back).

    :raises ConfigError: if its columns are not those of ``plan``'s space
    """
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = ["trial", *plan.space.keys, "score", "steps", "status", "trial_id", "error"]
        if reader.fieldnames != fields:
            raise ConfigError(
                f"{path}: its columns {reader.fieldnames} are not those of a search of "
                f"{plan.space.source} ({fields})"
            )
        rows = []
        for cells in reader:
            rows.append(
                {
                    "trial": int(cells["trial"]),
                    **{k: _parse_cell(cells[k]) for k in plan.space.keys},
                    "score": float(cells["score"]) if cells["score"] else None,
                    "steps": int(cells["steps"]) if cells["steps"] else None,
                    "status": cells["status"],
                    "trial_id": cells["trial_id"],
                    "error": cells["error"],
                }
            )
    return rows


def _parse_cell(text: str) -> Any:
    """A value as :func:`_write_csv` wrote it: a number, YAML (lists, mappings, strings), or
    blank for None (YAML alone would read ``1e-05`` as a string)."""
    if not text:
        return None
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The complete trial with the highest score; on a tie the earliest, so that a sampled
    trial replaces trial 0 (the agent as it was) only by scoring higher."""
    complete = [r for r in rows if r["status"] == "complete" and r[METRIC] is not None]
    return max(complete, key=lambda r: (r[METRIC], -r["trial"])) if complete else None


def _write_outcome(
    plan: TrialPlan, rows: list[dict[str, Any]], out: Path, trials: int
) -> SearchOutcome:
    """The table, the plot and the best agent file."""
    from cfc_rl.experiment.runs import atomic_write_text

    files = [out / "trials.csv", out / "trials.md", out / "scores.png"]
    best = best_row(rows)
    atomic_write_text(files[1], trials_markdown(plan, rows, best))
    _plot(files[2], plan, rows, best)
    agent_file = None
    if best is not None:
        agent_file = _write_agent_file(plan, best, out, trials)
        files.append(agent_file)
    _write_csv(files[0], plan, rows)  # last: the benchmark takes it as the search's end
    return SearchOutcome(rows=rows, best=best, agent_file=agent_file, files=files)


def _cell(value: Any) -> str:
    """A value for a table cell."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return "" if value is None else str(value)


def _write_csv(path: Path, plan: TrialPlan, rows: list[dict[str, Any]]) -> None:
    from cfc_rl.experiment.runs import atomic_write_text

    text = io.StringIO()
    fields = ["trial", *plan.space.keys, "score", "steps", "status", "trial_id", "error"]
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: (_cell(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()}
        )
    atomic_write_text(path, text.getvalue())


def trials_markdown(
    plan: TrialPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None
) -> str:
    """The table of trials as Markdown, best first.

    :param plan: the search's plan
    :param rows: the trials (:class:`SearchOutcome`)
    :param best: the best complete trial
    """
    seeds = plan.seeds
    lines = [
        f"### {plan.agent_name} on {plan.task.name} ({plan.budget:,} steps, {len(rows)} trials)",
        "",
        f"Score: the mean over {len(seeds)} seed(s) ({seeds[0]}..{seeds[-1]}) of the final "
        "return (complete trials), or of the last evaluation reported to ASHA (pruned trials). "
        "Trial 0 is the agent as it was before the search (a blank value: the library's "
        "default), trained in full; a sampled trial replaces it only by scoring higher.",
        "",
        "| trial | " + " | ".join(plan.space.keys) + " | score | steps | status |",
        "|---:|" + "---:|" * len(plan.space.keys) + "---:|---:|---|",
    ]

    def rank(row: dict[str, Any]) -> tuple[int, float]:
        status = {"complete": 0, "pruned": 1}.get(row["status"], 2)
        return (status, -(row["score"] if row["score"] is not None else -math.inf))

    for row in sorted(rows, key=rank):
        mark = " (before the search)" if row["trial"] == 0 else ""
        mark += " (best)" if best is not None and row["trial"] == best["trial"] else ""
        cells = [_cell(row[k]) for k in plan.space.keys]
        steps = f"{row['steps']:,}" if isinstance(row["steps"], int) else _cell(row["steps"])
        lines.append(
            f"| {row['trial']}{mark} | " + " | ".join(cells) + f" | {_cell(row['score'])} "
            f"| {steps} | {row['status']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(
    path: Path, plan: TrialPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None
) -> None:
    """Score against trial: complete and pruned trials, the best so far."""
    import matplotlib

    from cfc_rl.experiment.runs import atomic_write

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for status, marker, color in (("complete", "o", "C0"), ("pruned", "x", "0.5")):
        points = [(r["trial"], r[METRIC]) for r in rows if r["status"] == status]
        points = [(t, s) for t, s in points if s is not None]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=status)
    complete = sorted((r["trial"], r[METRIC]) for r in rows if r["status"] == "complete")
    if complete:
        best_so_far, running = [], -math.inf
        for trial, score in complete:
            running = max(running, score)
            best_so_far.append((trial, running))
        ax.step(*zip(*best_so_far, strict=True), where="post", color="C1", label="best so far")
    if best is not None:
        ax.annotate(
            f"best: trial {best['trial']}, {best[METRIC]:.1f}",
            (best["trial"], best[METRIC]),
            xytext=(-6, -12),
            textcoords="offset points",
            ha="right",
            fontsize="small",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"score (mean return over {len(plan.seeds)} seed(s))")
    ax.set_title(f"{plan.agent_name} on {plan.task.name}, {plan.budget:,} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _write_agent_file(plan: TrialPlan, best: dict[str, Any], out: Path, trials: int) -> Path:
    """The agent file with the best values in its overrides for the task, and a copy of its
    settings beside it."""
    from cfc_rl.experiment.runs import atomic_write_text, dump_yaml
    from cfc_rl.experiment.settings import SETTINGS_FOLDER

    # trial 0's blanks are keys the agent leaves to the library's default: not written
    values = {k: best[k] for k in plan.space.keys if best[k] is not None}
    path = out / f"{plan.agent_name}_tuned_{plan.task.name}.yaml"
    which = "the agent as it was" if best["trial"] == 0 else f"trial {best['trial']}"
    header = [
        f"# {plan.agent_name} tuned on {plan.task.name} ({plan.task.id}) by cfc-rl tune:",
        f"# the best of trial 0 and {trials} sampled trials (space {plan.space.source}; "
        f"{len(plan.seeds)} seed(s) from {plan.seeds[0]}, {plan.budget:,} steps),",
        f"# mean final return {best[METRIC]:.2f} ({which}). The chosen values are "
        f"in overrides.{plan.override_key};",
        f"# {SETTINGS_FOLDER}/ beside this file is a copy of the settings it was tuned with.",
    ]
    original = Path(plan.agent_source).read_text()
    if "overrides" not in plan.agent_data:
        entry = plan.agent_file(values)["overrides"][plan.override_key]
        tail = {"overrides": {plan.override_key: entry}}
        body = original.rstrip("\n") + "\n" + dump_yaml(tail)
    else:  # the overrides change: the file is written anew (without its comments)
        body = dump_yaml(plan.agent_file(values))
    atomic_write_text(path, "\n".join(header) + "\n" + body)
    if plan.settings is not None:
        target = out / SETTINGS_FOLDER / Path(plan.settings.source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.settings.source, target)
    return path


# The command.


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cfc-rl tune``.

    :param parser: the command's parser
    """
    parser.add_argument("--agent", required=True, help="agent file, e.g. agents/ppo_cfc.yaml")
    parser.add_argument("--task", required=True, help="task file, e.g. envs/pendulum_p.yaml")
    parser.add_argument(
        "--space", required=True, help="search-space file, e.g. agents/spaces/cfc.yaml"
    )
    parser.add_argument(
        "--trials", type=positive_int, default=50, help="number of trials (default 50)"
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=2,
        help=f"seeds per trial, from {SEED_START} (default 2); the score is their mean",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="budget of every run (default: the task file's train.total_timesteps)",
    )
    parser.add_argument("--out", default="runs/tune", help="output folder (default runs/tune)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    add_executor_arguments(parser)


def tune_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``cfc-rl tune``: run the search, print the table and where the files are.

    :param args: the parsed options of :func:`add_tune_arguments`
    :param parser: the command's parser (for usage errors)
    :return: the exit code (1 when no trial completed)
    """
    outcome = search(
        args.agent,
        args.task,
        args.space,
        trials=args.trials,
        seeds=args.seeds,
        steps=args.steps,
        out=args.out,
        device=args.device,
        **executor_options(args),
    )
    print()
    print(Path(outcome.files[1]).read_text())
    print(f"written: {', '.join(os.path.relpath(f) for f in outcome.files)}")
    if outcome.best is None:
        print("no trial completed: see the errors above and in trials.csv", file=sys.stderr)
        return 1
    agent_file = os.path.relpath(outcome.agent_file)
    print(f"train it with: cfc-rl train --agent {agent_file} --task {args.task}")
    return 0
