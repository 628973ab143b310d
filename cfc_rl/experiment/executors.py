"""Where jobs run: an :class:`Executor` takes jobs and yields what became of each.

:class:`LocalExecutor` runs them in a process pool on this machine. A cluster executor only
has to implement :meth:`Executor.run`: jobs are plain data (:class:`~.jobs.Job`) and
:func:`~.jobs.run_job` returns each one's result record.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cfc_rl.experiment.jobs import Job, run_job

__all__ = ["Executor", "JobResult", "LocalExecutor"]


@dataclass(frozen=True)
class JobResult:
    """What became of a job.

    :param job: the job
    :param status: ``"done"``, ``"skipped"`` (already complete) or ``"failed"``
    :param seconds: time the job took in this invocation
    :param error: the traceback of a failed job
    :param record: the run's result record (``result.json``) of a done job
    """

    job: Job
    status: str
    seconds: float = 0.0
    error: str = ""
    record: dict[str, Any] = field(default_factory=dict)


def run_reporting(job: Job) -> JobResult:
    """:func:`run_job`, with its error caught and reported, so one failing job does not stop
    the others."""
    start = time.perf_counter()
    try:
        record = run_job(job)
    except Exception:
        return JobResult(job, "failed", time.perf_counter() - start, traceback.format_exc())
    return JobResult(job, "done", time.perf_counter() - start, record=record)


class Executor(Protocol):
    """Runs independent jobs."""

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run every job and yield the results as jobs finish, in any order."""
        ...


class LocalExecutor:
    """Jobs in parallel processes on this machine (in this process when ``jobs == 1``).

    :param jobs: number of jobs at once
    """

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.jobs = jobs

    def run(self, jobs: Sequence[Job]) -> Iterator[JobResult]:
        """Run every job, ``self.jobs`` at a time."""
        if self.jobs == 1:
            for job in jobs:
                yield run_reporting(job)
            return
        # spawn, not fork: forking a process that has started torch's thread pools can hang.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(self.jobs, mp_context=context) as pool:
            futures = [pool.submit(run_reporting, job) for job in jobs]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
