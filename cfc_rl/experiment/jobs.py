"""A training job as plain data, and the one function that runs it.

A :class:`Job` carries the resolved agent and task (the same plain data a run records in its
``config.yaml``), not paths to files that may only exist where it was made, so any executor
(a local process pool, a cluster) only has to call :func:`run_job` on it somewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfc_rl.experiment.runs import RunFolder
from cfc_rl.experiment.settings import AgentConfig
from cfc_rl.experiment.tasks import Task

__all__ = ["Job", "run_job"]


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


def run_job(job: Job, on_evaluation: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train the job to completion, resuming a partial run in its folder; returns the run's
    result record (``result.json``). Errors propagate: the executor reports them.

    :param on_evaluation: called with the step count and mean return of every periodic
        evaluation (a hyperparameter search reports them to its scheduler)
    """
    import torch

    from cfc_rl.experiment.train import configs_from_record, resume_run, start_run

    torch.set_num_threads(job.threads)
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
