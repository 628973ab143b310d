"""The benchmark study: a grid of tasks x agents x seeds whose runs accumulate in the repository,
and the one command that turns them into the report.

The grid is a YAML file (``results/benchmark/grid.yaml``)::

    runs: runs                      # the run folders, relative to this file
    zero: ppo_mlp                   # normalisation: this agent's mean return on a task is 0 ...
    focus: [ppo_cfc]                # agents whose probability of improvement is reported
    agent_sets:                     # named lists of agent files
      ppo: [agents/ppo_cfc.yaml, agents/ppo_mlp.yaml]
    headline_in: README.md          # optional: the report's headline goes between its markers
    tuning:                         # the search every agent gets on every task before its runs
      trials: 8                     # sampled trials (trial 0, the agent as it is, comes on top)
      seeds: 2                      # seeds per trial (from 1000)
      spaces: {ppo_cfc: agents/spaces/cfc.yaml, ppo_mlp: agents/spaces/mlp.yaml}
    tiers:
      classic:
        seeds: 5                    # seeds 0..4 (or a list of seeds)
        tuning: {seeds: 1}          # optional: the tier's own trials or seeds for its searches
        tasks:
          - {task: envs/pendulum_p.yaml, steps: 100000, agents: [ppo, agents/sac_mlp.yaml]}
          - task: envs/halfcheetah_p.yaml
            steps: 500000
            agents: [ppo]
            agent_steps: {ppo_ltc: 200000}   # a smaller budget for an agent that costs more

``agents`` of a task names agent sets or agent files. ``agent_steps`` gives an agent a smaller
budget than the task's where the task's is more than it can afford: it is searched and run at
that budget, and the report writes the budget beside its rows.

:func:`run_benchmark` trains the grid's runs that are not complete into
``<runs>/<task>/<agent>/seed_<n>`` (the layout of ``cfc-rl compare``), so a study grows across
machines: the repository keeps each run's small files (``config.yaml``, ``result.json``,
``evaluations.*``), and a run whose ``result.json`` is committed is never trained again. A
complete run trained with other settings than the agent file now gives is an error, not a
silent mix.

:func:`report` reads only those small files and writes, beside the grid:

- ``README.md``: per tier, the aggregate over tasks of normalised scores (IQM and mean with 95%
  stratified-bootstrap intervals, rliable), the probability that each focus agent improves on
  every other agent with its verdict (wins: the interval lies above 0.5; loses: below; ties:
  it holds 0.5) and what it costs (the ratio of training steps/s), and per task the final
  returns, wall clock, steps/s and parameters;
- ``headline.md``: per tier, the normalised scores with each focus agent's probability of
  improvement and speed ratio (its training steps/s over the other's), in one table, all over
  the same tasks (while a tier is incomplete, those of the most agents); with
  ``headline_in``, the report also writes it into that file between the lines
  :data:`HEADLINE_BEGIN` and :data:`HEADLINE_END` (the project's README);
- ``summary.csv``, ``aggregate.csv``, ``improvement.csv``: the same numbers, unrounded;
- ``curves_<tier>_<task>.png`` and ``curves_time_<tier>_<task>.png``: IQM return against
  environment steps and against training time (a task can be in several tiers);
  ``profiles_<tier>.png``: performance profiles.

Normalisation, per task: ``(return - zero) / (best - zero)`` where ``zero`` is the mean final
return of the tier's ``zero`` agent and ``best`` the highest mean final return of any agent on
the task; so the memoryless agent scores 0 and the best agent 1. A task is left out of the
aggregates, and the report says why, until the zero agent has a run of every seed, and where no
agent's mean lies above the 95% interval of the zero agent's mean (the task does not tell memory
from none, and the small gap would scale noise into large negative scores)."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cfc_rl.envs import ConfigError
from cfc_rl.envs.config import read_yaml
from cfc_rl.experiment.compare import interval_columns, plan_jobs, plot_curves
from cfc_rl.experiment.executors import Executor, JobResult
from cfc_rl.experiment.jobs import Job, refuse_stale
from cfc_rl.experiment.runs import (
    RunFolder,
    atomic_write,
    atomic_write_text,
    write_csv,
)
from cfc_rl.experiment.statistics import iqm_and_mean_intervals, probability_of_improvement_interval

__all__ = [
    "Grid",
    "GridTask",
    "Tier",
    "estimate_seconds",
    "load_grid",
    "measured_speeds",
    "plan",
    "report",
    "run_benchmark",
    "untuned",
]

logger = logging.getLogger(__name__)

GRID_KEYS = ("runs", "zero", "focus", "agent_sets", "tiers", "tuning", "headline_in")
TUNING_KEYS = ("trials", "seeds", "spaces")
TIER_KEYS = ("seeds", "tasks", "zero", "focus", "tuning")
TASK_KEYS = ("task", "steps", "agents", "reference", "agent_steps")
REFERENCE_KEYS = ("agent", "return", "source")


@dataclass(frozen=True)
class GridTask:
    """One task of a tier: its file, its budget, the agent files that run on it, a published
    figure one of them must reach (``{agent, return, source}``), if there is one, and the
    agents with a smaller budget than the task's (``agent_steps``: (agent name, steps) pairs)."""

    task: str
    name: str
    steps: int
    agents: tuple[str, ...]
    reference: Mapping[str, Any] | None = None
    agent_steps: tuple[tuple[str, int], ...] = ()

    @property
    def agent_names(self) -> tuple[str, ...]:
        return tuple(Path(a).stem for a in self.agents)

    def steps_for(self, agent: str) -> int:
        """The budget of an agent (by name) on the task: its own, or else the task's."""
        return dict(self.agent_steps).get(agent, self.steps)


@dataclass(frozen=True)
class Tier:
    """A group of tasks run with the same seeds, aggregated together; ``zero`` and ``focus``
    are the grid's unless the tier names its own, and so is the search budget (``tuning``: the
    tier's own ``trials`` or ``seeds``, as (key, value) pairs, replace the grid's)."""

    name: str
    seeds: tuple[int, ...]
    tasks: tuple[GridTask, ...]
    zero: str
    focus: tuple[str, ...]
    tuning: tuple[tuple[str, int], ...] = ()

    @property
    def agent_names(self) -> tuple[str, ...]:
        """Every agent of the tier, in the order its tasks first name them."""
        return tuple(dict.fromkeys(a for t in self.tasks for a in t.agent_names))


@dataclass(frozen=True)
class Tuning:
    """The search every agent gets on every task (the same budget for all): ``trials`` trials
    of ``seeds`` seeds each, in the agent's space (``spaces``: agent name -> space file)."""

    trials: int
    seeds: int
    spaces: Mapping[str, str]

    def describe(self) -> str:
        """'trial 0 and <n> sampled trials, <s> seed(s) each': what one search trains."""
        seeds = f"{self.seeds} seed" + "s" * (self.seeds > 1)
        return f"trial 0 and {self.trials} sampled trials, {seeds} each"


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (see the module docstring)."""

    path: Path
    runs: Path
    tiers: tuple[Tier, ...]
    tuning: Tuning | None = None
    headline_in: Path | None = None

    @property
    def searches(self) -> Path:
        """The folder of the searches: ``tuning/<task>/<agent>/`` beside the grid."""
        return self.path.parent / "tuning"

    def trials(self, task: str, agent: str) -> list[dict[str, Any]]:
        """The trials of the agent's search on the task (none before it), from its
        ``trials.csv``: each one's ``trial`` number, ``score`` (None if it has none) and
        ``status``, as :func:`~cfc_rl.experiment.tune.best_row` takes them."""
        table = self.searches / task / agent / "trials.csv"
        if not table.exists():
            return []
        with table.open(newline="") as f:
            return [
                {
                    "trial": int(row["trial"]),
                    "score": float(row["score"]) if row.get("score") else None,
                    "status": row.get("status"),
                }
                for row in csv.DictReader(f)
            ]

    def searched(self, task: str, agent: str) -> bool:
        """Whether the agent's search on the task is done: its ``trials.csv`` is written and
        has trial 0 (the agent as it was; searches written before trial 0 existed lack it)."""
        return any(row["trial"] == 0 for row in self.trials(task, agent))

    def kept_trial_0(self, task: str, agent: str) -> bool:
        """Whether the agent's search on the task chose trial 0: the settings it had before
        (RL Zoo's), which no sampled trial beat."""
        from cfc_rl.experiment.tune import best_row

        best = best_row(self.trials(task, agent))
        return best is not None and best["trial"] == 0

    def tuning_for(self, tier: Tier) -> Tuning:
        """The search every agent gets on the tier's tasks: the grid's, with the tier's own
        ``trials`` or ``seeds``.

        :raises ConfigError: if the grid has no ``tuning`` section
        """
        if self.tuning is None:
            raise ConfigError(f"{self.path}: no tuning section (trials, seeds, spaces)")
        return replace(self.tuning, **dict(tier.tuning))

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ConfigError(
            f"{self.path}: no tier {name!r}; tiers: {', '.join(t.name for t in self.tiers)}"
        )


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Read and check a grid file: every task and agent file must exist and the agents' names
    (file stems) must be unique.

    :raises ConfigError: naming the file and the key
    """
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(GRID_KEYS)}")
    _check_keys(path, "", data, GRID_KEYS, required=("tiers",))
    sets = data.get("agent_sets") or {}
    if not isinstance(sets, Mapping) or not all(
        isinstance(v, list) and all(isinstance(a, str) for a in v) for v in sets.values()
    ):
        raise ConfigError(f"{path}: agent_sets must map names to lists of agent files")
    tiers_data = data["tiers"]
    if not isinstance(tiers_data, Mapping) or not tiers_data:
        raise ConfigError(f"{path}: tiers must be a non-empty mapping of tier name to tier")
    stems: dict[str, str] = {}
    pairs: dict[tuple[str, str], str] = {}
    tiers = []
    for tier_name, tier_data in tiers_data.items():
        where = f"tiers.{tier_name}."
        if not isinstance(tier_data, Mapping):
            raise ConfigError(f"{path}: {where[:-1]} must be a mapping")
        _check_keys(path, where, tier_data, TIER_KEYS, required=("seeds", "tasks"))
        seeds = _seeds(path, where + "seeds", tier_data["seeds"])
        tasks_data = tier_data["tasks"]
        if not isinstance(tasks_data, list) or not tasks_data:
            raise ConfigError(f"{path}: {where}tasks must be a non-empty list")
        tasks = []
        for i, entry in enumerate(tasks_data):
            at = f"{where}tasks[{i}]."
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{path}: {at[:-1]} must be a mapping")
            _check_keys(path, at, entry, TASK_KEYS, required=("task", "steps", "agents"))
            task_file = entry["task"]
            if not isinstance(task_file, str) or not Path(task_file).is_file():
                raise ConfigError(f"{path}: {at}task: no task file {task_file!r}")
            steps = entry["steps"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ConfigError(f"{path}: {at}steps must be a positive integer, not {steps!r}")
            agents: list[str] = []
            if not isinstance(entry["agents"], list) or not entry["agents"]:
                raise ConfigError(f"{path}: {at}agents must be a non-empty list")
            for name in entry["agents"]:
                files = sets.get(name, [name])
                for agent_file in files:
                    if not Path(agent_file).is_file():
                        what = "agent set or agent file" if name not in sets else "agent file"
                        raise ConfigError(f"{path}: {at}agents: no {what} {agent_file!r}")
                    stem = Path(agent_file).stem
                    if stems.setdefault(stem, agent_file) != agent_file:
                        raise ConfigError(
                            f"{path}: {at}agents: {agent_file} and {stems[stem]} have the same "
                            f"name {stem!r}; run folders are named by agent file"
                        )
                    if agent_file not in agents:
                        agents.append(agent_file)
            reference = entry.get("reference")
            if reference is not None:
                if not isinstance(reference, Mapping):
                    raise ConfigError(f"{path}: {at}reference must be a mapping")
                _check_keys(path, at + "reference.", reference, REFERENCE_KEYS, REFERENCE_KEYS)
                if Path(str(reference["agent"])).stem not in [Path(a).stem for a in agents]:
                    raise ConfigError(
                        f"{path}: {at}reference.agent {reference['agent']!r} is not an agent "
                        "of the task"
                    )
                if isinstance(reference["return"], bool) or not isinstance(
                    reference["return"], (int, float)
                ):
                    raise ConfigError(f"{path}: {at}reference.return must be a number")
            agent_steps = _agent_steps(path, at, entry.get("agent_steps"), agents, steps)
            grid_task = GridTask(
                task_file, Path(task_file).stem, steps, tuple(agents), reference, agent_steps
            )
            tasks.append(grid_task)
        for grid_task in tasks:
            for agent in grid_task.agent_names:
                # One run folder per (task, agent, seed): a second budget would overwrite it.
                if (grid_task.name, agent) in pairs:
                    raise ConfigError(
                        f"{path}: {where}tasks: {agent} on {grid_task.name} appears twice in the "
                        f"grid (also in tier {pairs[(grid_task.name, agent)]})"
                    )
                pairs[(grid_task.name, agent)] = str(tier_name)
        zero = tier_data.get("zero", data.get("zero"))
        focus = tier_data.get("focus", data.get("focus")) or []
        focus = [focus] if isinstance(focus, str) else focus
        tier_agents = {a for t in tasks for a in t.agent_names}
        if zero is None:
            raise ConfigError(f"{path}: {where}zero is missing (and the grid has no zero)")
        for name in [zero, *focus]:
            if name not in tier_agents:
                raise ConfigError(
                    f"{path}: {where[:-1]}: {name!r} (zero or focus) is not an agent of the tier"
                )
        tier_tuning = _tier_tuning(path, where, tier_data.get("tuning"), "tuning" in data)
        tiers.append(
            Tier(str(tier_name), seeds, tuple(tasks), str(zero), tuple(focus), tier_tuning)
        )
    runs = path.parent / str(data.get("runs", "runs"))
    headline_in = data.get("headline_in")
    if headline_in is not None:
        if not isinstance(headline_in, str) or not Path(headline_in).is_file():
            raise ConfigError(f"{path}: headline_in: no Markdown file {headline_in!r}")
        headline_in = Path(headline_in)
        _headline_bounds(headline_in, headline_in.read_text())
    tuning = _tuning(path, data.get("tuning"), set(stems))
    return Grid(path, runs, tuple(tiers), tuning, headline_in)


def _agent_steps(
    path: Path, at: str, data: Any, agents: Sequence[str], steps: int
) -> tuple[tuple[str, int], ...]:
    """A task's ``agent_steps``: each an agent of the task with a budget below the task's."""
    if data is None:
        return ()
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{path}: {at}agent_steps must map agent names to budgets in steps")
    names = [Path(a).stem for a in agents]
    for agent, budget in data.items():
        if agent not in names:
            raise ConfigError(
                f"{path}: {at}agent_steps: {agent!r} is not an agent of the task; agents: "
                f"{', '.join(names)}"
            )
        if isinstance(budget, bool) or not isinstance(budget, int) or not 0 < budget < steps:
            raise ConfigError(
                f"{path}: {at}agent_steps.{agent} must be a number of steps below the task's "
                f"{steps}, not {budget!r}"
            )
    return tuple((str(agent), int(budget)) for agent, budget in data.items())


def _tier_tuning(
    path: Path, where: str, data: Any, grid_has_tuning: bool
) -> tuple[tuple[str, int], ...]:
    """A tier's ``tuning``: its own ``trials`` or ``seeds`` (positive integers), or ()."""
    if data is None:
        return ()
    keys = TUNING_KEYS[:2]
    if not isinstance(data, Mapping) or not data:
        raise ConfigError(f"{path}: {where}tuning must be a mapping with keys {', '.join(keys)}")
    if not grid_has_tuning:
        raise ConfigError(f"{path}: {where}tuning: the grid has no tuning section to change")
    _check_keys(path, where + "tuning.", data, keys, required=())
    for key, value in data.items():
        _positive(path, f"{where}tuning.{key}", value)
    return tuple((str(key), int(value)) for key, value in data.items())


def _positive(path: Path, where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{path}: {where} must be a positive integer, not {value!r}")


def _tuning(path: Path, data: Any, agents: set[str]) -> Tuning | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: tuning must be a mapping with keys {', '.join(TUNING_KEYS)}")
    _check_keys(path, "tuning.", data, TUNING_KEYS, required=TUNING_KEYS)
    for key in ("trials", "seeds"):
        _positive(path, f"tuning.{key}", data[key])
    spaces = data["spaces"]
    if not isinstance(spaces, Mapping):
        raise ConfigError(f"{path}: tuning.spaces must map agent names to space files")
    for agent, space in spaces.items():
        if agent not in agents:
            raise ConfigError(f"{path}: tuning.spaces: {agent!r} is not an agent of the grid")
        if not isinstance(space, str) or not Path(space).is_file():
            raise ConfigError(f"{path}: tuning.spaces.{agent}: no space file {space!r}")
    return Tuning(data["trials"], data["seeds"], {str(k): str(v) for k, v in spaces.items()})


def _check_keys(
    path: Path, where: str, data: Mapping[str, Any], known: Sequence[str], required: Sequence[str]
) -> None:
    unknown = sorted(set(map(str, data)) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key {where}{unknown[0]}; known: {', '.join(known)}")
    for key in required:
        if key not in data:
            raise ConfigError(f"{path}: {where}{key} is missing")


def _seeds(path: Path, where: str, value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return tuple(range(value))
    if (
        isinstance(value, list)
        and value
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    raise ConfigError(
        f"{path}: {where} must be a number of seeds or a list of distinct seeds, not {value!r}"
    )


def select(
    grid: Grid,
    *,
    tiers: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    agents: Sequence[str] | None = None,
) -> list[tuple[Tier, GridTask, str]]:
    """The grid's (tier, task, agent file) cells, or those the filters select (names of tiers,
    tasks and agents).

    :raises ConfigError: for a filter that names nothing the chosen tiers have
    """
    chosen = [grid.tier(name) for name in tiers] if tiers else list(grid.tiers)
    every_task = {t.name for tier in chosen for t in tier.tasks}
    every_agent = {a for tier in chosen for a in tier.agent_names}
    for kind, wanted, known in (("task", tasks, every_task), ("agent", agents, every_agent)):
        for name in wanted or ():
            if name not in known:
                raise ConfigError(
                    f"{grid.path}: no {kind} {name!r} in the chosen tiers; "
                    f"{kind}s: {', '.join(sorted(known))}"
                )
    return [
        (tier, grid_task, agent_file)
        for tier in chosen
        for grid_task in tier.tasks
        if not tasks or grid_task.name in tasks
        for agent_file, name in zip(grid_task.agents, grid_task.agent_names, strict=True)
        if not agents or name in agents
    ]


def plan(
    grid: Grid,
    *,
    tiers: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    agents: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    device: str = "cpu",
) -> list[Job]:
    """The grid's jobs, or the part of it that the filters select (see :func:`select`; seeds).

    :raises ConfigError: for a filter that selects nothing the grid has, naming it
    """
    jobs = []
    for tier, grid_task, agent_file in select(grid, tiers=tiers, tasks=tasks, agents=agents):
        tier_seeds = [s for s in tier.seeds if seeds is None or s in seeds]
        if tier_seeds:
            jobs += plan_jobs(
                [agent_file],
                [grid_task.task],
                seeds=tier_seeds,
                steps=grid_task.steps_for(Path(agent_file).stem),
                out=grid.runs,
                device=device,
            )
    return jobs


def measured_speeds(grid: Grid) -> dict[tuple[str | None, str], float]:
    """Training steps/s measured by the complete runs under the grid's runs folder: per (task,
    agent) the mean over its runs, and per (None, agent) the mean over all of the agent's runs;
    for estimating what the missing runs cost (:func:`estimate_seconds`)."""
    by_cell: dict[tuple[str | None, str], list[float]] = {}
    for result_file in grid.runs.glob("*/*/seed_*/result.json"):
        result = RunFolder(result_file.parent).read_result()
        if not result or not result.get("steps_per_s"):
            continue
        task, agent = result_file.parent.parent.parent.name, result_file.parent.parent.name
        for key in ((task, agent), (None, agent)):
            by_cell.setdefault(key, []).append(float(result["steps_per_s"]))
    return {key: float(np.mean(values)) for key, values in by_cell.items()}


def estimate_seconds(
    cells: Sequence[tuple[str, str, int]], speeds: Mapping[tuple[str | None, str], float]
) -> tuple[float, list[tuple[str, str, int]]]:
    """The training time of runs given as (task, agent, steps): each at the steps/s its agent
    had on the task, or else at its mean speed over its tasks times the task's relative speed
    (the geometric mean, over the agents that ran on the task, of their speed there over their
    mean speed: MuJoCo tasks train several times slower than CartPole).

    :return: the seconds of the runs with a speed to go by, and the runs without one (the agent
        or the task has no run yet)
    """
    relative: dict[str, list[float]] = {}
    for (task, agent), speed in speeds.items():
        if task is not None:
            relative.setdefault(task, []).append(speed / speeds[(None, agent)])
    task_factor = {task: float(np.exp(np.mean(np.log(r)))) for task, r in relative.items()}
    seconds, unknown = 0.0, []
    for task, agent, steps in cells:
        speed = speeds.get((task, agent))
        if not speed and task in task_factor and (None, agent) in speeds:
            speed = speeds[(None, agent)] * task_factor[task]
        if speed:
            seconds += steps / speed
        else:
            unknown.append((task, agent, steps))
    return seconds, unknown


def untuned(grid: Grid, cells: Sequence[tuple[Tier, GridTask, str]]) -> set[tuple[str, str]]:
    """The (task, agent) names of the cells whose agent the grid tunes (``tuning.spaces``) but
    that have no search yet: their runs wait, so that no run trains with untuned settings."""
    if grid.tuning is None:
        return set()
    names = {(grid_task.name, Path(agent_file).stem) for _, grid_task, agent_file in cells}
    return {
        (task, agent)
        for task, agent in names
        if agent in grid.tuning.spaces and not grid.searched(task, agent)
    }


def tune_cells(
    grid: Grid,
    cells: Sequence[tuple[Tier, GridTask, str]],
    on_done: Callable[[str, str, str], None] | None = None,
    **search_kwargs: Any,
) -> None:
    """Tune every cell that has no search yet, with its tier's budget (:meth:`Grid.tuning_for`),
    and write each search's choice into its agent file (:func:`adopt`); a cell searched before
    is only adopted.

    :param cells: from :func:`select`
    :param on_done: called with the task, the agent and what happened (progress display)
    :param search_kwargs: passed to :func:`~cfc_rl.experiment.tune.search` (executor, address,
        cpus_per_job, max_retries, storage, device)
    :raises ConfigError: without a ``tuning`` section or a space for a selected agent, before
        any search starts
    """
    from cfc_rl.experiment.tune import search

    if grid.tuning is None:
        raise ConfigError(f"{grid.path}: no tuning section (trials, seeds, spaces)")
    for _, _, agent_file in cells:
        if Path(agent_file).stem not in grid.tuning.spaces:
            raise ConfigError(
                f"{grid.path}: tuning.spaces has no space for {Path(agent_file).stem}"
            )
    for tier, grid_task, agent_file in cells:
        tuning = grid.tuning_for(tier)
        agent = Path(agent_file).stem
        out = grid.searches / grid_task.name / agent
        if grid.searched(grid_task.name, agent):
            what = "searched before"
        else:
            # a search made before searches began with trial 0 gets only that
            only_trial_0 = (out / "trials.csv").exists()
            search(
                agent_file,
                grid_task.task,
                tuning.spaces[agent],
                trials=tuning.trials,
                seeds=tuning.seeds,
                steps=grid_task.steps_for(agent),
                out=out,
                only_trial_0=only_trial_0,
                # searched again (its folder deleted): from the agent as it was before
                before_search=_has_adopted(agent_file, grid_task.name),
                **_rungs_at_the_task_s_fractions(grid_task, agent),
                **search_kwargs,
            )
            what = "trial 0 added to its search" if only_trial_0 else "searched"
        what += "; " + adopt(grid, grid_task, agent_file)
        if on_done:
            on_done(grid_task.name, agent, what)


def _rungs_at_the_task_s_fractions(grid_task: GridTask, agent: str) -> dict[str, int]:
    """For an agent at a budget of its own (``agent_steps``): its search's evaluations and
    ASHA rungs scaled with its budget, so that its trials are compared at the same fractions of
    their budget as the task's other agents' (the default rungs depend on the evaluation
    interval, which is the task's). Empty for an agent at the task's budget."""
    from cfc_rl.experiment.tasks import load_task
    from cfc_rl.experiment.tune import first_rung

    steps = grid_task.steps_for(agent)
    if steps == grid_task.steps:
        return {}
    every = load_task(grid_task.task).eval.every_steps
    return {
        "eval_every": max(1, round(every * steps / grid_task.steps)),
        "grace_steps": max(1, round(first_rung(grid_task.steps, every) * steps / grid_task.steps)),
    }


ADOPTED = "  # Tuned for the benchmark:"  # the first line of what adopt writes


def adopt(grid: Grid, grid_task: GridTask, agent_file: str) -> str:
    """Write the values a search chose into the agent file, as ``overrides.<task file name>``
    with a comment naming the search, so that the benchmark (and ``cfc-rl train``) runs them.

    The section is appended to the file, whose comments stay: the file must have no
    ``overrides`` yet, or end with its ``overrides`` mapping. What an earlier adopt wrote for
    the task is written again (the search gained trial 0 since, and may have chosen it).

    :return: what it did, in words
    :raises ConfigError: if the search completed no trial, or the agent file already holds other
        values for the task that adopt did not write (remove them to adopt the search)
    """
    from cfc_rl.experiment.tasks import load_task
    from cfc_rl.experiment.tune import SEED_START, best_row

    agent = Path(agent_file).stem
    folder = grid.searches / grid_task.name / agent
    tuned_file = folder / f"{agent}_tuned_{grid_task.name}.yaml"
    if not tuned_file.exists():
        raise ConfigError(f"{folder}: the search completed no trial; delete the folder to retry")
    # cfc-rl tune keys its choice by the task file's name when the agent file already has that
    # key, else by the task id, which task files can share (pendulum_p, pendulum_p_irregular)
    tuned = read_yaml(tuned_file)["overrides"]
    values = tuned.get(grid_task.name) or tuned[load_task(grid_task.task).id]
    path = Path(agent_file)
    lines = path.read_text().splitlines()
    overrides = (read_yaml(path) or {}).get("overrides") or {}
    rows = grid.trials(grid_task.name, agent)
    best = best_row(rows)
    entry = yaml.safe_dump({grid_task.name: values}, default_flow_style=None, sort_keys=False)
    block = [
        f"{ADOPTED} the best of {len(rows)} trials (seeds from {SEED_START}, mean final",
        f"  # return {best['score']:.1f}); {os.path.relpath(folder / 'trials.md')}, protocol in",
        f"  # {os.path.relpath(grid.path.parent / 'PROTOCOL.md')}.",
        *("  " + line for line in entry.splitlines()),
    ]
    if grid_task.name in overrides:
        start, end = _adopted_lines(lines, grid_task.name)
        if lines[start:end] == block:
            return f"{path} has its values"
        if not lines[start].startswith(ADOPTED):
            if overrides[grid_task.name] == values:
                return f"{path} has its values"
            raise ConfigError(
                f"{path}: overrides.{grid_task.name} differs from what {folder} chose; remove "
                "it to adopt the search"
            )
        lines[start:end] = block
        atomic_write_text(path, "\n".join(lines) + "\n")
        return f"{path}: overrides.{grid_task.name} written again"
    top_level = [line for line in lines if line[:1].isalpha()]
    if overrides and not top_level[-1].startswith("overrides:"):
        raise ConfigError(f"{path}: overrides must be the file's last section to append to it")
    while lines and not lines[-1].strip():
        lines.pop()
    lines += ([] if overrides else ["overrides:"]) + block
    atomic_write_text(path, "\n".join(lines) + "\n")
    return f"{path}: overrides.{grid_task.name} written"


def _has_adopted(agent_file: str, task: str) -> bool:
    """Whether the agent file holds what :func:`adopt` wrote for the task."""
    path = Path(agent_file)
    if task not in ((read_yaml(path) or {}).get("overrides") or {}):
        return False
    lines = path.read_text().splitlines()
    return lines[_adopted_lines(lines, task)[0]].startswith(ADOPTED)


def _adopted_lines(lines: list[str], task: str) -> tuple[int, int]:
    """Where ``overrides.<task>`` is in an agent file's lines: from the comment lines above it
    to its last indented line."""
    key = next(
        n for n, line in enumerate(lines) if line == f"  {task}:" or line.startswith(f"  {task}: ")
    )
    start = key
    while start > 0 and lines[start - 1].startswith("  #"):
        start -= 1
    end = key + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    return start, end


def run_benchmark(
    grid: Grid,
    jobs: Sequence[Job],
    executor: Executor | None = None,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Train the jobs that are not complete, then write the report.

    :raises RunError: if a run was started with settings the files no longer give (before
        anything trains)
    """
    from cfc_rl.experiment.compare import run_jobs

    results = run_jobs(jobs, executor, on_result)
    report(grid)
    return results


# --- the report ----------------------------------------------------------------------------


@dataclass
class _Cell:
    """The complete runs of one agent on one task at the tier's budget."""

    task: str
    agent: str
    steps: int
    folders: list[RunFolder]
    results: list[dict[str, Any]]
    machines: list[str | None]

    @property
    def finals(self) -> np.ndarray:
        return np.array([r["final_mean_return"] for r in self.results], dtype=float)


def _collect(grid: Grid, tier: Tier) -> tuple[dict[tuple[str, str], _Cell], list[str]]:
    """Every (task, agent) of the tier with at least one complete run at the agent's budget on
    the task (every seed folder counts: seeds beyond the tier's extend the study), and the runs
    started with other settings than the agent and task files give now (one line each)."""
    cells, stale = {}, []
    for grid_task in tier.tasks:
        for agent in grid_task.agent_names:
            steps = grid_task.steps_for(agent)
            folders, results, machines = [], [], []
            job = None
            for folder in sorted(
                (grid.runs / grid_task.name / agent).glob("seed_*"),
                key=lambda p: int(p.name.removeprefix("seed_")),
            ):
                run = RunFolder(folder)
                result = run.read_result()
                if result is None or result["total_timesteps"] != steps:
                    continue
                if job is None:  # what the files give now, for any seed
                    [job] = plan(
                        grid,
                        tiers=[tier.name],
                        tasks=[grid_task.name],
                        agents=[agent],
                        seeds=tier.seeds[:1],
                    )
                config = run.read_config()
                difference = job.difference_from_record(config)
                if difference:
                    stale.append(f"{folder}: {difference}")
                    continue
                folders.append(run)
                results.append(result)
                machines.append(config.get("machine"))
            if folders:
                cells[(grid_task.name, agent)] = _Cell(
                    grid_task.name, agent, steps, folders, results, machines
                )
    return cells, stale


def _on_every_seed(
    tier: Tier, cells: Mapping[tuple[str, str], _Cell]
) -> dict[tuple[str, str], _Cell]:
    """The cells with a complete run of each of the tier's seeds: only they enter the
    normalised scores, the comparisons and the profiles (a cell of one run would give them
    intervals of zero width)."""
    return {
        key: cell
        for key, cell in cells.items()
        if set(tier.seeds) <= {r["seed"] for r in cell.results}
    }


def _normalisers(
    grid: Grid, tier: Tier, cells: Mapping[tuple[str, str], _Cell]
) -> dict[str, tuple[float, float]]:
    """Per task with runs of the zero agent and a best agent clearly above it: (zero, best).

    Clearly: the best agent's mean return lies above the 95% interval of the zero agent's mean.
    Where it does not, ``best - zero`` is a gap the seeds' noise can close, and dividing by it
    would blow that noise up into scores far below 0 that swamp the tier's aggregate (Hopper-P:
    every agent's good seeds stand still at about 1000, so the MLP ended 101 below the best and
    the worst agent at -3.3)."""
    out = {}
    for grid_task in tier.tasks:
        task_cells = [c for (t, _), c in cells.items() if t == grid_task.name]
        zero_cell = cells.get((grid_task.name, tier.zero))
        if zero_cell is None:
            continue
        zero = interval_columns(zero_cell.finals)
        best = max(float(c.finals.mean()) for c in task_cells)
        if best > zero["mean_ci_high"]:
            out[grid_task.name] = (zero["mean"], best)
    return out


def _left_out(
    tier: Tier,
    complete: Mapping[tuple[str, str], _Cell],
    normalise: Mapping[str, tuple[float, float]],
) -> list[str]:
    """The tier's tasks missing from the normalised scores, each with the reason."""
    left_out = []
    for t in tier.tasks:
        if t.name in normalise:
            continue
        if (t.name, tier.zero) in complete:
            left_out.append(f"{t.name} (no agent's mean above the 95% interval of {tier.zero}'s)")
        else:
            left_out.append(f"{t.name} (waiting for {tier.zero} on every seed)")
    return left_out


def _score_matrix(cells: Sequence[_Cell], normalise: Mapping[str, tuple[float, float]] | None):
    """(runs, tasks): each task's first ``n`` runs, ``n`` the fewest any task has (rliable's
    stratified bootstrap wants the same number of runs per task)."""
    n = min(len(c.results) for c in cells)
    columns = []
    for cell in cells:
        scores = cell.finals[:n]
        if normalise is not None:
            zero, best = normalise[cell.task]
            scores = (scores - zero) / (best - zero)
        columns.append(scores)
    return np.stack(columns, axis=1)


def _seeded(function: Callable[[], Any]) -> Any:
    # rliable's performance profiles draw from numpy's global generator: seeded, so the report
    # is repeatable.
    state = np.random.get_state()
    np.random.seed(0)
    try:
        return function()
    finally:
        np.random.set_state(state)


def _coverage(
    tier: Tier, cells: Mapping[tuple[str, str], _Cell], normalise: Mapping[str, tuple[float, float]]
) -> dict[str, tuple[str, ...]]:
    """Each agent's normalisable tasks with complete runs, in the tier's order (agents with
    none left out)."""
    coverage = {}
    for agent in tier.agent_names:
        tasks = tuple(
            t.name for t in tier.tasks if (t.name, agent) in cells and t.name in normalise
        )
        if tasks:
            coverage[agent] = tasks
    return coverage


def _headline_group(coverage: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The tasks the headline scores: those that the most agents all ran (then the most tasks:
    while the study grows, all the agents on fewer tasks rather than a few on more); none
    without coverage. The candidates are the agents' task sets and their intersections."""
    candidates = set(coverage.values())
    while True:
        more = {tuple(t for t in a if t in b) for a in candidates for b in candidates} - {()}
        if more <= candidates:
            break
        candidates |= more
    members = {ts: sum(set(ts) <= set(c) for c in coverage.values()) for ts in candidates}
    return max(sorted(candidates), key=lambda ts: (members[ts], len(ts)), default=())


def _aggregates(
    tier: Tier,
    cells: Mapping[tuple[str, str], _Cell],
    normalise: Mapping[str, tuple[float, float]],
    groups: Iterable[tuple[str, ...]],
) -> list[dict[str, Any]]:
    """Per group of normalisable tasks (each agent's, and the headline's): the IQM and mean
    normalised score across them of each agent that ran them all, with 95% stratified-bootstrap
    intervals."""
    # Agents on more tasks also appear in the groups of fewer tasks they cover, so that every
    # group compares all the agents that ran on its tasks.
    rows = []
    for tasks in sorted(set(groups), key=lambda ts: (-len(ts), ts)):
        members = [a for a in tier.agent_names if all((t, a) in cells for t in tasks)]
        scores = {a: _score_matrix([cells[(t, a)] for t in tasks], normalise) for a in members}

        for agent in members:
            (iqm, iqm_low, iqm_high), (mean, mean_low, mean_high) = iqm_and_mean_intervals(
                scores[agent]
            )
            rows.append(
                {
                    "tier": tier.name,
                    "tasks": " ".join(tasks),
                    "agent": agent,
                    "runs_per_task": scores[agent].shape[0],
                    "iqm": iqm,
                    "iqm_ci_low": iqm_low,
                    "iqm_ci_high": iqm_high,
                    "mean": mean,
                    "mean_ci_low": mean_low,
                    "mean_ci_high": mean_high,
                }
            )
    return rows


def verdict(low: float, high: float) -> str:
    """``wins`` when the probability of improvement's interval lies above 0.5, ``loses`` when
    below, ``ties`` when it holds 0.5."""
    if low > 0.5:
        return "wins"
    if high < 0.5:
        return "loses"
    return "ties"


def _improvements(
    tier: Tier, cells: Mapping[tuple[str, str], _Cell], headline_tasks: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """For each focus agent and each other agent: the probability that a run of the focus agent
    returns more than one of the other's, per task, over all the tasks both ran on (``tasks``
    "all") and, where it is fewer of them, over the headline's tasks (``tasks`` those names;
    rliable, 95% stratified-bootstrap intervals)."""
    rows = []
    for focus in tier.focus:
        for other in tier.agent_names:
            if other == focus:
                continue
            shared = [
                t.name for t in tier.tasks if (t.name, focus) in cells and (t.name, other) in cells
            ]
            if not shared:
                continue
            scopes = [*([[t] for t in shared] if len(shared) > 1 else []), shared]
            if len(headline_tasks) > 1 and set(headline_tasks) < set(shared):
                scopes.append(list(headline_tasks))
            for scope in scopes:
                x = _score_matrix([cells[(t, focus)] for t in scope], None)
                y = _score_matrix([cells[(t, other)] for t in scope], None)
                p, low, high = probability_of_improvement_interval(x, y)
                # The geometric mean of the per-task ratios: a task twice as fast weighs as much
                # as one twice as slow.
                ratios = [
                    _steps_per_s(cells[(t, focus)]) / _steps_per_s(cells[(t, other)]) for t in scope
                ]
                rows.append(
                    {
                        "tier": tier.name,
                        "focus": focus,
                        "other": other,
                        "tasks": "all" if scope is shared else " ".join(scope),
                        "n_tasks": len(scope),
                        "probability": p,
                        "ci_low": low,
                        "ci_high": high,
                        "verdict": verdict(low, high),
                        "steps_per_s_ratio": float(np.exp(np.mean(np.log(ratios)))),
                    }
                )
    return rows


def _steps_per_s(cell: _Cell) -> float:
    return float(np.mean([r["steps_per_s"] for r in cell.results]))


def report(grid: Grid, out: str | os.PathLike[str] | None = None) -> str:
    """Aggregate the grid's complete runs into the report files (see the module docstring).

    :param out: the folder of the report (default: the grid file's folder; only then does the
        headline also go into the grid's ``headline_in`` file)
    :return: the report's Markdown (``README.md``)
    :raises RunError: if runs were started with other settings than the agent and task files
        give now (before anything is written)
    """
    out = Path(out) if out is not None else grid.path.parent
    summary_rows: list[dict[str, Any]] = []
    aggregate_rows: list[dict[str, Any]] = []
    improvement_rows: list[dict[str, Any]] = []
    sections = []
    headline: list[str] = []
    collected, stale = {}, []
    for tier in grid.tiers:  # all of them checked before anything is written
        collected[tier.name], tier_stale = _collect(grid, tier)
        stale += tier_stale
    refuse_stale(stale)
    for tier in grid.tiers:
        cells = collected[tier.name]
        complete = _on_every_seed(tier, cells)
        normalise = _normalisers(grid, tier, complete)
        tier_summary = []
        for grid_task in tier.tasks:
            for agent in grid_task.agent_names:
                cell = cells.get((grid_task.name, agent))
                if cell is None:
                    continue
                results = cell.results
                row = {
                    "tier": tier.name,
                    "task": grid_task.name,
                    "agent": agent,
                    "seeds": len(results),
                    "steps": cell.steps,
                    **interval_columns(cell.finals),
                    "normalised_mean": (
                        (float(cell.finals.mean()) - normalise[grid_task.name][0])
                        / (normalise[grid_task.name][1] - normalise[grid_task.name][0])
                        if grid_task.name in normalise
                        else float("nan")
                    ),
                    "wall_clock_s": float(np.mean([r["wall_clock_s"] for r in results])),
                    "steps_per_s": _steps_per_s(cell),
                    "params": int(results[0]["params"]),
                }
                tier_summary.append(row)
        coverage = _coverage(tier, complete, normalise)
        headline_tasks = _headline_group(coverage)
        groups = [*coverage.values(), *([headline_tasks] if headline_tasks else [])]
        tier_aggregates = _aggregates(tier, complete, normalise, groups)
        tier_improvements = _improvements(tier, complete, headline_tasks)
        summary_rows += tier_summary
        aggregate_rows += tier_aggregates
        improvement_rows += tier_improvements
        left_out = _left_out(tier, complete, normalise)
        sections.append(
            _tier_markdown(
                grid, tier, cells, left_out, tier_summary, tier_aggregates, tier_improvements
            )
        )
        headline += _headline(
            tier,
            f"{_progress(tier, cells)} ({', '.join(t.name for t in tier.tasks)}; "
            f"seeds {_seed_text(tier.seeds)}). {_machines(cells)}{_smaller_budgets(tier)}",
            headline_tasks,
            tier_aggregates,
            tier_improvements,
            left_out,
        )
        for grid_task in tier.tasks:
            runs = {a: c.folders for (t, a), c in cells.items() if t == grid_task.name}
            name = f"{tier.name}_{grid_task.name}"
            plot_curves(out / f"curves_{name}.png", f"{grid_task.name} ({tier.name})", runs)
            plot_curves(
                out / f"curves_time_{name}.png",
                f"{grid_task.name} ({tier.name})",
                runs,
                against="time",
            )
        _plot_profiles(out / f"profiles_{tier.name}.png", tier, complete, normalise)
    write_csv(out / "summary.csv", summary_rows, empty_header=("tier",))
    write_csv(out / "aggregate.csv", aggregate_rows, empty_header=("tier",))
    write_csv(out / "improvement.csv", improvement_rows, empty_header=("tier",))
    text = _markdown(grid, sections)
    headline_text = "\n".join(headline or ["No tier has a complete comparison yet.", ""])
    atomic_write_text(out / "headline.md", headline_text)
    atomic_write_text(out / "README.md", text)
    if grid.headline_in is not None and out.resolve() == grid.path.parent.resolve():
        splice_headline(grid.headline_in, headline_text)
    return text


HEADLINE_BEGIN = "<!-- benchmark headline: written by `cfc-rl benchmark report` -->"
HEADLINE_END = "<!-- end of the benchmark headline -->"


def _headline_bounds(path: Path, text: str) -> tuple[int, int]:
    """Where the headline lies in ``text``: after the begin marker's line, up to the end
    marker.

    :raises ConfigError: without both markers, in order, once each
    """
    begin, end = text.find(HEADLINE_BEGIN), text.find(HEADLINE_END)
    if begin < 0 or end < begin or text.count(HEADLINE_BEGIN) != 1 or text.count(HEADLINE_END) != 1:
        raise ConfigError(
            f"{path}: needs the lines {HEADLINE_BEGIN!r} and {HEADLINE_END!r}, once each and in "
            "that order, around the benchmark's headline"
        )
    return begin + len(HEADLINE_BEGIN) + 1, end


def read_headline(path: str | os.PathLike[str]) -> str:
    """The headline between the markers of a Markdown file (:func:`splice_headline`)."""
    path = Path(path)
    text = path.read_text()
    start, end = _headline_bounds(path, text)
    return text[start:end]


def splice_headline(path: str | os.PathLike[str], headline: str) -> None:
    """Replace what lies between the headline markers of a Markdown file with ``headline``."""
    path = Path(path)
    text = path.read_text()
    start, end = _headline_bounds(path, text)
    atomic_write_text(path, text[:start] + headline + text[end:])


def _markdown(grid: Grid, sections: list[str]) -> str:
    return "\n".join(
        [
            "# Benchmark report",
            "",
            "Written by `cfc-rl benchmark report` from the run files under "
            f"`{grid.runs.relative_to(grid.path.parent)}/`; do not edit it by hand. The grid is "
            f"`{grid.path.name}`, the protocol (tuning, seeds, budgets) `PROTOCOL.md`.",
            "",
            "Final return: the mean over a run's final evaluation episodes. Per task and agent: "
            "the interquartile mean (IQM) and the mean over seeds with 95% stratified-bootstrap "
            "confidence intervals (rliable); with fewer than 4 seeds the IQM equals the mean. "
            "Normalised score: the tier's memoryless agent (its zero) = 0, the best agent on the "
            "task = 1. Probability of improvement: that a run of the tier's focus agent ends "
            "above a run of the other agent, with its verdict: wins (the 95% interval lies above "
            "0.5), ties (it holds 0.5), loses (below); the intervals are not adjusted for the "
            "number of comparisons, so among many verdicts a few wins or losses can come by "
            "chance. Wall clock and steps/s come from the "
            "machines the runs were made on (each run's config.yaml and result.json).",
            "",
            *sections,
        ]
    )


def _tier_markdown(
    grid: Grid,
    tier: Tier,
    cells: Mapping[tuple[str, str], _Cell],
    left_out: Sequence[str],
    summary: list[dict[str, Any]],
    aggregates: list[dict[str, Any]],
    improvements: list[dict[str, Any]],
) -> str:
    def done(task: str, agent: str) -> int:
        cell = cells.get((task, agent))
        return 0 if cell is None else sum(r["seed"] in tier.seeds for r in cell.results)

    missing = [
        f"{t.name}/{a} ({done(t.name, a)}/{len(tier.seeds)})"
        for t in tier.tasks
        for a in t.agent_names
        if done(t.name, a) < len(tier.seeds)
    ]
    lines = [
        f"## Tier {tier.name}",
        "",
        f"Seeds {_seed_text(tier.seeds)}; {_progress(tier, cells)}. "
        f"Zero of the normalised score: {tier.zero}."
        + _search_budget(grid, tier)
        + (f" {_machines(cells)}" if cells else "")
        + _smaller_budgets(tier),
    ]
    if missing:
        lines.append(f"Incomplete (runs done / planned): {', '.join(missing)}.")
    if left_out:
        lines.append(f"Not in the normalised scores: {', '.join(left_out)}.")
    lines.append("")
    if aggregates:
        lines += ["### Across tasks: normalised score", ""]
        for tasks in dict.fromkeys(r["tasks"] for r in aggregates):
            rows = sorted((r for r in aggregates if r["tasks"] == tasks), key=lambda r: -r["iqm"])
            lines += [
                f"Tasks: {', '.join(tasks.split())}.",
                "",
                "| agent | runs per task | IQM [95% CI] | mean [95% CI] |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| {r['agent']} | {r['runs_per_task']} "
                f"| {r['iqm']:.2f} [{r['iqm_ci_low']:.2f}, {r['iqm_ci_high']:.2f}] "
                f"| {r['mean']:.2f} [{r['mean_ci_low']:.2f}, {r['mean_ci_high']:.2f}] |"
                for r in rows
            ]
            lines.append("")
        lines += [f"![performance profiles](profiles_{tier.name}.png)", ""]
    for focus in tier.focus:
        rows = [r for r in improvements if r["focus"] == focus]
        if not rows:
            continue
        # the tasks in the tier's order, then the headline's tasks, then all both ran
        order = [t.name for t in tier.tasks]
        scopes = sorted(
            dict.fromkeys(r["tasks"] for r in rows),
            key=lambda s: (s == "all", s not in order, order.index(s) if s in order else 0),
        )
        lines += [
            f"### Does {focus} improve on the others, and at what cost?",
            "",
            "Probability of improvement [95% CI], verdict; speed: the focus agent's training "
            "steps/s over the other's (geometric mean over the tasks both ran).",
            "",
            "| against | " + " | ".join(s.replace(" ", ", ") for s in scopes) + " | speed |",
            "|---|" + "---:|" * (len(scopes) + 1),
        ]
        overall = {r["other"]: r for r in rows if r["tasks"] == "all"}
        for other in dict.fromkeys(r["other"] for r in rows):
            by_scope = {r["tasks"]: r for r in rows if r["other"] == other}
            cells_text = [
                f"{by_scope[s]['probability']:.2f} [{by_scope[s]['ci_low']:.2f}, "
                f"{by_scope[s]['ci_high']:.2f}] {by_scope[s]['verdict']}"
                if s in by_scope
                else ""
                for s in scopes
            ]
            speed = f"{overall[other]['steps_per_s_ratio']:.2f}x"
            lines.append(f"| {other} | " + " | ".join(cells_text) + f" | {speed} |")
        lines.append("")
        lines.append(f"- Over the tasks both ran: {_verdicts(focus, list(overall.values()))}.")
        per_task = []
        for word in ("wins", "ties", "loses"):
            others: dict[str, list[str]] = {}
            for r in rows:
                if r["n_tasks"] == 1 and r["tasks"] != "all" and r["verdict"] == word:
                    others.setdefault(r["other"], []).append(r["tasks"])
            if others:
                named = ", ".join(f"{o} ({', '.join(ts)})" for o, ts in others.items())
                per_task.append(f"{word} against {named}")
        if per_task:
            lines.append(f"- Per task: {focus} {'; '.join(per_task)}.")
        lines.append("")
    for grid_task in tier.tasks:
        rows = sorted((r for r in summary if r["task"] == grid_task.name), key=lambda r: -r["iqm"])
        own = "".join(f"; {a} {s:,}" for a, s in grid_task.agent_steps)
        lines += [f"### {grid_task.name} ({grid_task.steps:,} steps{own})", ""]
        tuned = [a for a in grid_task.agent_names if grid.searched(grid_task.name, a)]
        untuned = [a for a in grid_task.agent_names if a not in tuned]
        if not tuned:
            lines += ["Tuned: none yet.", ""]
        else:
            kept = [a for a in tuned if grid.kept_trial_0(grid_task.name, a)]
            lines += [
                f"Tuned (`tuning/{grid_task.name}/`): {', '.join(tuned)}"
                + (f"; not yet: {', '.join(untuned)}." if untuned else ".")
                + (
                    f" No sampled trial beat the settings before the search (trial 0) "
                    f"for {', '.join(kept)}: they keep them."
                    if kept
                    else ""
                ),
                "",
            ]
        if not rows:
            lines += ["No complete run yet.", ""]
            continue
        lines += [
            "| agent | seeds | IQM [95% CI] | mean [95% CI] | normalised | wall clock | steps/s "
            "| params |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {_budgeted(r['agent'], r['steps'], grid_task)} | {r['seeds']} "
            f"| {r['iqm']:.1f} [{r['iqm_ci_low']:.1f}, {r['iqm_ci_high']:.1f}] "
            f"| {r['mean']:.1f} [{r['mean_ci_low']:.1f}, {r['mean_ci_high']:.1f}] "
            f"| {'' if np.isnan(r['normalised_mean']) else format(r['normalised_mean'], '.2f')} "
            f"| {r['wall_clock_s']:.0f} s | {r['steps_per_s']:.0f} | {r['params']:,} |"
            for r in rows
        ]
        if grid_task.reference is not None:
            lines += ["", _reference_line(grid_task.reference, rows)]
        lines += [
            "",
            f"![{grid_task.name} against steps](curves_{tier.name}_{grid_task.name}.png) "
            f"![{grid_task.name} against time](curves_time_{tier.name}_{grid_task.name}.png)",
            "",
        ]
    return "\n".join(lines)


def _budgeted(agent: str, steps: int, grid_task: GridTask) -> str:
    """The agent's name, with its budget beside it where it is not the task's."""
    return agent if steps == grid_task.steps else f"{agent} ({steps:,} steps)"


def _search_budget(grid: Grid, tier: Tier) -> str:
    """' Searched per agent and task: trial 0 and <n> sampled trials, <s> seeds each.', or ''."""
    if grid.tuning is None:
        return ""
    return f" Searched per agent and task (PROTOCOL.md): {grid.tuning_for(tier).describe()}."


def _smaller_budgets(tier: Tier) -> str:
    """' Smaller budgets (...): <agent> on <task> (<steps> steps of <task's>); ...', or ''."""
    named = [
        f"{agent} on {t.name} ({steps:,} steps of {t.steps:,})"
        for t in tier.tasks
        for agent, steps in t.agent_steps
    ]
    if not named:
        return ""
    return (
        " Trained and searched at a smaller budget than the task's, what they can afford "
        f"(PROTOCOL.md): {'; '.join(named)}; their scores and comparisons are at that budget."
    )


def _progress(tier: Tier, cells: Mapping[tuple[str, str], _Cell]) -> str:
    """'<done> of <planned> planned runs complete' (runs of the tier's seeds)."""
    planned = sum(len(t.agents) for t in tier.tasks) * len(tier.seeds)
    done = sum(
        1
        for t in tier.tasks
        for a in t.agent_names
        for c in [cells.get((t.name, a))]
        if c is not None
        for r in c.results
        if r["seed"] in tier.seeds
    )
    return f"{done} of {planned} planned runs complete"


def _machines(cells: Mapping[tuple[str, str], _Cell]) -> str:
    """'Runs made on: <machine> (<n> runs); ...': the speeds are those machines'."""
    counts: dict[str, int] = {}
    for cell in cells.values():
        for machine in cell.machines:
            name = machine or "not recorded"
            counts[name] = counts.get(name, 0) + 1
    return "Runs made on: " + "; ".join(f"{m} ({n} runs)" for m, n in counts.items()) + "."


def _headline(
    tier: Tier,
    progress: str,
    tasks: Sequence[str],
    aggregates: list[dict[str, Any]],
    improvements: list[dict[str, Any]],
    left_out: Sequence[str] = (),
) -> list[str]:
    """The tier in a few lines for the project's README: the normalised scores over ``tasks``
    (:func:`_headline_group`) and per focus agent the probability, over the same tasks, that it
    improves on each other agent, with its speed ratio. Without aggregates, each probability is
    over the tasks both agents ran. ``left_out``: the tasks missing from the normalised scores,
    with why (:func:`_left_out`)."""
    label = " ".join(tasks)
    scores = {r["agent"]: r for r in aggregates if r["tasks"] == label}
    if scores:
        # over the headline's tasks: its own rows where the two agents share more tasks, the
        # per-task rows where the headline has one task, else (they share just these) "all"
        chosen = {}
        for r in improvements:
            pair = (r["focus"], r["other"])
            if r["tasks"] == label or (r["tasks"] == "all" and pair not in chosen):
                chosen[pair] = r
        overall = [r for pair, r in chosen.items() if pair[1] in scores and pair[0] in scores]
    else:
        overall = [r for r in improvements if r["tasks"] == "all"]
    if not scores and not overall:
        return []
    focus = list(dict.fromkeys(r["focus"] for r in overall))
    agents = list(dict.fromkeys([*sorted(scores, key=lambda a: -scores[a]["iqm"]),
                                 *(r["other"] for r in overall)]))  # fmt: skip
    scored = (
        f" Normalised scores over {', '.join(tasks)} ({tier.zero} 0, the best agent 1)."
        if scores
        else ""
    )
    lines = [f"**{tier.name}**: {progress}{scored}", ""]
    header = ["agent"]
    if scores:
        header.append("normalised score, IQM [95% CI]")
    for name in focus:
        header += [f"P({name} > agent) [95% CI]", f"{name}'s speed ÷ agent's"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for agent in agents:
        row = [agent]
        if scores:
            score = scores[agent]
            row.append(
                f"{score['iqm']:.2f} [{score['iqm_ci_low']:.2f}, {score['iqm_ci_high']:.2f}]"
            )
        for name in focus:
            r = next((r for r in overall if r["focus"] == name and r["other"] == agent), None)
            row += (
                [
                    f"{r['probability']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] "
                    f"{r['verdict']}",
                    f"{r['steps_per_s_ratio']:.2f}x",
                ]
                if r
                else ["", ""]
            )
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    where = "Over these tasks" if scores else "Over the tasks both ran"
    for name in focus:
        rows = [r for r in overall if r["focus"] == name]
        lines.append(f"{where}, {_verdicts(name, rows)}.")
    others = sorted(set(tier.agent_names) - set(agents))
    if scores and others:
        lines.append(
            f"Not in this table (no complete runs on all these tasks yet): {', '.join(others)}."
        )
    if scores and left_out:
        lines.append(f"Not in the normalised scores: {', '.join(left_out)}.")
    lines.append("")
    return lines


def _verdicts(focus: str, rows: Any) -> str:
    """'<focus> wins against a, b; ties against c' from improvement rows of one scope."""
    said = [
        f"{word} against {', '.join(r['other'] for r in rows if r['verdict'] == word)}"
        for word in ("wins", "ties", "loses")
        if any(r["verdict"] == word for r in rows)
    ]
    return f"{focus} {'; '.join(said)}"


def _reference_line(reference: Mapping[str, Any], rows: list[dict[str, Any]]) -> str:
    """Where the agent's mean stands against its published figure: at or above it; below it
    with the figure inside the mean's 95% interval (the data do not put it below); or below
    the whole interval."""
    agent, figure = reference["agent"], float(reference["return"])
    published = f"Published reference: {agent} {figure:g} ({reference['source']})."
    row = next((r for r in rows if r["agent"] == agent), None)
    if row is None:
        return f"{published} No run of {agent} yet."
    if row["mean"] >= figure:
        verdict = "at or above it"
    elif row["mean_ci_high"] >= figure:
        verdict = "below it, but its interval reaches it"
    else:
        verdict = "below it, interval and all"
    return (
        f"{published} Here: mean {row['mean']:.1f} [{row['mean_ci_low']:.1f}, "
        f"{row['mean_ci_high']:.1f}] over {row['seeds']} seeds: {verdict}."
    )


def _seed_text(seeds: Sequence[int]) -> str:
    if list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))) and len(seeds) > 2:
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _plot_profiles(
    path: Path,
    tier: Tier,
    cells: Mapping[tuple[str, str], _Cell],
    normalise: Mapping[str, tuple[float, float]],
) -> None:
    """Performance profiles (the fraction of runs above each normalised score) of the agents
    that ran on all of the tier's normalisable tasks; no file when there are none."""
    tasks = [t.name for t in tier.tasks if t.name in normalise]
    agents = [a for a in tier.agent_names if tasks and all((t, a) in cells for t in tasks)]
    if not agents:
        path.unlink(missing_ok=True)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import library as rly

    scores = {a: _score_matrix([cells[(t, a)] for t in tasks], normalise) for a in agents}
    taus = np.linspace(
        min(0.0, min(float(s.min()) for s in scores.values())),
        max(1.0, max(float(s.max()) for s in scores.values())),
        101,
    )
    profiles, intervals = _seeded(lambda: rly.create_performance_profile(scores, taus, reps=1_000))
    fig, ax = plt.subplots(figsize=(6, 4))
    for agent in agents:
        (line,) = ax.plot(taus, profiles[agent], label=agent)
        ax.fill_between(
            taus, intervals[agent][0], intervals[agent][1], alpha=0.15, color=line.get_color()
        )
    ax.set_xlabel("normalised score τ")
    ax.set_ylabel("fraction of runs with score > τ")
    ax.set_title(f"{tier.name}: {', '.join(tasks)}", fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
