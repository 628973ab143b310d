"""train -> evaluate round trips, resume after an interruption, and compare, on tiny budgets.

The agents are the shipped files with smaller cells and rollouts (a few hundred steps each), so
that the whole module runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cfc_rl.envs import ConfigError
from cfc_rl.experiment import cli
from cfc_rl.experiment.callbacks import merge_progress
from cfc_rl.experiment.evaluate import evaluate_run
from cfc_rl.experiment.runs import RunError, RunFolder
from cfc_rl.experiment.train import Checkpoints, TrainingInterrupted, train

ROOT = Path(__file__).resolve().parent.parent

# Smaller versions of shipped agents: same algorithm, policy and cell, tiny sizes.
TINY = {
    "ppo_cfc": {
        "hyperparams": {"n_steps": 64, "batch_size": 64, "n_epochs": 2},
        "policy_kwargs": {"hidden_size": 8, "backbone_units": 16},
    },
    "ppo_gru": {
        "hyperparams": {"n_steps": 64, "batch_size": 64, "n_epochs": 2},
        "policy_kwargs": {"hidden_size": 8},
    },
    "ppo_mlp": {"hyperparams": {"n_steps": 64, "batch_size": 64, "n_epochs": 2}},
    "sac_cfc": {
        "hyperparams": {"learning_starts": 50, "batch_size": 32, "buffer_size": 1000},
        "features_extractor": {"hidden_size": 8, "backbone_units": 16},
        "wrappers": {"history": 4},
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_agent(folder: Path, name: str) -> Path:
    """The shipped agent ``name`` with the TINY changes, written to ``folder/name.yaml`` beside
    a copy of the shipped per-task settings."""
    if not (folder / "settings").exists():
        shutil.copytree(ROOT / "agents" / "settings", folder / "settings")
    data = yaml.safe_load((ROOT / "agents" / f"{name}.yaml").read_text())
    for key, value in TINY[name].items():
        data[key] = {**(data.get(key) or {}), **value}
    data.pop("overrides", None)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_task(folder: Path, task: str = "cartpole_p", n_envs: int = 2) -> Path:
    """The shipped task with a 256-step budget and short evaluations every 128 steps."""
    data = yaml.safe_load((ROOT / "envs" / f"{task}.yaml").read_text())
    data["train"] = {**data["train"], "total_timesteps": 256, "n_envs": n_envs}
    data["eval"] = {"episodes": 2, "every_steps": 128, "deterministic": True}
    path = folder / f"{task}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("agent", "task"),
    [("ppo_cfc", "cartpole_p"), ("ppo_mlp", "cartpole_p"), ("sac_cfc", "pendulum_p_irregular")],
)
def test_train_then_evaluate_round_trip(tmp_path: Path, capsys, agent: str, task: str) -> None:
    agent_file, task_file = tiny_agent(tmp_path, agent), tiny_task(tmp_path, task)
    out = tmp_path / "runs"
    argv = ["--agent", str(agent_file), "--task", str(task_file), "--out", str(out), "--seed", "3"]
    assert cli.main(["train", *argv, "--no-progress"]) == 0
    run = RunFolder(out / task / agent / "seed_3")
    assert str(run.root) in capsys.readouterr().out  # train tells where the run is

    for name in ("config.yaml", "model.zip", "vecnormalize.pkl", "progress.csv"):
        assert (run.root / name).stat().st_size > 0, name
    assert list(run.monitor.glob("*.monitor.csv"))
    assert list(run.tensorboard.glob("events.out.tfevents.*"))
    config = run.read_config()
    assert config["seed"] == 3
    assert config["agent"]["name"] == agent
    assert config["task"]["train"]["total_timesteps"] == 256
    assert config["versions"]["stable-baselines3"]
    # the machine its speed was measured on: CPU, cores, torch's threads (the CLI's --threads)
    assert config["machine"].endswith(f"{os.cpu_count()} cores, torch threads 1")
    result = run.read_result()
    assert result["num_timesteps"] >= 256
    assert result["eval_episodes"] == 2 and result["params"] > 0
    with (run.root / "evaluations.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["timesteps"]) for r in rows][:2] == [128, 256]
    with np.load(run.evaluations) as data:
        assert data["results"].shape == (len(rows), 2)
    assert not list(run.root.glob(".*"))  # no temporary files left

    final = (run.root / "evaluation_episodes.csv").read_text()
    assert cli.main(["evaluate", str(run.root), "--episodes", "3", "--json"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    evaluation = json.loads(line)
    assert evaluation["episodes"] == 3
    assert {"mean_return", "std_return", "mean_length"} <= set(evaluation)
    with (run.root / "evaluate_episodes.csv").open() as f:
        episodes = list(csv.DictReader(f))
    assert len(episodes) == 3
    assert (run.root / "evaluation_episodes.csv").read_text() == final  # training's, kept
    mean = np.mean([float(e["return"]) for e in episodes])
    assert mean == pytest.approx(evaluation["mean_return"])


def test_an_existing_run_needs_resume(tmp_path: Path) -> None:
    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    train(agent, task, out=tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(agent, task, out=tmp_path)
    # A complete run resumed to the same budget is left as it is, its config.yaml included.
    files = {p: p.read_bytes() for p in (tmp_path / "cartpole_p").rglob("*") if p.is_file()}
    run = train(agent, task, out=tmp_path, resume=True)
    assert run.read_result()["num_timesteps"] == 256
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == files


def _session_spy(monkeypatch) -> dict:
    """What a session starts from: torch's seed, the environments' next seeds, the replay
    buffer's transitions."""
    import cfc_rl.experiment.train as train_module

    seen: dict = {}
    real = train_module._session

    def spy(run, agent, task, seed, model, **kwargs):
        env = model.get_env()
        while hasattr(env, "venv"):
            env = env.venv
        seen["torch_seed"] = torch.initial_seed()
        seen["env_seeds"] = list(env._seeds)
        buffer = getattr(model, "replay_buffer", None)
        seen["transitions"] = buffer.size() * model.n_envs if buffer is not None else None
        return real(run, agent, task, seed, model, **kwargs)

    monkeypatch.setattr(train_module, "_session", spy)
    return seen


def test_a_resumed_session_draws_new_random_numbers(tmp_path: Path, monkeypatch) -> None:
    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    run = train(agent, task, out=tmp_path, seed=3)
    seen = _session_spy(monkeypatch)
    train(run_dir=run.root, resume=True, steps=512)
    # seeded as the environments are (seed + steps made), not with the first session's seed
    assert seen["torch_seed"] == 3 + 256
    assert seen["env_seeds"] == [3 + 256, 3 + 256 + 1]


def test_raising_an_off_policy_budget_keeps_the_replay_buffer(tmp_path: Path, monkeypatch) -> None:
    agent, task = tiny_agent(tmp_path, "sac_cfc"), tiny_task(tmp_path, "pendulum_p_irregular")
    run = train(agent, task, out=tmp_path)
    seen = _session_spy(monkeypatch)
    raised = train(run_dir=run.root, resume=True, steps=384).read_result()
    assert seen["transitions"] == 256 and raised["num_timesteps"] == 384


def test_a_crash_while_raising_a_budget_keeps_the_final_model(tmp_path: Path, monkeypatch) -> None:
    import cfc_rl.experiment.train as train_module

    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    run = train(agent, task, out=tmp_path)
    shutil.rmtree(run.checkpoints)  # as a run finished before final states were checkpointed

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(train_module, "_session", crash)
    with pytest.raises(RuntimeError):
        train(run_dir=run.root, resume=True, steps=512)
    assert run.read_result() is None
    saved = run.read_checkpoint()
    assert saved["steps"] == 256 and (run.checkpoints / saved["model"]).exists()
    monkeypatch.undo()
    assert train(run_dir=run.root, resume=True, steps=512).read_result()["num_timesteps"] == 512


def test_a_budget_is_raised_timing_all_steps_and_never_lowered(tmp_path: Path) -> None:
    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    run = train(agent, task, out=tmp_path)
    first = run.read_result()
    assert first["timed_steps"] == first["num_timesteps"] == 256
    files = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"--steps 128: .* has trained 256 steps already"):
        train(run_dir=run.root, resume=True, steps=128)
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == files
    raised = train(run_dir=run.root, resume=True, steps=512).read_result()
    assert raised["num_timesteps"] == raised["timed_steps"] == 512
    assert raised["training_s"] > first["training_s"]
    assert raised["steps_per_s"] == pytest.approx(512 / raised["training_s"])


def test_ctrl_c_before_a_resumed_session_trains_keeps_its_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    from stable_baselines3.common.base_class import BaseAlgorithm

    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    run = train(agent, task, out=tmp_path)
    trained_s = run.read_result()["training_s"]

    def ctrl_c(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BaseAlgorithm, "_setup_learn", ctrl_c)
    with pytest.raises(TrainingInterrupted, match="interrupted at 256 of 512 steps"):
        train(run_dir=run.root, resume=True, steps=512)
    saved = run.read_checkpoint()
    assert saved["steps"] == 256 and (run.checkpoints / saved["model"]).exists()
    assert saved["training_s"] == trained_s


@pytest.mark.parametrize("agent", ["ppo_gru", "sac_cfc"])
def test_resume_after_an_interruption_reaches_the_same_step_count(
    tmp_path: Path, monkeypatch, capsys, agent: str
) -> None:
    task_name = "cartpole_p" if agent.startswith("ppo") else "pendulum_p_irregular"
    agent_file, task_file = tiny_agent(tmp_path, agent), tiny_task(tmp_path, task_name)
    budget = 300  # not a whole number of PPO rollouts (2 envs x 64 steps): PPO ends at 384
    reference = train(agent_file, task_file, steps=budget, run_dir=tmp_path / "reference")
    expected = reference.read_result()["num_timesteps"]

    # Ctrl-C in the middle of the second half of training.
    original = Checkpoints._on_step

    def interrupt(self) -> bool:
        if self.num_timesteps >= 200:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Checkpoints, "_on_step", interrupt)
    monkeypatch.setattr("cfc_rl.experiment.train.CHECKPOINTS_PER_RUN", 1)  # only the Ctrl-C one
    run_dir = tmp_path / "interrupted"
    argv = ["--agent", str(agent_file), "--task", str(task_file), "--steps", str(budget)]
    assert cli.main(["train", *argv, "--run-dir", str(run_dir), "--no-progress"]) == 130
    assert "--resume" in capsys.readouterr().err
    run = RunFolder(run_dir)
    assert run.read_result() is None and not run.model.exists()
    saved = run.read_checkpoint()
    assert 0 < saved["steps"] < budget
    assert (run.checkpoints / saved["model"]).exists()

    monkeypatch.setattr(Checkpoints, "_on_step", original)
    assert cli.main(["train", "--resume", "--run-dir", str(run_dir), "--no-progress"]) == 0
    result = run.read_result()
    assert result["num_timesteps"] == expected
    assert result["total_timesteps"] == budget
    # steps/s is timed over both sessions: the checkpoint carried the first one's training time
    assert 0 < saved["training_s"] < result["training_s"]
    assert result["timed_steps"] == result["num_timesteps"]
    assert result["steps_per_s"] == pytest.approx(result["num_timesteps"] / result["training_s"])
    with np.load(run.evaluations) as data:
        timesteps = data["timesteps"].tolist()
    with np.load(reference.evaluations) as data:
        assert timesteps == data["timesteps"].tolist()  # same evaluation points, no repeats
    # One progress.csv: the resumed session's rows appended, the redone steps not twice; every
    # row, evaluations included, has its step count.
    assert not list(run.root.glob("progress.resumed*"))
    with (run.root / "progress.csv").open() as f:
        logged = [int(float(r["time/total_timesteps"])) for r in csv.DictReader(f)]
    assert logged == sorted(logged) and logged[-1] > saved["steps"]


def test_the_log_of_two_sessions_that_died_holds_each_step_once(tmp_path: Path) -> None:
    def write(name: str, steps: list[int]) -> None:
        lines = ["time/total_timesteps,train/loss", *(f"{n},{n / 1000}" for n in steps)]
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    # The first session logged to step 500 and died; its last checkpoint was at 300. The second
    # resumed at 300, logged to 600 and died too, with a checkpoint at 450.
    write("progress.csv", [100, 200, 300, 400, 500])
    write("progress.resumed_300.csv", [400, 500, 600])
    merge_progress(RunFolder(tmp_path), until=450)  # the third session resumes at 450
    with (tmp_path / "progress.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["time/total_timesteps"]) for r in rows] == [100, 200, 300, 400]
    assert rows[-1]["train/loss"] == "0.4"  # the second session's row, which training kept
    assert not (tmp_path / "progress.resumed_300.csv").exists()


def test_sac_on_discrete_actions_says_why(tmp_path: Path) -> None:
    agent = tmp_path / "sac_mlp.yaml"
    agent.write_text((ROOT / "agents" / "sac_mlp.yaml").read_text())
    with pytest.raises(ValueError, match="needs continuous actions"):
        train(agent, tiny_task(tmp_path), out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # checked before any folder is made


@pytest.mark.skipif(
    not (importlib.util.find_spec("pygame") and importlib.util.find_spec("imageio_ffmpeg")),
    reason="video needs the [video] extra (pygame, imageio-ffmpeg)",
)
def test_evaluate_records_a_video(tmp_path: Path, capsys) -> None:
    run = train(tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path), out=tmp_path)
    assert cli.main(["evaluate", str(run.root), "--episodes", "1", "--video"]) == 0
    video = run.root / "video.mp4"
    assert video.stat().st_size > 1000
    assert video.read_bytes()[4:8] == b"ftyp"  # an MP4 container
    assert f"video: {video}" in capsys.readouterr().out


def test_compare_summarises_and_skips_finished_runs(tmp_path: Path, capsys) -> None:
    agents = [str(tiny_agent(tmp_path, "ppo_mlp")), str(tiny_agent(tmp_path, "ppo_gru"))]
    task = str(tiny_task(tmp_path))
    out = tmp_path / "compare"
    argv = ["--agents", *agents, "--tasks", task, "--seeds", "2", "--out", str(out)]
    assert cli.main(["compare", *argv, "-j", "2"]) == 0
    first = capsys.readouterr().out
    assert first.count("done ") == 4

    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["task"], r["agent"]) for r in rows} == {
        ("cartpole_p", "ppo_mlp"),
        ("cartpole_p", "ppo_gru"),
    }
    for r in rows:
        assert r["seeds"] == "2"
        assert float(r["iqm_ci_low"]) <= float(r["iqm"]) <= float(r["iqm_ci_high"])
        assert float(r["mean_ci_low"]) <= float(r["mean"]) <= float(r["mean_ci_high"])
        assert float(r["steps_per_s"]) > 0 and int(r["params"]) > 0
    markdown = (out / "summary.md").read_text()
    assert "| ppo_gru | 2 |" in markdown and "95%" in markdown
    assert (out / "curves_cartpole_p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = sorted(out.glob("*/*/seed_*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    assert cli.main(["compare", *argv, "-j", "1"]) == 0
    second = capsys.readouterr().out
    assert second.count("skipped") == 4 and "done " not in second
    assert [p.stat().st_mtime_ns for p in results] == stamps


def test_interrupted_training_raises_with_a_resume_hint(tmp_path: Path, monkeypatch) -> None:
    def interrupt(self) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(Checkpoints, "_on_step", interrupt)
    with pytest.raises(TrainingInterrupted, match="cfc-rl train --resume --run-dir"):
        train(tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path), out=tmp_path)


def test_same_config_and_seed_give_the_same_numbers(tmp_path: Path) -> None:
    agent, task = tiny_agent(tmp_path, "ppo_cfc"), tiny_task(tmp_path)
    first = train(agent, task, seed=5, run_dir=tmp_path / "a").read_result()
    second = train(agent, task, seed=5, run_dir=tmp_path / "b").read_result()
    assert first["final_mean_return"] == second["final_mean_return"]
    assert (tmp_path / "a" / "evaluations.csv").read_text() == (
        tmp_path / "b" / "evaluations.csv"
    ).read_text()


def test_cli_reports_a_bad_agent_file_without_a_traceback(tmp_path: Path, capsys) -> None:
    agent = tmp_path / "broken.yaml"
    agent.write_text("algo: ppo\npolicy: MlpPolicy\nhyperparams: {n_stepz: 8}\n")
    argv = ["train", "--agent", str(agent), "--task", str(tiny_task(tmp_path))]
    assert cli.main(argv) == 2
    assert f"error: {agent}: unknown key hyperparams.n_stepz" in capsys.readouterr().err


def test_damaged_run_files_are_named_in_the_error(tmp_path: Path, capsys) -> None:
    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    run = train(agent, task, run_dir=tmp_path / "run")
    good_model = run.model.read_bytes()

    run.model.write_bytes(good_model[:300])  # a truncated zip
    assert cli.main(["evaluate", str(run.root)]) == 2
    assert f"{run.model} is damaged" in capsys.readouterr().err
    # with --video, a damaged model is still reported as damaged, not as a rendering problem
    assert cli.main(["evaluate", str(run.root), "--video"]) == 2
    err = capsys.readouterr().err
    assert f"{run.model} is damaged" in err and "render" not in err
    run.model.write_bytes(good_model)
    run.vecnormalize.write_bytes(b"not a pickle")
    with pytest.raises(RunError, match=r"vecnormalize\.pkl is damaged"):
        evaluate_run(run.root)
    with pytest.raises(RunError, match=r"is not a run folder: it has no config\.yaml"):
        evaluate_run(tmp_path)
    run.config.write_text("algo: [unclosed\n")
    with pytest.raises(RunError, match=r"config\.yaml is damaged"):
        evaluate_run(run.root)


def test_ctrl_c_during_an_update_saves_the_model_as_its_rollout_began(
    tmp_path: Path, monkeypatch
) -> None:
    import pickle

    from sb3_contrib import RecurrentPPO

    agent, task = tiny_agent(tmp_path, "ppo_gru"), tiny_task(tmp_path)
    agent.write_text(agent.read_text() + "normalize: true\n")
    began = {}
    real_start, real_train = Checkpoints._on_rollout_start, RecurrentPPO.train

    def rollout_start(self) -> None:
        real_start(self)
        if self.num_timesteps == 128:  # the second rollout: 2 envs x 64 steps made
            began["policy"] = {k: v.clone() for k, v in self.model.policy.state_dict().items()}
            began["count"] = self.model.get_vec_normalize_env().obs_rms.count

    def half_an_update(self) -> None:
        real_train(self)  # the parameters move ...
        if self.num_timesteps == 256:
            raise KeyboardInterrupt  # ... and Ctrl-C comes before the update is over

    monkeypatch.setattr(Checkpoints, "_on_rollout_start", rollout_start)
    monkeypatch.setattr(RecurrentPPO, "train", half_an_update)
    with pytest.raises(TrainingInterrupted, match="interrupted at 128 of 512 steps"):
        train(agent, task, steps=512, run_dir=tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    saved = run.read_checkpoint()
    model = RecurrentPPO.load(run.checkpoints / saved["model"])
    for key, value in model.policy.state_dict().items():
        torch.testing.assert_close(value, began["policy"][key], rtol=0, atol=0)
    with (run.checkpoints / saved["vecnormalize"]).open("rb") as f:
        assert pickle.load(f).obs_rms.count == began["count"]


def test_resuming_from_a_damaged_checkpoint_names_it(tmp_path: Path, monkeypatch) -> None:
    agent, task = tiny_agent(tmp_path, "ppo_mlp"), tiny_task(tmp_path)
    monkeypatch.setattr(
        Checkpoints,
        "_on_step",
        lambda self: (
            (_ for _ in ()).throw(KeyboardInterrupt) if self.num_timesteps >= 128 else True
        ),
    )
    with pytest.raises(TrainingInterrupted):
        train(agent, task, steps=512, run_dir=tmp_path / "run")
    run = RunFolder(tmp_path / "run")
    checkpoint = run.checkpoints / run.read_checkpoint()["model"]
    checkpoint.write_bytes(b"\0" * 64)
    monkeypatch.undo()
    with pytest.raises(RunError, match=re.escape(f"{checkpoint} is damaged")):
        train(run_dir=run.root, resume=True)
