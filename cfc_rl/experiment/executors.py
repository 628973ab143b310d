"""Where jobs run: an :class:`Executor` takes jobs and yields what became of each.

:class:`LocalExecutor` runs them in a process pool on this machine. A cluster executor only
has to implement :meth:`Executor.run`: jobs are plain data (:class:`~.jobs.Job`) and
:func:`~.jobs.run_job` returns each one's result record.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import signal
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cfc_rl.experiment.jobs import Job, run_job

__all__ = ["ExecutionInterrupted", "Executor", "JobResult", "LocalExecutor"]


@dataclass(frozen=True)
class JobResult:
    """What became of a job.

    :param job: the job
    :param status: ``"done"``, ``"skipped"`` (already complete), ``"failed"`` or
        ``"interrupted"`` (Ctrl-C; a checkpoint was saved)
    :param seconds: time the job took in this invocation
    :param error: the traceback of a failed job
    :param record: the run's result record (``result.json``) of a done job
    """

    job: Job
    status: str
    seconds: float = 0.0
    error: str = ""
    record: dict[str, Any] = field(default_factory=dict)


class ExecutionInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the jobs; the ones that were training saved a checkpoint. The message
    counts what was finished and saved."""


def run_reporting(job: Job) -> JobResult:
    """:func:`run_job`, with its error caught and reported, so one failing job does not stop
    the others; a job stopped by Ctrl-C (after saving its checkpoint) is ``"interrupted"``."""
    from cfc_rl.experiment.train import TrainingInterrupted

    start = time.perf_counter()
    try:
        record = run_job(job)
    except TrainingInterrupted as e:
        return JobResult(job, "interrupted", time.perf_counter() - start, str(e))
    except Exception:
        return JobResult(job, "failed", time.perf_counter() - start, traceback.format_exc())
    return JobResult(job, "done", time.perf_counter() - start, record=record)


class _NotStarted(Exception):
    """A job the pool took up after Ctrl-C: it was not begun."""


_stopped: Any = None  # the pool's "Ctrl-C came" event, in each worker


def _ignore_interrupts(stopped: Any) -> None:
    """Pool workers ignore Ctrl-C between jobs (an idle worker would die with a traceback);
    :func:`_run_interruptibly` takes it while a job trains, which then saves a checkpoint."""
    global _stopped
    _stopped = stopped
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_interruptibly(job: Job) -> JobResult:
    # The pool hands a worker its next job before the parent can cancel it: after Ctrl-C such
    # a job would train to its end while the command waits for it.
    if _stopped.is_set():
        raise _NotStarted
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run_reporting(job)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if result.status == "interrupted":
        _stopped.set()
    return result


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
        """Run every job, ``self.jobs`` at a time.

        :raises ExecutionInterrupted: on Ctrl-C, once the running jobs have saved checkpoints
        """
        finished = 0
        if self.jobs == 1:
            for job in jobs:
                result = run_reporting(job)
                yield result
                if result.status == "interrupted":
                    raise ExecutionInterrupted(_interrupted(finished, 1, len(jobs)))
                finished += 1
            return
        # spawn, not fork: forking a process that has started torch's thread pools can hang.
        context = multiprocessing.get_context("spawn")
        stopped = context.Event()
        with concurrent.futures.ProcessPoolExecutor(
            self.jobs, mp_context=context, initializer=_ignore_interrupts, initargs=(stopped,)
        ) as pool:
            futures = [pool.submit(_run_interruptibly, job) for job in jobs]
            results: list[JobResult] = []
            try:
                for future in concurrent.futures.as_completed(futures):
                    results.append(future.result())
                    yield results[-1]
                    if results[-1].status == "interrupted":
                        raise KeyboardInterrupt
            except (KeyboardInterrupt, _NotStarted):
                stopped.set()
                for future in futures:
                    future.cancel()
                # the jobs in training got Ctrl-C too: wait for their checkpoints
                for future in futures:
                    if not future.cancelled():
                        with contextlib.suppress(BaseException):
                            if future.result() not in results:
                                results.append(future.result())
                finished = sum(r.status != "interrupted" for r in results)
                saved = sum(r.status == "interrupted" for r in results)
                raise ExecutionInterrupted(_interrupted(finished, saved, len(jobs))) from None


def _interrupted(finished: int, saved: int, total: int) -> str:
    return (
        f"interrupted: {finished} of {total} runs to train finished, {saved} saved a checkpoint "
        "to continue from"
    )
