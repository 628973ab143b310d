"""The command line and the run folders under bad input and interruptions: one-line errors,
nothing left behind that blocks a corrected rerun, no silent fallback, records that can be
reproduced, and Ctrl-C on a parallel comparison."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cfc_rl.envs import ConfigError
from cfc_rl.experiment import cli
from cfc_rl.experiment.evaluate import evaluate_run
from cfc_rl.experiment.runs import RunError, RunFolder
from cfc_rl.experiment.train import build_model, final_step_count, resolve, train

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _files(folder: Path, agent: str = "algo: ppo\npolicy: MlpPolicy\n", steps: int = 256):
    """An agent file beside a copy of the settings, and a small CartPole task."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "settings").exists():
        shutil.copytree(ROOT / "agents" / "settings", folder / "settings")
    agent_file = folder / "agent.yaml"
    agent_file.write_text(agent + "hyperparams: {n_steps: 64, batch_size: 64, n_epochs: 1}\n")
    data = yaml.safe_load((ROOT / "envs" / "cartpole_p.yaml").read_text())
    data["train"] = {**data["train"], "total_timesteps": steps, "n_envs": 2}
    data["eval"] = {"episodes": 2, "every_steps": 128, "deterministic": True}
    task_file = folder / "cartpole_p.yaml"
    task_file.write_text(yaml.safe_dump(data))
    return agent_file, task_file


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_typo_in_a_cell_setting_is_one_line_and_makes_no_folder(tmp_path: Path, capsys) -> None:
    agent, task = _files(tmp_path, "algo: recurrent_ppo\npolicy: RecurrentCellPolicy\n"
                         "policy_kwargs: {cell: cfc, backbone_unitz: 32}\n")  # fmt: skip
    out = tmp_path / "runs"
    assert cli.main(["train", "--agent", str(agent), "--task", str(task), "--out", str(out)]) == 2
    assert "unknown key policy_kwargs.backbone_unitz" in _one_line_error(capsys)
    assert not out.exists()


def test_sac_on_discrete_actions_is_one_line(tmp_path: Path, capsys) -> None:
    _, task = _files(tmp_path)
    argv = ["train", "--agent", str(ROOT / "agents" / "sac_mlp.yaml"), "--task", str(task)]
    assert cli.main([*argv, "--out", str(tmp_path / "runs")]) == 2
    assert "needs continuous actions" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_training_leaves_nothing_behind(tmp_path: Path) -> None:
    agent, task = _files(tmp_path)
    bad = {"hyperparams": {"batch_size": 1}}  # PPO refuses it in its constructor
    with pytest.raises(AssertionError):
        train(agent, task, out=tmp_path / "runs", overrides=bad)
    assert not (tmp_path / "runs" / "cartpole_p" / "agent" / "seed_0").exists()
    # the corrected command runs, without --resume and without deleting anything by hand
    run = train(agent, task, out=tmp_path / "runs")
    assert run.read_result()["num_timesteps"] == 256
    # a folder of the user's is never removed, only what training wrote into it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(AssertionError):
        train(agent, task, run_dir=mine, overrides=bad)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--agent", "a.yaml", "--task", "t.yaml", "--seed", "-1"], "--seed: must be"),
        (["train", "--agent", "a.yaml", "--task", "t.yaml", "--steps", "0"], "--steps: must be"),
        (["train", "--agent", "a.yaml", "--task", "t.yaml", "--threads", "0"], "--threads"),
        (["evaluate", "run", "--episodes", "0"], "--episodes: must be at least 1"),
        (["evaluate", "run", "--episodes", "-3"], "--episodes: must be at least 1"),
        (["compare", "--agents", "a", "--tasks", "t", "-j", "0"], "-j/--jobs: must be"),
        (
            ["tune", "--agent", "a", "--task", "t", "--space", "s", "--trials", "0"],
            "--trials: must",
        ),
        (["tune", "--agent", "a", "--task", "t", "--space", "s", "--seeds", "x"], "--seeds: expe"),
        (["tune", "--agent", "a", "--task", "t", "--space", "s", "--steps", "-5"], "--steps: must"),
        (["train", "--agent", "a", "--task", "t", "--set", "n_envs"], "expected KEY=VALUE"),
    ],
)
def test_bad_numbers_on_the_command_line_name_the_option(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_an_error_not_a_quiet_cpu_run(tmp_path: Path, capsys) -> None:
    agent, task = _files(tmp_path)
    argv = ["--agent", str(agent), "--task", str(task), "--out", str(tmp_path / "runs")]
    assert cli.main(["train", *argv, "--device", "cuda"]) == 2
    assert "CUDA is not available" in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_version_and_list(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("cfc-rl ")
    os.chdir(ROOT)
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for text in ("cfc_rl/HalfCheetah-P-v5", "envs/cartpole_p.yaml", "agents/ppo_cfc.yaml"):
        assert text in out


def test_set_changes_a_setting_validated_like_the_files(tmp_path: Path, capsys) -> None:
    agent, task = _files(tmp_path)
    base = ["train", "--agent", str(agent), "--task", str(task), "--no-progress"]
    out = ["--out", str(tmp_path / "runs")]
    assert cli.main([*base, *out, "--set", "hyperparams.n_stepz=3"]) == 2
    assert "--set: unknown key hyperparams.n_stepz" in _one_line_error(capsys)
    sets = [
        "--set",
        "hyperparams.gamma=0.9",
        "--set",
        "n_envs=1",
        "--set",
        "hyperparams.n_steps=32",
    ]
    assert cli.main([*base, *out, *sets]) == 0
    config = RunFolder(tmp_path / "runs" / "cartpole_p" / "agent" / "seed_0").read_config()
    assert config["agent"]["hyperparams"]["gamma"] == 0.9
    assert config["agent"]["hyperparams"]["n_steps"] == 32
    assert config["task"]["train"]["n_envs"] == 1


def test_resume_with_another_agent_is_refused(tmp_path: Path) -> None:
    agent, task = _files(tmp_path)
    run = train(agent, task, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"hyperparams differs from the agent given"):
        train(agent, task, run_dir=run.root, resume=True, overrides={"hyperparams": {"gamma": 0.5}})
    # the same agent and task: fine, even to a larger budget
    assert (
        train(agent, task, run_dir=run.root, resume=True, steps=384).read_result()["num_timesteps"]
        == 384
    )


def test_result_json_is_reproduced_by_evaluate_and_the_best_model_is_kept(
    tmp_path: Path, capsys
) -> None:
    agent, task = _files(tmp_path, steps=384)
    run = train(agent, task, run_dir=tmp_path / "run")
    result = run.read_result()
    assert result["eval_seed"] == 10_000 and result["eval_deterministic"] is True
    assert cli.main(["evaluate", str(run.root), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["mean_return"] == result["final_mean_return"]  # exactly, by default
    best = json.loads(run.best_record.read_text())
    assert run.best_model.exists() and best["steps"] in (128, 256, 384)
    assert evaluate_run(run.root, model="best", episodes=2)["model"] == "best"
    checkpoint = run.checkpoints / run.read_checkpoint()["model"]
    assert evaluate_run(run.root, model=str(checkpoint), episodes=2)["episodes"] == 2
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate_run(run.root, model=str(tmp_path / "nope.zip"))


def test_every_truncation_of_a_model_is_reported_as_damaged(tmp_path: Path) -> None:
    agent, task = _files(tmp_path)
    run = train(agent, task, run_dir=tmp_path / "run")
    good = run.model.read_bytes()
    for size in range(0, len(good), max(1, len(good) // 40)):
        run.model.write_bytes(good[:size])
        with pytest.raises(RunError, match="is damaged"):
            evaluate_run(run.root, episodes=1)


def test_the_run_s_own_step_count_bounds_its_progress_bar(tmp_path: Path) -> None:
    agent, task = _files(tmp_path)
    agent_cfg, task_cfg = resolve(agent, task)
    from cfc_rl.experiment.environments import make_env

    env = make_env(task_cfg, agent_cfg, n_envs=2, seed=0)
    model = build_model(agent_cfg, env, seed=0, device="cpu")
    assert final_step_count(model, 10) == 128  # one whole rollout of 64 steps x 2 envs
    assert final_step_count(model, 256) == 256 and final_step_count(model, 257) == 384
    env.close()
    run = train(agent, task, steps=10, run_dir=tmp_path / "run", progress_bar=True)
    assert run.read_result()["num_timesteps"] == 128


def test_sac_s_replay_buffer_is_sized_to_the_budget(tmp_path: Path) -> None:
    agent_cfg, task_cfg = resolve(
        ROOT / "agents" / "sac_mlp.yaml", ROOT / "envs" / "pendulum_p.yaml"
    )
    from cfc_rl.experiment.environments import make_env

    env = make_env(task_cfg, agent_cfg, n_envs=1, seed=0)
    model = build_model(agent_cfg, env, seed=0, device="cpu", budget=400)
    assert model.replay_buffer.buffer_size == 400
    explicit = agent_cfg.with_values({"hyperparams": {"buffer_size": 1000}}, "test")
    assert build_model(explicit, env, seed=0, device="cpu", budget=400).buffer_size == 1000
    env.close()


def test_compare_keeps_budgets_apart_and_plots_only_what_evaluated(tmp_path: Path, capsys) -> None:
    agent, task = _files(tmp_path)
    data = yaml.safe_load(task.read_text())
    data["eval"]["every_steps"] = 10_000  # beyond the budgets: no run evaluates, no curve
    task.write_text(yaml.safe_dump(data))
    out = str(tmp_path / "out")
    argv = ["compare", "--agents", str(agent), "--tasks", str(task), "--seeds", "1", "--out", out]
    assert cli.main([*argv, "--steps", "64"]) == 0
    assert not (tmp_path / "out" / "curves_cartpole_p.png").exists()
    assert "curves_<task>" not in capsys.readouterr().out
    assert cli.main([*argv, "--steps", "256", "--out", str(tmp_path / "out2")]) == 0
    for path in (tmp_path / "out2" / "cartpole_p").iterdir():  # move into the first comparison
        shutil.copytree(path / "seed_0", tmp_path / "out" / "cartpole_p" / "agent" / "seed_1")
    assert cli.main([*argv, "--steps", "64"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "### cartpole_p (64 steps)" in summary and "### cartpole_p (256 steps)" in summary


def test_ctrl_c_on_a_parallel_comparison_is_one_line_and_resumes(tmp_path: Path) -> None:
    agent, task = _files(tmp_path, "algo: recurrent_ppo\npolicy: RecurrentCellPolicy\n"
                         "policy_kwargs: {cell: gru, hidden_size: 8}\n", steps=3000)  # fmt: skip
    out = tmp_path / "out"
    # four runs, two at a time: the pool has already handed the next ones to its workers
    command = [sys.executable, "-m", "cfc_rl.experiment.cli", "compare", "--agents", str(agent),
               "--tasks", str(task), "--seeds", "4", "-j", "2", "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    checkpoints = [out / "cartpole_p" / "agent" / f"seed_{s}" / "checkpoints" for s in (0, 1)]
    deadline = time.monotonic() + 240
    while not all((c / "latest.json").exists() for c in checkpoints):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to the whole group
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    assert "interrupted: 0 of 4 runs to train finished, 2 saved a checkpoint" in err
    assert "continue with: cfc-rl compare" in err
    # the runs not begun at Ctrl-C are not begun after it either
    assert not (out / "cartpole_p" / "agent" / "seed_2").exists()
    assert not (out / "cartpole_p" / "agent" / "seed_3").exists()
    saved = [json.loads((c / "latest.json").read_text())["steps"] for c in checkpoints]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for seed in range(4):
        result = RunFolder(out / "cartpole_p" / "agent" / f"seed_{seed}").read_result()
        assert result["num_timesteps"] == 3072  # where an uninterrupted run ends
    assert min(saved) < 3072
