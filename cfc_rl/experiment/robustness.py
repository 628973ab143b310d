"""Evaluation under changed conditions: the return of trained runs as one condition of their
task (sensor noise, drop-out, flicker, the control period) moves away from training.

:func:`sweep` evaluates every run at every level of each swept condition (the others stay as
the run was trained), then aggregates per agent and level across the runs' seeds with 95%
stratified-bootstrap intervals (rliable), into ``robustness.csv``, ``robustness.md`` and one
plot per swept condition, ``robustness_<condition>.png`` (return against the level, one line
per agent); each run's mean and episodes go to ``robustness_runs.csv`` and
``robustness_episodes.csv``, and the run folders are left as they were. This is the
experiment that tells whether a cell that reads Δt generalises to control rates it never saw.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cfc_rl.envs import ConfigError
from cfc_rl.experiment.compare import interval_columns
from cfc_rl.experiment.evaluate import CONDITIONS, evaluate_run, shifted_task
from cfc_rl.experiment.runs import RunFolder, atomic_write, atomic_write_text, write_csv
from cfc_rl.experiment.train import configs_from_record

__all__ = ["sweep", "sweep_markdown"]

logger = logging.getLogger(__name__)


def sweep(
    runs: Sequence[str | os.PathLike[str]],
    levels: Mapping[str, Sequence[Any]],
    *,
    out: str | os.PathLike[str],
    episodes: int | None = None,
    device: str = "auto",
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every run at every level of every condition and aggregate per agent.

    :param runs: run folders (several seeds of several agents on one task)
    :param levels: per condition of :data:`~cfc_rl.experiment.evaluate.CONDITIONS`, the
        values to evaluate at, e.g. ``{"period": [1, 2, 4, 6]}``
    :param out: folder of the table and the plots
    :param episodes: episodes per evaluation (default: each task's ``eval.episodes``)
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``
    :param on_result: called with each evaluation's row as it finishes (progress)
    :return: one row per (condition, level, agent), as written to ``robustness.csv``
    :raises ConfigError: before any evaluation, for an unknown condition, an empty sweep, a
        level given twice or one a run cannot take, a run that is not complete or given twice,
        runs of more than one task, or an ``out`` that is a file
    """
    unknown = sorted(set(levels) - set(CONDITIONS))
    if unknown:
        raise ConfigError(
            f"--sweep {unknown[0]}: not a condition; choose from {', '.join(CONDITIONS)}"
        )
    if not levels or any(len(values) == 0 for values in levels.values()):
        raise ConfigError("--sweep needs a condition and at least one level, e.g. noise=0,0.1")
    for condition, values in levels.items():
        # a level given twice would count every run twice in its interval
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise ConfigError(f"--sweep {condition}: the level {twice} is given twice")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder for the table and the plots")
    folders = [RunFolder(Path(run)) for run in runs]
    _check_runs(folders, levels)
    evaluations, episodes_rows = [], []
    for condition, values in levels.items():
        for value in values:
            for folder in folders:
                result = evaluate_run(
                    folder.root, conditions={condition: value}, episodes=episodes, device=device
                )
                row = {
                    "condition": condition,
                    "level": value,
                    "agent": folder.read_config()["agent"]["name"],
                    "run": str(folder.root),
                    "mean_return": result["mean_return"],
                }
                evaluations.append(row)
                episodes_rows += [
                    {**row, "episode": i, "return": r, "length": n}
                    for i, (r, n) in enumerate(
                        zip(result["returns"], result["lengths"], strict=True)
                    )
                ]
                if on_result:
                    on_result(row)
    rows = _aggregate(evaluations)
    write_csv(out / "robustness_runs.csv", evaluations)
    write_csv(out / "robustness_episodes.csv", episodes_rows)
    write_csv(out / "robustness.csv", rows)
    atomic_write_text(out / "robustness.md", sweep_markdown(rows))
    for condition in levels:
        _plot(out / f"robustness_{condition}.png", condition, rows)
    return rows


def _check_runs(folders: list[RunFolder], levels: Mapping[str, Sequence[Any]]) -> None:
    """Before the first evaluation (a sweep runs for hours): each run given once, complete, all
    of one task (an agent's runs are aggregated across them), and able to take every level."""
    seen: dict[Path, Path] = {}
    tasks: dict[str, Path] = {}
    checked: set[str] = set()
    for folder in folders:
        where = folder.root.resolve()
        if where in seen:
            raise ConfigError(f"{folder.root} is given twice (also as {seen[where]})")
        seen[where] = folder.root
        if folder.read_result() is None:
            raise ConfigError(f"{folder.root} is not a complete run (no result.json)")
        record = folder.read_config()
        tasks.setdefault(record["task"].get("name") or record["task"]["id"], folder.root)
        if len(tasks) > 1:
            (first, first_run), (other, other_run) = list(tasks.items())[:2]
            raise ConfigError(
                f"the runs are of more than one task ({first}: {first_run}, {other}: "
                f"{other_run}); a sweep aggregates each agent's runs of one task"
            )
        key = json.dumps(record["task"], sort_keys=True)  # all the check depends on
        if key in checked:
            continue
        checked.add(key)
        _, task = configs_from_record(record)
        for condition, values in levels.items():
            for value in values:
                shifted_task(task, {condition: value})


def _aggregate(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[float]] = {}
    for row in evaluations:
        key = (row["condition"], str(row["level"]), row["agent"])
        groups.setdefault(key, []).append(row["mean_return"])
    rows = []
    for (condition, level, agent), returns in groups.items():
        rows.append(
            {
                "condition": condition,
                "level": level,
                "agent": agent,
                "runs": len(returns),
                **interval_columns(returns),
            }
        )
    return rows


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """One table per condition: a row per level, a column per agent (IQM [95% CI])."""
    lines = [
        "Mean return of each run's evaluation episodes; per agent and level, the IQM over runs",
        "(seeds) with its 95% stratified-bootstrap confidence interval (rliable).",
        "",
    ]
    for condition in dict.fromkeys(r["condition"] for r in rows):
        agents = list(dict.fromkeys(r["agent"] for r in rows if r["condition"] == condition))
        levels = list(dict.fromkeys(r["level"] for r in rows if r["condition"] == condition))
        lines += [
            f"### {condition}",
            "",
            f"| {condition} | " + " | ".join(agents) + " |",
            "|---|" + "---:|" * len(agents),
        ]
        for level in levels:
            cells = []
            for agent in agents:
                match = [
                    r
                    for r in rows
                    if r["condition"] == condition and r["level"] == level and r["agent"] == agent
                ]
                r = match[0]
                cells.append(f"{r['iqm']:.1f} [{r['iqm_ci_low']:.1f}, {r['iqm_ci_high']:.1f}]")
            lines.append(f"| {level} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(path: Path, condition: str, rows: list[dict[str, Any]]) -> None:
    """Return (IQM, 95% CI) against the level, one line per agent."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    selected = [r for r in rows if r["condition"] == condition]
    levels = list(dict.fromkeys(r["level"] for r in selected))
    positions = {level: i for i, level in enumerate(levels)}
    for agent in dict.fromkeys(r["agent"] for r in selected):
        points = [r for r in selected if r["agent"] == agent]
        x = [positions[r["level"]] for r in points]
        (line,) = ax.plot(x, [r["iqm"] for r in points], marker="o", label=agent)
        ax.fill_between(
            x,
            [r["iqm_ci_low"] for r in points],
            [r["iqm_ci_high"] for r in points],
            alpha=0.2,
            color=line.get_color(),
        )
    ax.set_xticks(range(len(levels)), [str(level) for level in levels])
    ax.set_xlabel(condition)
    ax.set_ylabel("evaluation return (IQM, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
