"""Compare agents: every (agent, task, seed) trained as an independent job, then aggregated
with honest statistics.

:func:`compare` builds the job grid, skips runs that are complete (so that an interrupted
comparison resumes where it stopped, and a partial run continues from its checkpoint), runs the
rest on an :class:`Executor`, and writes to the output folder:

- ``summary.csv`` and ``summary.md``: per task and agent, the interquartile mean (IQM) and the
  mean of the final returns over seeds, each with a 95% stratified-bootstrap confidence interval
  (rliable's definitions, Agarwal et al. 2021: :mod:`.statistics`), plus wall-clock time,
  environment steps per second and the number of parameters;
- ``curves_<task>.png``: IQM return against environment steps during training, one line per
  agent, with the 95% confidence band.

Jobs are plain data (:mod:`.jobs`) and run on an :class:`~.executors.Executor`: a local process
pool by default; a cluster executor only has to implement ``run``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cfc_rl.experiment.executors import Executor, JobResult, LocalExecutor
from cfc_rl.experiment.jobs import Job, refuse_stale, stale_runs
from cfc_rl.experiment.runs import RunFolder, atomic_write, atomic_write_text, write_csv
from cfc_rl.experiment.statistics import BOOTSTRAP_REPS, curve_intervals, iqm_and_mean_intervals

__all__ = [
    "aggregate",
    "compare",
    "interval_columns",
    "interval_estimates",
    "plan_jobs",
    "plot_curves",
    "run_jobs",
    "summary_markdown",
]

logger = logging.getLogger(__name__)

CURVE_BOOTSTRAP_REPS = 1_000  # per evaluation point of the learning curves (cheaper)


def plan_jobs(
    agents: Sequence[str | os.PathLike[str]],
    tasks: Sequence[str | os.PathLike[str]],
    *,
    seeds: int | Sequence[int] = 3,
    steps: int | None = None,
    out: str | os.PathLike[str] = "runs/compare",
    device: str = "cpu",
) -> list[Job]:
    """Every (agent, task, seed) of a comparison as a job, resolved here: a typo in the last
    file, or an agent without settings for a task, fails before any training starts.

    :raises ConfigError: naming the file and the key
    """
    from cfc_rl.experiment.train import resolve

    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    jobs = []
    for task in tasks:
        for agent in agents:
            agent_cfg, task_cfg = resolve(agent, task, steps)
            for seed in seed_list:
                run_dir = Path(out) / task_cfg.name / agent_cfg.name / f"seed_{seed}"
                jobs.append(Job.create(agent_cfg, task_cfg, seed, run_dir, device))
    return jobs


def compare(
    agents: Sequence[str | os.PathLike[str]],
    tasks: Sequence[str | os.PathLike[str]],
    *,
    seeds: int | Sequence[int] = 3,
    steps: int | None = None,
    out: str | os.PathLike[str] = "runs/compare",
    device: str = "cpu",
    executor: Executor | None = None,
    on_result: Callable[[JobResult], None] | None = None,
) -> tuple[list[JobResult], list[dict[str, Any]]]:
    """Train every (agent, task, seed) that is not complete yet, then aggregate.

    :param agents: agent files
    :param tasks: task files
    :param seeds: a number of seeds (0, 1, ... n-1) or the seeds themselves
    :param steps: budget of every run (None: each task file's ``train.total_timesteps``)
    :param out: output folder: run folders under ``<out>/<task>/<agent>/seed_<n>``, and the
        summary files and plots
    :param device: device of every job
    :param executor: where the jobs run (default: :class:`LocalExecutor` with one job)
    :param on_result: called with each job's result as it finishes (progress display)
    :return: the job results (skipped ones included) and the summary rows
    """
    jobs = plan_jobs(agents, tasks, seeds=seeds, steps=steps, out=out, device=device)
    results = run_jobs(jobs, executor, on_result)
    rows = aggregate(out)
    return results, rows


def run_jobs(
    jobs: Sequence[Job],
    executor: Executor | None = None,
    on_result: Callable[[JobResult], None] | None = None,
) -> list[JobResult]:
    """Train the jobs that are not complete yet (a partial run continues from its checkpoint).

    :param jobs: the jobs, e.g. from :func:`plan_jobs`
    :param executor: where they run (default: :class:`LocalExecutor` with one job)
    :param on_result: called with each job's result as it finishes, skipped ones included
    :return: the job results, skipped ones included
    :raises RunError: if a job's folder holds a run started with other settings (before
        anything trains: such a run is neither done nor to be continued)
    """
    from cfc_rl.experiment.train import compile_cells, configs_from_record

    refuse_stale(stale_runs(jobs))
    todo, results = [], []
    for job in jobs:
        if job.is_complete():
            results.append(JobResult(job, "skipped"))
            if on_result:
                on_result(results[-1])
        else:
            todo.append(job)
    logger.info("%d runs to train, %d already complete", len(todo), len(results))
    # Once here, before the jobs fan out: no job waits on another's build or counts its time.
    for job in todo:
        compile_cells(configs_from_record({"agent": job.agent, "task": job.task})[0])
    for result in (executor or LocalExecutor()).run(todo):
        results.append(result)
        if on_result:
            on_result(result)
    return results


def aggregate(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Summarise every complete run under ``out`` into ``summary.csv``, ``summary.md`` and one
    ``curves_<task>.png`` per task.

    :param out: the comparison's output folder
    :return: one row per (task, agent), as written to ``summary.csv``
    """
    out = Path(out)
    # Runs of different budgets are different experiments: they are never pooled.
    runs: dict[tuple[str, int, str], list[RunFolder]] = {}
    for result_file in sorted(out.glob("*/*/seed_*/result.json")):
        run = RunFolder(result_file.parent)
        budget = run.read_result()["total_timesteps"]
        runs.setdefault((run.root.parent.parent.name, budget, run.root.parent.name), []).append(run)
    rows = []
    for (task, budget, agent), folders in sorted(runs.items()):
        results = [f.read_result() for f in folders]
        finals = [r["final_mean_return"] for r in results]
        rows.append(
            {
                "task": task,
                "agent": agent,
                "seeds": len(results),
                "steps": budget,
                **interval_columns(finals),
                "wall_clock_s": float(np.mean([r["wall_clock_s"] for r in results])),
                "steps_per_s": float(np.mean([r["steps_per_s"] for r in results])),
                "params": results[0]["params"],
            }
        )
    write_csv(out / "summary.csv", rows, empty_header=("task", "agent"))
    atomic_write_text(out / "summary.md", summary_markdown(rows))
    for task in sorted({task for task, _, _ in runs}):
        budgets = {b for t, b, _ in runs if t == task}
        curves = {
            agent if len(budgets) == 1 else f"{agent}, {budget:,} steps": folders
            for (t, budget, agent), folders in runs.items()
            if t == task
        }
        plot_curves(out / f"curves_{task}.png", task, curves)
    return rows


def interval_columns(scores: Sequence[float]) -> dict[str, float]:
    """The IQM and the mean of runs' scores with their 95% stratified-bootstrap intervals, as
    the columns of a summary table."""
    (iqm, iqm_lo, iqm_hi), (mean, mean_lo, mean_hi) = interval_estimates(
        np.asarray(scores, dtype=float)[:, None]
    )
    return {
        "iqm": iqm,
        "iqm_ci_low": iqm_lo,
        "iqm_ci_high": iqm_hi,
        "mean": mean,
        "mean_ci_low": mean_lo,
        "mean_ci_high": mean_hi,
    }


def interval_estimates(
    scores: np.ndarray, reps: int = BOOTSTRAP_REPS
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """IQM and mean of ``scores`` (runs, tasks), each with its 95% stratified-bootstrap CI."""
    return iqm_and_mean_intervals(scores, reps)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary as Markdown: one table per task."""
    lines = [
        "Final return: the mean over each run's final evaluation episodes; per agent, the",
        "interquartile mean (IQM) and the mean over seeds with 95% stratified-bootstrap",
        "confidence intervals (rliable). With fewer than 4 seeds the IQM trims nothing and",
        "equals the mean. Steps/s: training throughput, evaluations excluded.",
        "",
    ]
    for task, steps in sorted({(r["task"], r["steps"]) for r in rows}):
        task_rows = [r for r in rows if r["task"] == task and r["steps"] == steps]
        lines += [
            f"### {task} ({steps:,} steps)",
            "",
            "| agent | seeds | IQM [95% CI] | mean [95% CI] | wall clock | steps/s | params |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(task_rows, key=lambda r: -r["iqm"]):
            lines.append(
                f"| {r['agent']} | {r['seeds']} "
                f"| {r['iqm']:.1f} [{r['iqm_ci_low']:.1f}, {r['iqm_ci_high']:.1f}] "
                f"| {r['mean']:.1f} [{r['mean_ci_low']:.1f}, {r['mean_ci_high']:.1f}] "
                f"| {r['wall_clock_s']:.0f} s | {r['steps_per_s']:.0f} | {r['params']:,} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_curves(
    path: Path, task: str, runs: dict[str, list[RunFolder]], against: str = "steps"
) -> None:
    """IQM evaluation return, one line per agent, with 95% bootstrap bands; no file where no
    run has evaluated yet (an empty plot says nothing).

    :param against: the x axis: ``"steps"`` (environment steps) or ``"time"`` (training
        wall-clock time: each evaluation's step count over its run's steps/s, so evaluations
        do not count and a run's throughput is taken as constant)
    """
    if against not in ("steps", "time"):
        raise ValueError(f"against must be 'steps' or 'time', not {against!r}")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = False
    for agent, folders in sorted(runs.items()):
        curves, seconds_per_step = [], []
        for folder in folders:
            if folder.evaluations.exists():
                with np.load(folder.evaluations) as data:
                    curves.append((data["timesteps"], data["results"].mean(axis=1)))
                result = folder.read_result()
                seconds_per_step.append(1.0 / result["steps_per_s"] if result else np.nan)
        if not curves:
            continue
        # Seeds evaluate at the same step counts; keep the points they all have.
        n = min(len(t) for t, _ in curves)
        if n == 0:
            continue
        steps = curves[0][0][:n]
        scores = np.stack([r[:n] for _, r in curves])  # (seeds, points)
        # Seeds of one agent run at about one speed: their mean places the points in time.
        x = steps if against == "steps" else steps * np.nanmean(seconds_per_step)

        point, low, high = curve_intervals(scores, CURVE_BOOTSTRAP_REPS)
        (line,) = ax.plot(x, point, label=f"{agent} ({len(curves)} seeds)")
        plotted = True
        ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
    ax.set_xlabel("environment steps" if against == "steps" else "training time (s)")
    ax.set_ylabel("evaluation return (IQM, 95% CI)")
    ax.set_title(task)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize="small")
    fig.tight_layout()
    if plotted:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    else:
        path.unlink(missing_ok=True)  # an earlier plot of runs that are no longer there
    plt.close(fig)
