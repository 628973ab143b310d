"""The committed results are what the repository's files give now: every run under results/
(the README's figures, the benchmark) was trained with the settings its agent and task files
give today. Tuning an agent on a task (which writes overrides.<task> into the agent file) makes
the runs of that agent on that task stale, and this test names them: run their commands again
(or retire the figures that quote them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from cfc_rl.experiment.benchmark import stale_runs
from cfc_rl.experiment.compare import plan_jobs
from cfc_rl.experiment.runs import RunFolder

ROOT = Path(__file__).resolve().parent.parent

# README figures kept as summaries only (their runs predate committed run files): the task and
# the agents they ran, which must stay untuned on that task until the figures are made again.
SUMMARIES_WITHOUT_RUN_FILES = {
    "results/compare_pendulum_p_irregular": (
        "pendulum_p_irregular",
        ("ppo_cfc", "ppo_lstm", "ppo_mlp"),
    ),
    "results/robustness_pendulum_p_irregular": ("pendulum_p_irregular", ("ppo_cfc", "ppo_gru")),
}


def test_every_committed_run_was_trained_with_the_files_as_they_are(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the runs name their agent and task files from the repository root
    # results/<study>/runs/: the committed runs (a search's trial runs are not kept)
    runs = sorted(p.parent for p in (ROOT / "results").glob("*/runs/**/result.json"))
    assert len(runs) > 40
    jobs = []
    for folder in runs:
        run = RunFolder(folder)
        config, result = run.read_config(), run.read_result()
        assert result is not None, folder
        [job] = plan_jobs(
            [config["agent"]["source"]],
            [config["task"]["source"]],
            seeds=[config["seed"]],
            steps=result["total_timesteps"],
        )
        jobs.append(dataclasses.replace(job, run_dir=str(folder)))
    stale = stale_runs(jobs)
    assert not stale, "runs trained with other settings than the files give now:\n" + "\n".join(
        stale
    )


def test_figures_without_run_files_ran_agents_that_are_still_untuned_there() -> None:
    for folder, (task, agents) in SUMMARIES_WITHOUT_RUN_FILES.items():
        assert (ROOT / folder).is_dir(), folder
        for agent in agents:
            data = yaml.safe_load((ROOT / "agents" / f"{agent}.yaml").read_text())
            assert task not in (data.get("overrides") or {}), (
                f"{agent} is tuned on {task} now: make {folder} again with the README's commands"
            )
