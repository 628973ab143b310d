"""The benchmark study: its grid file, the runs it plans, the report it writes from run files, and
the published report, which must be exactly what the committed runs give."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from cfc_rl.envs import ConfigError
from cfc_rl.experiment import cli
from cfc_rl.experiment.benchmark import (
    HEADLINE_BEGIN,
    HEADLINE_END,
    _reference_line,
    estimate_seconds,
    load_grid,
    measured_speeds,
    plan,
    read_headline,
    report,
    select,
    tune_cells,
    verdict,
)
from cfc_rl.experiment.compare import plan_jobs
from cfc_rl.experiment.jobs import stale_runs
from cfc_rl.experiment.runs import RunError, RunFolder, dump_yaml
from cfc_rl.experiment.tasks import load_task

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "results" / "benchmark"

# Made-up final returns per (task, agent), 4 seeds each: on cartpole_p ppo_cfc is best, on
# pendulum_p ppo_gru is; ppo_mlp (no memory) is worst on both.
FINALS = {
    ("cartpole_p", "ppo_mlp"): [100.0, 110.0, 120.0, 130.0],
    ("cartpole_p", "ppo_gru"): [300.0, 310.0, 320.0, 330.0],
    ("cartpole_p", "ppo_cfc"): [500.0, 500.0, 500.0, 500.0],
    ("pendulum_p", "ppo_mlp"): [-1200.0, -1100.0, -1000.0, -900.0],
    ("pendulum_p", "ppo_gru"): [-300.0, -250.0, -200.0, -150.0],
    ("pendulum_p", "ppo_cfc"): [-700.0, -650.0, -600.0, -550.0],
}


def write_grid(folder: Path, **changes) -> Path:
    data = {
        "runs": "runs",
        "agent_sets": {
            "ppo": [str(ROOT / "agents" / f"{a}.yaml") for a in ("ppo_cfc", "ppo_gru", "ppo_mlp")]
        },
        "tiers": {
            "classic": {
                "seeds": 4,
                "zero": "ppo_mlp",
                "focus": "ppo_cfc",
                "tasks": [
                    {
                        "task": str(ROOT / "envs" / "cartpole_p.yaml"),
                        "steps": 1000,
                        "agents": ["ppo"],
                        "reference": {"agent": "ppo_gru", "return": 320.0, "source": "a paper"},
                    },
                    {
                        "task": str(ROOT / "envs" / "pendulum_p.yaml"),
                        "steps": 2000,
                        "agents": ["ppo"],
                        "reference": {"agent": "ppo_cfc", "return": -500, "source": "a blog"},
                    },
                ],
            }
        },
    }
    data.update(changes)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_grid_with_irregular(folder: Path, agents: list[str]) -> Path:
    """The grid of :func:`write_grid` with a third task, irregular Pendulum-P, for ``agents``
    (agent set or agent file names)."""
    path = write_grid(folder)
    data = yaml.safe_load(path.read_text())
    data["tiers"]["classic"]["tasks"].append(
        {
            "task": str(ROOT / "envs" / "pendulum_p_irregular.yaml"),
            "steps": 2000,
            "agents": [a if a == "ppo" else str(ROOT / "agents" / f"{a}.yaml") for a in agents],
        }
    )
    path.write_text(yaml.safe_dump(data))
    return path


def fake_run(job, final: float, steps_per_s: float = 100.0) -> None:
    """The small files a finished run leaves, with the given final return."""
    run = RunFolder(Path(job.run_dir))
    run.root.mkdir(parents=True, exist_ok=True)
    machine = "A CPU, 2 cores, torch threads 1"
    run.config.write_text(
        dump_yaml({"agent": job.agent, "task": job.task, "seed": job.seed, "machine": machine})
    )
    steps = np.arange(1, 5) * job.budget // 4
    returns = np.linspace(final - 100, final, 4)[:, None] + np.zeros((4, 3))
    np.savez(run.evaluations, timesteps=steps, results=returns, ep_lengths=np.ones((4, 3)))
    record = {
        "agent": job.agent["name"],
        "task": job.task["name"],
        "seed": job.seed,
        "total_timesteps": job.budget,
        "final_mean_return": final,
        "wall_clock_s": job.budget / steps_per_s,
        "steps_per_s": steps_per_s,
        "params": 1234,
    }
    run.result.write_text(json.dumps(record))


# Training steps/s per (task, agent): ppo_cfc is 4x and 1x ppo_gru's speed (geometric mean 2),
# 0.5x and 0.25x ppo_mlp's (geometric mean 0.354).
SPEEDS = {
    ("cartpole_p", "ppo_mlp"): 800.0,
    ("cartpole_p", "ppo_gru"): 100.0,
    ("cartpole_p", "ppo_cfc"): 400.0,
    ("pendulum_p", "ppo_mlp"): 800.0,
    ("pendulum_p", "ppo_gru"): 200.0,
    ("pendulum_p", "ppo_cfc"): 200.0,
}


def fill(grid) -> None:
    for job in plan(grid):
        cell = (job.task["name"], job.agent["name"])
        fake_run(job, FINALS[cell][job.seed], SPEEDS[cell])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_report_normalises_aggregates_and_judges(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    fill(grid)
    (tmp_path / "tuning" / "cartpole_p" / "ppo_cfc").mkdir(parents=True)
    (tmp_path / "tuning" / "cartpole_p" / "ppo_cfc" / "trials.csv").write_text(
        "trial,score,status\n0,500.0,complete\n1,500.0,complete\n2,,error\n"
    )
    (tmp_path / "tuning" / "cartpole_p" / "ppo_gru").mkdir(parents=True)
    (tmp_path / "tuning" / "cartpole_p" / "ppo_gru" / "trials.csv").write_text(
        "trial,score,status\n0,400.0,complete\n1,500.0,complete\n"
    )
    text = report(grid)

    summary = {(r["task"], r["agent"]): r for r in read_csv(tmp_path / "summary.csv")}
    assert len(summary) == 6
    # no memory = 0, the best agent = 1, the others in between by their mean
    assert float(summary[("cartpole_p", "ppo_mlp")]["normalised_mean"]) == 0.0
    assert float(summary[("cartpole_p", "ppo_cfc")]["normalised_mean"]) == 1.0
    assert float(summary[("cartpole_p", "ppo_gru")]["normalised_mean"]) == pytest.approx(200 / 385)
    assert float(summary[("pendulum_p", "ppo_gru")]["normalised_mean"]) == 1.0
    assert float(summary[("pendulum_p", "ppo_cfc")]["normalised_mean"]) == pytest.approx(425 / 825)
    assert float(summary[("pendulum_p", "ppo_mlp")]["mean"]) == pytest.approx(-1050.0)

    aggregate = {r["agent"]: r for r in read_csv(tmp_path / "aggregate.csv")}
    assert set(aggregate) == {"ppo_cfc", "ppo_gru", "ppo_mlp"}
    assert float(aggregate["ppo_mlp"]["mean"]) == pytest.approx(0.0)
    cfc_scores = [1.0] * 4 + [(f + 1050) / 825 for f in FINALS[("pendulum_p", "ppo_cfc")]]
    assert float(aggregate["ppo_cfc"]["mean"]) == pytest.approx(np.mean(cfc_scores))
    for row in aggregate.values():
        assert float(row["mean_ci_low"]) <= float(row["mean"]) <= float(row["mean_ci_high"])

    improvement = {(r["other"], r["tasks"]): r for r in read_csv(tmp_path / "improvement.csv")}
    # every CfC run beats every MLP run on both tasks: probability 1
    assert float(improvement[("ppo_mlp", "all")]["probability"]) == 1.0
    assert improvement[("ppo_mlp", "all")]["verdict"] == "wins"
    assert improvement[("ppo_gru", "cartpole_p")]["verdict"] == "wins"
    assert improvement[("ppo_gru", "pendulum_p")]["verdict"] == "loses"
    assert float(improvement[("ppo_gru", "all")]["probability"]) == 0.5
    assert improvement[("ppo_gru", "all")]["verdict"] == "ties"
    # what it costs: the focus agent's steps/s over the other's, geometric mean over tasks
    assert float(improvement[("ppo_gru", "cartpole_p")]["steps_per_s_ratio"]) == 4.0
    assert float(improvement[("ppo_gru", "all")]["steps_per_s_ratio"]) == pytest.approx(2.0)
    assert float(improvement[("ppo_mlp", "all")]["steps_per_s_ratio"]) == pytest.approx(0.125**0.5)

    assert text == (tmp_path / "README.md").read_text()
    assert "16 of 24 planned runs complete" not in text and "24 of 24 planned runs" in text
    assert "Runs made on: A CPU, 2 cores, torch threads 1 (24 runs)." in text
    assert "- Over the tasks both ran: ppo_cfc wins against ppo_mlp; ties against ppo_gru." in text
    assert "| ppo_gru | 1.00 [1.00, 1.00] wins | 0.00 [0.00, 0.00] loses | 0.50 " in text
    assert "| ppo_mlp | 1.00 [1.00, 1.00] wins | 1.00 [1.00, 1.00] wins | 1.00 " in text
    assert text.count(" | 2.00x |") == 1 and text.count(" | 0.35x |") == 1
    assert (
        "- Per task: ppo_cfc wins against ppo_gru (cartpole_p), ppo_mlp (cartpole_p, pendulum_p); "
        "loses against ppo_gru (pendulum_p)." in text
    )
    assert "| ppo_cfc | 4 | 500.0 [500.0, 500.0] | 500.0 [500.0, 500.0] | 1.00 |" in text
    assert (
        "Tuned (`tuning/cartpole_p/`): ppo_cfc, ppo_gru; not yet: ppo_mlp. No sampled trial beat "
        "the settings before the search (trial 0) for ppo_cfc: they keep them." in text
    )
    assert "Tuned: none yet." in text  # pendulum_p
    # a figure above the mean but inside its interval is not called reached
    assert (
        "Published reference: ppo_gru 320 (a paper). Here: mean 315.0 [305.0, 325.0] over 4 "
        "seeds: below it, but its interval reaches it." in text
    )
    assert "Published reference: ppo_cfc -500 (a blog). Here: mean -625.0" in text
    assert text.count(": below it, interval and all.") == 1
    names = ("curves_classic_cartpole_p", "curves_time_classic_pendulum_p", "profiles_classic")
    for name in names:
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    # the same files give the same report, byte for byte (the bootstrap is seeded)
    again = tmp_path / "again"
    assert report(grid, again) == text
    assert (again / "summary.csv").read_bytes() == (tmp_path / "summary.csv").read_bytes()


@pytest.mark.parametrize(
    ("mean", "high", "verdict"),
    [
        (320.0, 330.0, "at or above it"),
        (315.0, 325.0, "below it, but its interval reaches it"),
        (300.0, 319.9, "below it, interval and all"),
    ],
)
def test_the_reference_line_says_where_the_mean_stands(mean, high, verdict) -> None:
    reference = {"agent": "ppo_gru", "return": 320.0, "source": "a paper"}
    row = {"agent": "ppo_gru", "mean": mean, "mean_ci_low": 290.0, "mean_ci_high": high}
    line = _reference_line(reference, [{**row, "seeds": 5}])
    assert line.endswith(f"over 5 seeds: {verdict}.")
    assert _reference_line(reference, []).endswith("No run of ppo_gru yet.")


def test_the_headline_scores_the_group_with_the_most_agents(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    fill(grid)
    # ppo_gru has not run on pendulum_p yet: ppo_cfc and ppo_mlp share two tasks, all three
    # agents one; the headline compares all three on that one
    shutil.rmtree(tmp_path / "runs" / "pendulum_p" / "ppo_gru")
    report(grid, tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Tasks: cartpole_p, pendulum_p." in text and "Tasks: cartpole_p." in text
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "Normalised scores over cartpole_p (ppo_mlp 0, the best agent 1)." in headline
    rows = [line.split(" | ")[:3] for line in headline.splitlines() if line.startswith("| ppo_")]
    # and the probability of improvement over that task too, though cfc and mlp share two
    improvement = {(r["other"], r["tasks"]): r for r in read_csv(tmp_path / "out/improvement.csv")}
    assert float(improvement[("ppo_mlp", "all")]["n_tasks"]) == 2
    assert rows == [
        ["| ppo_cfc", "1.00 [1.00, 1.00]", ""],
        ["| ppo_gru", "0.52 [0.48, 0.56]", "1.00 [1.00, 1.00] wins"],
        ["| ppo_mlp", "0.00 [-0.04, 0.04]", "1.00 [1.00, 1.00] wins"],
    ]
    assert "Over these tasks, ppo_cfc wins against ppo_gru, ppo_mlp." in headline


def test_the_headline_judges_over_the_tasks_it_scores(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    fill(grid)
    # without ppo_mlp's runs on pendulum_p only cartpole_p is normalised: the headline scores
    # that task, and cfc against gru there (it wins), not over both tasks they ran (a tie)
    shutil.rmtree(tmp_path / "runs" / "pendulum_p" / "ppo_mlp")
    report(grid, tmp_path / "out")
    improvement = {(r["other"], r["tasks"]): r for r in read_csv(tmp_path / "out/improvement.csv")}
    assert improvement[("ppo_gru", "all")]["verdict"] == "ties"
    assert improvement[("ppo_gru", "cartpole_p")]["verdict"] == "wins"
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "Normalised scores over cartpole_p (ppo_mlp 0, the best agent 1)." in headline
    assert "| ppo_gru | 0.52 [0.48, 0.56] | 1.00 [1.00, 1.00] wins | 4.00x |" in headline
    assert "Over these tasks, ppo_cfc wins against ppo_gru, ppo_mlp." in headline
    assert "Not in this table" not in headline


def test_the_headline_names_the_agents_it_leaves_out(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    fill(grid)
    shutil.rmtree(tmp_path / "runs" / "cartpole_p" / "ppo_gru")
    shutil.rmtree(tmp_path / "runs" / "pendulum_p" / "ppo_gru")
    report(grid, tmp_path / "out")
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "Normalised scores over cartpole_p, pendulum_p (ppo_mlp 0" in headline
    assert "| ppo_gru" not in headline
    assert "Not in this table (no complete runs on all these tasks yet): ppo_gru." in headline


def test_the_headline_judges_over_its_tasks_where_the_agents_share_more(tmp_path: Path) -> None:
    grid = load_grid(write_grid_with_irregular(tmp_path, ["ppo_cfc", "ppo_mlp"]))
    # on the third task only cfc and mlp ran, and mlp is the better: no agent is above the zero,
    # so the aggregates (and the headline) cover the other two, where cfc beats mlp every time
    finals = {**FINALS, ("pendulum_p_irregular", "ppo_mlp"): [-200.0] * 4}
    finals[("pendulum_p_irregular", "ppo_cfc")] = [-900.0] * 4
    for job in plan(grid):
        fake_run(job, finals[(job.task["name"], job.agent["name"])][job.seed])
    report(grid, tmp_path / "out")
    improvement = {(r["other"], r["tasks"]): r for r in read_csv(tmp_path / "out/improvement.csv")}
    assert float(improvement[("ppo_mlp", "all")]["probability"]) == pytest.approx(2 / 3)
    assert improvement[("ppo_mlp", "cartpole_p pendulum_p")]["n_tasks"] == "2"
    assert float(improvement[("ppo_mlp", "cartpole_p pendulum_p")]["probability"]) == 1.0
    assert ("ppo_gru", "cartpole_p pendulum_p") not in improvement  # gru shares just these
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "Normalised scores over cartpole_p, pendulum_p (ppo_mlp 0" in headline
    assert "| ppo_mlp | 0.00 [-0.06, 0.06] | 1.00 [1.00, 1.00] wins |" in headline
    text = (tmp_path / "out" / "README.md").read_text()
    assert (
        "| against | cartpole_p | pendulum_p | pendulum_p_irregular | cartpole_p, pendulum_p "
        in text
    )
    assert (
        "- Per task: ppo_cfc wins against ppo_gru (cartpole_p), ppo_mlp (cartpole_p, pendulum_p)"
        in text
    )


def test_the_headline_takes_the_tasks_the_most_agents_share(tmp_path: Path) -> None:
    grid = load_grid(write_grid_with_irregular(tmp_path, ["ppo"]))
    # mlp ran all three tasks, cfc the first two, gru the first and the third: no agent's own
    # tasks are shared by all three agents, cartpole_p alone is
    finals = {**FINALS, ("pendulum_p_irregular", "ppo_mlp"): [-900.0] * 4}
    finals[("pendulum_p_irregular", "ppo_gru")] = [-300.0] * 4
    for job in plan(grid):
        cell = (job.task["name"], job.agent["name"])
        if cell not in (("pendulum_p_irregular", "ppo_cfc"), ("pendulum_p", "ppo_gru")):
            fake_run(job, finals[cell][job.seed])
    report(grid, tmp_path / "out")
    headline = (tmp_path / "out" / "headline.md").read_text()
    assert "Normalised scores over cartpole_p (ppo_mlp 0, the best agent 1)." in headline
    rows = [line.split(" | ")[:3] for line in headline.splitlines() if line.startswith("| ppo_")]
    assert rows == [
        ["| ppo_cfc", "1.00 [1.00, 1.00]", ""],
        ["| ppo_gru", "0.52 [0.48, 0.56]", "1.00 [1.00, 1.00] wins"],
        ["| ppo_mlp", "0.00 [-0.04, 0.04]", "1.00 [1.00, 1.00] wins"],
    ]
    assert "Not in this table" not in headline
    # the report keeps each agent's own tasks too
    text = (tmp_path / "out" / "README.md").read_text()
    for tasks in ("cartpole_p, pendulum_p, pendulum_p_irregular", "cartpole_p, pendulum_p",
                  "cartpole_p, pendulum_p_irregular", "cartpole_p"):  # fmt: skip
        assert f"Tasks: {tasks}.\n" in text


def test_report_writes_its_headline_into_the_named_readme(tmp_path: Path, capsys) -> None:
    readme = tmp_path / "PROJECT.md"
    readme.write_text(f"# A project\n\n{HEADLINE_BEGIN}\nold numbers\n{HEADLINE_END}\n\nMore.\n")
    path = write_grid(tmp_path, headline_in=str(readme))
    grid = load_grid(path)
    fill(grid)
    assert cli.main(["benchmark", "report", "--grid", str(path)]) == 0
    assert f"{readme} (headline)" in capsys.readouterr().out
    headline = (tmp_path / "headline.md").read_text()
    assert readme.read_text() == (
        f"# A project\n\n{HEADLINE_BEGIN}\n{headline}{HEADLINE_END}\n\nMore.\n"
    )
    assert read_headline(readme) == headline
    assert headline.startswith(
        "**classic**: 24 of 24 planned runs complete (cartpole_p, pendulum_p; seeds 0-3). Runs "
        "made on: A CPU, 2 cores, torch threads 1 (24 runs). Normalised scores over cartpole_p, "
        "pendulum_p (ppo_mlp 0, the best agent 1).\n"
    )
    # agents by normalised IQM; the focus agent's probability of improvement and speed ratio
    rows = [line for line in headline.splitlines() if line.startswith("| ppo_")]
    assert rows == [
        "| ppo_cfc | 0.79 [0.74, 0.80] |  |  |",
        "| ppo_gru | 0.74 [0.71, 0.79] | 0.50 [0.50, 0.50] ties | 2.00x |",
        "| ppo_mlp | 0.00 [-0.06, 0.06] | 1.00 [1.00, 1.00] wins | 0.35x |",
    ]
    assert "Over these tasks, ppo_cfc wins against ppo_mlp; ties against ppo_gru." in headline
    # a report written elsewhere leaves the README alone
    before = readme.read_text()
    (tmp_path / "runs" / "cartpole_p" / "ppo_gru" / "seed_0" / "result.json").unlink()
    report(grid, tmp_path / "copy")
    assert readme.read_text() == before
    assert (tmp_path / "copy" / "headline.md").read_text() != headline
    # a file without the markers is refused when the grid is read
    readme.write_text("# A project\n")
    with pytest.raises(ConfigError, match=r"PROJECT\.md: needs the lines .* once each"):
        load_grid(path)
    with pytest.raises(ConfigError, match=r"headline_in: no Markdown file 'nowhere\.md'"):
        load_grid(write_grid(tmp_path, headline_in="nowhere.md"))


def test_report_says_what_is_missing_and_leaves_out_tasks_without_the_zero(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    for job in plan(grid):
        name = (job.task["name"], job.agent["name"])
        if name == ("pendulum_p", "ppo_mlp") or (name[1] == "ppo_gru" and job.seed == 3):
            continue
        fake_run(job, FINALS[name][job.seed])
    text = report(grid)
    assert "18 of 24 planned runs complete" in text
    assert "pendulum_p/ppo_gru (3/4)" in text and "pendulum_p/ppo_mlp (0/4)" in text
    left_out = "Not in the normalised scores: pendulum_p (waiting for ppo_mlp on every seed)."
    assert left_out in text and left_out in (tmp_path / "headline.md").read_text()
    assert {r["tasks"] for r in read_csv(tmp_path / "aggregate.csv")} == {"cartpole_p"}
    # A cell without a run of every seed is in its task's table, not in the comparisons.
    summary = {(r["task"], r["agent"]): r for r in read_csv(tmp_path / "summary.csv")}
    assert summary[("pendulum_p", "ppo_gru")]["seeds"] == "3"
    improvement = {(r["other"], r["tasks"]): r for r in read_csv(tmp_path / "improvement.csv")}
    assert ("ppo_gru", "all") not in improvement  # seed 3 is missing on both tasks
    assert improvement[("ppo_mlp", "all")]["n_tasks"] == "1"


def test_a_task_whose_best_mean_is_within_the_zero_agents_interval_is_not_normalised(
    tmp_path: Path,
) -> None:
    # Pendulum-P where the memoryless agent's seeds spread over the others' means (a task that
    # does not tell memory from none): best - zero is noise, and dividing by it would put
    # ppo_cfc at (-625 + 362.5) / 137.5 = -1.9 in the tier's aggregate.
    finals = {**FINALS, ("pendulum_p", "ppo_mlp"): [-1000.0, -150.0, -150.0, -150.0]}
    grid = load_grid(write_grid(tmp_path))
    for job in plan(grid):
        cell = (job.task["name"], job.agent["name"])
        fake_run(job, finals[cell][job.seed], SPEEDS[cell])
    text = report(grid)
    left_out = (
        "Not in the normalised scores: pendulum_p "
        "(no agent's mean above the 95% interval of ppo_mlp's)."
    )
    assert left_out in text and left_out in (tmp_path / "headline.md").read_text()
    assert {r["tasks"] for r in read_csv(tmp_path / "aggregate.csv")} == {"cartpole_p"}
    summary = {(r["task"], r["agent"]): r for r in read_csv(tmp_path / "summary.csv")}
    assert math.isnan(float(summary[("pendulum_p", "ppo_cfc")]["normalised_mean"]))
    assert float(summary[("cartpole_p", "ppo_gru")]["normalised_mean"]) == pytest.approx(200 / 385)
    # the comparisons still count the task: they need no normalisation
    improvement = {(r["other"], r["tasks"]): r for r in read_csv(tmp_path / "improvement.csv")}
    assert improvement[("ppo_mlp", "all")]["n_tasks"] == "2"


def test_a_report_of_runs_with_other_settings_than_the_files_is_refused(tmp_path: Path) -> None:
    grid = load_grid(write_grid(tmp_path))
    fill(grid)
    config = tmp_path / "runs" / "cartpole_p" / "ppo_gru" / "seed_2" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["agent"]["hyperparams"]["learning_rate"] = 0.5
    config.write_text(dump_yaml(data))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(
        RunError,
        match=r"^1 run\(s\) were started with other settings .*seed_2: "
        r"agent\.hyperparams\.learning_rate was 0\.5",
    ):
        report(grid)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    stale = stale_runs(plan(grid))
    assert len(stale) == 1 and "agent.hyperparams.learning_rate was 0.5" in stale[0]


def test_run_refuses_stale_runs_before_training(tmp_path: Path, capsys) -> None:
    path = write_grid(tmp_path)
    grid = load_grid(path)
    fill(grid)
    config = tmp_path / "runs" / "pendulum_p" / "ppo_mlp" / "seed_1" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["task"]["train"]["n_envs"] = 99
    config.write_text(dump_yaml(data))
    assert cli.main(["benchmark", "run", "--grid", str(path)]) == 2
    err = capsys.readouterr().err
    assert "1 run(s) were started with other settings" in err
    assert "task.train.n_envs was 99" in err
    assert cli.main(["benchmark", "run", "--grid", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stale: " in out and "0 of 24 runs to train" in out


def test_plan_filters_and_dry_run(tmp_path: Path, capsys) -> None:
    path = write_grid(tmp_path)
    grid = load_grid(path)
    jobs = plan(grid, tasks=["pendulum_p"], agents=["ppo_cfc", "ppo_mlp"], seeds=[1, 3])
    assert [(j.task["name"], j.agent["name"], j.seed) for j in jobs] == [
        ("pendulum_p", "ppo_cfc", 1),
        ("pendulum_p", "ppo_cfc", 3),
        ("pendulum_p", "ppo_mlp", 1),
        ("pendulum_p", "ppo_mlp", 3),
    ]
    assert all(j.budget == 2000 for j in jobs)
    assert jobs[0].run_dir == str(tmp_path / "runs" / "pendulum_p" / "ppo_cfc" / "seed_1")
    with pytest.raises(ConfigError, match="no agent 'ppo_lstm' in the chosen tiers"):
        plan(grid, agents=["ppo_lstm"])
    with pytest.raises(ConfigError, match="no tier 'mujoco'; tiers: classic"):
        plan(grid, tiers=["mujoco"])
    argv = ["benchmark", "run", "--grid", str(path), "--tasks", "pendulum_p", "--dry-run"]
    assert cli.main(argv) == 0
    # no run at all: no speed to go by, and no "about 0.0 CPU-hours"
    assert (
        "12 of 12 runs to train: no estimate (no run yet of ppo_cfc, ppo_gru, ppo_mlp)"
        in capsys.readouterr().out
    )
    fake_run(jobs[0], -500.0, steps_per_s=10.0)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "11 of 12 runs to train" in out and "ppo_cfc/seed_1" not in out
    # what the missing runs cost at the speeds measured: 3 runs of ppo_cfc at 10 steps/s
    assert "    2,000 steps  ~    3 min  " in out and "    2,000 steps      ? min  " in out
    assert (
        "11 of 12 runs to train: about 0.2 CPU-hours at the committed runs' speeds (8 not "
        "counted: no run yet of ppo_gru, ppo_mlp)" in out
    )
    speeds = measured_speeds(grid)
    assert speeds == {("pendulum_p", "ppo_cfc"): 10.0, (None, "ppo_cfc"): 10.0}
    # no run on cartpole_p yet: nothing to scale ppo_cfc's speed by
    assert estimate_seconds([("cartpole_p", "ppo_cfc", 500)], speeds) == (
        0.0,
        [("cartpole_p", "ppo_cfc", 500)],
    )
    # ppo_mlp on cartpole_p: twice ppo_cfc's speed on pendulum_p, so on cartpole_p it is 40
    speeds = {
        ("pendulum_p", "ppo_cfc"): 10.0,
        ("pendulum_p", "ppo_mlp"): 20.0,
        ("cartpole_p", "ppo_mlp"): 40.0,
        (None, "ppo_cfc"): 10.0,
        (None, "ppo_mlp"): 30.0,
    }
    # cartpole_p relative to ppo_mlp's mean: 40 / 30; ppo_cfc there: 10 * 4 / 3
    seconds, unknown = estimate_seconds(
        [("cartpole_p", "ppo_cfc", 400), ("cartpole_p", "ppo_gru", 5)], speeds
    )
    assert seconds == pytest.approx(400 / (10 * 4 / 3)) and unknown == [
        ("cartpole_p", "ppo_gru", 5)
    ]
    # on a task several agents ran, the geometric mean of their relative speeds
    speeds[("cartpole_p", "ppo_cfc")] = 40.0
    speeds[("halfcheetah_p", "ppo_cfc")], speeds[("halfcheetah_p", "ppo_mlp")] = 5.0, 60.0
    seconds, _ = estimate_seconds(
        [("halfcheetah_p", "ppo_gru", 1)], {**speeds, (None, "ppo_gru"): 2.0}
    )
    assert seconds == pytest.approx(1 / (2.0 * np.sqrt((5.0 / 10.0) * (60.0 / 30.0))))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": 1}, "unknown key colour"),
        ({"tiers": {}}, "tiers must be a non-empty mapping"),
        ({"agent_sets": {"ppo": ["agents/nothing.yaml"]}}, "no agent file 'agents/nothing.yaml'"),
        ({"runs": "runs", "tiers": {"t": {"seeds": 0, "tasks": []}}}, "t.seeds must be a number"),
    ],
)
def test_grid_errors_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(tmp_path, **change))


def test_grid_errors_in_tiers(tmp_path: Path) -> None:
    good = yaml.safe_load(write_grid(tmp_path).read_text())
    tier = good["tiers"]["classic"]

    def with_tier(**changes) -> Path:
        return write_grid(tmp_path, tiers={"classic": {**tier, **changes}})

    with pytest.raises(ConfigError, match="agents: no agent set or agent file 'sac'"):
        load_grid(with_tier(tasks=[{**tier["tasks"][0], "agents": ["sac"]}]))
    with pytest.raises(ConfigError, match="'ppo_lstm' \\(zero or focus\\) is not an agent"):
        load_grid(with_tier(zero="ppo_lstm"))
    with pytest.raises(ConfigError, match="ppo_cfc on cartpole_p appears twice"):
        load_grid(with_tier(tasks=[tier["tasks"][0], {**tier["tasks"][0], "steps": 5}]))
    with pytest.raises(ConfigError, match=r"reference.agent 'ppo_lstm' is not an agent"):
        reference = {"agent": "ppo_lstm", "return": 1.0, "source": "x"}
        load_grid(with_tier(tasks=[{**tier["tasks"][0], "reference": reference}]))
    with pytest.raises(ConfigError, match=r"reference\.source is missing"):
        reference = {"agent": "ppo_gru", "return": 1.0}
        load_grid(with_tier(tasks=[{**tier["tasks"][0], "reference": reference}]))
    with pytest.raises(ConfigError, match=r"tasks\[1\]\.steps must be a positive integer"):
        load_grid(with_tier(tasks=[tier["tasks"][0], {**tier["tasks"][1], "steps": 0}]))


def test_verdict() -> None:
    assert verdict(0.51, 0.9) == "wins"
    assert verdict(0.1, 0.49) == "loses"
    assert verdict(0.3, 0.7) == verdict(0.5, 0.6) == "ties"


def test_published_report_is_what_the_committed_runs_give(tmp_path: Path, monkeypatch) -> None:
    """results/benchmark/README.md and its tables are regenerated from the committed run files
    and must come out identical: no number in them is typed by hand or left stale."""
    monkeypatch.chdir(ROOT)  # the grid names agent and task files from the repository root
    grid = load_grid(PUBLISHED / "grid.yaml")
    text = report(grid, tmp_path)
    assert text == (PUBLISHED / "README.md").read_text()
    for name in ("summary.csv", "aggregate.csv", "improvement.csv", "headline.md"):
        assert (tmp_path / name).read_bytes() == (PUBLISHED / name).read_bytes(), name
    assert grid.headline_in is not None
    assert read_headline(grid.headline_in) == (tmp_path / "headline.md").read_text()
    assert not stale_runs(plan(grid)), "committed runs whose settings the files no longer give"


def test_benchmark_trains_the_grid_then_reports(tmp_path: Path, capsys) -> None:
    """End to end on a tiny grid: two agents, one seed, a few hundred steps each."""
    from test_experiment_runs import tiny_agent, tiny_task

    agents = [str(tiny_agent(tmp_path, name)) for name in ("ppo_gru", "ppo_mlp")]
    task = str(tiny_task(tmp_path))
    path = tmp_path / "study" / "grid.yaml"
    path.parent.mkdir()
    path.write_text(
        yaml.safe_dump(
            {
                "tiers": {
                    "tiny": {
                        "seeds": 1,
                        "zero": "ppo_mlp",
                        "focus": "ppo_gru",
                        "tasks": [{"task": task, "steps": 256, "agents": agents}],
                    }
                }
            }
        )
    )
    assert cli.main(["benchmark", "run", "--grid", str(path), "-j", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("done ") == 2 and f"written: {path.parent}/README.md" in out
    rows = read_csv(path.parent / "summary.csv")
    assert {r["agent"] for r in rows} == {"ppo_gru", "ppo_mlp"}
    assert all(int(r["steps"]) == 256 and r["seeds"] == "1" for r in rows)
    readme = (path.parent / "README.md").read_text()
    assert "2 of 2 planned runs complete" in readme
    # a second run trains nothing and leaves the report as it was
    assert cli.main(["benchmark", "run", "--grid", str(path)]) == 0
    assert capsys.readouterr().out.count("skipped") == 2
    assert (path.parent / "README.md").read_text() == readme


def tuned_searches() -> list[Path]:
    return sorted((PUBLISHED / "tuning").glob("*/*/*_tuned_*.yaml"))


def test_agent_files_carry_the_values_their_searches_chose() -> None:
    """Each committed search's best values are in the agent file, under overrides.<task file
    name>, so that the benchmark (and a user's `cfc-rl train`) runs what the search chose."""
    for tuned in tuned_searches():
        task, agent = tuned.parent.parent.name, tuned.parent.name
        with (tuned.parent / "trials.csv").open() as f:
            header = next(csv.reader(f))
        keys = header[1 : header.index("score")]  # the space's dotted keys
        # under the task's id (the searched agent file also holds its overrides for other
        # tasks), or its name where the agent file had that key (trial 0 added afterwards)
        task_id = load_task(ROOT / "envs" / f"{task}.yaml").id
        overrides = yaml.safe_load(tuned.read_text())["overrides"]
        chosen = overrides.get(task) or overrides[task_id]
        shipped = yaml.safe_load((ROOT / "agents" / f"{agent}.yaml").read_text())
        in_agent_file = (shipped.get("overrides") or {}).get(task)
        assert in_agent_file is not None, f"agents/{agent}.yaml has no overrides.{task}"
        for key in keys:  # trial 0 leaves out the keys the agent left to the defaults
            *sections, name = key.split(".")
            want, have = chosen, in_agent_file
            for part in sections:
                want, have = want.get(part, {}), have.get(part, {})
            assert have.get(name) == want.get(name), f"agents/{agent}.yaml overrides.{task}.{key}"


def one_agent_grid(folder: Path, agent_file: Path, **changes) -> Path:
    """The test grid with one agent (its zero) on both tasks."""
    tasks = [
        {"task": str(ROOT / "envs" / f"{task}.yaml"), "steps": 1000, "agents": [str(agent_file)]}
        for task in ("cartpole_p", "pendulum_p")
    ]
    tiers = {"classic": {"seeds": 2, "zero": agent_file.stem, "tasks": tasks}}
    return write_grid(folder, agent_sets={}, tiers=tiers, **changes)


TASK_IDS = {"cartpole_p": "cfc_rl/CartPole-P-v1", "pendulum_p": "cfc_rl/Pendulum-P-v1"}


def fake_search(
    grid, task: str, agent: str, values: dict, score: float, others: dict | None = None
) -> None:
    """The files `cfc-rl tune` leaves: trials.csv and the agent file with the chosen values
    under the task id, beside the agent's ``others`` overrides."""
    folder = grid.searches / task / agent
    folder.mkdir(parents=True)
    (folder / "trials.csv").write_text(
        f"trial,score,steps,status\n0,{score - 1},1000,complete\n1,{score},1000,complete\n"
        "2,-9999.0,100,pruned\n"
    )
    tuned = {"algo": "ppo", "overrides": {**(others or {}), TASK_IDS[task]: values}}
    (folder / f"{agent}_tuned_{task}.yaml").write_text(yaml.safe_dump(tuned))


def test_adopt_appends_the_chosen_values_to_the_agent_file(tmp_path: Path) -> None:
    from test_experiment_runs import tiny_agent

    from cfc_rl.experiment.benchmark import adopt, select
    from cfc_rl.experiment.train import resolve

    agent_file = tiny_agent(tmp_path, "ppo_mlp")
    original = agent_file.read_text()
    space = str(ROOT / "agents" / "spaces" / "mlp.yaml")
    tuning = {"trials": 2, "seeds": 1, "spaces": {"ppo_mlp": space}}
    grid = load_grid(one_agent_grid(tmp_path, agent_file, tuning=tuning))
    values = {"hyperparams": {"learning_rate": 0.00123, "n_steps": 512}}
    fake_search(grid, "cartpole_p", "ppo_mlp", values, -12.5)
    (_, cartpole, _), (_, pendulum, _) = select(grid)
    assert adopt(grid, cartpole, str(agent_file)) == f"{agent_file}: overrides.cartpole_p written"
    text = agent_file.read_text()
    assert text.startswith(original)  # the file's own lines and comments stay
    assert "# Tuned for the benchmark: the best of 3 trials" in text and "return -12.5)" in text
    assert yaml.safe_load(text)["overrides"] == {"cartpole_p": values}
    agent, _ = resolve(agent_file, ROOT / "envs" / "cartpole_p.yaml")
    assert agent.hyperparams["learning_rate"] == 0.00123 and agent.hyperparams["n_steps"] == 512
    other, _ = resolve(agent_file, ROOT / "envs" / "pendulum_p.yaml")
    assert other.hyperparams["learning_rate"] != 0.00123  # another task keeps its settings
    assert adopt(grid, cartpole, str(agent_file)) == f"{agent_file} has its values"
    # a second task's values go under the same overrides section; the search's file also
    # holds the agent's overrides for the first task, listed before the new ones
    others = {"cartpole_p": values}
    fake_search(grid, "pendulum_p", "ppo_mlp", {"hyperparams": {"n_steps": 256}}, -300.0, others)
    adopt(grid, pendulum, str(agent_file))
    assert yaml.safe_load(agent_file.read_text())["overrides"] == {
        "cartpole_p": values,
        "pendulum_p": {"hyperparams": {"n_steps": 256}},
    }
    # what adopt wrote is written again when the search's choice changed (trial 0 added to
    # it), in its place
    adopted = agent_file.read_text()
    agent_file.write_text(adopted.replace("0.00123", "0.5"))
    assert adopt(grid, cartpole, str(agent_file)) == (
        f"{agent_file}: overrides.cartpole_p written again"
    )
    assert agent_file.read_text() == adopted
    # other values put there by hand: an error, not an overwrite
    agent_file.write_text(original + "overrides:\n  cartpole_p:\n    n_envs: 2\n")
    with pytest.raises(ConfigError, match=r"overrides\.cartpole_p differs from what"):
        adopt(grid, cartpole, str(agent_file))
    assert agent_file.read_text().endswith("n_envs: 2\n")


def test_adopt_refuses_what_it_cannot_append_to(tmp_path: Path) -> None:
    from cfc_rl.experiment.benchmark import adopt, select

    agent_file = tmp_path / "ppo_mlp.yaml"
    agent_file.write_text(
        "algo: ppo\npolicy: MlpPolicy\noverrides:\n  cartpole_p: {n_envs: 2}\nn_envs: 4\n"
    )
    grid = load_grid(one_agent_grid(tmp_path, agent_file))
    (_, pendulum, _) = select(grid, tasks=["pendulum_p"])[0]
    with pytest.raises(ConfigError, match="the search completed no trial"):
        adopt(grid, pendulum, str(agent_file))
    fake_search(grid, "pendulum_p", "ppo_mlp", {"n_envs": 8}, 1.0)
    with pytest.raises(ConfigError, match="overrides must be the file's last section"):
        adopt(grid, pendulum, str(agent_file))


def test_a_task_in_two_tiers_keeps_the_plots_of_both(tmp_path: Path) -> None:
    data = yaml.safe_load(write_grid(tmp_path).read_text())
    lstm = str(ROOT / "agents" / "ppo_lstm.yaml")
    pendulum = {"task": str(ROOT / "envs" / "pendulum_p.yaml"), "steps": 5000, "agents": [lstm]}
    data["tiers"]["other"] = {"seeds": 1, "zero": "ppo_lstm", "tasks": [pendulum]}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(data))
    grid = load_grid(tmp_path / "grid.yaml")
    for job in plan(grid, tiers=["classic"]):
        fake_run(job, FINALS[(job.task["name"], job.agent["name"])][job.seed])
    report(grid)
    assert (tmp_path / "curves_classic_pendulum_p.png").exists()
    assert not (tmp_path / "curves_other_pendulum_p.png").exists()  # no run there yet


def test_runs_of_agents_without_a_search_wait_or_are_tuned_first(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    spaces = {a: str(ROOT / "agents" / "spaces" / f"{a[4:]}.yaml") for a in ("ppo_cfc", "ppo_gru")}
    path = write_grid(tmp_path, tuning={"trials": 2, "seeds": 1, "spaces": spaces})
    grid = load_grid(path)
    searched = tmp_path / "tuning" / "cartpole_p" / "ppo_cfc"
    searched.mkdir(parents=True)
    (searched / "trials.csv").write_text("trial\n0\n")
    older = tmp_path / "tuning" / "pendulum_p" / "ppo_gru"  # made before trial 0 existed
    older.mkdir(parents=True)
    (older / "trials.csv").write_text("trial\n1\n")
    stopped = tmp_path / "tuning" / "cartpole_p" / "ppo_gru"  # begun, not finished
    stopped.mkdir(parents=True)
    (stopped / "search_state.yaml").write_text("trials: 2\n")
    # ppo_mlp has no space: it is not tuned, and its runs do not wait
    assert cli.main(["benchmark", "run", "--grid", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert (
        "3 searches missing (trial 0 and 2 sampled trials, 1 seed each; 1 made before trial 0 "
        "existed need only it)" in out
    )
    assert (
        "searches begun, not finished (run again, they keep their finished trials): "
        "cartpole_p/ppo_gru\n" in out
    )
    assert (
        "runs waiting for their agent's search (run with --tune, or cfc-rl benchmark tune):\n"
        "  cartpole_p: ppo_gru\n"
        "  pendulum_p: ppo_cfc, ppo_gru\n" in out
    )
    assert "12 of 12 runs to train" in out and "ppo_gru/seed_" not in out

    # --tune searches first (here a stand-in that leaves the search's file), then trains
    tuned = []

    def tune_cells(grid, cells, on_done=None, **kwargs) -> None:
        for _, grid_task, agent_file in cells:
            tuned.append((grid_task.name, Path(agent_file).stem))
            folder = grid.searches / grid_task.name / Path(agent_file).stem
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "trials.csv").write_text("trial\n0\n")

    monkeypatch.setattr("cfc_rl.experiment.benchmark.tune_cells", tune_cells)
    fill(grid)  # every run complete: nothing trains
    assert cli.main(["benchmark", "run", "--grid", str(path), "--tune"]) == 0
    out = capsys.readouterr().out
    assert len(tuned) == 6 and "waiting" not in out and out.count("skipped") == 24


def test_only_what_adopt_wrote_counts_as_an_earlier_search_s_choice(tmp_path: Path) -> None:
    from cfc_rl.experiment.benchmark import _has_adopted

    agent = tmp_path / "agent.yaml"
    agent.write_text("algo: ppo\npolicy: MlpPolicy\n")
    assert not _has_adopted(str(agent), "pendulum_p")
    agent.write_text(agent.read_text() + "overrides:\n  pendulum_p:\n    n_envs: 2\n")
    assert not _has_adopted(str(agent), "pendulum_p")  # the user's own values
    assert _has_adopted(str(ROOT / "agents" / "ppo_gru.yaml"), "pendulum_p")
    assert not _has_adopted(str(ROOT / "agents" / "ppo_gru.yaml"), "no_such_task")


def test_an_agent_with_a_smaller_budget_is_searched_run_and_reported_at_it(
    tmp_path: Path, monkeypatch
) -> None:
    good = yaml.safe_load(write_grid(tmp_path).read_text())
    tier = good["tiers"]["classic"]
    pendulum = {**tier["tasks"][1], "agent_steps": {"ppo_gru": 500}}
    spaces = {
        a: str(ROOT / "agents" / "spaces" / f"{s}.yaml")
        for a, s in [("ppo_gru", "gru"), ("ppo_cfc", "cfc")]
    }
    path = write_grid(
        tmp_path,
        tiers={"classic": {**tier, "tasks": [tier["tasks"][0], pendulum]}},
        tuning={"trials": 2, "seeds": 1, "spaces": spaces},
    )
    grid = load_grid(path)
    budgets = {(j.task["name"], j.agent["name"]): j.budget for j in plan(grid)}
    assert budgets[("pendulum_p", "ppo_gru")] == 500
    assert budgets[("pendulum_p", "ppo_cfc")] == budgets[("pendulum_p", "ppo_mlp")] == 2000
    assert budgets[("cartpole_p", "ppo_gru")] == 1000

    # Its search trains at its budget, and evaluates and prunes its trials at the fractions of
    # it where the task's other agents' are: pendulum_p evaluates every 5000 steps, so their
    # first rung is at 5000 steps (the evaluation interval) of 2000 and its at a quarter of that.
    searched = []

    def search(agent_file, task_file, space, **kwargs):
        rungs = (kwargs.get("eval_every"), kwargs.get("grace_steps"))
        searched.append((Path(task_file).stem, Path(agent_file).stem, kwargs["steps"], rungs))
        # The shipped agent files hold the choices of the committed searches, which this grid
        # does not have: a search made again starts from the agent as it was before them.
        assert kwargs["before_search"] and not kwargs["only_trial_0"]
        raise RuntimeError("stop after the call")

    monkeypatch.setattr("cfc_rl.experiment.tune.search", search)
    for agent in ("ppo_gru", "ppo_cfc"):
        with pytest.raises(RuntimeError, match="stop after the call"):
            tune_cells(grid, select(grid, tasks=["pendulum_p"], agents=[agent]))
    assert searched == [
        ("pendulum_p", "ppo_gru", 500, (1250, 1250)),
        ("pendulum_p", "ppo_cfc", 2000, (None, None)),
    ]

    fill(grid)
    # a run of it at the task's budget is not one of the cell's runs
    [job] = plan_jobs(
        [str(ROOT / "agents" / "ppo_gru.yaml")],
        [str(ROOT / "envs" / "pendulum_p.yaml")],
        seeds=[9],
        steps=2000,
        out=grid.runs,
    )
    fake_run(job, 1e6)
    text = report(grid, tmp_path / "report")
    summary = {(r["task"], r["agent"]): r for r in read_csv(tmp_path / "report" / "summary.csv")}
    assert summary[("pendulum_p", "ppo_gru")]["steps"] == "500"
    assert summary[("pendulum_p", "ppo_gru")]["seeds"] == "4"
    assert float(summary[("pendulum_p", "ppo_gru")]["mean"]) == np.mean(
        FINALS[("pendulum_p", "ppo_gru")]
    )
    assert summary[("cartpole_p", "ppo_gru")]["steps"] == "1000"
    assert "### pendulum_p (2,000 steps; ppo_gru 500)" in text
    assert "| ppo_gru (500 steps) | 4 |" in text and "| ppo_cfc | 4 |" in text
    sentence = "ppo_gru on pendulum_p (500 steps of 2,000)"
    assert sentence in text and sentence in (tmp_path / "report" / "headline.md").read_text()


@pytest.mark.parametrize(
    ("agent_steps", "message"),
    [
        ({"ppo_lstm": 10}, "agent_steps: 'ppo_lstm' is not an agent of the task"),
        ({"ppo_gru": 1000}, "agent_steps.ppo_gru must be a number of steps below the task's 1000"),
        ({"ppo_gru": 0}, "agent_steps.ppo_gru must be a number of steps below"),
        ([500], "agent_steps must map agent names to budgets"),
    ],
)
def test_a_smaller_budget_must_be_an_agents_and_smaller(
    tmp_path: Path, agent_steps, message: str
) -> None:
    tier = yaml.safe_load(write_grid(tmp_path).read_text())["tiers"]["classic"]
    task = {**tier["tasks"][0], "agent_steps": agent_steps}
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(tmp_path, tiers={"classic": {**tier, "tasks": [task]}}))


def test_a_tier_searches_with_its_own_trials_and_seeds(tmp_path: Path, capsys, monkeypatch) -> None:
    good = yaml.safe_load(write_grid(tmp_path).read_text())
    classic = good["tiers"]["classic"]
    spaces = {"ppo_gru": str(ROOT / "agents" / "spaces" / "gru.yaml")}
    cheap = {**classic, "tasks": [classic["tasks"][1]], "tuning": {"seeds": 1}}
    path = write_grid(
        tmp_path,
        tiers={"classic": {**classic, "tasks": [classic["tasks"][0]]}, "cheap": cheap},
        tuning={"trials": 3, "seeds": 2, "spaces": spaces},
    )
    grid = load_grid(path)
    assert grid.tuning_for(grid.tier("classic")) == grid.tuning
    # the file's order (yaml.safe_dump sorts the keys): cheap, then classic
    assert [tier.name for tier in grid.tiers] == ["cheap", "classic"]
    assert (
        grid.tuning_for(grid.tier("cheap")).trials,
        grid.tuning_for(grid.tier("cheap")).seeds,
    ) == (3, 1)

    searched = []

    def search(agent_file, task_file, space, **kwargs):
        searched.append((Path(task_file).stem, kwargs["trials"], kwargs["seeds"]))
        raise RuntimeError("stop after the call")

    monkeypatch.setattr("cfc_rl.experiment.tune.search", search)
    for task in ("cartpole_p", "pendulum_p"):
        with pytest.raises(RuntimeError, match="stop after the call"):
            tune_cells(grid, select(grid, tasks=[task], agents=["ppo_gru"]))
    assert searched == [("cartpole_p", 3, 2), ("pendulum_p", 3, 1)]

    assert cli.main(["benchmark", "run", "--grid", str(path), "--dry-run"]) == 0
    assert (
        "2 searches missing (per tier, cheap: trial 0 and 3 sampled trials, 1 seed each; "
        "classic: trial 0 and 3 sampled trials, 2 seeds each)" in capsys.readouterr().out
    )
    text = report(grid, tmp_path / "report")
    assert (
        "Searched per agent and task (PROTOCOL.md): trial 0 and 3 sampled trials, 2 seeds each."
        in text
    )
    assert "trial 0 and 3 sampled trials, 1 seed each." in text


@pytest.mark.parametrize(
    ("tuning", "grid_tuning", "message"),
    [
        ({"seeds": 0}, True, r"tiers\.classic\.tuning\.seeds must be a positive integer, not 0"),
        ({"spaces": {}}, True, r"unknown key tiers\.classic\.tuning\.spaces; known: trials, seeds"),
        ([1], True, r"tiers\.classic\.tuning must be a mapping with keys trials, seeds"),
        ({"trials": 2}, False, r"tiers\.classic\.tuning: the grid has no tuning section"),
    ],
)
def test_a_tiers_search_budget_is_checked(
    tmp_path: Path, tuning, grid_tuning: bool, message: str
) -> None:
    tier = yaml.safe_load(write_grid(tmp_path).read_text())["tiers"]["classic"]
    spaces = {"ppo_gru": str(ROOT / "agents" / "spaces" / "gru.yaml")}
    changes = {"tuning": {"trials": 2, "seeds": 2, "spaces": spaces}} if grid_tuning else {}
    with pytest.raises(ConfigError, match=message):
        load_grid(write_grid(tmp_path, tiers={"classic": {**tier, "tuning": tuning}}, **changes))
