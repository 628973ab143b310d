"""A training job as plain data, and the one function that runs it.

A :class:`Job` carries the resolved agent and task (the same plain data a run records in its
``config.yaml``), not paths to files that may only exist where it was made, so any executor
(a local process pool, a cluster) only has to call :func:`run_job` on it somewhere.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cfc_rl.experiment.runs import RunError, RunFolder, dump_yaml
from cfc_rl.experiment.settings import AgentConfig
from cfc_rl.experiment.tasks import Task

__all__ = ["Job", "first_difference", "refuse_stale", "run_job", "stale_runs"]


@dataclass(frozen=True)
class Job:
    """One (agent, task, seed) run.

    :param agent: the resolved agent as plain data (``name``, ``source`` and its settings)
    :param task: the resolved task as plain data (``name``, ``source``, the task-file schema)
    :param seed: the seed
    :param run_dir: the run folder
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param threads: torch threads of the job (1: jobs run side by side on separate cores)
    """

    agent: dict[str, Any]
    task: dict[str, Any]
    seed: int
    run_dir: str
    device: str = "cpu"
    threads: int = 1

    @classmethod
    def create(
        cls,
        agent: AgentConfig,
        task: Task,
        seed: int,
        run_dir: str | os.PathLike[str],
        device: str = "cpu",
        threads: int = 1,
    ) -> Job:
        """A job from a resolved agent and task (see :func:`cfc_rl.experiment.train.resolve`)."""
        return cls(
            agent={"name": agent.name, "source": agent.source, **agent.as_dict()},
            task={"name": task.name, "source": task.source, **task.as_dict()},
            seed=seed,
            run_dir=str(run_dir),
            device=device,
            threads=threads,
        )

    @property
    def name(self) -> str:
        """``task/agent/seed_n``, for progress lines."""
        return f"{self.task['name']}/{self.agent['name']}/seed_{self.seed}"

    @property
    def budget(self) -> int:
        return int(self.task["train"]["total_timesteps"])

    def is_complete(self) -> bool:
        """Whether its run folder already holds a run trained to its budget."""
        return RunFolder(Path(self.run_dir)).is_complete(self.budget)

    def difference_from_run(self) -> str | None:
        """How the run already in its folder was configured otherwise than this job (the
        first difference, e.g. ``agent.hyperparams.learning_rate was 0.5, is now 0.001``), or
        None where the folder holds no run or the same configuration. The budget is left
        out: resuming a run to a new budget continues the same run."""
        run = RunFolder(Path(self.run_dir))
        return self.difference_from_record(run.read_config()) if run.config.exists() else None

    def difference_from_record(self, record: Mapping[str, Any]) -> str | None:
        """:meth:`difference_from_run` for a run's recorded configuration (its
        ``config.yaml``), wherever the run is."""
        for part in ("agent", "task"):
            # through YAML, as the record was: tuples become lists
            recorded, now = (
                _without_budget(part, data)
                for data in (record.get(part), yaml.safe_load(dump_yaml(getattr(self, part))))
            )
            difference = first_difference(recorded, now)
            if difference:
                return f"{part}.{difference}"
        return None


def _without_budget(part: str, data: Any) -> Any:
    if part != "task" or not isinstance(data, Mapping) or "train" not in data:
        return data
    data = copy.deepcopy(dict(data))
    if isinstance(data["train"], dict):
        data["train"].pop("total_timesteps", None)
    return data


def first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """The first key path (in sorted order) where two nested mappings differ, with both
    values, or None where they are equal."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(key), new.get(key), f"{where}{key}.")
            if found:
                return found
        return None
    if old != new:
        return f"{where[:-1]} was {old!r}, is now {new!r}"
    return None


def stale_runs(jobs: Sequence[Job]) -> list[str]:
    """The jobs whose folder holds a run, complete or not, configured otherwise than the job
    (the agent or task file changed since it started): one line each, naming the first
    difference. Such a run is neither skipped as done nor continued: it must be deleted or
    its files restored."""
    lines = []
    for job in jobs:
        difference = job.difference_from_run()
        if difference:
            lines.append(f"{job.run_dir}: {difference}")
    return lines


def refuse_stale(stale: Sequence[str]) -> None:
    """Refuse to go on with stale runs (lines of :func:`stale_runs`).

    :raises RunError: naming the first three, if there are any
    """
    if stale:
        raise RunError(
            f"{len(stale)} run(s) were started with other settings than the agent and task "
            "files give now; delete them to train them again, or restore the files: "
            + "; ".join(stale[:3])
            + (" ..." if len(stale) > 3 else "")
        )


def run_job(job: Job, on_evaluation: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the job to completion, resuming a partial run in its folder; returns the run's
    result record (``result.json``). Errors propagate: the executor reports them.

    :param on_evaluation: called with the step count and mean return of every periodic
        evaluation (a hyperparameter search reports them to its scheduler)
    :raises RunError: if the folder holds a run configured otherwise (:func:`stale_runs`)
    """
    import torch

    from cfc_rl.experiment.train import configs_from_record, resume_run, start_run

    torch.set_num_threads(job.threads)
    refuse_stale(stale_runs([job]))
    run = RunFolder(Path(job.run_dir))
    if run.config.exists():
        resume_run(run.root, steps=job.budget, device=job.device, on_evaluation=on_evaluation)
    else:
        agent, task = configs_from_record({"agent": job.agent, "task": job.task})
        start_run(
            agent, task, seed=job.seed, run=run, device=job.device, on_evaluation=on_evaluation
        )
    result = run.read_result()
    assert result is not None, f"{run.root} has no result after training"
    return result
