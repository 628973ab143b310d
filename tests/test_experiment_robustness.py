"""Evaluation under changed conditions and robustness sweeps, on tiny trained runs."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cfc_rl.envs import ConfigError, SensorNoise, base_dt, make_task
from cfc_rl.experiment import cli, robustness
from cfc_rl.experiment.evaluate import conditions_task, evaluate_run
from cfc_rl.experiment.tasks import load_task
from cfc_rl.experiment.train import train

ROOT = Path(__file__).resolve().parent.parent
GRU = (
    "algo: recurrent_ppo\npolicy: RecurrentCellPolicy\npolicy_kwargs: {cell: gru, hidden_size: 8}\n"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two seeds of a GRU agent on irregular Pendulum-P, one on CartPole-P (no Δt)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("robustness")
    shutil.copytree(ROOT / "agents" / "settings", folder / "settings")
    agent = folder / "gru.yaml"
    agent.write_text(GRU + "hyperparams: {n_steps: 64, batch_size: 64, n_epochs: 1}\n")
    made: dict[str, list[Path]] = {}
    for task_name, seeds in (("pendulum_p_irregular", (0, 1)), ("cartpole_p", (0,))):
        data = yaml.safe_load((ROOT / "envs" / f"{task_name}.yaml").read_text())
        data["train"] = {**data["train"], "total_timesteps": 128, "n_envs": 2}
        data["eval"] = {"episodes": 2, "every_steps": 128, "deterministic": True}
        task = folder / f"{task_name}.yaml"
        task.write_text(yaml.safe_dump(data))
        made[task_name] = [train(agent, task, seed=s, out=folder / "runs").root for s in seeds]
    yield made
    torch.set_num_threads(threads)


def test_conditions_are_the_ones_applied() -> None:
    task = load_task(ROOT / "envs" / "pendulum_p_irregular.yaml")
    noisy = make_task(conditions_task(task, {"noise": 0.2}).env)
    wrapper, found = noisy, None
    while hasattr(wrapper, "env"):
        if isinstance(wrapper, SensorNoise):
            found = wrapper
        wrapper = wrapper.env
    assert found is not None and found.sigma == 0.2
    env = make_task(conditions_task(task, {"period": 3}).env)
    env.reset(seed=0)
    for _ in range(5):  # a fixed period: every control step is 3 base steps, dt = 3 x base
        obs, _, _, _, info = env.step(env.action_space.sample())
        assert info["repeats"] == 3
        assert info["dt"] == pytest.approx(3 * base_dt(env.unwrapped))
        assert obs["dt"][0] == pytest.approx(info["dt"])
    with pytest.raises(ConfigError, match=r"--set: wrappers\.noise"):
        conditions_task(task, {"noise": -1.0})
    with pytest.raises(ConfigError, match="--set speed: not a condition"):
        conditions_task(task, {"speed": 2})


def test_evaluation_records_its_conditions(runs, tmp_path) -> None:
    run = runs["pendulum_p_irregular"][0]
    final = (run / "evaluation_episodes.csv").read_text()
    default = evaluate_run(run, episodes=2)
    shifted = evaluate_run(
        run, episodes=2, conditions={"period": 6, "noise": 0.1}, episodes_csv=tmp_path / "e.csv"
    )
    assert default["conditions"]["irregular"] == (1, 4)
    assert shifted["conditions"]["irregular"] == (6, 6) and shifted["conditions"]["noise"] == 0.1
    assert shifted["mean_return"] != default["mean_return"]
    with (tmp_path / "e.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["irregular"] for r in rows} == {"6-6"}
    assert {r["noise"] for r in rows} == {"0.1"}
    assert [float(r["return"]) for r in rows] == shifted["returns"]
    assert np.mean(shifted["returns"]) == pytest.approx(shifted["mean_return"])
    # the run's record of its final evaluation is training's, whatever is evaluated later
    assert (run / "evaluation_episodes.csv").read_text() == final


def test_a_condition_the_policy_cannot_read_says_why(runs) -> None:
    with pytest.raises(ConfigError, match="trained without it"):
        evaluate_run(runs["cartpole_p"][0], conditions={"period": 2})


def test_a_sweep_of_two_runs_writes_the_table_and_the_plot(runs, tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    finals = [(run / "evaluation_episodes.csv").read_text() for run in runs["pendulum_p_irregular"]]
    argv = ["robustness", *map(str, runs["pendulum_p_irregular"]), "--sweep", "period=1,3"]
    assert cli.main([*argv, "--sweep", "noise=0,0.2", "--episodes", "2", "--out", str(out)]) == 0
    with (out / "robustness.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["condition"], r["level"]) for r in rows] == [
        ("period", "1"), ("period", "3"), ("noise", "0"), ("noise", "0.2")
    ]  # fmt: skip
    assert all(r["runs"] == "2" and r["agent"] == "gru" for r in rows)
    for row in rows:
        assert float(row["iqm_ci_low"]) <= float(row["iqm"]) <= float(row["iqm_ci_high"])
    with (out / "robustness_runs.csv").open() as f:
        per_run = list(csv.DictReader(f))
    assert len(per_run) == 8
    mean = np.mean([float(r["mean_return"]) for r in per_run[:2]])
    assert float(rows[0]["mean"]) == pytest.approx(mean)
    with (out / "robustness_episodes.csv").open() as f:
        episodes = list(csv.DictReader(f))
    assert len(episodes) == 8 * 2
    for run_row in per_run:
        returns = [
            float(e["return"])
            for e in episodes
            if (e["condition"], e["level"], e["run"])
            == (run_row["condition"], run_row["level"], run_row["run"])
        ]
        assert np.mean(returns) == pytest.approx(float(run_row["mean_return"]))
    # the runs' own final evaluations are untouched
    assert [(r / "evaluation_episodes.csv").read_text() for r in runs["pendulum_p_irregular"]] == (
        finals
    )
    for name in ("robustness.md", "robustness_period.png", "robustness_noise.png"):
        assert (out / name).stat().st_size > 0
    assert "### period" in capsys.readouterr().out
    assert cli.main(["evaluate", str(runs["pendulum_p_irregular"][0]), "--set", "period=2",
                     "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["conditions"]["irregular"] == [
        2,
        2,
    ]


def test_a_video_without_its_writer_fails_before_the_episodes(runs, tmp_path, monkeypatch) -> None:
    from cfc_rl.experiment import evaluate

    def no_episodes(*args, **kwargs):
        raise AssertionError("episodes ran")

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` fails
    monkeypatch.setattr(evaluate, "evaluate_policy", no_episodes)
    with pytest.raises(evaluate.VideoUnavailable, match="MP4 needs imageio and imageio-ffmpeg"):
        evaluate_run(runs["cartpole_p"][0], video=True, episodes_csv=tmp_path / "e.csv")
    assert not (tmp_path / "e.csv").exists()


def test_a_sweep_checks_its_runs_and_levels_before_the_first_evaluation(
    runs, tmp_path, monkeypatch
) -> None:
    def no_evaluation(*args, **kwargs):
        raise AssertionError("a run was evaluated")

    monkeypatch.setattr(robustness, "evaluate_run", no_evaluation)
    irregular, cartpole = runs["pendulum_p_irregular"], runs["cartpole_p"]
    out = tmp_path / "sweep"
    # a bad level of the second condition, and one the runs of the second task cannot take
    with pytest.raises(ConfigError, match=r"wrappers\.noise"):
        robustness.sweep(irregular, {"period": [1, 2], "noise": [0, -1]}, out=out)
    with pytest.raises(ConfigError, match="trained without it"):
        robustness.sweep(cartpole, {"noise": [0], "period": [1, 2]}, out=out)
    # the same agent (gru) on two tasks would be aggregated into one column
    with pytest.raises(ConfigError, match=r"more than one task .*pendulum_p_irregular.*cartpole_p"):
        robustness.sweep([*irregular, *cartpole], {"noise": [0]}, out=out)
    with pytest.raises(ConfigError, match="given twice"):
        robustness.sweep([irregular[0], irregular[0]], {"noise": [0]}, out=out)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="a file, not a folder"):
        robustness.sweep(irregular, {"noise": [0]}, out=tmp_path / "file")
    assert not out.exists()


def test_a_condition_or_level_given_twice_is_refused(runs, tmp_path, monkeypatch, capsys) -> None:
    def no_evaluation(*args, **kwargs):
        raise AssertionError("a run was evaluated")

    monkeypatch.setattr(robustness, "evaluate_run", no_evaluation)
    run = str(runs["pendulum_p_irregular"][0])
    out = tmp_path / "sweep"
    # each run would count twice in the level's interval
    with pytest.raises(ConfigError, match="--sweep period: the level 2 is given twice"):
        robustness.sweep([run], {"period": [1, 2, 2]}, out=out)
    # the first --sweep's levels would be dropped
    with pytest.raises(SystemExit) as exit_:
        cli.main(
            ["robustness", run, "--sweep", "period=1,2", "--sweep", "period=4", "--out", str(out)]
        )
    assert exit_.value.code == 2
    assert "--sweep period is given twice" in capsys.readouterr().err
    assert not out.exists()
